"""Held-out probe accuracy per layer for all ten values on SmolLM2 with the paper's context-controlled pairs.

Usage: ``python -m benchmarks.probe_accuracy [--data ../shared/data/conva] [--model smollm2]``. Writes
``benchmarks/results/probe_accuracy.json`` and prints its table (:mod:`benchmarks.report` renders it into RESULTS.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, write_result
from benchmarks.report import probe_accuracy as probe_table
from conva.data import paper_pairs
from conva.models import load_model
from conva.probes import ProbeSettings, fit_probes
from conva.record import record_activations
from conva.values import VALUES

OUT = RESULTS / "probe_accuracy.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "conva")
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--split", default="pair", choices=["pair", "sample"])
    args = parser.parse_args()
    start = time.time()
    model, tok = load_model(args.model)
    n_layers = model.config.num_hidden_layers
    results = {}
    for value in VALUES:
        pairs = paper_pairs(args.data, value)
        texts = [p.positive for p in pairs] + [p.negative for p in pairs]
        labels = np.repeat([1, 0], len(pairs))
        groups = np.tile(np.arange(len(pairs)), 2)
        acts = record_activations(model, tok, texts, batch_size=25)
        fit = fit_probes(
            lambda l: acts[:, l], labels, groups, range(n_layers), ProbeSettings(split=args.split)
        )
        results[value] = [round(float(a), 4) for a in fit.test_acc]
        best = int(np.argmax(fit.test_acc))
        print(f"{value:15s} best layer {best:2d} acc {fit.test_acc[best]:.3f}", flush=True)
    report = {
        **machine(),
        "benchmark": "probe_accuracy",
        "model": args.model,
        "split": args.split,
        "seconds": round(time.time() - start, 1),
        "test_acc": results,
    }
    write_result(OUT, report)
    print(probe_table(report))


if __name__ == "__main__":
    main()
