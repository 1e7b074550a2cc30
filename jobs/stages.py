"""A model's stages on the driver: what each one is keyed on, its input, and how its shards become worker tasks.

A :class:`StageSpec` is decided in pre-flight, before anything is written: its folder, its config (the
part of the job config its output depends on, plus the shard size and a hash of its input), its shard
count and its input. :func:`open_stages` opens them all in the store (checking every one before
writing any) and :func:`stage_runs` turns them into :class:`~conva.workers.pool.StageRun` s for the one
runner, with each stage's dependencies: fit after the last activation shard, steering after the last
bundle, a study's judging of generation shard ``i`` as soon as shard ``i`` is committed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from conva.batch.badrows import RowTally
from conva.batch.config import RESULT_NEUTRAL_KEYS, Config, config_dict
from conva.batch.extraction import activation_model
from conva.batch.inputs import InputPlan, write_input_table
from conva.batch.lease import held_fence
from conva.batch.schemas import SCHEMA_VERSION
from conva.batch.storage import Location
from conva.batch.store import (
    ConfigMismatchError,
    ShardRecord,
    ShardRef,
    Stage,
    StoreError,
    shard_ranges,
    stage_mismatch,
    stage_status,
)
from conva.fit import GATE_FIT_KEYS
from conva.jobs.common import JobError
from conva.workers.pool import StageRun
from conva.workers.tasks import ShardTask

__all__ = [
    "StageSpec",
    "GeneratedInput",
    "StageResult",
    "STAGE_DIRS",
    "ACTIVATION_KEYS",
    "BUNDLE_KEYS",
    "select",
    "shard_config",
    "check_stages",
    "open_stages",
    "stage_runs",
    "bundle_folders",
]

_log = logging.getLogger("conva.jobs")

STAGE_DIRS = {"extract": "activations", "fit": "bundles", "steer": "generations"}
# The config keys each stage's output depends on: a rerun refuses (or with --overwrite, replaces) a stage
# only when one of these changed. Generations depend on everything but where and how the job runs.
ACTIVATION_KEYS = (
    "model",
    "data.values",
    "data.pairs",
    "data.pair_kind",
    "data.neutral",
    "extract",
    "gate.kind",
    "steer.chat_template",
)
BUNDLE_KEYS = (*ACTIVATION_KEYS, "probe", "fit", *(f"gate.{k}" for k in GATE_FIT_KEYS))


@dataclass(frozen=True)
class GeneratedInput:
    """An input table the job builds itself (small: texts to extract, a study's cells × prompts).

    It is written once beside its stage (``_input/<sha256>.parquet``, one row group per shard) and the
    workers read their slices from there.
    """

    table: pa.Table
    sha256: str
    rows_per_shard: int

    @property
    def n_shards(self) -> int:
        return len(shard_ranges(self.table.num_rows, self.rows_per_shard))


@dataclass(frozen=True)
class StageSpec:
    """One stage of a model's job. ``name`` is what the workers run; ``folder`` where it is stored.

    ``writes``: False when the job only reads the stage (it must then be complete). ``input_kind``:
    ``table`` (a generated input) or ``records`` (a user's file, read leniently by the workers).
    ``source``: where the input comes from, for messages (``file /data/p.jsonl``, ``data.pairs = 'demo'``).
    """

    name: str
    folder: str
    config: dict
    n_shards: int
    input: GeneratedInput | InputPlan | None = None
    writes: bool = True
    input_kind: str = "table"
    source: str = ""


@dataclass(frozen=True)
class StageResult:
    """What a stage did in this run: shards in all, shards processed now, rows written now, seconds, error rows.

    ``startup_seconds`` is the part of ``seconds`` spent before the first shard could start (joining Ray,
    starting the workers, loading their models); throughput at steady state is ``rows / (seconds - startup)``.
    """

    stage: str
    shards: int
    processed: int
    rows: int
    seconds: float
    startup_seconds: float = 0.0
    folder: str = ""
    error_rows: int = 0  # over every committed shard of the stage, this run's and earlier ones
    input_rows: int = 0  # input rows of every committed shard (0 for a stage without an error column)
    tally: RowTally | None = (
        None  # every committed row by kind and error reason (stages with an error column)
    )


def select(config: dict, keys: tuple[str, ...]) -> dict:
    """The dotted ``keys`` of a nested config, nested the same way."""
    out: dict = {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = config, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    return out


def shard_config(rows_per_shard: int, rows: int, sha256: str) -> dict:
    """The part of a sharded stage's config that fixes its shards: their size and the input's rows and hash.

    The shard size lives under the result-neutral ``ray`` section, but shard i's rows depend on it: keep it.
    """
    return {"rows_per_shard": rows_per_shard, "rows": rows, "input_sha256": sha256}


def run_config(cfg: Config) -> dict:
    """The config every generation-like stage is keyed on: all but where and how the job runs."""
    return {k: v for k, v in config_dict(cfg).items() if k not in ("output", "ray")}


# The keys of a stage's config that describe its input and shards (shard_config), not the user's config.
_INPUT_KEYS = ("shards.input_sha256", "shards.rows")
_SHARD_SIZE_KEY = "shards.rows_per_shard"


def check_stages(out: Location, specs: list[StageSpec], overwrite: bool) -> None:
    """Refuse before writing anything: a changed config (naming every differing key), a stage read but incomplete.

    An input edited under committed shards, or a changed shard size, is named as such (the keys under
    ``shards.`` are the job's own bookkeeping, not the user's).
    """
    keys: set[str] = set()
    where: list[StageSpec] = []
    for spec in specs:
        if spec.writes and overwrite:
            continue
        found = stage_mismatch(out, spec.folder, spec.config, SCHEMA_VERSION, ignore_keys=RESULT_NEUTRAL_KEYS)
        if found:
            keys |= set(found)
            where.append(spec)
    if keys:
        folder = out.child(where[0].folder) if len(where) == 1 else out
        user = sorted(k for k in keys if not k.startswith("shards."))
        changed = [
            s
            for s in where
            if set(_INPUT_KEYS)
            & set(stage_mismatch(out, s.folder, s.config, SCHEMA_VERSION, ignore_keys=RESULT_NEUTRAL_KEYS))
        ]
        if user:
            raise ConfigMismatchError(
                folder,
                user
                + [_input_change(s) for s in changed]
                + ([_shard_size_key(where)] if _SHARD_SIZE_KEY in keys else []),
            )
        if changed:
            raise JobError(
                f"{folder}: {_input_change(changed[0])}. Rerun with --overwrite to compute the stage again "
                "from the new input (the committed output stays readable until that run is complete), or "
                "restore the input"
            )
        raise JobError(
            f"{folder}: {_shard_size_key(where)} differs from the shard size the committed shards were cut "
            "with; set it back to resume, or rerun with --overwrite"
        )
    for spec in specs:
        if not spec.writes:
            status = stage_status(out, spec.folder)
            if not status.exists or status.committed < status.n_shards:
                job = {"activations": "extract", "bundles": "fit"}.get(spec.folder, spec.folder)
                raise JobError(
                    f"output.dir: {out.child(spec.folder)} is not complete ({status.committed} of "
                    f"{status.n_shards} shards); run `conva {job}` first (or `conva run`)"
                )
        elif not overwrite and not stage_status(out, spec.folder).exists:
            _refuse_strays(out.child(spec.folder))


def _refuse_strays(folder: Location) -> None:
    """A stage folder without a commit log but with published-looking files: :meth:`Stage.open` would refuse it."""
    strays = sorted(f.name for f in folder.list() if not f.name.startswith(("_", ".")))
    if strays:
        raise StoreError(
            f"{folder} holds files no commit log lists ({', '.join(strays[:3])}"
            f"{', …' if len(strays) > 3 else ''}); cannot tell which config wrote them. "
            "Rerun with --overwrite to replace them."
        )


def _input_change(spec: StageSpec) -> str:
    return "the input changed since the committed shards" + (f" ({spec.source})" if spec.source else "")


def _shard_size_key(specs: list[StageSpec]) -> str:
    """The config key that sets the shard size of these stages (steering-like stages have their own)."""
    if any(s.name == "extract" for s in specs):
        return "ray.rows_per_shard"
    return "ray.steer_rows_per_shard (or ray.rows_per_shard where it is 0)"


def open_stages(out: Location, specs: list[StageSpec], overwrite: bool) -> dict[str, Stage]:
    """Open every stage (after :func:`check_stages`); a stage only read is never overwritten."""
    check_stages(out, specs, overwrite)
    return {
        spec.name: Stage.open(
            out,
            spec.folder,
            spec.config,
            SCHEMA_VERSION,
            n_shards=spec.n_shards,
            overwrite=overwrite and spec.writes,
            ignore_keys=RESULT_NEUTRAL_KEYS,
            fence=held_fence(out),  # every log append first checks this driver still holds the lease
            background=True,  # publishing runs beside the scheduling loop; finish() waits for it
        )
        for spec in specs
    }


def bundle_folders(fit: Stage, values: tuple[str, ...]) -> dict[str, Location]:
    """value → the folder of its committed bundle (published, or under its attempt during an overwrite)."""
    return {v: fit.object(i, f"{v}/meta.json").parent() for i, v in enumerate(values)}


def _slices(spec: StageSpec, stage: Stage) -> tuple:
    """The stage's input slices; a generated input is written beside the stage first (once)."""
    if isinstance(spec.input, GeneratedInput):
        g = spec.input
        return write_input_table(stage.input_location(g.sha256), g.table, g.rows_per_shard, g.sha256).slices
    return spec.input.slices if spec.input is not None else ()


def _complete(stage: Stage) -> Callable[[int], bool]:
    """A later stage's dependency on ``stage``: whether it is complete (O(1): :meth:`Stage.is_complete` counts
    commits), asked for every queued shard after each commit."""
    return lambda _shard: stage.is_complete()


def stage_runs(
    cfg: Config,
    specs: list[StageSpec],
    stages: dict[str, Stage],
    on_commit: Callable[[str, ShardRecord], None] | None = None,
    check_bundles: Callable[[dict[str, Location]], None] | None = None,
) -> list[StageRun]:
    """The runner's view of the stages that have pending shards, in pipeline order, with their dependencies.

    ``check_bundles`` (value → bundle folder) runs once, when the bundles are all committed and before
    anything is steered with them: e.g. a study's check that its bands suit every bundle.
    """
    runs = []
    values = cfg.data.values
    fit_done = _complete(stages["fit"]) if "fit" in stages else None
    for spec in specs:
        stage = stages[spec.name]
        if not spec.writes or stage.is_complete():
            continue
        slices = _slices(spec, stage)
        after, make = _STAGE_TASKS[spec.name](spec, stages, slices, values)
        if spec.name == "steer" and check_bundles is not None:
            make = _checked_first(make, lambda: check_bundles(bundle_folders(stages["fit"], values)))
        if spec.name == "fit":
            after = _complete(stages["extract"])
        elif after is None and spec.name != "extract" and fit_done is not None:
            after = fit_done
        callback = (lambda record, name=spec.name: on_commit(name, record)) if on_commit else None
        runs.append(StageRun(spec.name, stage, make, after, callback))
    return runs


def _checked_first(
    make: Callable[[ShardRef], ShardTask], check: Callable[[], None]
) -> Callable[[ShardRef], ShardTask]:
    """``make``, running ``check`` once before its first task (a failed check fails the job, naming the problem)."""
    done: list[bool] = []

    def first(ref: ShardRef) -> ShardTask:
        if not done:
            check()
            done.append(True)
        return make(ref)

    return first


def _extract_tasks(spec, stages, slices, values):
    return None, lambda ref: ShardTask("extract", ref, slice=slices[ref.shard])


def _fit_tasks(spec, stages, slices, values):
    acts, cache = stages["extract"], dict[str, Any]()

    def make(ref: ShardRef) -> ShardTask:
        if not cache:  # once, after the last activation shard is committed
            records = acts.records()
            info, layers = activation_model(r.extra["model"] for r in records)
            digest = hashlib.sha256(
                "".join(o.sha256 for r in records for o in r.objects).encode()
            ).hexdigest()[:16]
            cache.update(files=tuple(acts.parquet_files()), model=info.__dict__, layers=layers, digest=digest)
        params = {
            "value": values[ref.shard],
            "model": cache["model"],
            "layers": cache["layers"],
            "dataset_hash": cache["digest"],
        }
        return ShardTask("fit", ref, files=cache["files"], params=params)

    return None, make


def _steer_tasks(spec, stages, slices, values):
    fit, kind = stages["fit"], spec.input_kind
    return None, lambda ref: ShardTask(
        "steer", ref, slice=slices[ref.shard], bundles=bundle_folders(fit, values), params={"input": kind}
    )


def _evaluate_tasks(spec, stages, slices, values):
    gen, fit = stages["steer"], stages["fit"]

    def make(ref: ShardRef) -> ShardTask:
        part = gen.object(ref.shard, f"part-{ref.shard:05d}.parquet")
        return ShardTask("evaluate", ref, files=(part,), bundles=bundle_folders(fit, values))

    return gen.is_committed, make


def _utility_tasks(spec, stages, slices, values):
    fit = stages["fit"]
    return None, lambda ref: ShardTask(
        "utility", ref, slice=slices[ref.shard], bundles=bundle_folders(fit, values)
    )


def _choice_tasks(spec, stages, slices, values):
    fit = stages["fit"]
    return None, lambda ref: ShardTask(
        "choice", ref, slice=slices[ref.shard], bundles=bundle_folders(fit, values)
    )


def _agreement_tasks(spec, stages, slices, values):
    fit = stages["fit"]
    return None, lambda ref: ShardTask("agreement", ref, bundles=bundle_folders(fit, values))


_STAGE_TASKS = {
    "extract": _extract_tasks,
    "fit": _fit_tasks,
    "steer": _steer_tasks,
    "evaluate": _evaluate_tasks,
    "utility": _utility_tasks,
    "choice": _choice_tasks,
    "agreement": _agreement_tasks,
}
