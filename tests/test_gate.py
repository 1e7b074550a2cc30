"""The value-specific probe gate: splits by pair, choices on calibrate, figures on test, missed targets recorded."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conva import data
from conva.bundle import save_bundle
from conva.fit import FitSettings, GateSettings, LayerData, ModelInfo, fit_value
from conva.gates import Calibration, calibrate_threshold, fit_probe_gate, gate_metrics, gate_splits

D, LAYERS = 16, (0, 1, 2)


def _gate_data(seed: int = 0, n_pairs: int = 120):
    """Own texts (label 1) against other values' texts and neutral prompts, two texts per group; layer 1 separates best."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    origin = np.repeat(["own", "other", "neutral"], [n_pairs, 2 * n_pairs, n_pairs])
    groups = np.asarray([f"{o}/{i // 2}" for i, o in enumerate(origin)])
    labels = (origin == "own").astype(np.int64)
    base = rng.normal(size=(len(labels), D))
    sep = {0: 0.5, 1: 2.0, 2: 1.0}
    mats = {
        l: (base + np.outer(np.where(labels == 1, sep[l], -sep[l]), direction)).astype(np.float32)
        for l in LAYERS
    }
    return mats, labels, groups, origin


def test_gate_splits_are_disjoint_by_pair_and_cover_every_row():
    _, labels, groups, _ = _gate_data()
    s = gate_splits(groups, calibrate_size=0.25, test_size=0.25, seed=3, labels=labels)
    parts = [set(s.train.tolist()), set(s.calibrate.tolist()), set(s.test.tolist())]
    assert sum(map(len, parts)) == len(labels) and set.union(*parts) == set(range(len(labels)))
    for a in range(3):
        for b in range(a + 1, 3):
            assert parts[a].isdisjoint(parts[b])
            assert set(groups[list(parts[a])]).isdisjoint(groups[list(parts[b])])  # a pair never straddles
    again = gate_splits(groups, 0.25, 0.25, seed=3, labels=labels)
    assert np.array_equal(again.test, s.test) and np.array_equal(again.calibrate, s.calibrate)
    for part in (s.train, s.calibrate, s.test):  # stratified: each part holds its share of the own texts
        assert abs(labels[part].mean() - labels.mean()) < 0.03


def test_gate_figures_come_from_rows_neither_choice_saw():
    mats, labels, groups, origin = _gate_data()
    kw = dict(
        target="precision", target_value=0.95, calibrate_size=0.25, test_size=0.25, seed=1, origin=origin
    )
    gate = fit_probe_gate(lambda l: mats[l], labels, groups, LAYERS, **kw)
    split = gate_splits(groups, 0.25, 0.25, seed=1, labels=labels)
    # The reported figures are exactly the gate's own rule applied to the test rows.
    test_scores = gate.scores(mats[gate.layer][split.test])
    assert gate.heldout == {
        **gate_metrics(test_scores, labels[split.test], gate.threshold, origin[split.test]),
        "not_converged": 0.0,
    }
    assert gate.layer == 1 and gate.target_met and gate.calibration["precision"] >= 0.95
    assert set(gate.heldout) >= {"open_rate_neutral", "open_rate_other", "open_rate_own"}
    # Rewriting every test row's activations changes the figures, never the choices or the fit. (The split is
    # stratified by label, so labels fix which rows are test rows before anything is fitted.)
    rng = np.random.default_rng(9)
    scrambled = {l: m.copy() for l, m in mats.items()}
    for m in scrambled.values():
        m[split.test] = rng.normal(size=(len(split.test), D)) * 5
    other = fit_probe_gate(lambda l: scrambled[l], labels, groups, LAYERS, **kw)
    assert (other.layer, other.threshold, other.b) == (gate.layer, gate.threshold, gate.b)
    assert np.array_equal(other.w, gate.w) and other.calibration == gate.calibration
    assert other.heldout != gate.heldout


def test_calibration_meets_its_target_or_says_it_did_not():
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95])
    labels = np.array([0, 0, 1, 0, 1, 1, 1, 1])
    assert calibrate_threshold(scores, labels, "precision", 1.0) == Calibration(
        0.7, True
    )  # lowest with no false positive
    assert calibrate_threshold(scores, labels, "recall", 1.0) == Calibration(0.3, True)
    top_negative = np.array(
        [0, 1, 1, 1, 0, 1, 1, 0]
    )  # the highest score is a negative: precision 1 is out of reach
    cal = calibrate_threshold(scores, top_negative, "precision", 1.0)
    assert not cal.met and cal.threshold == 0.2  # the best-F1 threshold (F1 = 5/6), flagged


def test_missed_target_is_logged_and_recorded_in_meta_json(tmp_path, caplog):
    _, labels, groups, origin = _gate_data()
    mats = {
        l: np.ones((len(labels), D), np.float32) for l in LAYERS
    }  # nothing to separate: precision = base rate
    rng = np.random.default_rng(0)
    pair_labels = np.tile([1, 0], 40)
    pair_x = (rng.normal(size=(80, D)) + np.outer(pair_labels - 0.5, np.ones(D))).astype(np.float32)
    pairs = LayerData(lambda l: pair_x, pair_labels, np.repeat(np.arange(40), 2), LAYERS)
    gate = LayerData(lambda l: mats[l], labels, groups, LAYERS, origin=origin)
    settings = FitSettings(gate=GateSettings(target="precision", target_value=0.999), band=(1, 2))
    with caplog.at_level(logging.WARNING, logger="conva.gates"):
        bundle = fit_value("power", pairs, gate, ModelInfo("m", "f" * 16, D, 3), settings)
    assert bundle.gate.target_met is False
    assert any("target_met = false" in r.getMessage() and "power" in r.getMessage() for r in caplog.records)
    meta = json.loads((save_bundle(bundle, tmp_path / "power") / "meta.json").read_text())
    n_test = len(gate_splits(groups, 0.25, 0.25, 0, labels).test)
    assert meta["gate"]["target_met"] is False and meta["gate"]["heldout"]["n"] == float(n_test)


def test_probe_gate_needs_both_classes_in_train_and_calibrate():
    mats, labels, groups, _ = _gate_data()
    with pytest.raises(ValueError, match="both classes"):
        fit_probe_gate(lambda l: mats[l], np.zeros_like(labels), groups, LAYERS, name="power")


def test_gate_prompts_are_held_apart_from_the_steered_prompts():
    from conva.batch.config import load_config
    from conva.batch.pipeline import extraction_rows, steering_rows

    cfg = load_config(
        None,
        [
            '--data.values=["power", "tradition"]',
            "--gate.value_prompts=5",
            "--gate.other_pairs_per_value=2",
            "--data.max_prompts_per_value=30",
        ],
    )
    rows = extraction_rows(cfg).to_pylist()
    gate_prompts = [r for r in rows if r["dataset"] == "gate_prompt"]
    assert {r["value"] for r in gate_prompts} == set(data.VALUES) and len(gate_prompts) == 5 * len(
        data.VALUES
    )
    steered = steering_rows(cfg).to_pylist()
    for value in ("power", "tradition"):
        prompts = [p.prompt for p in data.demo_prompts(value)]
        mine = [r["prompt"] for r in steered if r["value"] == value]
        assert mine == prompts[:-5] and {r["text"] for r in gate_prompts if r["value"] == value} == set(
            prompts[-5:]
        )
    assert (
        sum(r["dataset"] == "gate" and r["value"] == "hedonism" for r in rows) == 2 * 2
    )  # capped: not studied
    with pytest.raises(ValueError, match="none of 'power'"):
        steering_rows(load_config(None, ['--data.values=["power"]', "--gate.value_prompts=99"]))
