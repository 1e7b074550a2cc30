"""Behaviour on the real SmolLM2-135M-Instruct: ε property and single pass = the paper's procedure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conva.batch.config import load_config
from conva.batch.extraction import extract_table, extraction_rows, fit_bundles
from conva.fit import ModelInfo
from conva.gates import Gate
from conva.models import load_model, model_fingerprint
from conva.probes import split_three
from conva.record import record_activations
from conva.steering.hf import generate
from conva.steering.spec import SteerSpec
from tests.test_steer_tiny import _prob, _states

pytestmark = pytest.mark.slow

PROMPTS = [
    "Should I accept a promotion that means moving away from my friends?",
    "What is the boiling point of water at sea level?",
    "Is it better to work late to finish my project or go home to rest?",
    "Should I tell my boss about a mistake my colleague made?",
]


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def smol_fit(smol, paper_data):
    """An achievement bundle fitted on the paper's pairs, band 10–20, no gate; with the pair texts' activations
    ``[layer, row, d]``, labels and groups, and the config.

    No gate is fitted here: a probe gate reads about 400 more texts (the pairs again in the chat template, the
    neutral prompts, the MC questions), three quarters of this fixture's forward passes. The gate fitted on
    SmolLM2 is the demo's, pinned bit for bit and to float rounding by ``tests/test_pinned_outputs.py``;
    :func:`smol_bundle` gives this bundle a probe gate made here for the steering tests."""
    model, tok = smol
    cfg = load_config(
        None,
        [
            '--data.values=["achievement"]',
            f'--data.pairs="paper:{paper_data}"',
            "--fit.band=10-20",
            "--fit.p0=0.99999",
            "--gate.kind=none",
        ],
    )
    rows = extraction_rows(cfg)
    layers = list(range(model.config.num_hidden_layers))
    acts = extract_table(model, tok, rows, layers, "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        len(layers), rows.num_rows, -1
    )
    info = ModelInfo("SmolLM2-135M-Instruct", model_fingerprint(model), model.config.hidden_size, len(layers))
    bundle = fit_bundles(rows, lambda l: matrix[l], layers, cfg, info)["achievement"]
    pairs = np.flatnonzero(
        (np.asarray(rows.column("dataset").to_pylist()) == "pairs")
        & (np.asarray(rows.column("value").to_pylist()) == "achievement")
    )
    pair_data = (
        matrix[:, pairs],
        np.asarray(rows.column("label").to_pylist())[pairs],
        np.asarray(rows.column("group").to_pylist())[pairs],
    )
    return bundle, pair_data, cfg


@pytest.fixture(scope="module")
def smol_bundle(smol, smol_fit):
    """The fitted bundle with a probe gate at the band's first layer: the achievement probe there, its threshold
    the median of its scores on ``PROMPTS``, so it opens for half of them: neither always open nor always shut."""
    model, tok = smol
    bundle = smol_fit[0]
    layer = min(bundle.band)
    k = list(bundle.layers).index(layer)
    w, b = bundle.w[k], float(bundle.b[k])
    acts = record_activations(model, tok, PROMPTS, [layer], chat_template=True)[:, 0]
    scores = Gate("probe", 0.5, layer, w, b).scores(acts)
    gate = Gate("probe", float(np.median(scores)), layer, w, b)
    assert 0 < int(np.sum(gate.open(scores))) < len(PROMPTS)
    return replace(bundle, gate=gate)


def test_smollm2_probes_caa_and_held_out_accuracy_recomputed(smol_fit):
    """The bundle's CAA rows, held-out accuracies and band, recomputed here from the activations: the CAA row
    is mean(positive) − mean(negative) of the pair texts; ``test_acc`` is the stored probe's accuracy on the
    pairs the split held out (both texts of a pair on one side); the band is the best window by ``val_acc``."""
    bundle, (acts, labels, groups), cfg = smol_fit
    _, _, test = split_three(groups, cfg.probe)
    assert len(set(groups[test]) & set(np.delete(groups, test))) == 0
    for k, l in enumerate(bundle.layers):
        x = acts[l].astype(np.float64)
        caa = x[labels == 1].mean(0) - x[labels == 0].mean(0)
        np.testing.assert_allclose(bundle.caa[k], caa, rtol=1e-4, atol=1e-5)
        predicted = (x[test] @ bundle.w[k].astype(np.float64) + float(bundle.b[k])) > 0
        assert float(bundle.test_acc[k]) == pytest.approx(
            float(np.mean(predicted == (labels[test] == 1))), abs=1e-6
        )
    # SmolLM2 separates the achievement pairs well above chance on held-out scenarios (a behaviour figure).
    assert bundle.test_acc.max() >= 0.85
    assert bundle.gate.kind == "none"  # fitted without a gate: it reads only the pair texts (see smol_fit)


def test_smollm2_epsilon_reaches_p0(smol, smol_bundle):
    model, tok = smol
    specs = [SteerSpec("conva_nogate", smol_bundle, p0=0.99999)] * len(PROMPTS)
    before, after, rows = _states(model, tok, PROMPTS, specs, list(smol_bundle.band))
    assert any(e > 0 for r in rows for e in r.eps)
    for i, row in enumerate(rows):
        for l in smol_bundle.band:
            p_before = float(_prob(smol_bundle, l, before[l][i]))
            p_after = float(_prob(smol_bundle, l, after[l][i]))
            assert p_after == pytest.approx(max(0.99999, p_before), abs=1e-4), (i, l)


def test_smollm2_single_pass_equals_reference(smol, smol_bundle):
    model, tok = smol
    specs = [
        SteerSpec("conva", smol_bundle, p0=0.99999),
        SteerSpec("none"),
        SteerSpec("conva_nogate", smol_bundle, p0=0.999),
        SteerSpec("caa", smol_bundle, strength=2.0, gate_scope="conva"),
    ]  # ungated: it must move SmolLM2
    ours = generate(model, tok, PROMPTS, specs, max_new_tokens=16)
    ref = generate(model, tok, PROMPTS, specs, max_new_tokens=16, mode="reference")
    for a, b in zip(ours, ref):
        assert a.gate_open == b.gate_open
        np.testing.assert_allclose(a.eps, b.eps, atol=1e-4, rtol=1e-4)
        assert a.tokens == b.tokens
    plain = generate(model, tok, PROMPTS, [SteerSpec("none")] * len(PROMPTS), max_new_tokens=16)
    assert plain[1].tokens == ours[1].tokens
    changed = [i for i, r in enumerate(ours) if any(r.eps) and r.tokens != plain[i].tokens]
    assert changed, "steering must change some of SmolLM2's answers"
