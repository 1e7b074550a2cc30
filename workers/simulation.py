"""A simulated stage on fake workers (``steer.backend = "fake"``): the real store and runner, no model.

:func:`simulate` runs ``n`` shards through the one runner (:func:`conva.workers.scheduler.run_stages`) on a pool
of :class:`conva.workers.fake.FakeWorker` s, each shard a known sleep plus a real small Parquet write, and
measures what the orchestration adds: the benchmark (``benchmarks/bench_orchestration.py``) and the tests
(``tests/test_orchestration.py``) use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from conva.batch.config import Config
from conva.batch.storage import Location
from conva.batch.store import Stage
from conva.workers.pool import WorkerPool
from conva.workers.tasks import ShardTask, WorkerSpec

__all__ = ["Simulation", "simulate"]


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
    from conva.workers.scheduler import run_stages
    from conva.workers.tasks import StageRun

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
