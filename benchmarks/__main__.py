"""Run the CPU benchmarks and write their figures into ``benchmarks/RESULTS.md``: ``python -m benchmarks``.

Each benchmark runs in its own process (so threads, Ray and memory do not leak between them), one after
the other, and writes ``benchmarks/results/<name>.json`` with its machine, date and versions; the runner
then renders every results file into the generated block of ``RESULTS.md`` (:mod:`benchmarks.report`).
A benchmark that fails is reported and the others still run; its old results file, if any, stays.

    python -m benchmarks                 # all of them (about 80 min on a 2-core machine; probe_accuracy and gate not included)
    python -m benchmarks steer fit       # some of them
    python -m benchmarks --quick         # smaller sizes, to check the suite end to end (about 15 min)
    python -m benchmarks --list

The GPU script is separate (``benchmarks/gpu.py``, run on a device machine: it needs no Ray or vLLM).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]

# name -> (command after the interpreter, extra arguments for --quick). probe_accuracy (issue 2's table,
# ~15 min of extraction) and gate (two models' gate texts, demo and paper data) run only when named.
_SMALL_STUDY = [
    '--data.values=["power", "security"]',
    "--data.max_prompts_per_value=2",
    "--steer.max_new_tokens=8",
    "--utility.max_items=4",
    "--study.bootstrap=100",
]
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "steer": (
        ["-m", "benchmarks.bench_steer"],
        ["--batch", "8", "--new", "16", "--ref-prompts", "2", "--repeats", "1"],
    ),
    "vllm": (
        ["-m", "benchmarks.bench_vllm", "--repeats", "4"],
        ["--batch", "8", "--new", "16", "--repeats", "1"],
    ),
    "vllm_plugin": (
        ["-m", "benchmarks.bench_vllm_plugin"],
        ["--batch", "4", "--new", "8", "--settings", "3", "--repeats", "1"],
    ),
    "extract": (["-m", "benchmarks.bench_extract"], ['--data.values=["power"]']),
    "fit": (["-m", "benchmarks.bench_fit"], ["--model", "tiny", "--synthetic-gb", "0.1", "--cap-gb", "0.8"]),
    "scaleout": (["-m", "benchmarks.bench_scaleout"], ["--values", "power", "--prompts", "2"]),
    "commit": (
        ["-m", "benchmarks.bench_commit"],
        ["--shards", "20", "200", "--s3-shards", "20", "--compact-every", "50"],
    ),
    "bulk_steer": (
        ["-m", "benchmarks.bench_bulk_steer"],
        ["--rows", "20000", "--rows-one-worker", "8192", "--rows-per-shard", "2048", "--plan-rows", "100000"],
    ),
    "study": (["-m", "benchmarks.bench_study", "busy"], _SMALL_STUDY),
    "models": (["-m", "benchmarks.bench_study", "models"], _SMALL_STUDY),
    "probe_accuracy": (["-m", "benchmarks.probe_accuracy"], []),
    "gate": (["-m", "benchmarks.bench_gate"], ["--models", "smollm2", "--data", "demo"]),
}
DEFAULT = [n for n in BENCHMARKS if n not in ("probe_accuracy", "gate")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: {' '.join(DEFAULT)})")
    ap.add_argument(
        "--quick", action="store_true", help="small sizes: checks the suite, figures not for RESULTS.md"
    )
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    env, results = dict(os.environ), report.RESULTS
    if args.quick:  # quick figures never reach results/ or RESULTS.md
        results = Path(tempfile.mkdtemp(prefix="conva-bench-quick-"))
        env["CONVA_BENCH_RESULTS"] = str(results)
    failed = []
    for name in args.names or DEFAULT:
        command, quick = BENCHMARKS[name]
        cmd = [sys.executable, *command, *(quick if args.quick else [])]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        code = subprocess.call(cmd, cwd=REPO, env=env)
        print(f"== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if args.quick:
        print(report.render(results))
        print(f"quick results in {results} (RESULTS.md untouched)")
    else:
        report.update()
        print(f"rendered {report.DOC}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
