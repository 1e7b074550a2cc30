"""The driver's cost per committed shard at 100, 1,000 and 10,000 shards, on a local folder and on S3.

For each size N a fresh stage is opened (:meth:`conva.batch.store.Stage.open`, the store the jobs use). First,
standing in for the workers and not timed, N attempts are written the way a worker writes them
(:func:`conva.batch.store.write_table_shard` into each attempt's folder: a small steering-shaped table). Then
the driver's part is timed, exactly what the stage runner does per shard: ``Stage.commit(record)``
(append one log object, publish the shard under its final name, delete the attempt folder) and
``Stage.compact_if_due()`` (a segment of the last ``COMPACT_EVERY`` records, and one batched deletion of the
single records it holds). ``Stage.finish()`` and a reopening of the complete stage (replaying
its log, listing its objects: what a resumed job pays once) are timed separately.

All sizes run one after another in one process (after an untimed warm-up), the first size again at the
end, so the ratio of the cost per shard at the largest size to the smallest (the mean of its two runs) is
measured side by side. The local folder lies on
the repository's disk (``benchmarks/.cache``: fsync'd as a job's output would be); S3 is ``moto_server``
on loopback (``tests/s3server.py``): its figures include the mock server's own time per request.

    python -m benchmarks.bench_commit [--shards 100 1000 10000] [--s3-shards 100 1000] [--compact-every N]

Writes ``benchmarks/results/commit.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from benchmarks.common import CACHE, RESULTS, commit_timed, machine, write_result

OUT = RESULTS / "commit.json"
ROWS = 8  # rows per shard: a steering shard's record is the same size whatever its rows


def _shard_table(shard: int) -> pa.Table:
    return pa.table(
        {
            "row_id": [f"p/{shard:06d}/{i}" for i in range(ROWS)],
            "output": [f"answer {shard} {i}" for i in range(ROWS)],
            "eps": pa.array([0.1 * i for i in range(ROWS)], pa.float64()),
        }
    )


def one_size(root, n: int) -> dict:
    """Open a fresh stage of ``n`` shards under ``root``, write every attempt, then time the driver's commits."""
    import conva.batch.store as store
    from conva.batch.schemas import SCHEMA_VERSION

    stage = store.Stage.open(
        root, f"commit{n}-{uuid.uuid4().hex[:6]}", {"bench": "commit", "n": n}, SCHEMA_VERSION, n_shards=n
    )

    def write(shard: int):
        return store.write_table_shard(stage.ref(shard, uuid.uuid4().hex[:12]), _shard_table(shard))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:  # the workers' side, not timed as the driver's
        records = list(pool.map(write, range(n)))
    written = time.perf_counter() - t0
    costs = commit_timed(stage, records)
    t = time.perf_counter()
    stage.finish()
    finish = time.perf_counter() - t
    t = time.perf_counter()
    again = store.Stage.open(root, stage.name, {"bench": "commit", "n": n}, SCHEMA_VERSION, n_shards=n)
    reopen = time.perf_counter() - t
    if again.pending() or again.row_count() != n * ROWS:
        raise RuntimeError(
            f"the reopened stage holds {again.row_count()} rows, {len(again.pending())} shards pending"
        )
    log = [f.name for f in stage.location.child("_log").list()]
    tenth = max(1, n // 10)
    return {
        "shards": n,
        "driver_s": round(sum(costs), 4),
        "ms_per_shard": round(1000 * sum(costs) / n, 4),
        "median_ms": round(1000 * statistics.median(costs), 4),
        "p99_ms": round(1000 * _quantile(costs, 0.99), 4),
        "max_ms": round(1000 * max(costs), 2),
        "ms_per_shard_first_tenth": round(1000 * sum(costs[:tenth]) / tenth, 4),
        "ms_per_shard_last_tenth": round(1000 * sum(costs[-tenth:]) / tenth, 4),
        "commits_per_s": round(n / sum(costs), 1),
        "log_objects_after": len(log),
        "finish_s": round(finish, 4),
        "reopen_s": round(reopen, 4),
        "workers_write_s": round(written, 2),
    }


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_sizes(root, sizes: list[int]) -> list[dict]:
    """Every size in order, then the first one again (the same machine state at both ends of the run).

    An untimed run of the first size goes before them all: imports, connections and caches warm up.
    """
    one_size(root, sizes[0])
    runs = []
    for n in [*sizes, sizes[0]]:
        runs.append(one_size(root, n))
        print(f"{root}: {n} shards, {runs[-1]['ms_per_shard']:.3f} ms per shard", flush=True)
    return runs


def _summary(runs: list[dict]) -> dict:
    first = statistics.mean([runs[0]["ms_per_shard"], runs[-1]["ms_per_shard"]])
    largest = runs[-2]
    return {
        "smallest": runs[0]["shards"],
        "largest": largest["shards"],
        "ms_per_shard_smallest": round(first, 4),
        "ms_per_shard_largest": largest["ms_per_shard"],
        "ratio": round(largest["ms_per_shard"] / first, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument(
        "--s3-shards",
        type=int,
        nargs="*",
        default=[100, 1000],
        help="sizes on S3 (moto on loopback); none to skip",
    )
    ap.add_argument(
        "--compact-every",
        type=int,
        default=0,
        help="records between log checkpoints (0: the store's COMPACT_EVERY); smaller for a quick run",
    )
    args = ap.parse_args(argv)
    import conva.batch.store.log as store_log  # the commit log reads COMPACT_EVERY from its own module
    from conva.batch.storage import location

    if args.compact_every:
        store_log.COMPACT_EVERY = args.compact_every  # read by the log at every commit
    report: dict = {
        **machine(),
        "benchmark": "commit",
        "rows_per_shard": ROWS,
        "compact_every": store_log.COMPACT_EVERY,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="commit-", dir=CACHE))
    try:
        runs = run_sizes(location(folder), args.shards)
        report["local"] = {"runs": runs, **_summary(runs)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.s3_shards:
        from tests.s3server import s3_server

        with s3_server() as s3:
            os.environ.update(s3.env)  # pyarrow.fs reads the endpoint and credentials from the environment
            runs = run_sizes(location(s3.bucket() + "/out"), args.s3_shards)
            report["s3"] = {"runs": runs, **_summary(runs)}
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
