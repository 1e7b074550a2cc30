"""The value-specific probe gate: splits by pair, choices on calibrate, figures on test, missed targets recorded.

By default a recall gate (the reference's kind): the threshold opens ≥ 90 % of the value's own calibrate
prompts, with unrelated inputs (neutral prompts, multiple-choice questions) as negatives.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conva import data
from conva.bundle import save_bundle
from conva.fit import FitSettings, GateSettings, LayerData, ModelInfo, fit_value
from conva.gates import (
    Calibration,
    calibrate_threshold,
    fit_probe_gate,
    gate_labels,
    gate_metrics,
    gate_splits,
    open_rates,
)

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
    s = gate_splits(groups, calibrate_size=0.25, test_size=0.25, seed=3, strata=labels)
    parts = [set(s.train.tolist()), set(s.calibrate.tolist()), set(s.test.tolist())]
    assert sum(map(len, parts)) == len(labels) and set.union(*parts) == set(range(len(labels)))
    for a in range(3):
        for b in range(a + 1, 3):
            assert parts[a].isdisjoint(parts[b])
            assert set(groups[list(parts[a])]).isdisjoint(groups[list(parts[b])])  # a pair never straddles
    again = gate_splits(groups, 0.25, 0.25, seed=3, strata=labels)
    assert np.array_equal(again.test, s.test) and np.array_equal(again.calibrate, s.calibrate)
    for part in (s.train, s.calibrate, s.test):  # stratified: each part holds its share of the own texts
        assert abs(labels[part].mean() - labels.mean()) < 0.03


def test_precision_setting_figures_come_from_rows_neither_choice_saw():
    mats, labels, groups, origin = _gate_data()
    kw = dict(
        target="precision", target_value=0.95, calibrate_size=0.25, test_size=0.25, seed=1, origin=origin
    )
    gate = fit_probe_gate(lambda l: mats[l], labels, groups, LAYERS, **kw)
    split = gate_splits(groups, 0.25, 0.25, seed=1, strata=origin)
    # The reported figures are exactly the gate's own rule applied to the test rows.
    test_scores = gate.scores(mats[gate.layer][split.test])
    assert gate.heldout == {
        **gate_metrics(test_scores, labels[split.test], gate.threshold, origin[split.test]),
        "not_converged": 0.0,
    }
    assert gate.layer == 1 and gate.target_met and gate.calibration["precision"] >= 0.95
    assert set(gate.heldout) >= {"open_rate_neutral", "open_rate_other", "open_rate_own"}
    # Rewriting every test row's activations changes the figures, never the choices or the fit. (The split is
    # stratified by kind of row, so the kinds fix which rows are test rows before anything is fitted.)
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
    settings = FitSettings(gate=GateSettings(target="precision", precision=0.999), band=(1, 2))
    with caplog.at_level(logging.WARNING, logger="conva.gates"):
        bundle = fit_value("power", pairs, gate, ModelInfo("m", "f" * 16, D, 3), settings)
    assert bundle.gate.target_met is False
    assert any("target_met = false" in r.getMessage() and "power" in r.getMessage() for r in caplog.records)
    meta = json.loads((save_bundle(bundle, tmp_path / "power") / "meta.json").read_text())
    test = gate_splits(groups, 0.25, 0.25, 0, origin).test
    n_test = np.sum(origin[test] != "other")  # other values' texts are not negatives by default: not counted
    assert meta["gate"]["target_met"] is False and meta["gate"]["heldout"]["n"] == float(n_test)
    assert meta["gate"]["heldout"]["open_n_other"] == float(np.sum(origin[test] == "other"))


def test_probe_gate_needs_both_classes_in_train_and_calibrate():
    mats, labels, groups, _ = _gate_data()
    with pytest.raises(ValueError, match="both classes"):
        fit_probe_gate(lambda l: mats[l], np.zeros_like(labels), groups, LAYERS, name="power")


def test_gate_prompts_are_held_apart_from_the_steered_prompts():
    from conva.batch.config import load_config
    from conva.batch.extraction import extraction_rows
    from conva.batch.steer_rows import steering_rows

    cfg = load_config(
        None,
        [
            '--data.values=["power", "tradition"]',
            "--gate.value_prompts=5",
            "--gate.other_pairs_per_value=2",
            "--gate.negatives=unrelated+other_values",
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
    # With unrelated negatives (the default) a value not studied gives no pairs: they would be no one's data.
    unrelated = load_config(None, ['--data.values=["power", "tradition"]', "--gate.value_prompts=5"])
    datasets = {(r["dataset"], r["value"]) for r in extraction_rows(unrelated).to_pylist()}
    assert ("gate", "hedonism") not in datasets and ("gate", "power") in datasets
    assert ("gate_prompt", "hedonism") in datasets  # its prompts are kept: the other-values open rate
    with pytest.raises(ValueError, match="none of 'power'"):
        steering_rows(load_config(None, ['--data.values=["power"]', "--gate.value_prompts=99"]))


def _six_kinds(seed: int = 0):
    """Gate rows of every kind; the value's texts lie along one direction, other values' halfway, at layer 1 best.

    Own and other prompts are single rows (own group each), pair texts come two to a group.
    """
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    counts = {"own": 40, "own_pair": 80, "other": 60, "other_pair": 60, "neutral": 80, "mc": 40}
    origin = np.repeat(list(counts), list(counts.values()))
    groups = np.asarray(
        [f"{o}/{i // 2 if o.endswith('_pair') else i}" for o in counts for i in range(counts[o])]
    )
    shift = {"own": 1.0, "own_pair": 1.5, "other": 0.3, "other_pair": 0.5, "neutral": -1.0, "mc": -1.2}
    base = rng.normal(size=(len(origin), D))
    along = np.asarray([shift[o] for o in origin])
    sep = {0: 0.5, 1: 2.0, 2: 1.0}
    mats = {l: (base + np.outer(along * sep[l], direction)).astype(np.float32) for l in LAYERS}
    return mats, groups, origin


def _fit(mats, groups, origin, gate=GateSettings(), seed=0):
    rng = np.random.default_rng(seed)
    pair_labels = np.tile([1, 0], 40)
    pair_x = (rng.normal(size=(80, D)) + np.outer(pair_labels - 0.5, np.ones(D))).astype(np.float32)
    pairs = LayerData(lambda l: pair_x, pair_labels, np.repeat(np.arange(40), 2), LAYERS)
    data = LayerData(lambda l: mats[l], gate_labels(origin), groups, LAYERS, origin=origin)
    return fit_value("power", pairs, data, ModelInfo("m", "f" * 16, D, 3), FitSettings(gate=gate, band=(2,)))


def test_default_gate_meets_recall_on_the_value_own_calibrate_prompts():
    mats, groups, origin = _six_kinds()
    gate = _fit(mats, groups, origin).gate
    assert (gate.target, gate.target_value, gate.target_met) == ("recall", 0.9, True)
    split = gate_splits(groups, 0.25, 0.25, 0, origin)
    # The threshold is calibrated on the value's own prompts (not its pair texts) and the unrelated rows only.
    cal = split.calibrate[np.isin(origin[split.calibrate], ["own", "neutral", "mc"])]
    scores = gate.scores(mats[gate.layer][cal])
    own = origin[cal] == "own"
    recall = np.mean(scores[own] >= gate.threshold)
    assert recall >= 0.9 and gate.calibration["recall"] == recall
    # ... and it is the highest such threshold: the next score up opens too few of them.
    above = np.sort(scores[scores > gate.threshold])
    assert len(above) == 0 or np.mean(scores[own] >= above[0]) < 0.9
    assert gate.calibration["n"] == len(cal)
    assert gate.calibration["precision"] == np.sum(own & (scores >= gate.threshold)) / np.sum(
        scores >= gate.threshold
    )


def test_open_rates_come_from_test_rows_the_threshold_never_saw():
    mats, groups, origin = _six_kinds()
    gate = _fit(mats, groups, origin).gate
    split = gate_splits(groups, 0.25, 0.25, 0, origin)
    parts = [set(split.train.tolist()), set(split.calibrate.tolist()), set(split.test.tolist())]
    assert set.union(*parts) == set(range(len(origin))) and sum(map(len, parts)) == len(origin)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert parts[a].isdisjoint(parts[b]) and set(groups[list(parts[a])]).isdisjoint(
            groups[list(parts[b])]
        )
    test_scores = gate.scores(mats[gate.layer][split.test])
    for kind in ("own", "own_pair", "other", "other_pair", "neutral", "mc"):
        mine = origin[split.test] == kind
        assert mine.sum() > 0
        assert gate.heldout[f"open_rate_{kind}"] == np.mean(test_scores[mine] >= gate.threshold)
        assert gate.heldout[f"open_n_{kind}"] == mine.sum()
    assert {k: v for k, v in gate.heldout.items() if k.startswith("open_")} == open_rates(
        test_scores, origin[split.test], gate.threshold
    )
    # The test rows' activations never reach the fit or the threshold; they move only the reported figures.
    scrambled = {l: m.copy() for l, m in mats.items()}
    for m in scrambled.values():
        m[split.test] = np.random.default_rng(5).normal(size=(len(split.test), D)) * 5
    other = _fit(scrambled, groups, origin).gate
    assert (other.layer, other.threshold, other.b, other.calibration) == (
        gate.layer,
        gate.threshold,
        gate.b,
        gate.calibration,
    )
    assert other.heldout != gate.heldout


def test_other_values_texts_are_negatives_only_when_asked():
    mats, groups, origin = _six_kinds()
    default = _fit(mats, groups, origin).gate
    moved = {l: m.copy() for l, m in mats.items()}
    is_other = np.isin(origin, ["other", "other_pair"])
    for m in moved.values():  # the other values' texts pushed far to the closed side
        m[is_other] -= 50 * default.w / np.linalg.norm(default.w)
    again = _fit(moved, groups, origin).gate
    assert np.array_equal(default.w, again.w) and default.threshold == again.threshold  # unread by the fit
    assert default.heldout["open_rate_other"] > 0 == again.heldout["open_rate_other"]  # but reported
    both = GateSettings(negatives="unrelated+other_values")
    with_other, moved_other = _fit(mats, groups, origin, both).gate, _fit(moved, groups, origin, both).gate
    assert not np.array_equal(with_other.w, moved_other.w)
    assert list(gate_labels(["own", "own_pair", "other", "other_pair", "neutral", "mc"])) == [
        1,
        1,
        -1,
        -1,
        0,
        0,
    ]
    assert list(gate_labels(["other", "other_pair"], "unrelated+other_values")) == [0, 0]


def test_precision_setting_through_the_fit():
    mats, groups, origin = _six_kinds()
    gate = _fit(
        mats, groups, origin, GateSettings(target="precision", negatives="unrelated+other_values")
    ).gate
    assert (gate.target, gate.target_value, gate.target_met) == ("precision", 0.95, True)
    split = gate_splits(groups, 0.25, 0.25, 0, origin)
    cal = split.calibrate[origin[split.calibrate] != "own_pair"]
    scores = gate.scores(mats[gate.layer][cal])
    opened = scores >= gate.threshold
    precision = np.sum(opened & (origin[cal] == "own")) / opened.sum()
    assert precision >= 0.95 and gate.calibration["precision"] == precision
    recall_gate = _fit(mats, groups, origin).gate
    assert recall_gate.heldout["open_rate_own"] >= gate.heldout["open_rate_own"]


def test_gate_config_errors_name_the_key():
    from conva.batch.config import ConfigError, load_config
    from conva.batch.extraction import extraction_rows
    from conva.batch.sources import gate_questions, utility_questions
    from conva.mc import demo_mc

    cfg = load_config(None, [])
    assert (cfg.gate.target, cfg.gate.recall, cfg.gate.precision, cfg.gate.negatives) == (
        "recall",
        0.9,
        0.95,
        "unrelated",
    )
    for override, key in [
        ("--gate.target=f1", "gate.target"),
        ("--gate.recall=1.5", "gate.recall"),
        ("--gate.precision=0", "gate.precision"),
        ("--gate.negatives=others", "gate.negatives"),
        ("--gate.mc_questions=-1", "gate.mc_questions"),
        ("--gate.mc_questions=many", "gate.mc_questions"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    with pytest.raises(ValueError, match=r"gate\.mc_questions = 999"):
        extraction_rows(load_config(None, ["--gate.mc_questions=999"]))
    # The gate reads the set's last questions; the study's utility asks only those before them.
    items, gate = demo_mc(), gate_questions(cfg)
    assert gate == items[-cfg.gate.mc_questions :] and len(gate) == 32
    assert utility_questions(cfg, "demo") == items[: len(items) - 32]
    assert utility_questions(cfg, "demo", 6) == items[:6]
    assert utility_questions(load_config(None, ["--gate.kind=none"]), "demo") == items
    rows = [r for r in extraction_rows(cfg).to_pylist() if r["dataset"] == "mc"]
    assert len(rows) == 32 and all(r["label"] == 0 and r["value"] is None for r in rows)


def test_gate_data_names_each_rows_kind():
    import pyarrow as pa

    from conva.batch.extraction import gate_data

    meta = pa.table(
        {
            "dataset": ["pairs", "gate", "gate", "gate_prompt", "gate_prompt", "neutral", "mc"],
            "value": ["power", "power", "tradition", "power", "tradition", None, None],
            "group": [0, 0, 0, 0, 0, 0, 0],
        }
    )
    data = gate_data(meta, "power", lambda l, r: np.zeros((len(r), 2)), [0])
    assert data is not None
    assert list(data.origin) == ["own_pair", "other_pair", "own", "other", "neutral", "mc"]
    assert list(data.labels) == [1, 0, 1, 0, 0, 0] and len(set(data.groups)) == 6
