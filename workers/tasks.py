"""What the driver hands a worker: who it is (:class:`WorkerSpec`, once) and one shard's work (:class:`ShardTask`).

Both are small: a task names where the worker reads its input (a slice of a file, committed objects of
an earlier stage) and where it writes (the attempt's folder, :class:`conva.batch.store.ShardRef`); the rows
themselves never pass through the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from conva.batch.config import Config
from conva.batch.inputs import InputSlice
from conva.batch.storage import Location
from conva.batch.store import ShardRecord, ShardRef, Stage
from conva.judges import JudgeSettings

if TYPE_CHECKING:
    from conva.batch.study import FluencySection, UtilitySection

T = TypeVar("T")

__all__ = ["WorkerSpec", "ShardTask", "StageRun", "required"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a model worker needs for its whole life: the job config and, in a study, the judging settings.

    ``judge_cache`` is a folder on the worker's node for the LLM judge's reply cache (shared between a
    node's workers; on a shared mount, between nodes).
    """

    cfg: Config
    judge: JudgeSettings | None = None
    fluency: FluencySection | None = None
    utility: UtilitySection | None = None
    judge_cache: str = ""


@dataclass(frozen=True)
class ShardTask:
    """One attempt at one shard of ``stage``.

    ``slice``: the input rows (extract, steer, utility). ``files``: committed objects of an earlier stage
    the shard reads (the activation files for ``fit``; the generation shard for ``evaluate``).
    ``bundles``: value → the folder of its committed bundle. ``params``: small stage-specific facts
    (the value to fit and the model the activations were recorded with). ``batch_divisor``: batches are
    this many times smaller than configured (doubled after an out-of-memory failure). ``run``: the
    stage's shard function (its declaration's ``shard``, :mod:`conva.jobs.registry`), which the worker
    calls; a module-level function, so it travels as its import path.
    """

    stage: str
    ref: ShardRef
    slice: InputSlice | None = None
    files: tuple[Location, ...] = ()
    bundles: dict[str, Location] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    batch_divisor: int = 1
    run: Callable[[Any, ShardTask], Any] | None = None

    def input(self) -> InputSlice:
        """The shard's input slice (a stage that reads rows); a task without one is a driver bug, named here."""
        return required(self.slice, f"an input slice (stage {self.stage!r}, shard {self.ref.shard})")

    def batch(self, size: int) -> int:
        """A configured batch size, shrunk after out-of-memory retries."""
        return max(1, size // self.batch_divisor)


class ShardWorker(Protocol):
    """What a shard function (:mod:`conva.workers.shards`) uses of the worker running it.

    :class:`conva.workers.worker.ModelWorker` is the one implementation: it owns the model and loads each
    part once, on first use.
    """

    spec: WorkerSpec
    cfg: Config

    def hf(self) -> tuple[Any, Any]:
        """The HF model and tokenizer."""

    def model_info(self) -> dict:
        """The loaded model's facts (name, fingerprint, hidden size, blocks)."""

    def steerer(self) -> Any:
        """The steering backend (``steer.backend``) on the loaded model."""

    def bundles(self, where: dict[str, Location]) -> dict[str, Any]:
        """The value bundles in ``where`` (value → folder), checked against the model."""

    def judge(self, bundles: dict[str, Any]) -> Any:
        """The study's judge."""

    def fluency_judge(self) -> Any:
        """The LLM rating answers' fluency."""


def required(value: T | None, what: str) -> T:
    """``value``, or a clear error naming ``what`` a shard needed but its worker or task does not carry (the
    study's sections exist only on a study's workers)."""
    if value is None:
        raise ValueError(f"this shard needs {what}, which its worker or task does not carry")
    return value


@dataclass
class StageRun:
    """One stage as the runner sees it: its store, how to build an attempt's task, when a shard may start."""

    name: str
    stage: Stage
    make_task: Callable[[ShardRef], ShardTask]
    after: Callable[[int], bool] | None = None  # None: every shard may start now
    on_commit: Callable[[ShardRecord], None] | None = None
