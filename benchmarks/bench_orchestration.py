"""The orchestration at scale, apart from the model: fake workers (``steer.backend = "fake"``) on one machine.

Each fake worker sleeps a fixed time per shard (a stand-in for a GPU forward pass: wall time, no CPU) and
writes a real small Parquet shard through the store; the driver dispatches, commits and publishes as in
a real job (:func:`conva.workers.simulation.simulate`). So what is measured is the orchestration: how close the
whole run comes to the ideal ``ceil(shards / workers) x shard_seconds``, how many commits per second the
driver sustains, and what the driver spends (CPU seconds, peak RSS).

One Ray (two CPUs' worth, on loopback) and, per worker count, one pool of fake workers reused for every
configuration (its start-up is reported apart); a local folder and the S3 test server (moto on loopback,
:mod:`tests.s3server`) as the output. Every configuration's output is checked: each ``row_id`` exactly once.

    python -m benchmarks.bench_orchestration            # the plan in PLAN (about 30 min)
    python -m benchmarks.bench_orchestration --quick    # a minute's smoke run
    python -m benchmarks.bench_orchestration --acceptance  # the issue's shape: 64 x 1 s, 1e3/1e4, both stores
    python -m benchmarks.bench_orchestration --acceptance --stores s3  # one output only
    python -m benchmarks.bench_orchestration --preflight --sizes-mb 64,1024,10240  # pre-flight vs. input size

``--preflight`` plans generated Parquet and JSON Lines prompts files of growing size as a job's
pre-flight does (:func:`conva.batch.inputs.plan_input` with ``metadata_only``) and, up to 1 GB, with every
row screened on the driver too, each timed on the driver.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import tempfile
import time

from benchmarks.common import RESULTS, RSSSampler, machine, write_result

__all__ = ["main", "PLAN"]

# (store, workers, shards, shard seconds). Shard times shrink as shards grow so each run's ideal wall stays
# at ~16-125 s. The 1e5-shard run is at 64 workers only, and S3 runs stop at 1e3 shards: the driver's commit
# rate, not the workers, bounds them (at S3's ~15 commits/s, 1e4 shards take 11 min; see RESULTS.md).
PLAN: list[tuple[str, int, int, float]] = [
    *[("local", w, 1_000, 1.0) for w in (8, 32, 64)],
    *[("local", w, 10_000, 0.1) for w in (8, 32, 64)],
    ("local", 64, 100_000, 0.01),
    *[("s3", w, 1_000, 1.0) for w in (8, 32, 64)],
]
QUICK: list[tuple[str, int, int, float]] = [("local", 8, 200, 0.05), ("s3", 8, 100, 0.05)]
# The acceptance shape: 64 workers, 1-second shards, 10^3 and 10^4 shards, local and on S3 (~7 min).
ACCEPTANCE: list[tuple[str, int, int, float]] = [
    (store, 64, shards, 1.0) for store in ("local", "s3") for shards in (1_000, 10_000)
]
ROWS = 4  # rows per shard: a small real Parquet shard


def _config(workers: int):
    from conva.batch.config import Config

    cfg = Config()
    ray_cfg = cfg.ray.model_copy(
        update=dict(
            num_workers=workers,
            min_workers=workers,
            num_cpus_per_worker=0.0,  # a fake worker sleeps: it needs no CPU of its own
            shard_timeout_s=0.0,
            speculate_after=0.0,  # uniform shards: speculation would only add attempts
        )
    )
    return cfg.model_copy(update=dict(steer=cfg.steer.model_copy(update=dict(backend="fake")), ray=ray_cfg))


def _check_rows(stage, n_shards: int) -> bool:
    """Every row_id 0 .. n_shards*ROWS-1 exactly once in the committed shards."""
    ids = stage.dataset().to_table(columns=["row_id"]).column("row_id").to_pylist()
    return sorted(ids) == list(range(n_shards * ROWS))


def _one(store: str, shards: int, seconds: float, pool, cfg, s3) -> dict:
    from conva.batch.storage import location
    from conva.workers.simulation import simulate

    if store == "s3":
        out = location(f"{s3.bucket()}/run")
    else:
        folder = tempfile.mkdtemp(prefix="orch-", dir=os.environ.get("CONVA_BENCH_TMP"))
        out = location(folder)
    seen = len(pool.busy)
    with RSSSampler(every_s=0.5) as rss:
        m, stage = simulate(out, cfg, shards, rows=ROWS, pool=pool, seconds=seconds)
    # What a worker spent per shard (its sleep plus its own write of the shard to the output): the part of the
    # wall that is not the driver's. Whole rounds of it are the ideal of an orchestrator on this storage.
    busy = [finished - started for _, started, finished in list(pool.busy)[seen:] if finished and started]
    worker_s = sum(busy) / len(busy) if busy else seconds
    exact = _check_rows(stage, shards) if shards <= 10_000 or store == "local" else None
    if store == "local":
        shutil.rmtree(folder, ignore_errors=True)
    row = {
        "store": store,
        "workers": m.workers,
        "shards": shards,
        "shard_s": seconds,
        "ideal_s": round(m.ideal_s, 2),
        "run_s": round(m.run_s, 2),
        "finish_s": round(m.finish_s, 3),
        "efficiency": round(m.ideal_s / (m.run_s + m.finish_s), 3),
        "worker_s_per_shard": round(worker_s, 4),
        # against whole rounds of what the workers actually spent per shard (their writes included)
        "orchestration_efficiency": round(-(-shards // m.workers) * worker_s / (m.run_s + m.finish_s), 3),
        "commits_per_s": round(m.committed / (m.run_s + m.finish_s), 1),
        "driver_cpu_s": round(m.driver_cpu_s, 2),
        "driver_cpu_ms_per_shard": round(1000 * m.driver_cpu_s / shards, 3),
        "driver_rss_peak_mb": round(max(s[1] for s in rss.samples), 1),
        "committed": m.committed,
        "rows": m.rows,
        "each_row_once": exact,
    }
    print(row, flush=True)
    return row


def _profile(pool, cfg, shards: int, seconds: float) -> list[str]:
    """The driver's top functions by own time over one local run (cProfile)."""
    from conva.batch.storage import location
    from conva.workers.simulation import simulate

    folder = tempfile.mkdtemp(prefix="orch-prof-")
    prof = cProfile.Profile()
    prof.enable()
    simulate(location(folder), cfg, shards, rows=ROWS, pool=pool, seconds=seconds)
    prof.disable()
    shutil.rmtree(folder, ignore_errors=True)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
    return [line for line in text.getvalue().splitlines() if line.strip()][-16:]


def preflight(
    sizes_mb: tuple[int, ...] = (64, 256, 1024),
    rows_per_shard: int = 32,
    full_max_mb: int = 1024,
    formats: tuple[str, ...] = ("parquet", "jsonl"),
) -> dict:
    """Driver seconds and memory to plan a prompts file of each size and format as a job's pre-flight does
    (metadata only: a Parquet footer; a JSON Lines file's newlines found on a thread per core of the driver,
    or by Ray tasks (a local Ray of this machine's cores); the first ``SCREEN_ROWS`` rows screened) and, up
    to ``full_max_mb``, with every row screened on the driver as well."""
    import ray

    from conva.workers.cluster_map import cluster_map

    folder, rows = tempfile.mkdtemp(prefix="orch-preflight-", dir=os.environ.get("CONVA_BENCH_TMP")), []
    if "jsonl" in formats:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        cluster_map(len, [b""] * 4)  # the task workers are started before anything is timed
    try:
        for fmt in formats:
            for mb in sizes_mb:
                path = os.path.join(folder, f"prompts-{mb}mb.{fmt}")
                (_write_parquet if fmt == "parquet" else _write_jsonl)(path, mb)
                runs = [(True, None)]
                if fmt == "jsonl":
                    runs.append((True, cluster_map))
                if mb <= full_max_mb:
                    runs.append((False, None))
                for metadata_only, map_ranges in runs:
                    row = {
                        "format": fmt,
                        "index": "ray tasks" if map_ranges else "driver threads" if fmt == "jsonl" else "-",
                        **_plan_timed(path, rows_per_shard, metadata_only, map_ranges),
                    }
                    print(row, flush=True)
                    rows.append(row)
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()
    return {"machine": machine(), "rows_per_shard": rows_per_shard, "runs": rows}


def _plan_timed(path: str, rows_per_shard: int, metadata_only: bool, map_ranges=None) -> dict:
    from conva.batch.inputs import plan_input

    screened = [0]

    def screen(name: str, records: list) -> None:
        screened[0] += len(records)

    with RSSSampler(every_s=0.05) as rss:
        base = rss.sample()[1]
        t0, c0 = time.perf_counter(), time.process_time()
        plan = plan_input(path, rows_per_shard, screen, metadata_only=metadata_only, map_ranges=map_ranges)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = max([rss.sample()[1], *(s[1] for s in rss.samples)])
    cpu -= rss.cpu_s  # the sampler's own reads of /proc are not the driver's work
    return {
        "file_mb": round(os.path.getsize(path) / 2**20, 1),
        "rows": plan.rows,
        "shards": len(plan.slices),
        "metadata_only": metadata_only,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "sampler_cpu_s": round(rss.cpu_s, 3),  # left out of cpu_s
        "rows_screened_on_driver": screened[0],
        "rss_growth_mb": round(peak - base, 1),
    }


def _random_prompts(rng, k: int) -> list[str]:
    import numpy as np

    return [row.tobytes().hex() for row in rng.integers(0, 256, size=(k, 100), dtype=np.uint8)]


def _write_parquet(path: str, mb: int) -> None:
    """~200 incompressible bytes of prompt per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, rng = mb * 2**20 // 200, np.random.default_rng(mb)
    with pq.ParquetWriter(path, pa.schema([("value", pa.string()), ("prompt", pa.string())])) as w:
        for start in range(0, n, 100_000):
            k = min(100_000, n - start)
            prompts = pa.array(_random_prompts(rng, k))
            w.write_table(pa.table({"value": pa.array(["power"] * k), "prompt": prompts}))


def _write_jsonl(path: str, mb: int) -> None:
    """Rows of ~230 bytes (a 200-character random prompt): one block of 100,000 random rows, repeated."""
    import json

    import numpy as np

    rows = _random_prompts(np.random.default_rng(mb), 100_000)
    block = "".join(json.dumps({"value": "power", "prompt": p}) + "\n" for p in rows).encode()
    with open(path, "wb") as f:
        for _ in range(max(1, mb * 2**20 // len(block))):
            f.write(block)


def main(argv: list[str] | None = None) -> dict:
    import ray

    from conva.workers.pool import WorkerPool
    from conva.workers.tasks import WorkerSpec
    from tests.s3server import s3_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preflight", action="store_true")
    parser.add_argument(
        "--acceptance", action="store_true", help="64 workers x 1 s shards, 1e3 and 1e4, both stores"
    )
    parser.add_argument("--stores", default="local,s3", help="with --acceptance: which outputs (local,s3)")
    parser.add_argument(
        "--sizes-mb",
        default="64,256,1024",
        help="with --preflight: the prompts files' sizes (MB), e.g. 10240",
    )
    parser.add_argument(
        "--formats",
        default="parquet,jsonl",
        help="with --preflight: the prompts files' formats (parquet,jsonl)",
    )
    args = parser.parse_args(argv)
    if args.preflight:
        sizes = (8, 32) if args.quick else tuple(int(x) for x in args.sizes_mb.split(","))
        report = preflight(sizes, formats=tuple(args.formats.split(",")))
        write_result(RESULTS / "orchestration_preflight.json", report)
        return report
    plan = QUICK if args.quick else ACCEPTANCE if args.acceptance else PLAN
    plan = [p for p in plan if p[0] in args.stores.split(",")]
    report: dict = {
        "machine": machine(),
        "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "rows_per_shard": ROWS,
        "runs": [],
        "pools": [],
    }
    with s3_server() as s3:
        os.environ.update(s3.env)  # before Ray starts: its workers inherit the endpoint and keys
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            for workers in sorted({w for _, w, _, _ in plan}):
                cfg = _config(workers)
                pool = WorkerPool(WorkerSpec(cfg), "fake", ())
                started = pool.start()
                report["pools"].append({"workers": workers, "startup_s": round(started, 1)})
                try:
                    for store, w, shards, seconds in plan:
                        if w == workers:
                            report["runs"].append(_one(store, shards, seconds, pool, cfg, s3))
                    if workers == max(w for _, w, _, _ in plan) and not (args.quick or args.acceptance):
                        report["profile_local_64x10000"] = _profile(pool, cfg, 10_000, 0.1)
                finally:
                    pool.stop()
        finally:
            ray.shutdown()
    report["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    name = (
        "orchestration-quick"
        if args.quick
        else "orchestration-acceptance"
        if args.acceptance
        else "orchestration"
    )
    stores = sorted({p[0] for p in plan})
    if not args.quick and stores != ["local", "s3"]:  # a partial run keeps the full one's file
        name += "-" + "-".join(stores)
    write_result(RESULTS / f"{name}.json", report)
    return report


if __name__ == "__main__":
    main()
