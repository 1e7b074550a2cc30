"""**Progress** goes to the log as ``<stage>: shard i of N committed, x rows/s, ETA …`` lines, at most every
few seconds, so it shows in ``run.log`` and under ``ray job submit`` alike; on a terminal each stage also
gets a bar (which the job's log lines print above, see :func:`conva.jobs.common.setup_logging`).
"""

from __future__ import annotations

import logging
import sys
import time

from conva.batch.store import ShardRecord
from conva.workers.tasks import StageRun

__all__ = ["StageProgress", "duration_text"]

_log = logging.getLogger("conva.jobs")
_PROGRESS_EVERY_S = 10.0


class StageProgress:
    """``shard i of N, rows/s, ETA`` log lines for one stage, at most every few seconds; a bar too on a terminal."""

    def __init__(self, run: StageRun, label: str = "") -> None:
        self.run, self.total = run, run.stage.n_shards
        self.done, self.rows, self.last = len(run.stage.committed()), 0, 0.0
        self.start: float | None = None  # when the stage's first shard was handed out
        self.todo = self.total - self.done
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=f"{label}{run.name}",
                unit="shard",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def dispatched(self) -> None:
        if self.start is None:
            self.start = time.monotonic()

    def committed(self, record: ShardRecord) -> None:
        self.done, self.rows = self.done + 1, self.rows + record.rows
        if self.bar is not None:
            self.bar.update(1)
        now = time.monotonic()
        if now - self.last < _PROGRESS_EVERY_S and self.done < self.total:
            return
        self.last = now
        elapsed, finished = now - (self.start or now), self.todo - (self.total - self.done)
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = elapsed / finished * (self.total - self.done) if finished else 0.0
        _log.info(
            "%s: shard %d of %d committed, %.1f rows/s, ETA %s",
            self.run.name,
            self.done,
            self.total,
            rate,
            duration_text(eta),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration_text(seconds: float) -> str:
    """``1h02m`` or ``3m07s``: an ETA as the progress lines print it."""
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
