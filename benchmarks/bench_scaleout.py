"""Scale-out: the ``run`` job with 1 and with 2 workers on this machine, and the efficiency per worker.

The real job (:func:`jobs.runner.run_job`: pre-flight, extract on actors, fit on the driver, steer on actors,
atomic commits), on SmolLM2 with the project's demo data, each worker one actor of one CPU (one torch
thread), into a fresh output folder per run, both runs on one local Ray started once. Per stage it
reports rows/s at steady state (after the actors are up: ``StageResult.startup_seconds``) and the job's
wall time; ``efficiency = (throughput with 2 workers / 2) / throughput with 1 worker``.

On a 2-core machine two workers use both cores, and the driver (fit, commits) shares them: this measures
the sharding and the driver's overhead, not a cluster's network. ``benchmarks/RESULTS.md`` has the written
model of how the job scales to N GPU workers.

Usage: ``python -m benchmarks.bench_scaleout [--workers 1 2] [--values power benevolence ...]``. Writes
``benchmarks/results/scaleout.json``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import jobs  # noqa: F401  (loopback-only Ray environment, before ray is imported)
from benchmarks.common import RESULTS, activation_shard, machine, open_activations, write_result
from conva.config import load_config
from jobs.common import setup_logging
from jobs.runner import run_job

OUT = RESULTS / "scaleout.json"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VALUES = ["power", "benevolence", "achievement", "universalism"]


EXTRACT_SHARD, STEER_SHARD = 32, 8


def one_run(workers: int, values: list[str], prompts: int, out: Path) -> dict:
    """The ``run`` job on ``workers`` workers: extraction shards of 32 texts (little per-call overhead),
    steering shards of one batch (8 prompts, so a few dozen prompts keep both workers busy)."""
    cfg = load_config(REPO / "examples" / "demo.toml", [
        f"--ray.num_workers={workers}", "--ray.num_cpus_per_worker=1", f"--output.dir={out}",
        f"--data.values={values!r}".replace("'", '"'), f"--data.max_prompts_per_value={prompts}",
        "--steer.batch_size=8", f"--ray.rows_per_shard={EXTRACT_SHARD}", f"--ray.steer_rows_per_shard={STEER_SHARD}"])
    start = time.perf_counter()
    stages = run_job("run", cfg)
    wall = time.perf_counter() - start
    layers = _recorded_layers(out)
    out_stages = {}
    for r in stages:
        steady = r.seconds - r.startup_seconds
        out_stages[r.stage] = {"shards": r.shards, "rows": r.rows, "seconds": r.seconds,
                               "startup_seconds": r.startup_seconds, "steady_seconds": steady,
                               "rows_per_s": r.rows / steady if steady > 0 else None}
    # An extract row is one (text, layer): per text, divide by the layers recorded.
    out_stages["extract"]["texts_per_s"] = out_stages["extract"]["rows_per_s"] / layers
    out_stages["extract"]["rows_per_shard"], out_stages["steer"]["rows_per_shard"] = EXTRACT_SHARD, STEER_SHARD
    return {"workers": workers, "wall_s": wall, "stages": out_stages}


def _recorded_layers(out: Path) -> int:
    from jobs.fitting import recorded_model

    return len(recorded_model(open_activations(out))[1])


def driver_commit_rate(out: Path, texts: int = 64, layers: int = 32, hidden: int = 4096, shards: int = 6) -> dict:
    """MB/s the driver commits activation shards at (Parquet write, fsync, sha256, manifest): its ceiling.

    The shard is the extract job's layout for an 8B-shaped model (32 layers × 4096, float32), 64 texts.
    """
    import numpy as np

    from conva.pipeline import SCHEMA_VERSION
    from conva.store import open_stage

    x = np.random.default_rng(0).standard_normal((layers, texts, hidden), dtype=np.float32)
    table = activation_shard([(f"pairs/power/{i:06d}/pos", "pairs", "power", 1, i) for i in range(texts)], x)
    stage = open_stage(out, "activations", {"bench": "commit"}, SCHEMA_VERSION)
    start = time.perf_counter()
    for shard in range(shards):
        stage.commit(shard, table, row_group_size=texts)
    seconds = time.perf_counter() - start
    mb = shards * x.nbytes / 2**20
    return {"shard_mb": x.nbytes / 2**20, "shards": shards, "seconds": seconds, "mb_per_s": mb / seconds,
            "texts_per_s": shards * texts / seconds, "layers": layers, "hidden": hidden}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--values", nargs="+", default=DEFAULT_VALUES)
    ap.add_argument("--prompts", type=int, default=8, help="steering prompts per value (4 values × 8: 4 shards)")
    args = ap.parse_args(argv)
    setup_logging()
    runs = []
    work = Path(tempfile.mkdtemp(prefix="conva-bench-scaleout-"))
    try:
        for n in args.workers:
            runs.append(one_run(n, args.values, args.prompts, work / f"w{n}"))
        commit = driver_commit_rate(work / "commit")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs[0]
    efficiency = {}
    for run in runs[1:]:
        k = run["workers"] / base["workers"]
        eff = {s: (run["stages"][s]["rows_per_s"] / k) / base["stages"][s]["rows_per_s"]
               for s in ("extract", "steer")}
        eff["job_wall"] = (base["wall_s"] / run["wall_s"]) / k
        efficiency[str(run["workers"])] = eff
    report = {**machine(), "benchmark": "scaleout", "model": "smollm2", "values": args.values,
              "prompts_per_value": args.prompts, "runs": runs, "efficiency": efficiency,
              "driver_commit": commit}
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
