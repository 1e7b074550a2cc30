"""The study job: how busy its workers are, and two models run concurrently against one after another.

Two measurements, each the real study (:func:`conva.jobs.study.run_study`: per model one pool of model workers
serving extract, fit, steer, evaluate, utility and agreement, then the outputs rebuilt by a Ray task)
into a fresh output folder, in one process on one local Ray started (with its first worker process) before
the timed runs, as a study submitted to a cluster finds Ray running:

* ``busy`` (``benchmarks/results/study.json``): the demo study (``examples/demo_study.toml``: SmolLM2
  and Gemma 3 270M, five values, four methods, 2 workers per model, so on 2 CPUs one model after the
  other). Its busy fraction is the fraction of the study's wall time (from
  the call to its return: pre-flight, Ray, workers' start, every stage, the outputs) during which every
  worker was busy loading its model or running a shard, from the pools' actor-side intervals
  (``job.extra["busy"]``). Per stage: shards, span and worker seconds from the commit logs.
* ``models`` (``benchmarks/results/models.json``): a two-model study, both ways on the same 2 CPUs.
  *Concurrent*: each model gets 1 worker (``study.models = [{name, ray = {num_workers = 1}}, …]``), so
  both pools fit at once and run side by side. *One after another*: each model gets 2 workers, so the
  second pool only fits once the first is done (the study admits models in order while they fit the
  cluster). Same cells, same work; the wall times are compared. The two models are SmolLM2 and a second
  name for the same weights (a link to its folder), so both sides' work is identical. The overlap of the
  two models' busy windows shows which way they ran.

    python -m benchmarks.bench_study busy [--key=value ...]
    python -m benchmarks.bench_study models [--key=value ...]

Overrides (``--section.key=value``) apply to the study config of every run, e.g. a smaller study for a
quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import (
    CACHE,
    RESULTS,
    job_stages,
    machine,
    measure_job,
    run_study_planned,
    stage_figures,
    warm_ray,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_study.toml"
# The two-model comparison runs a smaller study than the demo (both ways it runs the models' work twice).
MODELS_DEFAULT = ['--data.values=["power", "benevolence", "achievement", "universalism"]']


def run_study_measured(overrides: list[str], out: Path) -> dict:
    """The study with ``overrides`` into ``out``: wall time, busy figures and each model's stages."""
    from conva.batch.study import load_study

    study, planned = load_study(DEMO, [*overrides, f"--output.dir={out}"]), []
    job = measure_job(lambda: run_study_planned(study, planned), planned)
    stages = {}
    for model in planned:
        for name, stage in job_stages(model).items():
            s = stage_figures(stage)
            s["first_start"], s["last_end"] = (
                round(s["first_start"] - job["start"], 2),
                round(s["last_end"] - job["start"], 2),
            )
            stages[f"{model.label}/{name}"] = s
    last = max(s["last_end"] for s in stages.values())
    return {
        **{k: v for k, v in job.items() if k not in ("start", "end")},
        "stages": stages,
        "after_last_shard_s": round(job["wall_s"] - last, 2),
    }


def busy(overrides: list[str]) -> dict:
    """The demo study (with ``overrides``): its wall time and how busy its workers were."""
    out = Path(tempfile.mkdtemp(prefix="study-", dir=CACHE))
    try:
        run = run_study_measured(overrides, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"config": str(DEMO.relative_to(REPO)), "overrides": overrides, **run}


def second_name() -> str:
    """A second model spec for SmolLM2's weights: a link to its converted folder under another name."""
    from conva.models import resolve_model

    link = CACHE / "SmolLM2-again"
    if not link.exists():
        link.symlink_to(resolve_model("smollm2"), target_is_directory=True)
    return str(link)


def _models(workers: int) -> str:
    """The ``study.models`` override: SmolLM2 under two names, each with ``workers`` workers."""
    specs = ("smollm2", second_name())
    body = ", ".join(f"{{name = {json.dumps(spec)}, ray = {{num_workers = {workers}}}}}" for spec in specs)
    return f"--study.models=[{body}]"


def models(overrides: list[str]) -> dict:
    """A two-model study run concurrently (1 worker each) and one after another (2 workers each)."""
    runs = {}
    for way, workers in (("concurrent", 1), ("sequential", 2)):
        out = Path(tempfile.mkdtemp(prefix=f"models-{way}-", dir=CACHE))
        try:
            runs[way] = {
                "workers_per_model": workers,
                **run_study_measured([*overrides, _models(workers)], out),
            }
        finally:
            shutil.rmtree(out, ignore_errors=True)
        # The share of the cluster's worker slots (one per CPU) kept busy: sequential pools have 4 workers in
        # all but only 2 at a time, so "every worker busy" would say nothing there.
        run = runs[way]
        run["slots_busy"] = round(sum(run["busy"]["per_worker"].values()) / (os.cpu_count() or 1), 3)
        windows = [(m["first_busy_s"], m["last_busy_s"]) for m in runs[way]["models"].values()]
        (a0, a1), (b0, b1) = windows
        runs[way]["models_overlap_s"] = round(max(0.0, min(a1, b1) - max(a0, b0)), 2)
    return {
        "config": str(DEMO.relative_to(REPO)),
        "overrides": overrides,
        "runs": runs,
        "sequential_over_concurrent": round(runs["sequential"]["wall_s"] / runs["concurrent"]["wall_s"], 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("busy", "models"))
    args, overrides = ap.parse_known_args(argv)
    from conva.jobs.common import setup_logging

    setup_logging()
    CACHE.mkdir(parents=True, exist_ok=True)
    report: dict = {
        **machine(),
        "benchmark": "study" if args.what == "busy" else "models",
        "ray_start_s": warm_ray(),
    }  # before the timed runs: a study on a cluster finds Ray running
    if args.what == "busy":
        report.update(busy(overrides))
        write_result(RESULTS / "study.json", report)
    else:
        report.update(models([*MODELS_DEFAULT, *overrides]))
        write_result(RESULTS / "models.json", report)
    return report


if __name__ == "__main__":
    main()
