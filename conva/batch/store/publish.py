"""Publishing committed shards off the scheduling loop: background threads, errors raised on the next call.

The driver appends a commit record (the commit) and hands the record to the :class:`Publisher`, which
renames (filesystem) or copies (object store) its objects to their final names, and deletes the copies'
sources in batches; readers only ever see published objects. :meth:`conva.batch.store.stage.Stage.finish`
and ``close`` wait for it.
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
    """Publishes committed shards in background threads, so that the driver's scheduling loop only appends
    records. The first error is kept and raised at the next commit or wait.

    ``publish`` puts one committed record's objects in place and returns the names of the sources it left
    behind (an object store's copies: the attempt's objects, now garbage); ``collect`` deletes such names,
    and gets them in batches of up to ``batch`` (one S3 ``DeleteObjects`` request holds 1,000 keys) and once
    more at :meth:`stop`. A source not yet collected when the driver dies is found by the next open, which
    publishes that committed shard again (the same bytes) and deletes it.

    ``threads``: how many shards are published at once. A rename is cheap (one thread), but on an object
    store each shard is a copy, a round trip, so one thread would publish fewer shards per second than 64
    workers commit; several keep up (publishing order does not matter: readers see a shard once it is in
    place, and :meth:`wait` waits for exactly the shards asked about).
    """

    def __init__(
        self,
        name: str,
        publish: Callable[[ShardRecord], list[str]],
        collect: Callable[[list[str]], None],
        threads: int = 1,
        batch: int = 1000,
    ) -> None:
        self.publish, self.collect, self.batch = publish, collect, batch
        self.queue: queue.Queue[ShardRecord | None] = queue.Queue()
        self.pending: set[int] = set()
        self.garbage: list[str] = []  # published sources not yet deleted
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._run, name=f"conva-publish-{name}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for thread in self.threads:
            thread.start()

    def put(self, record: ShardRecord) -> None:
        with self.cond:
            self.pending.add(record.shard)
        self.queue.put(record)

    def _run(self) -> None:
        while (record := self.queue.get()) is not None:
            full: list[str] = []
            try:
                if self.error is None:
                    left = self.publish(record)
                    with self.cond:
                        self.garbage.extend(left)
                        if len(self.garbage) >= self.batch:
                            full, self.garbage = self.garbage, []
            except BaseException as err:  # kept for the driver's thread, which raises it
                with self.cond:
                    self.error = self.error or err
            with self.cond:
                self.pending.discard(record.shard)
                self.cond.notify_all()
            self._collect(full)

    def _collect(self, names: list[str]) -> None:
        try:
            if names:
                self.collect(names)
        except BaseException as err:
            with self.cond:
                self.error = self.error or err

    def wait(self, shard: int | None = None) -> None:
        """Until ``shard`` (or every queued shard) is published; raises the publisher's error if any."""
        with self.cond:
            self.cond.wait_for(lambda: not self.pending if shard is None else shard not in self.pending)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise StoreError(f"publishing failed: {self.error}") from self.error

    def stop(self) -> None:
        """Publish what is queued, end the threads, then delete the sources left (idempotent)."""
        alive = [t for t in self.threads if t.is_alive()]
        for _ in alive:
            self.queue.put(None)
        for thread in alive:
            thread.join()
        with self.cond:
            rest, self.garbage = self.garbage, []
        self._collect(rest)


def remove_empty_tree(path: str) -> None:
    """Remove the now empty folders of a published attempt (bundles have subfolders), deepest first."""
    for folder, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(folder)
        except OSError:
            pass
