"""Are the value vectors value-specific? The forced-choice specificity matrix and the cosines, per pair set.

Each run is a real study (:func:`conva.jobs.study.main`, embedded Ray) with ``study.generate = false``:
only the forced choice (:mod:`conva.choice`), so every figure is judge-free. Both models, ConVA at two P0,
CAA at five strengths, the random control, gated ConVA, the unsteered model; the demo's balanced yes/no
prompts (half have "no" as the value's side). The runs differ only in the pairs the vectors are fitted on:

* ``negation``: ``conva/demo_data/pairs_negation`` (an affirmative text against its negation: "... because I
  want the final say" / "... because I don't want the final say"), the demo's pairs until 2026-12;
* ``stance``: ``conva/demo_data/pairs`` (two affirmative stances: the value against an opposing value, in
  the same scenario, no negation), the demo's pairs since 2026-12 (chosen on these figures);
* ``paper``: the paper's context-controlled pairs (``../shared/data/conva``, never copied into the
  repository) for three values, tested on the demo's prompts of those values.

Each study's output stays in ``benchmarks/.cache/specificity/<run>`` (a rerun resumes it; its report is
there). Writes ``benchmarks/results/specificity.json``: per run and model, every row of ``specificity.parquet``
and the mean cosine between different values' probe and CAA vectors at each layer.

    python -m benchmarks.bench_specificity [negation stance paper] [--key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import CACHE, RESULTS, machine, write_result

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_study.toml"
DATA = REPO / "conva" / "demo_data"
PAPER = Path(os.environ.get("CONVA_PAPER_DATA", REPO.parent / "shared" / "data" / "conva"))
DEMO_VALUES = '["achievement", "benevolence", "hedonism", "power", "tradition"]'
RUNS = {
    "negation": [f"--data.pairs={DATA / 'pairs_negation'}", f"--data.values={DEMO_VALUES}"],
    "stance": [f"--data.pairs={DATA / 'pairs'}", f"--data.values={DEMO_VALUES}"],
    "paper": [f"--data.pairs=paper:{PAPER}", '--data.values=["achievement", "power", "universalism"]'],
}
COMMON = [
    "--study.generate=false",
    '--study.methods=["conva", "caa", "none"]',
    "--study.p0=[0.99, 0.99999]",
    "--study.caa_strengths=[0.05, 0.1, 0.25, 0.5, 1.0]",
]


def _cosines(folder: Path) -> dict:
    """Per model and kind: layer -> mean cosine between different values' vectors."""
    table = pq.read_table(folder / "cosines.parquet").to_pylist()
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in table:
        if r["cosine"] is not None:
            acc[f"{r['model']}|{r['kind']}"][r["layer"]].append(r["cosine"])
    return {k: {int(layer): sum(v) / len(v) for layer, v in sorted(d.items())} for k, d in acc.items()}


def run(name: str, overrides: list[str]) -> dict:
    from conva.jobs.study import main

    out = CACHE / "specificity" / name  # kept: a rerun resumes, and its report can be opened
    start = time.monotonic()
    code = main(["--config", str(DEMO), *COMMON, *RUNS[name], *overrides, f"--output.dir={out}"])
    if code != 0:
        raise SystemExit(f"the {name} study failed with exit code {code}")
    return {
        "wall_s": round(time.monotonic() - start, 1),
        "specificity": pq.read_table(out / "specificity.parquet").to_pylist(),
        "cosines": _cosines(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args, overrides = parser.parse_known_args(argv)
    report = {"machine": machine(), "common": COMMON, "overrides": overrides, "runs": {}}
    for name in args.runs or list(RUNS):
        report["runs"][name] = run(name, overrides)
        print(json.dumps({name: report["runs"][name]["specificity"]}, indent=1, default=str)[:4000])
    write_result(RESULTS / "specificity.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
