"""How a stage's input is planned before anything runs: read and named by config key, hashed, screened.

The built-in stages' ``plan`` functions (:mod:`conva.jobs.builtin_stages`) and a study's stages build
their :class:`~conva.jobs.stages.StageSpec` from these: a job-built input table hashed by content
(:func:`generated`), a user's prompts file planned and screened row by row (:func:`steering_spec`),
every read error named by the config key that points at the file (:func:`read_input`).
"""

from __future__ import annotations

import logging
import os
import sys

from conva.batch.badrows import RowTally
from conva.batch.config import Config
from conva.batch.inputs import plan_input, table_sha256
from conva.batch.line_index import thread_map
from conva.batch.steer_rows import steering_rows, steering_rows_from_records
from conva.data import DataError
from conva.jobs.common import JobError, connect_ray
from conva.jobs.stages import GeneratedInput, StageSpec, shard_config
from conva.workers.cluster_map import cluster_map

_log = logging.getLogger("conva.jobs")

__all__ = [
    "read_input",
    "generated",
    "is_file_source",
    "check_error_fraction",
    "steering_spec",
    "index_map",
    "pairs_source",
]


def read_input(key: str, build, sources: dict[str, str] | None = None):
    """``build()``, its input errors named by config key (``sources``: key → path, to tell which input failed)."""
    try:
        return build()
    except DataError as err:
        for name, source in (sources or {}).items():
            if source not in ("demo", "") and str(err.file).startswith(source.removeprefix("paper:")):
                key = name
        raise JobError(f"{key}: {err}") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise JobError(f"{key}: cannot read the input: {type(err).__name__}: {err}") from err


def generated(table, rows_per_shard: int) -> GeneratedInput:
    """A job-built input table, hashed by content."""
    return GeneratedInput(table, table_sha256(table), rows_per_shard)


def is_file_source(source: str) -> bool:
    return source != "demo" and not source.startswith("paper:")


def check_error_fraction(cfg: Config, key: str, tally: RowTally, planned: int | None = None) -> None:
    """Refuse an input with more bad rows than ``data.max_error_fraction`` (likely the wrong file or format).

    ``planned``: the input's rows, where ``tally`` holds only the first of them (a large file's pre-flight).
    """
    limit = cfg.data.max_error_fraction
    of = (
        f"the first {tally.rows} of {planned}" if planned is not None and planned > tally.rows else tally.rows
    )
    if tally.too_many_bad(limit):
        raise JobError(
            f"{key}: {tally.bad} of {of} rows ({tally.bad / tally.rows:.0%}) cannot be steered, "
            f"more than data.max_error_fraction = {limit:g} allows: {tally.one_line()}. Is it the right "
            "file, in the project schema (value, prompt)? Fix the rows, or raise --data.max_error_fraction "
            "(1 never refuses)"
        )
    if tally.rows and not tally.valued and tally.neutral > limit * tally.rows:
        raise JobError(
            f"{key}: none of {f'its {of}' if of == tally.rows else of} rows names a value "
            f"({tally.neutral} neutral, {tally.bad} bad): "
            f"nothing would be steered, and {tally.neutral / tally.rows:.0%} neutral rows is more than "
            f"data.max_error_fraction = {limit:g} allows. Give the rows a `value` column naming one of "
            f"data.values ({', '.join(cfg.data.values)}), or set --data.max_error_fraction=1 to generate them "
            "all unsteered"
        )


def steering_spec(
    cfg: Config, folder: str, config: dict, screened: dict[str, RowTally] | None = None
) -> StageSpec:
    """The steering stage: a user's file or folder (planned, read by the workers) or the demo/paper prompts.

    The first rows of the input (:data:`~conva.batch.inputs.SCREEN_ROWS`, whole shards, each file's first
    shard at least: a small input whole) are screened by the rule the workers apply, into
    ``screened["data.prompts"]``, and the input refused if too many of its rows are bad
    (:func:`check_error_fraction`); the workers screen their slices and the run's error rows count at
    the end (:func:`check_run_errors`). A Parquet file is planned from its footer (constant time in its
    size); a JSON Lines file's newlines are found range by range, on the cluster's CPUs when the job runs
    on one (:func:`index_map`); a CSV file is read once, on the driver.
    """
    source, rps = cfg.data.prompts, cfg.ray.steer_shard_rows
    if is_file_source(source):
        tally = RowTally()

        def screen(name: str, records: list) -> None:
            tally.add_table(steering_rows_from_records(name, records, cfg.data.values))

        plan = read_input(
            "data.prompts",
            lambda: plan_input(source, rps, screen, metadata_only=True, map_ranges=index_map()),
        )
        check_error_fraction(cfg, "data.prompts", tally, plan.rows)
        if screened is not None:
            screened["data.prompts"] = tally
        return StageSpec(
            "steer",
            folder,
            {**config, "shards": shard_config(rps, plan.rows, plan.sha256)},
            len(plan.slices),
            plan,
            input_kind="records",
            source=f"file {source}",
        )
    inp = generated(read_input("data.prompts", lambda: steering_rows(cfg)), rps)
    return StageSpec(
        "steer",
        folder,
        {**config, "shards": shard_config(rps, inp.table.num_rows, inp.sha256)},
        inp.n_shards,
        inp,
        source=f"data.prompts = {source!r}",
    )


def index_map():
    """How a large JSON Lines file's ranges are indexed: as Ray tasks when the job runs on a cluster
    (``RAY_ADDRESS`` is set, or Ray is already joined; it is joined here if need be), else ``None``: a thread
    per core on this machine. A file of one range (256 MiB) is always indexed here; so is every range while
    the cluster has no CPU (an autoscaling cluster before its first worker node: tasks would wait for one)."""
    ray = sys.modules.get("ray")
    if not os.environ.get("RAY_ADDRESS") and not (ray is not None and ray.is_initialized()):
        return None

    def on_cluster(fn, bounds):
        connect_ray()
        import ray

        if ray.cluster_resources().get("CPU", 0) < 1:
            _log.info("the cluster has no CPU yet: indexing %d ranges on this machine", len(bounds))
            return thread_map(fn, bounds)
        return cluster_map(fn, bounds)

    return on_cluster


def pairs_source(cfg: Config) -> str:
    """The extraction texts' sources, as configured: the pairs and (for a probe gate) the neutral prompts."""
    return f"data.pairs = {cfg.data.pairs!r}" + (
        f", data.neutral = {cfg.data.neutral!r}" if cfg.gate.kind == "probe" else ""
    )
