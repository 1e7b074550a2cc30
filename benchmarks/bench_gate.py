"""The probe gate's open rates on the real models: the recall default against the old precision setting.

For each model (SmolLM2-135M-Instruct, Gemma 3 270M) and each data set (the demo study's five values on the
demo data; three values of the paper's data, ``../shared/data/conva``, read in place), the texts are
extracted once, every block, exactly as the job extracts them (:func:`conva.batch.extraction.extraction_rows`,
with the configs of ``examples/demo_study.toml`` / ``examples/paper_study.toml``), plus the prompts the
study steers. Each value's bundle is then fitted twice with the job's own :func:`fit_bundles`:

* ``recall`` (the default): threshold to recall ≥ 0.9 on the value's own calibrate prompts, unrelated
  inputs (neutral prompts, the MC set's last 32 questions) as negatives;
* ``precision`` (the old default): precision ≥ 0.95, other values' texts as negatives too.

Reported per (model, data, setting, value), at the chosen threshold, on rows the threshold never saw (the
gate's test split): the open rate on the value's own prompts, other values' prompts, neutral prompts and
MC questions (with their row counts); and on the prompts the study steers (never gate data at all).

Usage: ``python -m benchmarks.bench_gate [--models smollm2 gemma3-270m] [--data demo paper]``.
Writes ``benchmarks/results/gate.json``, keeping the (model, data) entries of an earlier run that this one
did not redo (so the models can run as separate processes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.common import RESULTS, machine, write_result
from benchmarks.report import gate as gate_table
from conva.batch.config import Config, load_config
from conva.batch.extraction import extract_table, extraction_rows, fit_bundles
from conva.batch.schemas import EXTRACTION_INPUT_SCHEMA
from conva.batch.sources import value_prompts
from conva.fit import ModelInfo
from conva.models import load_model, model_fingerprint, model_name

OUT = RESULTS / "gate.json"
PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "conva"
# The two study configs' data and gate keys (examples/demo_study.toml, examples/paper_study.toml).
DATA: dict[str, list[str]] = {
    "demo": [
        '--data.values=["achievement", "benevolence", "hedonism", "power", "tradition"]',
        "--data.max_prompts_per_value=10",
        "--gate.value_prompts=12",
        "--gate.other_pairs_per_value=4",
    ],
    "paper": [
        '--data.values=["achievement", "power", "universalism"]',
        f"--data.pairs=paper:{PAPER}",
        f"--data.prompts=paper:{PAPER}",
        "--data.max_prompts_per_value=30",
        "--gate.value_prompts=40",
        # paper_study.toml reads all 100 pairs of the seven other values; 20 each keeps this run short
        "--gate.other_pairs_per_value=20",
    ],
}
SETTINGS = {
    "recall": [],
    "precision": ["--gate.target=precision", "--gate.negatives=unrelated+other_values"],
}
KINDS = ("own", "other", "neutral", "mc")


def _rows(cfg: Config) -> pa.Table:
    """The extraction texts of the precision setting (a superset: other values' pairs too) and the steered prompts."""
    rows = extraction_rows(cfg).to_pylist()
    for value in cfg.data.values:
        for i, p in enumerate(value_prompts(cfg, value)[0]):
            rows.append(
                dict(
                    row_id=f"steer/{value}/{i:06d}",
                    dataset="steer",  # no stage of the fit reads this dataset
                    value=value,
                    label=0,
                    group=i,
                    text=p.prompt,
                    chat_template=cfg.steer.chat_template,
                )
            )
    return pa.Table.from_pylist(rows, schema=EXTRACTION_INPUT_SCHEMA)


def _gates(model, tok, spec: str, data: str) -> dict:
    configs = {s: load_config(None, [f"--model.name={spec}", *DATA[data], *o]) for s, o in SETTINGS.items()}
    rows = _rows(configs["precision"])
    layers = list(range(model.config.num_hidden_layers))
    start = time.time()
    acts = extract_table(model, tok, rows, layers, "last", 16)
    extract_s = time.time() - start
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        len(layers), rows.num_rows, -1
    )
    info = ModelInfo(model_name(spec), model_fingerprint(model), model.config.hidden_size, len(layers))
    dataset = np.asarray(rows.column("dataset").to_pylist(), dtype=object)
    values = np.asarray(rows.column("value").to_pylist(), dtype=object)
    out: dict = {"texts": rows.num_rows, "extract_s": round(extract_s, 1), "settings": {}}
    for setting, cfg in configs.items():
        # The recall setting's job would not read the pairs of values outside data.values: leave them out.
        unread = (dataset == "gate") & ~np.isin(values, cfg.data.values) & (setting == "recall")
        keep = np.flatnonzero(~unread)
        bundles = fit_bundles(rows.take(pa.array(keep)), lambda l: matrix[l][keep], layers, cfg, info)
        out["settings"][setting] = {
            v: _figures(b.gate, matrix, dataset, values, v) for v, b in bundles.items()
        }
    return out


def _figures(gate, matrix: np.ndarray, dataset: np.ndarray, values: np.ndarray, value: str) -> dict:
    h = gate.heldout
    steered = np.flatnonzero((dataset == "steer") & (values == value))
    opened = gate.open(gate.scores(matrix[gate.layer][steered]))
    return {
        "layer": gate.layer,
        "threshold": gate.threshold,
        "target_met": gate.target_met,
        "test_precision": h.get("precision"),
        "test_recall": h.get("recall"),
        **{f"open_{k}": h.get(f"open_rate_{k}") for k in KINDS},
        **{f"n_{k}": h.get(f"open_n_{k}") for k in KINDS},
        "open_steered": float(np.mean(opened)),
        "n_steered": len(steered),
    }


def _merged(results: dict) -> dict:
    """This run's entries over an earlier file's (each entry carries its own extraction time)."""
    old = json.loads(OUT.read_text()).get("models", {}) if OUT.exists() else {}
    for name, by_data in results.items():
        old.setdefault(name, {}).update(by_data)
    return old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    args = parser.parse_args()
    start = time.time()
    results: dict = {}
    for spec in args.models:
        model, tok = load_model(spec)
        name = model_name(spec)
        for data in args.data:
            results.setdefault(name, {})[data] = _gates(model, tok, spec, data)
            print(f"{name} {data}: done after {time.time() - start:.0f} s", flush=True)
    report = {
        **machine(),
        "benchmark": "gate",
        "seconds": round(time.time() - start, 1),
        "settings": {s: o for s, o in SETTINGS.items()},
        "data": DATA,
        "models": _merged(results),
    }
    write_result(OUT, report)
    print(gate_table(report))


if __name__ == "__main__":
    main()
