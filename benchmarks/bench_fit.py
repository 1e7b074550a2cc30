"""Fitting on the driver: probes for every layer and ten values, wall time, peak driver memory, activation volume.

Two measurements, each a real ``fit`` stage (:func:`jobs.fitting.run_fit`, the job's own code) run in a
fresh child process so its peak RSS is the driver's alone:

1. **model**: activations a real ``extract`` stage recorded (default: SmolLM2 on the paper's pairs, all 30
   layers, ten values, probe gate; ``--activations DIR`` reuses a job's output folder, otherwise the
   extract job runs once into ``benchmarks/.cache/`` and later runs reuse it, as any job resumes).
2. **synthetic, under a memory cap**: an activation stage in exactly the extract job's layout (one row
   group per layer per shard, value-major shards, the model metadata) with Gaussian activations whose
   classes are separated along a random direction per (value, layer), sized to ``--synthetic-gb`` of
   float32 activations; the fit runs in a memory cgroup capped at ``--cap-gb`` (below the volume), so it
   only completes if fitting streams. Where no cgroup can be made (not root, no memory controller) the
   cap is reported as not enforced and only the peak RSS says how much it needed.

Usage: ``python -m benchmarks.bench_fit [--activations DIR] [--synthetic-gb 2] [--cap-gb 1] [--skip-model]``.
Writes ``benchmarks/results/fit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, RESULTS, activation_shard, machine, open_activations, write_result

OUT = RESULTS / "fit.json"
_PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "conva"


# ----------------------------------------------------------------------------------------------- child side

def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(spec: dict) -> dict:
    """Run one fit stage on ``spec['activations']`` into a fresh folder; return time and memory."""
    from conva.config import build_config
    from conva.pipeline import SCHEMA_VERSION
    from conva.store import open_stage
    from jobs.fitting import run_fit

    cfg = build_config(spec["config"])
    acts = open_activations(Path(spec["activations"]))
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)  # a fresh fit every time: a committed stage would be a no-op
    stage = open_stage(out, "bundles", {"bench": "fit"}, SCHEMA_VERSION, overwrite=True)
    base = _rss_mb()
    start = time.perf_counter()
    result = run_fit(cfg, acts, stage, len(acts.manifest.shards))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    probes = stage.dataset().to_table(columns=["value", "test_acc"]).group_by("value").aggregate([("test_acc", "max")])
    return {"seconds": seconds, "values": result.processed, "rss_after_imports_mb": base, "peak_rss_mb": peak,
            "best_held_out_acc_min": min(probes.column("test_acc_max").to_pylist())}


# ---------------------------------------------------------------------------------------------- parent side

class MemoryCap:
    """A memory cgroup (v1 or v2) capped at ``limit`` bytes that a child joins at start; ``None`` if unavailable."""

    def __init__(self, limit: int) -> None:
        self.limit, self.path, self.files, self.why = limit, None, {}, None
        name = f"conva-bench-{os.getpid()}"
        for root, files in (("/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.max_usage_in_bytes",
                                                       "memory.failcnt")),
                            ("/sys/fs/cgroup", ("memory.max", "memory.peak", "memory.events"))):
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
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_fit", "--child", json.dumps(spec)],
                          capture_output=True, text=True, preexec_fn=cap.join if cap else None)
    if proc.returncode != 0:
        return {"failed": True, "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stage_volume(folder: Path) -> dict:
    """Rows, layers, width, float32 bytes and on-disk bytes of an activation stage."""
    from jobs.fitting import recorded_model

    acts = open_activations(folder)
    info, layers = recorded_model(acts)
    shards, rows = acts.manifest.shards, acts.row_count()
    return {"activation_rows": rows, "texts": rows // len(layers), "layers": len(layers),
            "hidden": info.hidden_size, "float32_mb": rows * info.hidden_size * 4 / 2**20,
            "on_disk_mb": sum(s.bytes for s in shards) / 2**20, "shards": len(shards)}


def model_activations(args: argparse.Namespace) -> tuple[Path, dict]:
    """A completed extract stage: the one given, or the extract job run once into the cache."""
    from conva.config import config_dict, load_config
    from jobs.common import setup_logging
    from jobs.runner import run_job

    if args.activations:
        folder = Path(args.activations)
        return folder, json.loads((folder / "config.json").read_text())
    pairs = f"paper:{_PAPER}" if _PAPER.is_dir() else "demo"
    folder = CACHE / ("fit-smollm2-paper" if pairs != "demo" else "fit-smollm2-demo")
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "demo.toml",
                      [f"--data.pairs={pairs}", f"--output.dir={folder}", "--ray.rows_per_shard=64"])
    setup_logging()
    run_job("extract", cfg)  # a no-op when every shard is already committed
    return folder, config_dict(cfg)


def synthetic_activations(folder: Path, gigabytes: float, hidden: int, layers: int, neutral: int,
                          rows_per_shard: int, seed: int = 0) -> dict:
    """Write an activation stage in the extract job's layout with ``gigabytes`` of float32 activations."""
    from conva.pipeline import SCHEMA_VERSION
    from conva.store import open_stage
    from conva.values import VALUES

    per_text = layers * hidden * 4
    texts = int(gigabytes * 2**30 / per_text)
    pairs = max(8, (texts - neutral) // (4 * len(VALUES)))  # each pair: 2 pair texts + 2 gate texts
    rng = np.random.default_rng(seed)

    def unit() -> np.ndarray:
        v = rng.standard_normal(hidden).astype(np.float32)
        return v / np.linalg.norm(v)

    probe_dir = {(v, l): unit() for v in VALUES for l in range(layers)}
    gate_dir = {v: unit() for v in VALUES}
    sep = np.linspace(0.5, 4.0, layers).astype(np.float32)  # later layers separate better, as in real models
    rows = []
    for v in VALUES:
        for i in range(pairs):
            for label, tag in ((1, "pos"), (0, "neg")):
                rows.append((f"pairs/{v}/{i:06d}/{tag}", "pairs", v, label, i))
                rows.append((f"gate/{v}/{i:06d}/{tag}", "gate", v, 1, i))
    rows += [(f"neutral/{i:06d}", "neutral", None, 0, i) for i in range(neutral)]
    meta = {"name": "synthetic", "fingerprint": "synthetic0000000", "hidden_size": hidden, "n_blocks": layers,
            "layers": list(range(layers))}
    config = {"synthetic": {"generator": 2, "gb": gigabytes, "hidden": hidden, "layers": layers, "neutral": neutral,
                            "rows_per_shard": rows_per_shard, "seed": seed}}
    manifest = folder / "activations" / "_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["config"] == config:
        stage = open_stage(folder, "activations", config, SCHEMA_VERSION)
        if stage.is_complete(-(-len(rows) // rows_per_shard)):
            return config
    stage = open_stage(folder, "activations", config, SCHEMA_VERSION, overwrite=True)
    for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
        part = rows[start:start + rows_per_shard]
        n = len(part)
        x = rng.standard_normal((layers, n, hidden), dtype=np.float32)
        for j, (_, dataset, v, label, _) in enumerate(part):
            if dataset == "pairs":
                x[:, j] += (2 * label - 1) * sep[:, None] * np.stack([probe_dir[v, l] for l in range(layers)])
            elif dataset == "gate":
                x[:, j] += 1.5 * gate_dir[v]
        table = activation_shard(part, x, meta)
        stage.commit(shard, table, row_group_size=n)
    return config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activations", help="a job output folder whose activations stage is complete")
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

    from conva.config import Config, config_dict

    report: dict = {**machine(), "benchmark": "fit"}
    work = Path(tempfile.mkdtemp(prefix="conva-bench-fit-"))
    try:
        if not args.skip_model:
            folder, cfg = model_activations(args)
            run = _run_child({"activations": str(folder), "config": cfg, "out": str(work / "model")})
            report["model"] = {"model": cfg["model"]["name"], "pairs": cfg["data"]["pairs"],
                               "values": len(cfg["data"]["values"]), **_stage_volume(folder), **run}
        folder = CACHE / "fit-synthetic"
        t0 = time.perf_counter()
        synthetic_activations(folder, args.synthetic_gb, args.hidden, args.layers, args.neutral, rows_per_shard=256)
        written = time.perf_counter() - t0
        cap = MemoryCap(int(args.cap_gb * 2**30))
        try:
            run = _run_child({"activations": str(folder), "config": config_dict(Config()),
                              "out": str(work / "synthetic")}, cap)
            peak = cap.peak_bytes()
        finally:
            cap.close()
        report["synthetic"] = {**_stage_volume(folder), "values": 10, "write_s": written, **run,
                               "cap_mb": args.cap_gb * 1024 if cap.enforced else None,
                               "cap_why_not": cap.why,
                               "cgroup_peak_mb_incl_page_cache": peak / 2**20 if peak else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(OUT, report)
    return report


if __name__ == "__main__":
    main()
