"""Scale-out: the ``run`` job with 1 and with 2 workers, its whole-job efficiency and how busy the workers were.

The real job (:func:`conva.jobs.runner.run_job` ``"run"``: pre-flight, one pool of model workers that loads
SmolLM2 once per worker and serves extract, fit and steer, commits of records) on the project's demo
data, each worker one actor of one CPU (one torch thread), into a fresh output folder per run, both runs
in one process on one local Ray, started (and its first worker process) before either run, as a job on a
cluster finds Ray running. Per run:

* ``wall_s``: the whole job, from the call to its return; the whole-job efficiency with 2 workers is
  ``wall(1) / (2 × wall(2))`` (the same work both ways);
* per stage, from the commit log (actor-side times of each shard): rows, span (first shard start to last
  shard end) and worker seconds; a stage's efficiency is its rows per second of span, per worker, against
  one worker's;
* ``busy``: the fraction of the job's wall time during which every worker was busy (loading its model or
  running a shard), from the pool's actor-side intervals (``job.extra["busy"]``), and each worker's own;
* the serial components the scaling model in ``RESULTS.md`` uses: time to the first busy worker, model
  load, and the time no worker was busy;
* ``shard_slowdown`` and ``at_equal_shard_speed`` (see :func:`efficiency`): on a machine shared with other
  work the two runs' shards do not run equally fast, and these separate that from the scheduling.

On a 2-core machine two workers use both cores and the driver and Ray share them: this measures the
sharding, the scheduling and the driver's overhead, not a cluster's network.

    python -m benchmarks.bench_scaleout [--workers 1 2] [--values power benevolence ...] [--prompts 8]

Writes ``benchmarks/results/scaleout.json``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import (
    CACHE,
    RESULTS,
    job_stages,
    machine,
    measure_job,
    run_job_planned,
    stage_figures,
    warm_ray,
    write_result,
)

OUT = RESULTS / "scaleout.json"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VALUES = ["power", "benevolence", "achievement", "universalism"]
EXTRACT_SHARD, STEER_SHARD = 32, 8


def run_config(workers: int, values: list[str], prompts: int, out: Path, model: str = "smollm2"):
    """The ``run`` job on ``workers`` workers: extraction shards of 32 texts (little per-call overhead),
    steering shards of one batch (8 prompts, so a few dozen prompts keep both workers busy)."""
    from conva.batch.config import load_config

    return load_config(
        REPO / "examples" / "demo.toml",
        [
            f"--model.name={model}",
            f"--ray.num_workers={workers}",
            "--ray.num_cpus_per_worker=1",
            f"--output.dir={out}",
            f"--data.values={values!r}".replace("'", '"'),
            f"--data.max_prompts_per_value={prompts}",
            "--steer.batch_size=8",
            f"--ray.rows_per_shard={EXTRACT_SHARD}",
            f"--ray.steer_rows_per_shard={STEER_SHARD}",
        ],
    )


def one_run(workers: int, values: list[str], prompts: int, out: Path, model: str = "smollm2") -> dict:

    cfg, planned = run_config(workers, values, prompts, out, model), []
    job = measure_job(lambda: run_job_planned("run", cfg, planned), planned)
    stages = {name: stage_figures(stage) for name, stage in job_stages(planned[0]).items()}
    for name, s in stages.items():
        for key in ("first_start", "last_end"):
            s[key] = round(s[key] - job["start"], 2)  # seconds into the job
    stages["extract"]["texts_per_s"] = round(
        stages["extract"]["rows"] / len(_layers(planned[0])) / stages["extract"]["span_s"], 2
    )
    stages["steer"]["rows_per_s"] = round(stages["steer"]["rows"] / stages["steer"]["span_s"], 3)
    return {
        "workers": workers,
        **{k: v for k, v in job.items() if k not in ("start", "end")},
        "stages": stages,
    }


def _layers(job) -> list[int]:
    from conva.batch.extraction import activation_model

    return activation_model(r.extra["model"] for r in job_stages(job)["extract"].records())[1]


def efficiency(base: dict, run: dict) -> dict:
    """Per worker, against ``base``: the whole job (wall) and each sharded stage (rows per second of span).

    ``shard_slowdown``: how much longer the same shards took on the workers (their summed durations, this run
    over ``base``); above 1 the workers got less CPU each (on this machine: each other, the driver, other
    jobs). ``at_equal_shard_speed``: the workers' mean busy fraction over ``base``'s, i.e. the whole-job
    efficiency the scheduling allows had every shard run as fast as in ``base`` (``job_wall × shard_slowdown``
    up to the model loads).
    """
    k = run["workers"] / base["workers"]

    def rate(r, s):
        return r["stages"][s]["rows"] / r["stages"][s]["span_s"]

    def work(r):
        return sum(s["worker_s"] for s in r["stages"].values())

    return {
        "job_wall": round(base["wall_s"] / run["wall_s"] / k, 3),
        **{s: round(rate(run, s) / k / rate(base, s), 3) for s in ("extract", "fit", "steer")},
        "shard_slowdown": round(work(run) / work(base), 3),
        "at_equal_shard_speed": round(run["busy"]["mean"] / base["busy"]["mean"], 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--values", nargs="+", default=DEFAULT_VALUES)
    ap.add_argument(
        "--prompts", type=int, default=8, help="steering prompts per value (4 values × 8: 4 shards)"
    )
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args(argv)
    from conva.jobs.common import setup_logging

    setup_logging()
    report: dict = {
        **machine(),
        "benchmark": "scaleout",
        "model": args.model,
        "values": args.values,
        "prompts_per_value": args.prompts,
        "rows_per_shard": {"extract": EXTRACT_SHARD, "steer": STEER_SHARD},
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    report["ray_start_s"] = warm_ray()  # not part of either run: a cluster job finds Ray running
    work = Path(tempfile.mkdtemp(prefix="scaleout-", dir=CACHE))
    try:
        runs = [one_run(n, args.values, args.prompts, work / f"w{n}", args.model) for n in args.workers]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["runs"] = runs
    report["efficiency"] = {str(r["workers"]): efficiency(runs[0], r) for r in runs[1:]}
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
