"""Every stage, declared once: :class:`StageDecl` and the one registry the runner, CLI and pre-flight read.

A stage's declaration says everything the batch side needs to know about it: its name (what a worker
runs, and the ``conva <name>`` job that writes it alone), its folder under ``output.dir``, the config keys
its output depends on (hashed into the stage's log; ``None``: every key but where and how the job runs),
how its input and shards are planned (``plan``), how a shard becomes a worker task (``tasks``), the
function a worker runs on one shard (``shard``), the stages it needs (``after``: read, and complete,
before its first shard runs) and what one input row is called in messages.

Registering a declaration (:func:`register_stage`) is the only edit a new stage needs: ``conva run``
(when ``in_run``), ``conva <name>``, ``conva validate --job <name>``, pre-flight, the resume check and
the shard dispatch all read it from here. The built-in stages are declared in
:mod:`conva.jobs.builtin_stages`; a study's stages there too, planned by :mod:`conva.jobs.study`.

The built-in declarations are registered when :mod:`conva.jobs.builtin_stages` is imported, which
:mod:`conva.jobs.preflight` (the planner of every job) does: this module imports none of them, so the
import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conva.batch.config import Config, config_dict

if TYPE_CHECKING:
    from conva.batch.badrows import RowTally
    from conva.batch.store import ShardRecord
    from conva.workers.tasks import ShardTask

__all__ = ["StageDecl", "register_stage", "registered", "declared", "stage_decl", "job_stages", "job_names"]

# (decl, cfg, screened) -> the stage's spec for a job (folder, keyed config with its `shards`, input, shards)
PlanFn = Callable[["StageDecl", Config, "dict[str, RowTally]"], Any]  # a conva.jobs.stages.StageSpec
# (spec, open stages, input slices, values) -> (dependency override or None, ShardRef -> ShardTask)
TaskFn = Callable[..., tuple[Any, Callable[..., "ShardTask"]]]
ShardFn = Callable[[Any, "ShardTask"], "ShardRecord"]


@dataclass(frozen=True)
class StageDecl:
    """One stage, declared once (see the module docstring for what reads each field).

    ``plan`` is None for a stage only a study plans (its folder and config depend on the study).
    ``row_unit``: what one output row's input is, for error-row counts (None: the stage has no error
    column); ``input_noun``: what its input rows are, for ``conva validate``.
    """

    name: str
    folder: str
    tasks: TaskFn
    shard: ShardFn
    plan: PlanFn | None = None
    keys: tuple[str, ...] | None = None
    after: tuple[str, ...] = ()
    row_unit: str | None = None
    input_noun: str | None = None
    in_run: bool = False

    def config(self, cfg: Config) -> dict:
        """The part of ``cfg`` this stage's output depends on (before its ``shards`` bookkeeping)."""
        full = config_dict(cfg)
        if self.keys is None:
            return {k: v for k, v in full.items() if k not in ("output", "ray")}
        return select(full, self.keys)


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


_STAGES: dict[str, StageDecl] = {}


def register_stage(decl: StageDecl) -> StageDecl:
    """Add ``decl`` to the registry (after the stages registered before it); a second name is refused."""
    if decl.name in _STAGES and _STAGES[decl.name] is not decl:
        raise ValueError(f"a stage named {decl.name!r} is registered already")
    missing = [d for d in decl.after if d not in _STAGES]
    if missing:
        raise ValueError(
            f"stage {decl.name!r}: it needs {missing}, which are not registered (register them first)"
        )
    _STAGES[decl.name] = decl
    return decl


@contextmanager
def registered(decl: StageDecl) -> Iterator[StageDecl]:
    """``decl`` registered for the ``with`` block only (a test's or a plug-in's temporary stage)."""
    register_stage(decl)
    try:
        yield decl
    finally:
        _STAGES.pop(decl.name, None)


def declared() -> list[StageDecl]:
    """Every registered stage, in registration (pipeline) order."""
    return list(_STAGES.values())


def stage_decl(name: str) -> StageDecl:
    """The declaration of stage ``name``; an unknown name is named with the known ones."""
    if name not in _STAGES:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(_STAGES)}")
    return _STAGES[name]


def job_stages(job: str) -> tuple[str, ...]:
    """The stages job ``job`` writes: ``run`` every stage declared ``in_run``; a planned stage's name, itself."""
    if job == "run":
        return tuple(d.name for d in declared() if d.in_run)
    decl = stage_decl(job)
    if decl.plan is None:
        raise KeyError(f"stage {job!r} is planned by a study, not a job of its own")
    return (job,)


def job_names() -> tuple[str, ...]:
    """Every job ``conva`` can run on one model: each planned stage alone, and ``run``."""
    return (*(d.name for d in declared() if d.plan is not None), "run")
