"""One job from the command line to its outputs: parse, pre-flight, lease, open the stages, run them, publish.

Order matters for "fail fast, write nothing": everything that can be checked without a model is
checked first (:func:`jobs.preflight.plan_job`); then the output's lease is taken (a second driver is
refused); only then are the stages opened, ``config.json`` and ``run.log`` written, Ray joined, every
node checked, and the workers started, last, and not at all when every shard is already committed.
One pool of model workers serves all the job's stages (:func:`run_model`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable

from conva.config import RESULT_NEUTRAL_KEYS, Config
from conva.pipeline import SCHEMA_VERSION
from conva.lease import OutputLease
from conva.store import ShardRecord, stage_status
from jobs.common import (EXPECTED_ERRORS, connect_ray, log_config, output_location, parse_args, run_log,
                         setup_logging, write_config)
from jobs.preflight import ModelJob, check_gpu_fit, check_nodes, plan_job
from jobs.stages import StageResult, open_stages, stage_runs
from workers.pool import PoolSettings, ShardFailedError, WorkerPool, WorkerStartError, run_stages
from workers.tasks import WorkerSpec

__all__ = ["JOBS", "run_job", "run_model", "main", "FAILURES"]

_log = logging.getLogger("conva.jobs")

JOBS: dict[str, tuple[str, ...]] = {
    "extract": ("extract",), "fit": ("fit",), "steer": ("steer",), "run": ("extract", "fit", "steer"),
}
FAILURES = (*EXPECTED_ERRORS, ShardFailedError, WorkerStartError, NotImplementedError)


def run_job(job: str, cfg: Config, overwrite: bool = False, *, break_lease: bool = False,
            planned: list[ModelJob] | None = None) -> list[StageResult]:
    """Run job ``job`` (a key of :data:`JOBS`) with ``cfg``; returns what each stage did.

    ``planned``, if given, receives the job as pre-flight planned it; once the run is done its ``extra``
    holds the workers' busy intervals and model loads (:func:`run_model`), e.g. for the benchmarks.

    Side effects: writes ``<output.dir>/{activations,bundles,generations}/``, ``config.json`` and appends
    to ``run.log``; with ``overwrite``, **replaces a stage written with another config** once the new
    run has committed all its shards (until then the old output stays readable).
    """
    start = time.monotonic()
    cfg, out = output_location(cfg)
    job_plan = plan_job(cfg, out, JOBS[job], overwrite)
    if planned is not None:
        planned.append(job_plan)
    with OutputLease(out, f"conva {job}", ttl_s=cfg.output.lease_ttl_s, break_stale=break_lease), run_log(out):
        write_config(cfg, out)
        log_config(cfg, job, overwrite)
        results = run_model(job_plan, WorkerSpec(cfg), overwrite)
        _log.info("job %s done in %.1f s: %s", job, time.monotonic() - start,
                  "; ".join(f"{r.stage} {r.processed}/{r.shards} shards processed" for r in results))
        return results


class _Tally:
    """Per stage: shards and rows committed in this run, error rows, first and last commit times."""

    def __init__(self) -> None:
        self.shards: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, record: ShardRecord) -> None:
        self.shards[stage] += 1
        self.rows[stage] += record.rows
        self.errors[stage] += int(record.extra.get("errors", 0))
        self.last[stage] = time.monotonic()
        if stage == "fit":
            e = record.extra
            _log.info("fit: bundle %d: band %s, best held-out accuracy %.3f, gate %s", record.shard, e.get("band"),
                      e.get("best_test_acc", float("nan")), e.get("gate"))
            if e.get("skipped"):
                _log.warning("fit: %d text(s) were not recorded and are left out, e.g. %s", e["skipped"],
                             "; ".join(f"{r['row_id']}: {r['error']}" for r in e.get("skipped_examples", [])))


def run_model(job: ModelJob, spec: WorkerSpec, overwrite: bool,
              on_commit: Callable[[str, ShardRecord], None] | None = None) -> list[StageResult]:
    """Run the pending shards of every stage of ``job`` on one pool of model workers, then publish.

    Starts no Ray and no worker when every shard is already committed. The model is loaded once per
    worker and serves every stage; stages overlap where their dependencies allow.
    """
    t0 = time.monotonic()
    work = _has_work(job, overwrite)
    if work:  # before anything is written: every node must see the output, the model and the inputs
        connect_ray()
        check_gpu_fit(job.cfg, check_nodes(job))
    stages = open_stages(job.out, list(job.specs), overwrite)
    tally = _Tally()

    def committed(stage: str, record: ShardRecord) -> None:
        tally(stage, record)
        if on_commit is not None:
            on_commit(stage, record)

    runs = stage_runs(job.cfg, list(job.specs), stages, on_commit=committed)
    startup = 0.0
    if not runs:
        _log.info("%s: every shard of %s is committed; nothing to do", job.label,
                  ", ".join(s.folder for s in job.specs if s.writes))
    else:
        if not work:  # a stage whose committed objects went missing runs again after all
            connect_ray()
            check_gpu_fit(job.cfg, check_nodes(job))
        pool = WorkerPool(spec, PoolSettings.from_config(job.cfg.ray), job.label, _loads(job.cfg, [r.name for r in runs]))
        try:
            pool.start()
            startup = time.monotonic() - t0
            run_stages(pool, runs)
        finally:
            pool.stop()
        job.extra.update(busy=pool.busy, returned_bytes=pool.returned_bytes, loads=dict(pool.loads),
                         replacements=pool.replacements)
        shards = sum(tally.shards.values())
        _log.info("%s: workers returned %d bytes of shard records for %d shards (no shard data); model loads per "
                  "worker: %s", job.label, pool.returned_bytes, shards, json.dumps(dict(pool.loads), sort_keys=True))
    results = []
    for s in job.specs:
        if not s.writes:
            continue
        stages[s.name].finish()
        if tally.errors[s.name]:
            _log.warning("%s: %d of %d rows written in this run are error rows (see the `error` column)", s.folder,
                         tally.errors[s.name], tally.rows[s.name])
        seconds = tally.last.get(s.name, time.monotonic()) - t0
        results.append(StageResult(s.name, s.n_shards, tally.shards[s.name], tally.rows[s.name], seconds,
                                   startup if tally.shards[s.name] else 0.0))
    return results


def _has_work(job: ModelJob, overwrite: bool) -> bool:
    """Whether any stage the job writes has a shard to run (read from the logs; writes nothing)."""
    for spec in job.specs:
        if not spec.writes:
            continue
        status = stage_status(job.out, spec.folder, spec.config, SCHEMA_VERSION, ignore_keys=RESULT_NEUTRAL_KEYS)
        if not status.exists or status.mismatch or status.committed < spec.n_shards:
            return True
    return False


def _loads(cfg: Config, stages: list[str]) -> tuple[str, ...]:
    """What each worker loads when it starts: nothing for a fit alone; else the model (or the vLLM engine)."""
    if set(stages) <= {"fit"}:
        return ()
    if "extract" in stages or cfg.steer.backend == "hf":
        return ("hf",)
    return ("steer",)


def main(job: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<job> --config FILE [--key=value ...] [--overwrite]``; exit 0 on success, 2 on a failure."""
    setup_logging()
    try:
        cfg, args = parse_args(f"conva {job}", argv)
        run_job(job, cfg, args.overwrite, break_lease=args.break_lease)
    except FAILURES as err:
        print(f"conva {job}: error: {err}", file=sys.stderr)
        return 2
    return 0

