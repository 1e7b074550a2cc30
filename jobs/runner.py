"""One job from the command line to its outputs: parse, pre-flight, open the stages, run them, report.

Order matters for "fail fast, write nothing": everything that can be checked without a model is
checked first; only then are the stage folders, ``config.json`` and ``run.log`` written, and Ray and
the workers start last (and not at all when every shard is already committed).
"""

from __future__ import annotations

import logging
import sys
import time

from conva.config import Config
from conva.store import ConfigMismatchError, shard_ranges
from jobs.common import (EXPECTED_ERRORS, attach_run_log, log_config, parse_args, setup_logging,
                         write_config)
from jobs.fitting import run_fit
from jobs.preflight import Inputs, preflight
from jobs.stages import StageResult, open_stages, run_extract, run_steer
from workers.pool import ShardFailedError, WorkerStartError

__all__ = ["JOBS", "run_job", "main"]

_log = logging.getLogger("conva.jobs")

JOBS: dict[str, tuple[str, ...]] = {
    "extract": ("extract",), "fit": ("fit",), "steer": ("steer",), "run": ("extract", "fit", "steer"),
}
_FAILURES = (*EXPECTED_ERRORS, ShardFailedError, WorkerStartError, NotImplementedError)


def run_job(job: str, cfg: Config, overwrite: bool = False) -> list[StageResult]:
    """Run job ``job`` (a key of :data:`JOBS`) with ``cfg``; returns what each stage did.

    Side effects: writes ``<output.dir>/{activations,bundles,generations}/``, ``config.json`` and
    appends to ``run.log``; with ``overwrite``, **deletes a stage's outputs written with another config**.
    """
    stages = JOBS[job]
    start = time.monotonic()
    inputs = preflight(cfg, stages)
    opened = open_stages(cfg, inputs, stages, overwrite)
    write_config(cfg, inputs.out)
    handler = attach_run_log(inputs.out)
    try:
        log_config(cfg, job, overwrite)
        results = [_run_stage(s, cfg, opened, inputs) for s in stages]
        _log.info("job %s done in %.1f s: %s", job, time.monotonic() - start,
                  "; ".join(f"{r.stage} {r.processed}/{r.shards} shards processed" for r in results))
        return results
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _run_stage(stage: str, cfg: Config, opened: dict, inputs: Inputs) -> StageResult:
    if stage == "extract":
        return run_extract(cfg, opened["extract"], inputs)
    if stage == "fit":
        n_acts = len(shard_ranges(inputs.extraction.num_rows, cfg.ray.rows_per_shard))
        return run_fit(cfg, opened["extract"], opened["fit"], n_acts)
    return run_steer(cfg, opened["steer"], inputs)


def main(job: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<job> --config FILE [--key=value ...] [--overwrite]``; exit 0 on success, 2 on a failure."""
    setup_logging()
    try:
        cfg, overwrite = parse_args(f"jobs.{job}", argv)
        run_job(job, cfg, overwrite)
    except ConfigMismatchError as err:
        print(f"jobs.{job}: error: {err} (command line: --overwrite)", file=sys.stderr)
        return 2
    except _FAILURES as err:
        print(f"jobs.{job}: error: {err}", file=sys.stderr)
        return 2
    return 0
