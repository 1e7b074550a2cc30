"""A simulated model worker, for measuring the orchestration apart from the model: ``steer.backend = "fake"``.

**A simulation tool, not a backend that computes anything.** A :class:`FakeWorker` stands where a
:class:`~conva.workers.worker.ModelWorker` would: the same pool starts it, the same runner feeds it shards
and commits its records, and it writes a real (small) Parquet shard through the normal store path
(:func:`conva.batch.store.write_table_shard`). But a shard's work is a sleep of ``ray.fake_shard_seconds``
standing in for a GPU forward pass, so it costs wall time and no CPU: dozens of workers share this
machine's two cores and the measured job time is the orchestration's (start-up, dispatch, commits,
publishing) plus the simulated compute, which is known exactly. It loads no model and imports no torch
(a test checks ``sys.modules``), so a fake worker process costs little memory.

Each output row is one input row: ``row_id`` is the input's ``row_id`` where the slice has one, else
the running number ``shard * rows + i`` of a task that names only ``params["rows"]`` (the benchmark's
tasks); ``error`` is null; ``output`` a short fixed text. A task's ``params["seconds"]`` overrides the
configured shard time (a benchmark reuses one pool for several shard times). A config selects it for
any stage::

    backend = "fake"            # under [steer]
    fake_shard_seconds = 0.5    # under [ray]
"""

from __future__ import annotations

import time

import pyarrow as pa

from conva.batch.inputs import read_table_slice
from conva.batch.store import ShardRecord, write_table_shard
from conva.workers.errors import ShardError, classify
from conva.workers.hooks import load_hook
from conva.workers.tasks import ShardTask, WorkerSpec
from conva.workers.worker import mark_running, worker_identity

__all__ = ["FakeWorker", "fake_rows"]

FAKE_OUTPUT = "(fake)"


def fake_rows(task: ShardTask) -> pa.Table:
    """The shard's output table: one row per input row (see the module docstring)."""
    if task.slice is not None:
        table = read_table_slice(task.slice)
        ids = (
            table.column("row_id").to_pylist()
            if "row_id" in table.column_names
            else list(range(task.slice.first_row, task.slice.first_row + table.num_rows))
        )
    else:
        n = int(task.params.get("rows", 1))
        ids = list(range(task.ref.shard * n, task.ref.shard * n + n))
    return pa.table(
        {
            "row_id": pa.array(ids, pa.int64()),
            "output": pa.array([FAKE_OUTPUT] * len(ids), pa.string()),
            "error": pa.array([None] * len(ids), pa.string()),
        }
    )


class FakeWorker:
    """Serves every stage's shards by sleeping ``ray.fake_shard_seconds`` and writing :func:`fake_rows`."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec, self.cfg = spec, spec.cfg
        self.seconds = spec.cfg.ray.fake_shard_seconds
        self.hook = load_hook()
        self.loads = 0
        self.identity = worker_identity()

    def ready(self) -> dict:
        """Who this worker is (node, address, pid, id)."""
        return dict(self.identity)

    def load(self, parts: tuple[str, ...]) -> dict:
        """Loads nothing; answers as :meth:`ModelWorker.load` does (identity, load count, times)."""
        now = time.time()
        return {**self.identity, "model": {}, "loads": self.loads, "started": now, "finished": now}

    def run(self, task: ShardTask) -> ShardRecord:
        """Sleep, then write the shard's rows to the attempt's folder; errors leave as typed ShardErrors."""
        from dataclasses import replace

        started = time.time()
        mark_running(self.identity["worker"], task.ref.attempt)
        try:
            if self.hook is not None:
                self.hook(task, self)
            table = fake_rows(task)
            seconds = float(task.params.get("seconds", self.seconds))
            time.sleep(seconds)  # the simulated forward pass: wall time, no CPU
            record = write_table_shard(task.ref, table, extra={"errors": 0, "inputs": table.num_rows})
        except Exception as err:
            where = f"node {self.identity['ip']}, worker {self.identity['worker']}"
            raise ShardError(classify(err), f"{type(err).__name__}: {err}", where) from err
        worker = {**self.identity, "started": started, "finished": time.time(), "loads": self.loads}
        return replace(record, worker=worker)
