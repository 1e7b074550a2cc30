"""A model's stages on the driver: what each one is keyed on, its input, and how its shards become worker tasks.

A :class:`StageSpec` is decided in pre-flight, before anything is written: its folder, its config (the
part of the job config its output depends on, plus the shard size and a hash of its input), its shard
count and its input. :func:`open_stages` opens them all in the store (checking every one before
writing any) and :func:`stage_runs` turns them into :class:`~conva.workers.tasks.StageRun` s for the one
runner, with each stage's dependencies: fit after the last activation shard, steering after the last
bundle, a study's judging of generation shard ``i`` as soon as shard ``i`` is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa

from conva.batch.badrows import RowTally
from conva.batch.config import RESULT_NEUTRAL_KEYS, Config
from conva.batch.inputs import InputPlan, InputSlice, write_input_table
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
from conva.jobs.registry import select, stage_decl
from conva.workers.tasks import ShardTask, StageRun

__all__ = [
    "StageSpec",
    "GeneratedInput",
    "StageResult",
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


def shard_config(rows_per_shard: int, rows: int, sha256: str) -> dict:
    """The part of a sharded stage's config that fixes its shards: their size and the input's rows and hash.

    The shard size lives under the result-neutral ``ray`` section, but shard i's rows depend on it: keep it.
    """
    return {"rows_per_shard": rows_per_shard, "rows": rows, "input_sha256": sha256}


def run_config(cfg: Config) -> dict:
    """The config every generation-like stage is keyed on: all but where and how the job runs."""
    return stage_decl("steer").config(cfg)


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
                job = spec.name
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


def _slices(spec: StageSpec, stage: Stage) -> Sequence[InputSlice]:
    """The stage's input slices; a generated input is written beside the stage first (once)."""
    if isinstance(spec.input, GeneratedInput):
        g = spec.input
        return write_input_table(stage.input_location(g.sha256), g.table, g.rows_per_shard, g.sha256).slices
    return spec.input.slices if spec.input is not None else ()


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
    for spec in specs:
        stage = stages[spec.name]
        if not spec.writes or stage.is_complete():
            continue
        decl = stage_decl(spec.name)
        after, make = decl.tasks(spec, stages, _slices(spec, stage), values)
        make = _with_shard_function(make, decl.shard)
        if spec.name == "steer" and check_bundles is not None:
            make = _checked_first(make, lambda: check_bundles(bundle_folders(stages["fit"], values)))
        if after is None:  # the declared dependencies, each complete
            after = _all_complete([stages[d] for d in decl.after if d in stages])
        callback = (lambda record, name=spec.name: on_commit(name, record)) if on_commit else None
        runs.append(StageRun(spec.name, stage, make, after, callback))
    return runs


def _all_complete(needed: list[Stage]) -> Callable[[int], bool] | None:
    """A stage's dependency on the stages it needs: whether each is complete (None: it needs none)."""
    if not needed:
        return None
    return lambda _shard: all(s.is_complete() for s in needed)


def _with_shard_function(make: Callable[[ShardRef], ShardTask], shard) -> Callable[[ShardRef], ShardTask]:
    """``make``, its tasks carrying the stage's shard function (what the worker runs)."""
    return lambda ref: replace(make(ref), run=shard)


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
