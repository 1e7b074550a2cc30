"""The sharded stages on the driver: open each stage's store, run pending shards on actors, commit as they finish.

The driver is the single writer of every manifest: workers return tables, the driver commits each one
atomically through :mod:`conva.store`. A crash keeps the committed shards and a rerun runs only the
pending ones; a stage whose shards are all committed starts no Ray and no worker at all.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from conva.config import RESULT_NEUTRAL_KEYS, Config, config_dict
from conva.fit import GATE_FIT_KEYS
from conva.pipeline import SCHEMA_VERSION
from conva.store import ConfigMismatchError, Stage, open_stage, shard_ranges, stage_mismatch
from jobs.common import connect_ray
from jobs.preflight import Inputs, table_hash
from workers.extraction import ExtractionWorker
from workers.pool import run_shards, start_actors, stop_actors
from workers.steering import SteeringWorker

__all__ = ["StageResult", "STAGE_DIRS", "stage_config", "shard_config", "open_stages", "run_extract", "run_steer"]

_log = logging.getLogger("conva.jobs")

STAGE_DIRS = {"extract": "activations", "fit": "bundles", "steer": "generations"}
# The config keys each stage's output depends on: a rerun refuses (or with --overwrite, replaces) a stage
# only when one of these changed. Generations depend on everything but where and how the job runs.
_ACTIVATION_KEYS = ("model", "data.values", "data.pairs", "data.pair_kind", "data.neutral", "extract",
                    "gate.kind", "steer.chat_template")
_BUNDLE_KEYS = (*_ACTIVATION_KEYS, "probe", "fit", *(f"gate.{k}" for k in GATE_FIT_KEYS))
# Test hook: the driver exits (as if killed) after this many commits; used by the resume tests.
STOP_AFTER_COMMITS_ENV = "CONVA_TEST_STOP_AFTER_COMMITS"


@dataclass(frozen=True)
class StageResult:
    """What a stage did in this run: shards in all, shards processed now, rows written now, seconds.

    ``startup_seconds`` is the part of ``seconds`` spent before the first shard could start (joining Ray,
    starting the actors, loading their models); throughput at steady state is ``rows / (seconds - startup)``.
    """

    stage: str
    shards: int
    processed: int
    rows: int
    seconds: float
    startup_seconds: float = 0.0


def stage_config(cfg: Config, stage: str, inputs: Inputs) -> dict:
    """The part of the config (plus the sharding and an input hash) that stage ``stage`` is keyed on."""
    full = config_dict(cfg)
    if stage == "extract":
        rows = inputs.extraction
        return {**_select(full, _ACTIVATION_KEYS), "shards": shard_config(cfg.ray.rows_per_shard, rows)}
    if stage == "fit":
        return {**_select(full, _BUNDLE_KEYS), "shards": {"values": list(cfg.data.values)}}
    body = {k: v for k, v in full.items() if k not in ("output", "ray")}
    return {**body, "shards": shard_config(cfg.ray.steer_shard_rows, inputs.steering)}


def open_stages(cfg: Config, inputs: Inputs, stages: tuple[str, ...], overwrite: bool) -> dict[str, Stage]:
    """Open every stage the job reads or writes; a changed config raises ``ConfigMismatchError`` naming keys.

    Stages the job only reads (activations for ``fit``, bundles for ``steer``) are never overwritten.
    """
    needed = list(stages)
    if "fit" in stages and "extract" not in stages:
        needed.insert(0, "extract")
    if "steer" in stages and "fit" not in stages:
        needed.insert(0, "fit")
    configs = {s: stage_config(cfg, s, inputs) for s in needed}
    # Check every stage before opening any, so a refused rerun names all the differing keys and touches nothing.
    refused = {s: stage_mismatch(inputs.out, STAGE_DIRS[s], configs[s], SCHEMA_VERSION, ignore_keys=RESULT_NEUTRAL_KEYS)
               for s in needed if not (overwrite and s in stages)}
    keys = sorted({k for ks in refused.values() for k in ks})
    if keys:
        where = [STAGE_DIRS[s] for s, ks in refused.items() if ks]
        raise ConfigMismatchError(inputs.out / where[0] if len(where) == 1 else inputs.out, keys)
    return {s: open_stage(inputs.out, STAGE_DIRS[s], configs[s], SCHEMA_VERSION,
                          overwrite=overwrite and s in stages, ignore_keys=RESULT_NEUTRAL_KEYS) for s in needed}


def run_extract(cfg: Config, stage: Stage, inputs: Inputs) -> StageResult:
    """Record activations for every pending shard of the extraction rows (one row group per layer)."""
    rows = inputs.extraction
    ranges = shard_ranges(rows.num_rows, cfg.ray.rows_per_shard)
    return _run_sharded("extract", cfg, stage, ranges, ExtractionWorker, "extract",
                        lambda s: (_take(rows, ranges[s]),), lambda s: ranges[s][1] - ranges[s][0])


def run_steer(cfg: Config, stage: Stage, inputs: Inputs) -> StageResult:
    """Generate for every pending shard of the steering rows with the bundles in ``<out>/bundles``."""
    rows, bundles = inputs.steering, str(inputs.out / "bundles")
    ranges = shard_ranges(rows.num_rows, cfg.ray.steer_shard_rows)
    return _run_sharded("steer", cfg, stage, ranges, SteeringWorker, "steer",
                        lambda s: (_take(rows, ranges[s]), bundles), lambda s: None)


def _run_sharded(name: str, cfg: Config, stage: Stage, ranges: list[tuple[int, int]], worker: type, method: str,
                 args: Callable[[int], tuple], row_group: Callable[[int], int | None]) -> StageResult:
    start, todo = time.monotonic(), stage.pending(len(ranges))
    if not todo:
        _log.info("%s: all %d shards already committed in %s; nothing to do", name, len(ranges), stage.path)
        return StageResult(name, len(ranges), 0, 0, 0.0)
    _log.info("%s: %d of %d shards pending (%d committed) in %s", name, len(todo), len(ranges),
              len(ranges) - len(todo), stage.path)
    connect_ray(cfg)
    actors = start_actors(worker, cfg, min(cfg.ray.num_workers, len(todo)))
    startup = time.monotonic() - start
    _log.info("%s: %d %s actors ready after %.1f s", name, len(actors), worker.__name__, startup)
    written, done = 0, 0
    bar = tqdm(total=len(ranges), initial=len(ranges) - len(todo), desc=name, unit="shard", disable=None)
    try:
        for shard, table in run_shards(actors, method, name, todo, args, retries=cfg.ray.max_task_retries):
            stage.commit(shard, table, row_group_size=row_group(shard))
            written, done = written + table.num_rows, done + 1
            bar.update()
            _log.info("%s: committed shard %d (%d rows)", name, shard, table.num_rows)
            _test_stop_hook(name, done)
    finally:
        bar.close()
        stop_actors(actors)
    seconds = time.monotonic() - start
    _log.info("%s: %d shards, %d rows in %.1f s", name, len(todo), written, seconds)
    return StageResult(name, len(ranges), len(todo), written, seconds, startup)


def _test_stop_hook(name: str, done: int) -> None:
    limit = os.environ.get(STOP_AFTER_COMMITS_ENV)
    if limit and done >= int(limit):
        _log.warning("%s: stopping the driver after %d commits (test hook %s)", name, done, STOP_AFTER_COMMITS_ENV)
        raise SystemExit(75)


def _take(rows: pa.Table, bounds: tuple[int, int]) -> pa.Table:
    # A copy, not a slice: a pickled slice can carry its parent's whole buffers to the worker.
    return rows.take(pa.array(range(*bounds), pa.int64()))


def shard_config(rows_per_shard: int, rows: pa.Table) -> dict:
    """The part of a sharded stage's config that fixes its shards: their size and the input's rows and hash.

    The shard size lives under the result-neutral ``ray`` section, but shard i's rows depend on it: keep it.
    """
    return {"rows_per_shard": rows_per_shard, "rows": rows.num_rows, "input_sha256": table_hash(rows)}


def _select(config: dict, keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = config, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    return out
