"""Publishing committed shards off the scheduling loop: a background thread, errors raised on the next call.

The driver appends a commit record (the commit) and hands the record to the :class:`Publisher`, which
renames (filesystem) or copies (object store) its objects to their final names; readers only ever see
published objects. :meth:`conva.batch.store.stage.Stage.finish` and ``close`` wait for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

from conva.batch.store.records import ShardRecord, StoreError

_log = logging.getLogger("conva.batch.store")


class Publisher:
    """Publishes committed shards in a background thread, in commit order, so that the driver's scheduling
    loop only appends records. The first error is kept and raised at the next commit or wait."""

    def __init__(self, name: str, publish: Callable[[ShardRecord], None]) -> None:
        self.publish = publish  # the stage's own publishing of one committed record
        self.queue: queue.Queue[ShardRecord | None] = queue.Queue()
        self.pending: set[int] = set()
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"conva-publish-{name}", daemon=True)
        self.thread.start()

    def put(self, record: ShardRecord) -> None:
        with self.cond:
            self.pending.add(record.shard)
        self.queue.put(record)

    def _run(self) -> None:
        while (record := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self.publish(record)
            except BaseException as err:  # kept for the driver's thread, which raises it
                self.error = err
            with self.cond:
                self.pending.discard(record.shard)
                self.cond.notify_all()

    def wait(self, shard: int | None = None) -> None:
        """Until ``shard`` (or every queued shard) is published; raises the publisher's error if any."""
        with self.cond:
            self.cond.wait_for(lambda: not self.pending if shard is None else shard not in self.pending)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise StoreError(f"publishing failed: {self.error}") from self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def remove_empty_tree(path: str) -> None:
    """Remove the now empty folders of a published attempt (bundles have subfolders), deepest first."""
    for folder, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(folder)
        except OSError:
            pass
