"""Bulk steering: a large Parquet prompt file through the ``steer`` job, with 1 and with 2 workers.

The job is the real one (:func:`conva.jobs.runner.run_job` ``"steer"`` with ``data.prompts`` = the file): the
driver plans the shards from the file in one streaming pass (hash and row-group boundaries), each
worker reads its own slice, steers it, writes its shard to the output and returns a record; the driver
commits records. The model is the smallest random model :mod:`conva.tiny` builds (2 blocks, hidden 64,
head size 32) with one new token per prompt, so the model's work per row is as small as it gets and
the driver's share is as large as it gets. Its bundles come from the ``extract`` and ``fit`` jobs, run
once beforehand on the demo pairs.

Measured per run (one process, one local Ray, the runs one after another):

* **driver memory**: the driver's RSS and USS sampled every 0.5 s in a thread; growth is the peak after
  a warm-up (until 10 % of the shards were done) minus the value at its end;
* **throughput**: rows per second over the whole job's wall time, and at steady state on the workers
  (from the first shard's start to the last shard's end, actor side);
* **the driver's load**: its CPU seconds (user + system) over the job's wall time, and per shard;
* **the driver's part of a 10M-row input** (``--plan-rows``): the pre-flight's streaming pass over the
  file (:func:`conva.batch.inputs.plan_input`: hash and shard boundaries), timed, RSS sampled. Steering 10M
  rows through the model takes hours on 2 cores; this shows what the driver does with such a file.

Throughput with 2 workers against 1 shows whether the driver limits it: on this 2-core machine two
workers, the driver and Ray's own processes share the two cores.

    python -m benchmarks.bench_bulk_steer [--rows 2000000] [--rows-one-worker 500000] [--rows-per-shard 4096]
                                          [--plan-rows 10000000]

Writes ``benchmarks/results/bulk_steer.json``. The prompt files are cached in ``benchmarks/.cache``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    CACHE,
    RESULTS,
    RSSSampler,
    busy_fraction,
    job_stages,
    machine,
    run_job_planned,
    stage_figures,
    write_result,
)

OUT = RESULTS / "bulk_steer.json"
VALUES = ("power", "security")
ROW_GROUP = 16384  # rows per Parquet row group of the prompt file: a few shards each, as a writer would make


def tiny_model() -> str:
    """The smallest random model conva.tiny builds (written once into the cache)."""
    from conva.tiny import make_tiny_model

    folder = CACHE / "bulk-tiny-h64"
    if not (folder / "config.json").exists():
        make_tiny_model(folder, num_layers=2, hidden=64, heads=2, kv_heads=1)
    return str(folder)


def prompt_file(rows: int) -> Path:
    """A Parquet file of ``rows`` prompts (``value, prompt``), written once in chunks (never held whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = CACHE / f"bulk-prompts-{rows}.parquet"
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("value", pa.string()), ("prompt", pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            idx = range(start, min(start + ROW_GROUP, rows))
            writer.write_table(
                pa.table(
                    {
                        "value": [VALUES[i % 2] for i in idx],
                        "prompt": [
                            f"Should I lead project {i} myself, or let team {i % 97} decide it together?"
                            for i in idx
                        ],
                    },
                    schema=schema,
                ),
                row_group_size=ROW_GROUP,
            )
    tmp.rename(path)
    return path


def _config(model: str, out: Path, prompts: Path | None, workers: int, args: argparse.Namespace):
    from conva.batch.config import load_config

    return load_config(
        None,
        [
            f"--model.name={model}",
            f"--output.dir={out}",
            f"--data.values={list(VALUES)!r}".replace("'", '"'),
            *([f"--data.prompts={prompts}"] if prompts else []),
            "--steer.max_new_tokens=1",
            f"--steer.batch_size={args.batch}",
            "--steer.chat_template=false",
            "--ray.rows_per_shard=64",
            f"--ray.steer_rows_per_shard={args.rows_per_shard}",
            f"--ray.num_workers={workers}",
            "--ray.num_cpus_per_worker=1",
            "--ray.max_restarts=0",
        ],
    )


def bundles(model: str, out: Path, args: argparse.Namespace) -> None:
    """The bundles the steering reads: the extract and fit jobs on the demo pairs (seconds on this model)."""
    from conva.jobs.runner import run_job

    cfg = _config(model, out, None, 2, args)
    run_job("extract", cfg)
    run_job("fit", cfg)


def one_run(model: str, out: Path, prompts: Path, rows: int, workers: int, args: argparse.Namespace) -> dict:
    """The steer job on ``prompts`` with ``workers`` workers, into a fresh ``generations`` stage."""
    import psutil

    shutil.rmtree(out / "generations", ignore_errors=True)
    cfg = _config(model, out, prompts, workers, args)
    proc, planned = psutil.Process(), []
    cpu0, start = proc.cpu_times(), time.time()
    with RSSSampler(0.5) as rss:
        [result] = run_job_planned("steer", cfg, planned)
    end, cpu1 = time.time(), proc.cpu_times()
    stage = job_stages(planned[0])["steer"]
    if stage.row_count() != rows or stage.pending():
        raise RuntimeError(
            f"the steer stage holds {stage.row_count()} rows of {rows}, {len(stage.pending())} shards pending"
        )
    shards = stage_figures(stage)
    ends = sorted(r.worker["finished"] for r in stage.records())
    warm = ends[max(0, len(ends) // 10 - 1)]  # warm-up: until 10 % of the shards were done
    driver_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    wall = end - start
    return {
        "workers": workers,
        "rows": rows,
        "shards": shards["shards"],
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
        "steady_rows_per_s": round(rows / shards["span_s"], 1),
        "worker_s": shards["worker_s"],
        "startup_s": round(shards["first_start"] - start, 2),
        "processed": result.processed,
        "driver_cpu_s": round(driver_cpu, 2),
        "driver_cpu_fraction": round(driver_cpu / wall, 4),
        "driver_cpu_ms_per_shard": round(1000 * driver_cpu / shards["shards"], 2),
        "busy": busy_fraction(planned[0].extra["busy"], start, end, workers),
        "returned_bytes": planned[0].extra["returned_bytes"],
        **_memory(rss.samples, warm),
    }


def _memory(samples: list[tuple[float, float, float]], warm: float) -> dict:
    """RSS/USS at the start, after the warm-up, at the end and at peak; growth after the warm-up (MB)."""
    after = [s for s in samples if s[0] >= warm] or samples[-1:]
    at_warm = after[0]
    return {
        "rss_start_mb": round(samples[0][1], 1),
        "rss_after_warmup_mb": round(at_warm[1], 1),
        "rss_peak_mb": round(max(s[1] for s in samples), 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_growth_after_warmup_mb": round(max(s[1] for s in after) - at_warm[1], 1),
        "uss_growth_after_warmup_mb": round(max(s[2] for s in after) - at_warm[2], 1),
        "samples": len(samples),
        "rss_trace": [
            (round(t - samples[0][0], 1), round(r, 1)) for t, r, _ in samples[:: max(1, len(samples) // 40)]
        ],
    }


def plan_only(rows: int, rows_per_shard: int) -> dict:
    """The driver's part of a ``rows``-row input alone: :func:`conva.batch.inputs.plan_input` (the streaming pass that
    hashes the file and finds every shard's rows), timed, with the driver's RSS sampled."""
    from conva.batch.inputs import plan_input

    path = prompt_file(rows)
    with RSSSampler(0.2) as rss:
        start = time.perf_counter()
        plan = plan_input(str(path), rows_per_shard)
        seconds = time.perf_counter() - start
    if plan.rows != rows:
        raise RuntimeError(f"planned {plan.rows} rows of {rows}")
    return {
        "rows": rows,
        "shards": len(plan.slices),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "seconds": round(seconds, 2),
        "rss_start_mb": round(rss.samples[0][1], 1),
        "rss_peak_mb": round(max(x[1] for x in rss.samples), 1),
        "rss_growth_mb": round(max(x[1] for x in rss.samples) - rss.samples[0][1], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="prompts in the 2-worker run (the largest)")
    ap.add_argument(
        "--rows-one-worker", type=int, default=0, help="prompts in the 1-worker run (0: rows / 4)"
    )
    ap.add_argument("--rows-per-shard", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256, help="steer.batch_size")
    ap.add_argument(
        "--plan-rows",
        type=int,
        default=10_000_000,
        help="also plan (only) an input this large, as the driver's pre-flight does (0: skip)",
    )
    args = ap.parse_args(argv)
    from conva.jobs.common import setup_logging

    setup_logging()
    report: dict = {
        **machine(),
        "benchmark": "bulk_steer",
        "rows_per_shard": args.rows_per_shard,
        "batch_size": args.batch,
        "max_new_tokens": 1,
        "row_group": ROW_GROUP,
        "model": "conva.tiny: llama, 2 blocks, hidden 64, 2 heads",
    }
    model = tiny_model()
    one = args.rows_one_worker or max(args.rows_per_shard, args.rows // 4)
    files = {1: prompt_file(one), 2: prompt_file(args.rows)}
    report["file_mb"] = {str(n): round(f.stat().st_size / 2**20, 1) for n, f in files.items()}
    if args.plan_rows:
        report["plan_only"] = plan_only(args.plan_rows, args.rows_per_shard)
    out = Path(tempfile.mkdtemp(prefix="bulk-", dir=CACHE))
    try:
        bundles(model, out, args)
        report["runs"] = [
            one_run(model, out, files[n], n_rows, n, args) for n, n_rows in ((1, one), (2, args.rows))
        ]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    r1, r2 = report["runs"]
    report["speedup_2_over_1"] = {
        "steady": round(r2["steady_rows_per_s"] / r1["steady_rows_per_s"], 3),
        "whole_job": round(r2["rows_per_s"] / r1["rows_per_s"], 3),
        # above 1: a prompt took longer on the workers with 2 (CPU contention)
        "shard_slowdown": round((r2["worker_s"] / r2["rows"]) / (r1["worker_s"] / r1["rows"]), 3),
    }
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
