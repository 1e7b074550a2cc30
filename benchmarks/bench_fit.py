"""Fitting: ten values as parallel shards on the workers against one worker, and a worker's memory under a cap.

Two measurements:

1. **parallel vs. serial** (issue 12): the real ``fit`` job (:func:`conva.jobs.runner.run_job` ``"fit"``: one
   shard per value, each a worker task that reads only its value's activations) on the same committed
   activations with 1 worker and with 2 workers, one after the other in one process; the bundles of
   both runs must be byte-identical. The activations are a real ``extract`` stage (default: SmolLM2 on
   the paper's pairs, all 30 layers, ten values, probe gate; ``--model tiny`` uses a tiny random model on
   the demo pairs), written once into ``benchmarks/.cache/`` and reused by later runs, as any job resumes.
2. **synthetic, under a memory cap**: an activation stage in exactly the extract job's layout (one row
   group per layer per shard, value-major shards, the model in each record) with Gaussian activations
   whose classes are separated along a random direction per (value, layer), sized to ``--synthetic-gb``
   of float32; the workers' own fit function (:func:`conva.workers.shards.fit`) fits all ten values in one
   child process capped at ``--cap-gb`` (below the volume) by a memory cgroup, so it only completes if
   the fit streams. Where no cgroup can be made (not root, no memory controller) the cap is reported as
   not enforced and only the peak RSS says how much it needed.

Usage: ``python -m benchmarks.bench_fit [--model smollm2|tiny] [--synthetic-gb 2] [--cap-gb 1] [--skip-model]``.
Writes ``benchmarks/results/fit.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import (
    CACHE,
    RESULTS,
    activation_shard,
    job_stages,
    machine,
    run_job_planned,
    stage_figures,
    write_result,
)

OUT = RESULTS / "fit.json"
_PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "conva"
_SYNTHETIC_STAGE = "activations"


# ----------------------------------------------------------------------------------------------- child side


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(spec: dict) -> dict:
    """Fit every value of the synthetic store with the workers' fit function, as one worker would; time, memory."""
    from types import SimpleNamespace

    from conva.batch.config import Config
    from conva.batch.extraction import activation_model
    from conva.batch.schemas import SCHEMA_VERSION
    from conva.batch.storage import location
    from conva.batch.store import Stage
    from conva.values import VALUES
    from conva.workers.shards import fit
    from conva.workers.tasks import ShardTask

    acts = Stage.open(
        location(spec["activations"]),
        _SYNTHETIC_STAGE,
        spec["config"],
        SCHEMA_VERSION,
        n_shards=spec["n_shards"],
    )
    info, layers = activation_model(r.extra["model"] for r in acts.records())
    bundles = Stage.open(
        location(spec["out"]), "bundles", {"bench": "fit"}, SCHEMA_VERSION, n_shards=len(VALUES)
    )
    worker = SimpleNamespace(cfg=Config())  # the fit reads nothing else of its worker
    files = tuple(acts.parquet_files())
    base = _rss_mb()
    start = time.perf_counter()
    best = []
    for i, value in enumerate(VALUES):
        params = {"value": value, "model": info.__dict__, "layers": layers, "dataset_hash": "synthetic"}
        record = fit(
            worker, ShardTask("fit", bundles.ref(i, uuid.uuid4().hex[:12]), files=files, params=params)
        )
        bundles.commit(record)
        best.append(record.extra["best_test_acc"])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "seconds": seconds,
        "values": len(best),
        "rss_after_imports_mb": base,
        "peak_rss_mb": peak,
        "best_held_out_acc_min": min(best),
    }


# ---------------------------------------------------------------------------------------------- parent side


class MemoryCap:
    """A memory cgroup (v1 or v2) capped at ``limit`` bytes that a child joins at start; ``None`` if unavailable."""

    def __init__(self, limit: int) -> None:
        self.limit, self.path, self.files, self.why = limit, None, {}, None
        name = f"conva-bench-{os.getpid()}"
        for root, files in (
            (
                "/sys/fs/cgroup/memory",
                ("memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.failcnt"),
            ),
            ("/sys/fs/cgroup", ("memory.max", "memory.peak", "memory.events")),
        ):
            path = Path(root) / name
            try:
                path.mkdir()
                (path / files[0]).write_text(str(limit))
                if root.endswith("memory") and (path / "memory.memsw.limit_in_bytes").exists():
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no escape into swap
            except OSError as err:
                self.why = f"{root}: {err}"
                if path.exists():
                    path.rmdir()
                continue
            self.path, self.files = path, dict(zip(("limit", "peak", "events"), files))
            return

    @property
    def enforced(self) -> bool:
        return self.path is not None

    def join(self) -> None:
        """Run in the child before exec: move this process into the cgroup."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        try:
            return int((self.path / self.files["peak"]).read_text()) if self.path else None
        except OSError:
            return None

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def _run_child(spec: dict, cap: MemoryCap | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_fit", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        preexec_fn=cap.join if cap else None,
    )
    if proc.returncode != 0:
        return {"failed": True, "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stage_volume(stage) -> dict:
    """Rows, layers, width, float32 bytes and on-disk bytes of a committed activation stage."""
    from conva.batch.extraction import activation_model

    records = stage.records()
    info, layers = activation_model(r.extra["model"] for r in records)
    rows = stage.row_count()
    return {
        "activation_rows": rows,
        "texts": rows // len(layers),
        "layers": len(layers),
        "hidden": info.hidden_size,
        "float32_mb": rows * info.hidden_size * 4 / 2**20,
        "on_disk_mb": sum(o.bytes for r in records for o in r.objects) / 2**20,
        "shards": len(records),
    }


def model_config(name: str, out: Path, workers: int = 2):
    """The job config of the parallel-fit measurement: SmolLM2 on the paper's pairs, or a tiny model on the demo's."""
    from conva.batch.config import load_config

    repo = Path(__file__).resolve().parents[1]
    if name == "tiny":
        model, pairs = _tiny_model(), "demo"
    else:
        model, pairs = name, (f"paper:{_PAPER}" if _PAPER.is_dir() else "demo")
    return load_config(
        repo / "examples" / "demo.toml",
        [
            f"--model.name={model}",
            f"--data.pairs={pairs}",
            f"--output.dir={out}",
            "--ray.rows_per_shard=64",
            f"--ray.num_workers={workers}",
            "--ray.num_cpus_per_worker=1",
        ],
    )


def _tiny_model() -> str:
    from conva.tiny import make_tiny_model

    folder = CACHE / "fit-tiny"
    if not (folder / "config.json").exists():
        make_tiny_model(folder)
    return str(folder)


def _bundle_digest(out: Path) -> str:
    """sha256 over every value's bundle: its tensors file and its meta.json without the creation time."""
    digest = hashlib.sha256()
    for meta in sorted((out / "bundles").glob("*/meta.json")):
        fields = {k: v for k, v in json.loads(meta.read_text()).items() if k != "created"}
        digest.update(meta.parent.name.encode() + json.dumps(fields, sort_keys=True).encode())
        digest.update((meta.parent / "vectors.safetensors").read_bytes())
    return digest.hexdigest()


def parallel_fit(name: str) -> dict:
    """The fit job with 1 and then 2 workers on one committed activation stage (extracted once, cached)."""
    from conva.jobs.common import setup_logging
    from conva.jobs.runner import run_job

    setup_logging()
    folder = CACHE / f"fit-{name}-{'paper' if name != 'tiny' and _PAPER.is_dir() else 'demo'}"
    run_job("extract", model_config(name, folder))  # a no-op when every shard is already committed
    report: dict = {"model": name, "runs": []}
    digests = set()
    for workers in (1, 2):
        shutil.rmtree(folder / "bundles", ignore_errors=True)
        cfg, planned = model_config(name, folder, workers), []
        start = time.time()
        [result] = run_job_planned("fit", cfg, planned)
        wall = time.time() - start
        stages = job_stages(planned[0])
        fit = stage_figures(stages["fit"])
        per_value = [r.worker["finished"] - r.worker["started"] for r in stages["fit"].records()]
        report["runs"].append(
            {
                "workers": workers,
                "wall_s": round(wall, 2),
                "values": result.processed,
                "fit_span_s": fit["span_s"],
                "fit_worker_s": fit["worker_s"],
                "to_first_fit_s": round(fit["first_start"] - start, 2),
                "value_s_min": round(min(per_value), 2),
                "value_s_max": round(max(per_value), 2),
                "workers_used": fit["workers"],
            }
        )
        digests.add(_bundle_digest(folder))
        report.setdefault("volume", _stage_volume(stages["extract"]))
    one, two = report["runs"]
    report["speedup"] = {
        "fit_span": round(one["fit_span_s"] / two["fit_span_s"], 3),
        "job_wall": round(one["wall_s"] / two["wall_s"], 3),
    }
    report["bundles_identical"] = len(digests) == 1
    return report


def synthetic_activations(
    folder: Path, gigabytes: float, hidden: int, layers: int, neutral: int, rows_per_shard: int, seed: int = 0
) -> dict:
    """Write an activation stage in the extract job's layout with ``gigabytes`` of float32 activations.

    Returns what reopens it: its config and shard count. An existing complete stage of the same config is reused.
    """
    from conva.batch.schemas import SCHEMA_VERSION
    from conva.batch.storage import location
    from conva.batch.store import Stage, stage_status, write_table_shard
    from conva.values import VALUES

    per_text = layers * hidden * 4
    texts = int(gigabytes * 2**30 / per_text)
    pairs = max(8, (texts - neutral) // (4 * len(VALUES)))  # each pair: 2 pair texts + 2 gate texts
    rows = []
    for v in VALUES:
        for i in range(pairs):
            for label, tag in ((1, "pos"), (0, "neg")):
                rows.append((f"pairs/{v}/{i:06d}/{tag}", "pairs", v, label, i))
                rows.append((f"gate/{v}/{i:06d}/{tag}", "gate", v, 1, i))
    rows += [(f"neutral/{i:06d}", "neutral", None, 0, i) for i in range(neutral)]
    n_shards = -(-len(rows) // rows_per_shard)
    config = {
        "synthetic": {
            "generator": 3,
            "gb": gigabytes,
            "hidden": hidden,
            "layers": layers,
            "neutral": neutral,
            "rows_per_shard": rows_per_shard,
            "seed": seed,
        }
    }
    where = location(folder)
    status = stage_status(where, _SYNTHETIC_STAGE, config, SCHEMA_VERSION)
    if status.exists and not status.mismatch and status.committed == n_shards:
        return {"config": config, "n_shards": n_shards}
    stage = Stage.open(where, _SYNTHETIC_STAGE, config, SCHEMA_VERSION, n_shards=n_shards, overwrite=True)
    rng = np.random.default_rng(seed)

    def unit() -> np.ndarray:
        v = rng.standard_normal(hidden).astype(np.float32)
        return v / np.linalg.norm(v)

    probe_dir = {(v, l): unit() for v in VALUES for l in range(layers)}
    gate_dir = {v: unit() for v in VALUES}
    sep = np.linspace(0.5, 4.0, layers).astype(np.float32)  # later layers separate better, as in real models
    meta = {
        "name": "synthetic",
        "fingerprint": "synthetic0000000",
        "hidden_size": hidden,
        "n_blocks": layers,
        "layers": list(range(layers)),
    }
    for shard in stage.pending():
        part = rows[shard * rows_per_shard : (shard + 1) * rows_per_shard]
        x = rng.standard_normal((layers, len(part), hidden), dtype=np.float32)
        for j, (_, dataset, v, label, _) in enumerate(part):
            if dataset == "pairs":
                x[:, j] += (2 * label - 1) * sep[:, None] * np.stack([probe_dir[v, l] for l in range(layers)])
            elif dataset == "gate":
                x[:, j] += 1.5 * gate_dir[v]
        record = write_table_shard(
            stage.ref(shard, uuid.uuid4().hex[:12]),
            activation_shard(part, x, meta),
            row_group_size=len(part),
            extra={"model": meta},
        )
        stage.commit(record)
    stage.finish()
    return {"config": config, "n_shards": n_shards}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="smollm2", help="activations for the parallel fit: smollm2 (paper pairs) or tiny"
    )
    ap.add_argument("--skip-model", action="store_true", help="only the synthetic measurement")
    ap.add_argument("--synthetic-gb", type=float, default=2.0, help="float32 activation volume to fit (GiB)")
    ap.add_argument("--cap-gb", type=float, default=1.0, help="the fit's memory cap (GiB), below the volume")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--neutral", type=int, default=500)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return {}

    report: dict = {**machine(), "benchmark": "fit"}
    if not args.skip_model:
        report["parallel"] = parallel_fit(args.model)
    folder = CACHE / "fit-synthetic"
    t0 = time.perf_counter()
    opened = synthetic_activations(
        folder, args.synthetic_gb, args.hidden, args.layers, args.neutral, rows_per_shard=256
    )
    written = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="fit-", dir=CACHE))
    cap = MemoryCap(int(args.cap_gb * 2**30))
    try:
        run = _run_child({"activations": str(folder), **opened, "out": str(work)}, cap)
        peak = cap.peak_bytes()
    finally:
        cap.close()
        shutil.rmtree(work, ignore_errors=True)
    from conva.batch.schemas import SCHEMA_VERSION
    from conva.batch.storage import location
    from conva.batch.store import Stage

    volume = _stage_volume(
        Stage.open(
            location(folder), _SYNTHETIC_STAGE, opened["config"], SCHEMA_VERSION, n_shards=opened["n_shards"]
        )
    )
    report["synthetic"] = {
        **volume,
        "write_s": written,
        **run,
        "values": run.get("values", 10),
        "cap_mb": args.cap_gb * 1024 if cap.enforced else None,
        "cap_why_not": cap.why,
        "cgroup_peak_mb_incl_page_cache": peak / 2**20 if peak else None,
    }
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
