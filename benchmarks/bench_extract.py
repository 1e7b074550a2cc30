"""Extraction throughput: the Ray extract path (two actors, steady state) against raw in-process forward passes.

Both sides process the same texts in the same batches of the same shards on the same machine:

* **raw**: one process, ``torch`` on every core, ``record_activations`` shard by shard (no Arrow, no store);
* **ray**: the job's own path — ``start_actors(ExtractionWorker)``, ``run_shards``, ``Stage.commit`` — with
  ``ray.num_workers`` actors of ``ray.num_cpus_per_worker`` CPUs each. Each actor first extracts one
  warm-up shard (not timed), so actor start-up and model loading are left out: steady state.

``ratio`` is texts/s (ray) over texts/s (raw on every core); ``ratio_per_cpu`` is texts/s per actor CPU
over texts/s of a one-thread raw run: the throughput per unit of compute. Writes ``benchmarks/results/extract.json``.

    python benchmarks/bench_extract.py [--config examples/demo.toml] [--key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jobs  # noqa: E402,F401  (loopback-only Ray environment, before ray is imported)
import torch  # noqa: E402

from benchmarks.common import RESULTS, machine, write_result  # noqa: E402
from conva.blocks import find_blocks  # noqa: E402
from conva.config import RESULT_NEUTRAL_KEYS, load_config  # noqa: E402
from conva.models import load_model  # noqa: E402
from conva.pipeline import SCHEMA_VERSION, extraction_rows  # noqa: E402
from conva.record import record_activations  # noqa: E402
from conva.store import open_stage, shard_ranges  # noqa: E402
from jobs.common import connect_ray  # noqa: E402
from workers.extraction import ExtractionWorker  # noqa: E402
from workers.pool import run_shards, start_actors, stop_actors  # noqa: E402


def _raw(cfg, rows, ranges) -> float:
    """Seconds for in-process forward passes over every shard (all cores)."""
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    layers = list(cfg.extract.layers) or list(range(len(find_blocks(model))))
    texts = rows.column("text").to_pylist()
    record_activations(model, tok, texts[: cfg.extract.batch_size], layers, batch_size=cfg.extract.batch_size)  # warm-up
    start = time.perf_counter()
    for lo, hi in ranges:
        record_activations(model, tok, texts[lo:hi], layers, position=cfg.extract.position,
                           chat_template=False, batch_size=cfg.extract.batch_size)
    return time.perf_counter() - start


def _ray(cfg, rows, ranges, out: Path) -> tuple[float, float]:
    """(seconds for the timed shards, actor start-up seconds) through actors and the store."""
    connect_ray(cfg)
    t0 = time.perf_counter()
    actors = start_actors(ExtractionWorker, cfg)
    stage = open_stage(out, "activations", {"bench": True}, SCHEMA_VERSION, overwrite=True,
                       ignore_keys=RESULT_NEUTRAL_KEYS)
    take = lambda s: (rows.slice(ranges[s][0], ranges[s][1] - ranges[s][0]),)
    try:
        warm = list(range(len(actors)))  # one shard per actor, untimed
        import ray
        ray.get([a.extract.remote(s, *take(s)) for a, s in zip(actors, warm)])
        startup = time.perf_counter() - t0
        start = time.perf_counter()
        for shard, table in run_shards(actors, "extract", "extract", list(range(len(warm), len(ranges))), take):
            stage.commit(shard, table, row_group_size=ranges[shard][1] - ranges[shard][0])
        return time.perf_counter() - start, startup
    finally:
        stop_actors(actors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "demo.toml"))
    parser.add_argument("--shards", type=int, default=14, help="shards to run (the first ones are warm-up)")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, ["--gate.kind=none", *overrides])  # raw texts only: the record path
    rows = extraction_rows(cfg)
    ranges = shard_ranges(rows.num_rows, cfg.ray.rows_per_shard)[: args.shards]
    n_warm = cfg.ray.num_workers
    timed = ranges[n_warm:]
    n_texts = sum(hi - lo for lo, hi in timed)
    with tempfile.TemporaryDirectory() as tmp:
        ray_s, startup = _ray(cfg, rows, ranges, Path(tmp))
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    raw_s = _raw(cfg, rows, timed)
    # One thread per core without OpenMP synchronisation: what a CPU of an actor can do at best. On a
    # machine shared with other work, a multi-threaded run can fall far below it.
    torch.set_num_threads(1)
    raw1_s = _raw(cfg, rows, timed)
    actor_cpus = cfg.ray.num_workers * cfg.ray.num_cpus_per_worker
    result = {
        **machine(), "benchmark": "extract", "model": cfg.model.name, "texts": n_texts, "shards": len(timed), "rows_per_shard": cfg.ray.rows_per_shard,
        "batch_size": cfg.extract.batch_size, "layers": "all",
        "raw_threads": threads, "ray_actors": cfg.ray.num_workers, "ray_cpus_per_actor": cfg.ray.num_cpus_per_worker,
        "raw_seconds": round(raw_s, 2), "ray_seconds": round(ray_s, 2), "ray_startup_seconds": round(startup, 2),
        "raw_texts_per_s": round(n_texts / raw_s, 1), "ray_texts_per_s": round(n_texts / ray_s, 1),
        "ratio": round(raw_s / ray_s, 3),
        "raw_1_thread_texts_per_s": round(n_texts / raw1_s, 1),
        "ratio_per_cpu": round((n_texts / ray_s / actor_cpus) / (n_texts / raw1_s), 3),
    }
    write_result(RESULTS / "extract.json", result)
    print(f"ray / raw throughput: {result['ratio']:.3f} (raw on {threads} threads); per CPU against a "
          f"1-thread raw run: {result['ratio_per_cpu']:.3f}")


if __name__ == "__main__":
    main()
