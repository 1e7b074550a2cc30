"""`python -m jobs.study --config FILE [--section.key=value ...] [--overwrite] [--validate]`: a whole study, one Ray job.

Per model, one pool of model workers runs every stage on the same runner as the run job
(:func:`jobs.runner.run_model`), loading the model once per worker: extraction and fit
(``<out>/models/<slug>/{activations,bundles}``), then

* ``study_generations``: every cell's prompts in one steering table (per-row overrides);
* ``study_judged``: the judge's verdict and the answer's perplexity per generation, shard ``i`` as soon
  as generation shard ``i`` is committed;
* ``study_utility``: multiple-choice answers with each cell's steering and gate active;
* ``study_judge``: the judge's agreement on held-out labelled pairs.

**Models run at the same time** when the cluster has room for their workers (each model's ``ray``
section sizes its own pool: ``study.models`` may give a model its own ``model``/``ray``/``vllm``/
``steer``/``extract`` settings), and queue, in order, when it does not. Then a Ray task next to the
data rebuilds ``<out>/{results,summary,utility,probes,judges}.parquet`` and ``<out>/report/`` from the
committed stages. A rerun skips every committed shard; a changed config is refused naming the keys
(``--overwrite`` replaces once the new run is complete). ``--validate`` checks and starts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq

from conva.lease import OutputLease
from conva.mc import demo_mc, load_mc, mc_prompts
from conva.models import ModelNotFoundError, check_model, model_name
from conva.storage import Location
from conva.study import (StudyConfig, expand_cells, load_study, model_config, model_spec, steering_table, study_dict,
                         utility_cells, utility_table)
from jobs.common import JobError, connect_ray, log_context, output_location, run_log, setup_logging
from jobs.preflight import ModelJob, generated, plan_job
from jobs.runner import FAILURES, run_model
from jobs.stages import StageSpec, run_config, shard_config
from workers.tasks import WorkerSpec

__all__ = ["run_study", "main", "OUTPUT_FILES", "study_jobs"]

_log = logging.getLogger("conva.jobs")
OUTPUT_FILES = ("results", "summary", "utility", "probes", "judges")


@dataclass(frozen=True)
class _ModelRun:
    """One model of the study: its planned job, the workers' settings and its cells."""

    job: ModelJob
    worker: WorkerSpec
    cells: tuple
    entry: object


def study_jobs(study: StudyConfig, out: Location, overwrite: bool) -> list[_ModelRun]:
    """Pre-flight every model of the study (no writes): its config, stages, inputs and workers' settings."""
    runs = []
    judge = {**study_dict(study)["judge"], "fluency": study_dict(study)["fluency"]}
    cache = study.judge.cache_dir or (str(out.child("judge_cache")) if out.is_local else "")
    for entry in study.study.models:
        spec = model_spec(entry)
        try:
            check_model(spec)
        except ModelNotFoundError as err:
            raise JobError(f"study.models: {err}") from err
        cfg = model_config(study, entry, out.uri)
        cells, ucells = expand_cells(study, spec), utility_cells(study, spec)
        rps, base = cfg.ray.steer_shard_rows, run_config(cfg)
        steer_in = generated(steering_table(cfg, cells), rps)
        util_in = generated(_utility_rows(study, ucells), rps)
        gen = {**base, "cells": [c.id for c in cells], "shards": shard_config(rps, steer_in.table.num_rows,
                                                                             steer_in.sha256)}
        own = [StageSpec("steer", "study_generations", gen, steer_in.n_shards, steer_in),
               StageSpec("evaluate", "study_judged", {**gen, "judge": judge}, steer_in.n_shards),
               StageSpec("utility", "study_utility", {**base, "utility": study_dict(study)["utility"],
                         "shards": shard_config(rps, util_in.table.num_rows, util_in.sha256)}, util_in.n_shards, util_in),
               StageSpec("agreement", "study_judge", {**base, "judge": judge}, 1)]
        job = plan_job(cfg, Location(cfg.output.dir), ("extract", "fit"), overwrite, label=model_name(spec),
                       extra=own, reads=_judge_reads(study))
        worker = WorkerSpec(cfg, study.judge, study.fluency, study.utility, cache)
        runs.append(_ModelRun(job, worker, tuple(cells), entry))
    return runs


def _judge_reads(study: StudyConfig) -> tuple[str, ...]:
    """Files the study's workers read themselves: the judge's labelled pairs when they are a file or folder."""
    pairs = study.judge.pairs
    if pairs == "demo":
        return ()
    return (pairs[len("paper:"):],) if pairs.startswith("paper:") else (pairs,)


def _utility_rows(study: StudyConfig, ucells) -> pa.Table:
    if not study.utility.mc:
        return utility_table([], [], [])
    items = demo_mc() if study.utility.mc == "demo" else load_mc(study.utility.mc)
    items = items[: study.utility.max_items] if study.utility.max_items else items
    return utility_table(ucells, items, mc_prompts(items, study.utility.shots))


def run_study(study: StudyConfig, overwrite: bool = False, *, break_lease: bool = False,
              planned: list[ModelJob] | None = None) -> Location:
    """Run (or resume) every model of ``study``; returns the study's output holding the Parquet files and report.

    ``planned``, if given, receives each model's planned job; once the run is done its ``extra`` holds that
    model's workers' busy intervals and model loads (:func:`jobs.runner.run_model`), e.g. for the benchmarks.

    Side effects: writes under ``job.output.dir``; with ``overwrite``, **replaces stages written with
    another config** once the new ones are complete.
    """
    job_cfg, out = output_location(study.job)
    study = replace(study, job=job_cfg)
    models = study_jobs(study, out, overwrite)
    if planned is not None:
        planned.extend(m.job for m in models)
    start = time.monotonic()
    with OutputLease(out, f"conva study {study.study.name}", ttl_s=job_cfg.output.lease_ttl_s,
                     break_stale=break_lease), run_log(out):
        out.child("study.json").write_text(json.dumps(study_dict(study), indent=1, sort_keys=True))
        _log.info("study %s, config:\n%s", study.study.name, json.dumps(study_dict(study), indent=1))
        worked = _run_models(models, overwrite)
        if worked or not all(out.child(f"{name}.parquet").exists() for name in OUTPUT_FILES):
            _write_outputs(study, out, models)
        else:
            _log.info("every stage of every model was committed already; %s is up to date", out)
        _log.info("study %s done in %.1f s", study.study.name, time.monotonic() - start)
    return out


class _Capacity:
    """Admits models in order while their pools fit the cluster's CPUs and GPUs; the rest wait their turn."""

    def __init__(self, total: dict) -> None:
        self.free = {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}
        self.total = dict(self.free)
        self.running = 0
        self.cond = threading.Condition()
        self.turn = 0

    @staticmethod
    def need(run: _ModelRun) -> dict:
        r = run.job.cfg.ray
        return {"CPU": r.num_workers * r.num_cpus_per_worker, "GPU": r.num_workers * r.num_gpus_per_worker}

    def acquire(self, order: int, need: dict) -> None:
        with self.cond:
            # A model bigger than the whole cluster runs alone (with the workers that fit), never forever queued.
            self.cond.wait_for(lambda: self.turn == order and (
                self.running == 0 or all(need[k] <= self.free[k] + 1e-9 for k in need)))
            for k in need:
                self.free[k] -= need[k]
            self.running += 1
            self.turn += 1
            self.cond.notify_all()

    def release(self, need: dict) -> None:
        with self.cond:
            for k in need:
                self.free[k] += need[k]
            self.running -= 1
            self.cond.notify_all()


def _run_models(models: list[_ModelRun], overwrite: bool) -> bool:
    """Every model's pipeline in its own thread, admitted by :class:`_Capacity`; the first failure is raised.

    Returns whether any model had work (nothing starts, not even Ray, when every stage is committed).
    """
    import ray

    from jobs.runner import _has_work

    if not any(_has_work(m.job, overwrite) for m in models):
        return False
    connect_ray()
    capacity = _Capacity(ray.cluster_resources())
    errors: list[BaseException] = []

    def one(order: int, run: _ModelRun) -> None:
        log_context.set(f"[{run.job.label}] ")
        need = capacity.need(run)
        capacity.acquire(order, need)
        try:
            run_model(run.job, run.worker, overwrite)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            _log.error("failed: %s", err)
        finally:
            capacity.release(need)

    threads = [threading.Thread(target=one, args=(i, m), name=f"conva-{m.job.label}") for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return True


def _write_outputs(study: StudyConfig, out: Location, models: list[_ModelRun]) -> None:
    """Rebuild the study's tables and report from the committed stages, in a Ray task next to the data."""
    import ray

    from jobs.stages import bundle_folders, open_stages

    parts = []
    for m in models:
        stages = open_stages(m.job.out, list(m.job.specs), False)
        files = {name: [f.uri for f in stages[name].parquet_files()] for name in ("steer", "evaluate", "utility",
                                                                                  "agreement")}
        bundles = {v: f.uri for v, f in bundle_folders(stages["fit"], m.job.cfg.data.values).items()}
        parts.append({"cells": list(m.cells), "files": files, "bundles": bundles, "model": model_spec(m.entry)})
    connect_ray()
    task = ray.remote(num_cpus=1)(_build_outputs)
    ray.get(task.remote(study, out.uri, parts))


def _build_outputs(study: StudyConfig, out_uri: str, parts: list[dict]) -> None:
    """(Ray task) Read the committed stages, write results/summary/utility/probes/judges and the report."""
    import pyarrow.dataset as ds

    from conva.bundle import BUNDLE_FILES, decode_bundle
    from conva.report import write_report_to
    from conva.storage import Location as Loc
    from conva.study import results_table, summarize

    def read(uris: list[str]) -> pa.Table:
        locs = [Loc(u) for u in uris]
        return ds.dataset([u.path for u in locs], format="parquet", filesystem=locs[0].fs).to_table()

    results, utility, judges, probes = [], [], [], []
    for p in parts:
        results.append(results_table(p["cells"], read(p["files"]["steer"]), read(p["files"]["evaluate"])))
        if p["files"]["utility"]:
            utility.append(read(p["files"]["utility"]))
        judges.append(read(p["files"]["agreement"]))
        for value, folder in sorted(p["bundles"].items()):
            files = {name: Loc(folder).child(name).read_bytes() for name in BUNDLE_FILES}
            probes += _probe_rows(p["model"], decode_bundle(files, folder))
    results_t = pa.concat_tables(results)
    utility_t = pa.concat_tables(utility) if utility else None
    judges_t = pa.concat_tables(judges)
    agreement = {(r["model"], r["value"]): r["agreement"] for r in judges_t.to_pylist()}
    summary = summarize(results_t, utility_t, agreement, n_boot=study.study.bootstrap, seed=study.study.seed)
    out = Loc(out_uri)
    for name, table in zip(OUTPUT_FILES, (results_t, summary, utility_t if utility_t is not None else pa.table({}),
                                          pa.Table.from_pylist(probes), judges_t)):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        out.child(f"{name}.parquet").write_bytes(sink.getvalue())
    write_report_to(out)


def _probe_rows(spec: str, bundle) -> list[dict]:
    h = bundle.gate.heldout or {}
    return [dict(model=model_name(spec), value=bundle.value, layer=int(layer), train_acc=float(bundle.train_acc[i]),
                 test_acc=float(bundle.test_acc[i]), in_band=int(layer) in bundle.band, gate_kind=bundle.gate.kind,
                 gate_layer=bundle.gate.layer, gate_precision=h.get("precision"), gate_recall=h.get("recall"))
            for i, layer in enumerate(bundle.layers.tolist())]


def _validate(study: StudyConfig) -> str:
    job_cfg, out = output_location(study.job)
    study = replace(study, job=job_cfg)
    models = study_jobs(study, out, overwrite=False)
    rows = sum(m.job.spec("steer").input.table.num_rows for m in models)
    util = sum(m.job.spec("utility").input.table.num_rows for m in models)
    return f"ok ({len(models)} model(s), {rows} generations and {util} multiple-choice rows in all, output {out})"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on a failure a user can fix (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="conva study", description="ConVA study: models × values × methods × P0")
    parser.add_argument("--config", required=True, help="study TOML (see examples/demo_study.toml)")
    parser.add_argument("--overwrite", action="store_true", help="replace stages written with another config")
    parser.add_argument("--break-lease", action="store_true", help="take over an output whose lease is stale")
    parser.add_argument("--validate", action="store_true", help="check the config and inputs; start nothing")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        study = load_study(args.config, overrides)
        if args.validate:
            print(f"conva study: {_validate(study)}")
            return 0
        start = time.monotonic()
        out = run_study(study, args.overwrite or study.job.output.overwrite, break_lease=args.break_lease)
    except FAILURES as err:
        print(f"conva study: error: {err}", file=sys.stderr)
        return 2
    from conva.report import format_summary

    summary = pq.read_table(io.BytesIO(out.child("summary.parquet").read_bytes()))
    print(format_summary(summary))
    print(f"\nstudy finished in {time.monotonic() - start:.0f} s; results in {out}\nreport: {out.child('report', 'index.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

