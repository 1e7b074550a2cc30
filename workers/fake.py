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
from dataclasses import dataclass

import pyarrow as pa

from conva.batch.config import Config
from conva.batch.inputs import read_table_slice
from conva.batch.storage import Location
from conva.batch.store import ShardRecord, Stage, write_table_shard
from conva.workers.errors import ShardError, classify
from conva.workers.hooks import load_hook
from conva.workers.pool import WorkerPool
from conva.workers.tasks import ShardTask, WorkerSpec
from conva.workers.worker import _identity, mark_running

__all__ = ["FakeWorker", "fake_rows", "simulate", "Simulation"]

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
        self.identity = _identity()

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


@dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` measured: walls (s), the driver's CPU seconds and peak RSS (MB), the pool's counts."""

    shards: int
    workers: int
    shard_seconds: float
    startup_s: float  # pool start until min_workers were ready
    run_s: float  # first dispatch until the last shard committed
    finish_s: float  # publishing what was left (Stage.finish)
    driver_cpu_s: float  # process CPU time of the driver over the whole job (start, run, finish)
    driver_rss_mb: float  # the driver's peak RSS so far
    committed: int
    rows: int

    @property
    def ideal_s(self) -> float:
        """The wall a perfect orchestrator would take: whole rounds of ``workers`` shards each."""
        return -(-self.shards // self.workers) * self.shard_seconds

    @property
    def whole_s(self) -> float:
        return self.startup_s + self.run_s + self.finish_s


def simulate(
    out: Location,
    cfg: Config,
    n_shards: int,
    rows: int = 4,
    folder: str = "generations",
    pool: WorkerPool | None = None,
    seconds: float | None = None,
) -> tuple[Simulation, Stage]:
    """Run a simulated steering stage of ``n_shards`` shards of ``rows`` rows on ``cfg.ray.num_workers`` fake
    workers, writing to ``<out>/<folder>`` through the real store and runner. Needs Ray (connected).

    ``cfg.steer.backend`` must be ``"fake"``. ``pool``: a started pool of fake workers to reuse (then
    ``startup_s`` is 0 and the pool is left running); ``seconds``: each shard's time (default
    ``ray.fake_shard_seconds``). Returns the measures and the (finished) stage, whose committed Parquet
    shards hold one row per ``row_id`` ``0 .. n_shards * rows - 1``.
    """
    import resource

    from conva.batch.schemas import SCHEMA_VERSION
    from conva.workers.pool import StageRun, run_stages

    if cfg.steer.backend != "fake":
        raise ValueError(f"steer.backend: simulate runs fake workers only, not {cfg.steer.backend!r}")
    cpu0 = time.process_time()
    stage = Stage.open(out, folder, {"simulation": "fake", "rows": rows}, SCHEMA_VERSION, n_shards=n_shards)
    shard_s = cfg.ray.fake_shard_seconds if seconds is None else seconds
    params = {"rows": rows, "seconds": shard_s}
    run = StageRun("steer", stage, lambda ref: ShardTask("steer", ref, params=params))
    own = pool is None
    if pool is None:
        pool = WorkerPool(WorkerSpec(cfg), "fake", ())
    try:
        startup = pool.start() if own else 0.0
        t0 = time.monotonic()
        run_stages(pool, [run])
        run_s = time.monotonic() - t0
    finally:
        if own:
            pool.stop()
    t1 = time.monotonic()
    stage.finish()
    finish_s = time.monotonic() - t1
    measured = Simulation(
        n_shards,
        len(pool.members) if not own else cfg.ray.num_workers,
        shard_s,
        startup,
        run_s,
        finish_s,
        time.process_time() - cpu0,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        len(stage.committed()),
        stage.row_count(),
    )
    return measured, stage
