"""The stage runner's vocabulary: a shard call in flight, and the two ways a run of shards ends early.

:class:`ShardCall` is one attempt at one shard, submitted to one worker (:mod:`conva.workers.scheduler`
keeps them per worker, in the order the worker runs them). :class:`ShardFailedError` ends a run when a
shard fails for good; :class:`Cancelled` when the run's ``cancel`` event is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conva.workers.tasks import StageRun

__all__ = ["ShardCall", "ShardFailedError", "Cancelled"]


class ShardFailedError(RuntimeError):
    """A shard failed for good: a fatal worker error, or retries (deaths, timeouts, transient errors) used up."""

    def __init__(self, stage: str, shard: int, message: str) -> None:
        super().__init__(f"{stage} shard {shard} failed: {message}")
        self.stage, self.shard = stage, shard


class Cancelled(RuntimeError):
    """The run was asked to stop (its ``cancel`` event was set, e.g. by a signal to a study's driver)."""


@dataclass
class ShardCall:
    """One attempt (``attempt``, a fresh id) at ``shard`` of ``run``: its Ray ref and when it was submitted."""

    ref: Any
    run: StageRun
    shard: int
    attempt: str
    submitted: float
    timed_out: bool = False
    speculative: bool = False  # a second attempt at a straggler (first record wins)
