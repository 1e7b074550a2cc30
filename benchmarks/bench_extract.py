"""Extraction throughput: the extract job on Ray workers (steady state) against raw in-process forward passes.

Both sides process the same texts in the same batches of the same shards on the same machine:

* **ray**: the real job (:func:`conva.jobs.runner.run_job` ``"extract"``) with ``ray.num_workers`` workers of
  ``ray.num_cpus_per_worker`` CPUs each: every worker reads its slice, records the activations, writes
  its shard and returns a record. Steady state is read off the commit log: per worker, the texts of its
  shards after its first one over the time from its first shard's end to its last shard's end (model
  load and the first, warming, shard left out), summed over the workers;
* **raw**: one process, ``torch`` on every core, ``record_activations`` over those same shards (no Arrow,
  no store), and again on one thread.

``ratio`` is texts/s (ray) over texts/s (raw on every core); ``ratio_per_cpu`` is texts/s per worker CPU
over texts/s of a one-thread raw run: the throughput per unit of compute. Writes ``benchmarks/results/extract.json``.

    python -m benchmarks.bench_extract [--config examples/demo.toml] [--key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE, RESULTS, job_stages, machine, run_job_planned, write_result

REPO = Path(__file__).resolve().parents[1]


def _raw(cfg, texts: list[str]) -> float:
    """Seconds for in-process forward passes over ``texts`` (one warm-up batch first)."""
    from conva.blocks import find_blocks
    from conva.models import load_model
    from conva.record import record_activations

    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    layers = list(cfg.extract.layers) or list(range(len(find_blocks(model))))
    record_activations(model, tok, texts[: cfg.extract.batch_size], layers, batch_size=cfg.extract.batch_size)
    start = time.perf_counter()
    for lo in range(0, len(texts), cfg.ray.rows_per_shard):  # shard by shard, as the workers do
        record_activations(
            model,
            tok,
            texts[lo : lo + cfg.ray.rows_per_shard],
            layers,
            position=cfg.extract.position,
            chat_template=False,
            batch_size=cfg.extract.batch_size,
        )
    return time.perf_counter() - start


def _ray(cfg) -> dict:
    """The extract job; its steady-state shards (each worker's after its first), their texts/s and start-up."""

    planned: list = []
    start = time.time()
    run_job_planned("extract", cfg, planned)
    records = job_stages(planned[0])["extract"].records()
    layers = len(records[0].extra["model"]["layers"])
    by_worker: dict[str, list] = {}
    for r in records:
        by_worker.setdefault(r.worker["worker"], []).append(r)
    steady, rate = [], 0.0
    for shards in by_worker.values():
        shards.sort(key=lambda r: r.worker["started"])
        if len(shards) < 2:
            continue
        rate += (
            sum(r.rows for r in shards[1:])
            / layers
            / (shards[-1].worker["finished"] - shards[0].worker["finished"])
        )
        steady += [r.shard for r in shards[1:]]
    first = min(r.worker["started"] for r in records)
    return {
        "steady_shards": sorted(steady),
        "texts_per_s": rate,
        "workers": len(by_worker),
        "startup_s": first - start,
        "wall_s": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "demo.toml"))
    args, overrides = parser.parse_known_args()
    import torch

    from conva.batch.config import load_config
    from conva.batch.extraction import extraction_rows
    from conva.batch.store import shard_ranges
    from conva.jobs.common import setup_logging

    setup_logging()
    CACHE.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="extract-", dir=CACHE))
    try:
        # Raw texts only (no gate texts): the record path.
        cfg = load_config(args.config, ["--gate.kind=none", f"--output.dir={out}", *overrides])
        ray_run = _ray(cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = extraction_rows(cfg).column("text").to_pylist()
    ranges = shard_ranges(len(rows), cfg.ray.rows_per_shard)
    texts = [t for s in ray_run["steady_shards"] for t in rows[ranges[s][0] : ranges[s][1]]]
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    raw_s = _raw(cfg, texts)
    # One thread per core without OpenMP synchronisation: what a CPU of a worker can do at best. On a
    # machine shared with other work, a multi-threaded run can fall far below it.
    torch.set_num_threads(1)
    raw1_s = _raw(cfg, texts)
    cpus = ray_run["workers"] * cfg.ray.num_cpus_per_worker
    n = len(texts)
    result = {
        **machine(),
        "benchmark": "extract",
        "model": cfg.model.name,
        "texts": n,
        "shards": len(ray_run["steady_shards"]),
        "rows_per_shard": cfg.ray.rows_per_shard,
        "batch_size": cfg.extract.batch_size,
        "layers": "all",
        "raw_threads": threads,
        "ray_actors": ray_run["workers"],
        "ray_cpus_per_actor": cfg.ray.num_cpus_per_worker,
        "raw_seconds": round(raw_s, 2),
        "ray_job_wall_seconds": round(ray_run["wall_s"], 2),
        "ray_startup_seconds": round(ray_run["startup_s"], 2),
        "raw_texts_per_s": round(n / raw_s, 1),
        "ray_texts_per_s": round(ray_run["texts_per_s"], 1),
        "ratio": round(ray_run["texts_per_s"] / (n / raw_s), 3),
        "raw_1_thread_texts_per_s": round(n / raw1_s, 1),
        "ratio_per_cpu": round((ray_run["texts_per_s"] / cpus) / (n / raw1_s), 3),
    }
    write_result(RESULTS / "extract.json", result)
    print(
        f"ray / raw throughput: {result['ratio']:.3f} (raw on {threads} threads); per CPU against a "
        f"1-thread raw run: {result['ratio_per_cpu']:.3f}"
    )


if __name__ == "__main__":
    main()
