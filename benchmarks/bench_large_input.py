"""Driver memory on a large input: N prompts through the extract job's pre-flight, sharding and commit path.

The job is the real one (``run_job("extract")``: pre-flight reads the pairs file, the stage opens, the
driver shards the rows, feeds them to Ray actors and commits each result through the store), with one
thing swapped: the actors are :class:`StubWorker`, which returns a valid activation row per text
instead of running a model, so what is measured is the driver, not the model. The driver's RSS is
sampled at every commit.

    python -m benchmarks.bench_large_input [--prompts 200000] [--rows-per-shard 500] [--workers 2]

prints the figures and writes ``benchmarks/results/large_input.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

__all__ = ["StubWorker", "measure", "main"]



class StubWorker:
    """Stands in for ``ExtractionWorker``: same constructor and ``extract`` contract, no model.

    Each text gets one ``width``-wide float32 activation (the shard index, so Parquet compresses it): the
    driver receives, and must let go of, as many bytes per shard as a model that wide would send.
    """

    width = 256

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def extract(self, shard_index: int, rows: pa.Table) -> pa.Table:
        n, d = rows.num_rows, self.width
        # The activations schema (conva.pipeline.activation_schema) spelled out, so the stub's worker process
        # imports neither torch nor transformers.
        schema = pa.schema([
            ("row_id", pa.string()), ("dataset", pa.string()), ("value", pa.string()), ("label", pa.int8()),
            ("group", pa.int64()), ("text_hash", pa.string()), ("layer", pa.int32()), ("position", pa.string()),
            ("activation", pa.list_(pa.float32(), d)), ("error", pa.string()),
        ])
        hashes = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in rows.column("text").to_pylist()]
        flat = pa.array(np.full(n * d, shard_index, dtype=np.float32))
        return pa.table({
            **{k: rows.column(k) for k in ("row_id", "dataset", "value", "label", "group")},
            "text_hash": pa.array(hashes, pa.string()), "layer": pa.array(np.zeros(n, np.int32)),
            "position": pa.array(["last"] * n, pa.string()),
            "activation": pa.FixedSizeListArray.from_arrays(flat, d), "error": pa.nulls(n, pa.string()),
        }, schema=schema)


class _Sampler(logging.Handler):
    """The driver's RSS at every "committed shard" log line."""

    def __init__(self) -> None:
        import psutil

        super().__init__(logging.INFO)
        self.proc, self.start = psutil.Process(), time.monotonic()
        self.samples: list[tuple[float, int, float, float]] = []  # (seconds, shards committed, RSS MB, USS MB)

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def uss_mb(self) -> float:
        return self.proc.memory_full_info().uss / 2**20  # private pages only: not the shared object store

    def emit(self, record: logging.LogRecord) -> None:
        if "committed shard" in record.getMessage():
            self.samples.append((time.monotonic() - self.start, len(self.samples) + 1, self.rss_mb(), self.uss_mb()))


def _pairs_file(path: Path, n_prompts: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n_prompts // 2):
            fh.write(json.dumps({"value": "power", "positive": f"I want to run project {i} and decide for everyone.",
                                 "negative": f"I want project {i} to be decided by the whole team."}) + "\n")
    return path


def measure(n_prompts: int, *, rows_per_shard: int, model: str, work: Path, workers: int = 2, width: int = 256) -> dict:
    """Run the extract job on ``n_prompts`` texts with ``width``-wide stub actors; return RSS figures (MB), timings."""
    from conva.config import load_config
    from jobs import stages
    from jobs.runner import run_job

    pairs = _pairs_file(Path(work) / "pairs.jsonl", n_prompts)
    cfg = load_config(None, [f"--model.name={model}", f"--output.dir={Path(work) / 'out'}", '--data.values=["power"]',
                             f"--data.pairs={pairs}", "--gate.kind=none", "--extract.layers=[0]",
                             f"--ray.rows_per_shard={rows_per_shard}", f"--ray.num_workers={workers}",
                             "--ray.num_cpus_per_worker=0.5"])
    sampler = _Sampler()
    before = sampler.rss_mb()
    jobs_log = logging.getLogger("conva.jobs")
    jobs_log.addHandler(sampler)
    level = jobs_log.level
    jobs_log.setLevel(logging.INFO)  # the commit lines are what the sampler counts
    stub = type("StubWorker", (StubWorker,), {"width": width})  # pickled by value: the actors see this width
    real, stages.ExtractionWorker = stages.ExtractionWorker, stub
    start = time.monotonic()
    try:
        [result] = run_job("extract", cfg)
    finally:
        stages.ExtractionWorker = real
        jobs_log.removeHandler(sampler)
        jobs_log.setLevel(level)
    figures = _figures(n_prompts, rows_per_shard, before, sampler, result, time.monotonic() - start)
    return {**figures, "width": width, "activation_mb_through_driver": round(n_prompts * width * 4 / 2**20, 1)}


def _figures(n: int, rows_per_shard: int, before: float, sampler: _Sampler, result, seconds: float) -> dict:
    s = sampler.samples
    rss, uss = [x[2] for x in s], [x[3] for x in s]
    tenth = max(1, len(s) // 10)
    rate = lambda part: round(len(part) / max(part[-1][0] - part[0][0], 1e-9), 1) if len(part) > 1 else None
    return {
        "prompts": n, "rows_per_shard": rows_per_shard, "shards": result.shards, "rows_committed": result.rows,
        "seconds": round(seconds, 1), "rows_per_s": round(result.rows / seconds),
        "rss_before_job_mb": round(before), "rss_first_commit_mb": round(rss[0]),
        "rss_after_warmup_mb": round(rss[tenth - 1]), "rss_peak_mb": round(max(rss)), "rss_end_mb": round(rss[-1]),
        "growth_after_warmup_mb": round(max(rss[tenth - 1:]) - rss[tenth - 1], 1),
        "uss_after_warmup_mb": round(uss[tenth - 1]), "uss_end_mb": round(uss[-1]),
        "uss_growth_after_warmup_mb": round(max(uss[tenth - 1:]) - uss[tenth - 1], 1),
        "commits_per_s_first_tenth": rate(s[:tenth]), "commits_per_s_last_tenth": rate(s[-tenth:]),
        "samples": [(round(t, 2), k, round(r, 1), round(u, 1)) for t, k, r, u in s[:: max(1, len(s) // 50)]],
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jobs  # noqa: F401  (loopback-only Ray environment before ray is imported)
    from benchmarks.common import RESULTS, machine
    from conva.tiny import make_tiny_model
    from jobs.common import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200_000)
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=int, default=256, help="floats per activation the stub returns")
    args = parser.parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory() as work:
        model = make_tiny_model(Path(work) / "model")  # pre-flight checks the model folder; the stub never loads it
        figures = measure(args.prompts, rows_per_shard=args.rows_per_shard, model=model, work=Path(work),
                          workers=args.workers, width=args.width)
    import ray

    ray.shutdown()
    figures["machine"] = machine()
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=1))
    (RESULTS / "large_input.json").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "large_input.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
