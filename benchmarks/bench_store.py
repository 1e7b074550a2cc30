"""The driver's cost per commit and its memory with 10³ and 10⁵ committed records, on a local folder and on S3.

What is measured is the driver's side of the store only (no workers, no Ray): a stage
(:class:`conva.batch.store.Stage`, opened as the jobs open it: fenced by a held lease, publishing in the
background) that already holds N committed shards, then M more shards committed one by one:
``Stage.commit(record)`` plus ``Stage.compact_if_due()`` timed on the driver's thread, exactly what the
scheduling loop pays per shard. The M attempts are written beforehand, untimed, as workers would.

How a stage comes to hold N shards: the N records (the size and shape of a real steering shard's record,
with the ``worker`` facts the pool adds) are put into the open stage's in-memory state, as a replay of its
log would leave them, without writing N objects first (10⁵ PUTs to the test server would take most of an
hour). The M timed commits then run on the real storage. So the figure answers "does a commit cost more when
the driver already tracks 10⁵ shards" and "how much memory do 10⁵ shards take in the driver", not the
replay time of such a log.

Each (storage, N) runs in a fresh Python process (clean RSS), in the order 10³, 10⁵, 10³ per storage, so
the 10³ figure is the mean of two runs bracketing the 10⁵ one. RSS is the process's resident set
(``/proc/self/status``) once the stage is open (storage clients loaded), with the N records, and after
the M commits; ``rss_mb_per_1e5_records`` is what the extra records of the large run take, per 10⁵.

    python -m benchmarks.bench_store [--small 1000] [--large 100000] [--commits 2000] [--no-s3]

Writes ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from benchmarks.common import CACHE, RESULTS, commit_timed, machine, write_result

OUT = RESULTS / "store.json"
REPO = Path(__file__).resolve().parents[1]
ROWS = 8


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _table(shard: int) -> pa.Table:
    return pa.table(
        {
            "row_id": [f"p/{shard:06d}/{i}" for i in range(ROWS)],
            "output": [f"answer {shard} {i}" for i in range(ROWS)],
            "eps": pa.array([0.1 * i for i in range(ROWS)], pa.float64()),
        }
    )


def one(uri: str, n: int, m: int) -> dict:
    """In this process: a stage holding ``n`` shards, then ``m`` commits timed (see the module docstring)."""
    from conva.batch.lease import OutputLease, held_fence
    from conva.batch.storage import location
    from conva.batch.store import ShardRecord, Stage, StoredObject, write_table_shard

    out = location(uri)
    with OutputLease(out, "bench store"):
        stage = Stage.open(
            out,
            f"s{n}-{uuid.uuid4().hex[:6]}",
            {"bench": "store"},
            1,
            n_shards=n + m,
            fence=held_fence(out),
            background=True,
        )
        sample = write_table_shard(stage.ref(0, "sample"), _table(0))
        stage.location.child("_attempts").delete_tree()
        rss0 = _rss_mb()  # the storage clients (pyarrow, boto3) are loaded by now
        gen = stage._gen  # the state a replay of n commit records leaves
        for shard in range(n):
            gen.shards[shard] = ShardRecord(
                stage.name,
                stage.generation,
                shard,
                uuid.uuid4().hex[:12],
                (StoredObject(f"part-{shard:05d}.parquet", sample.objects[0].bytes, uuid.uuid4().hex * 2),),
                ROWS,
                sample.schema,
                {},
                {
                    "node": "10.0.0.7",
                    "pid": 4242,
                    "worker": f"w{shard % 64}",
                    "started": time.time(),
                    "finished": time.time(),
                },
            )
        rss_loaded = _rss_mb()

        def write(shard: int):
            return write_table_shard(stage.ref(shard, uuid.uuid4().hex[:12]), _table(shard))

        with ThreadPoolExecutor(8) as pool:  # the workers' side, untimed
            records = list(pool.map(write, range(n, n + m)))
        cpu0 = time.thread_time()
        costs = commit_timed(stage, records)
        cpu = time.thread_time() - cpu0
        t = time.perf_counter()
        stage.finish()  # waits for the background publisher
        drain = time.perf_counter() - t
        if stage.n_committed != n + m:
            raise RuntimeError(f"{stage.n_committed} shards committed, expected {n + m}")
        published = sum(1 for f in stage.location.list() if f.name.startswith("part-"))
        if published != m:
            raise RuntimeError(f"{published} shards published, expected {m}")
        rss_end = _rss_mb()
    return {
        "committed_before": n,
        "commits": m,
        "ms_per_commit": round(1000 * sum(costs) / m, 4),
        "median_ms": round(1000 * statistics.median(costs), 4),
        "p99_ms": round(1000 * sorted(costs)[int(0.99 * m)], 4),
        "driver_cpu_ms_per_commit": round(1000 * cpu / m, 4),
        "publish_drain_s": round(drain, 3),
        "rss_before_records_mb": round(rss0, 1),
        "rss_with_records_mb": round(rss_loaded, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss0, 1),
    }


def _run_one(uri: str, n: int, m: int, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_store", "--one", uri, str(n), str(m)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench_store --one {uri} {n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _series(uri: str, small: int, large: int, m: int, env: dict) -> dict:
    runs = []
    for n in (small, large, small):
        runs.append(_run_one(uri, n, m, env))
        print(f"{uri}: {n} committed, {runs[-1]['ms_per_commit']:.3f} ms per commit", flush=True)
    base = statistics.mean([runs[0]["ms_per_commit"], runs[2]["ms_per_commit"]])
    base_rss = statistics.mean([runs[0]["rss_growth_mb"], runs[2]["rss_growth_mb"]])
    held = [r["rss_with_records_mb"] - r["rss_before_records_mb"] for r in runs]
    return {
        "runs": runs,
        "ms_per_commit_small": round(base, 4),
        "ms_per_commit_large": runs[1]["ms_per_commit"],
        "ratio_large_to_small": round(runs[1]["ms_per_commit"] / base, 3),
        "rss_growth_mb_small": round(base_rss, 1),
        "rss_growth_mb_large": runs[1]["rss_growth_mb"],
        # the memory the (large - small) extra records take, scaled to 10^5 records
        "rss_mb_per_1e5_records": round(
            (held[1] - statistics.mean([held[0], held[2]])) * 1e5 / (large - small), 1
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=2000, help="commits timed per run (M)")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("URI", "N", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return {}
    report: dict = {**machine(), "benchmark": "store", "rows_per_shard": ROWS, "commits_timed": args.commits}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="store-", dir=CACHE))
    try:
        report["local"] = _series(str(folder), args.small, args.large, args.commits, env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not args.no_s3:
        from tests.s3server import s3_server

        with s3_server() as s3:
            report["s3"] = _series(
                s3.bucket() + "/out", args.small, args.large, args.commits, {**env, **s3.env}
            )
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
