"""Behaviour on the real SmolLM2-135M-Instruct: ε property and single pass = the paper's procedure."""

from __future__ import annotations

import numpy as np
import pytest

from conva.batch.config import load_config
from conva.batch.pipeline import extract_table, extraction_rows, fit_bundles
from conva.fit import ModelInfo
from conva.models import load_model, model_fingerprint
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
def smol_bundle(smol, paper_data):
    """An achievement bundle fitted on the paper's pairs, band 10–20, probe gate on demo neutral prompts."""
    model, tok = smol
    cfg = load_config(
        None,
        [
            '--data.values=["achievement"]',
            f'--data.pairs="paper:{paper_data}"',
            "--fit.band=10-20",
            "--fit.p0=0.99999",
            "--gate.other_pairs_per_value=4",
        ],
    )
    rows = extraction_rows(cfg)
    layers = list(range(model.config.num_hidden_layers))
    acts = extract_table(model, tok, rows, layers, "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        len(layers), rows.num_rows, -1
    )
    info = ModelInfo("SmolLM2-135M-Instruct", model_fingerprint(model), model.config.hidden_size, len(layers))
    return fit_bundles(rows, lambda l: matrix[l], layers, cfg, info)["achievement"]


def test_smollm2_probes_are_accurate(smol_bundle):
    assert smol_bundle.test_acc.max() >= 0.85
    assert smol_bundle.gate.kind == "probe" and smol_bundle.gate.layer <= 10


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
