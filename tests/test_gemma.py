"""Gemma 3 270M, a second real model family: the ε property, single pass = the paper's procedure = the compiled
path, and gated-off rows bit-identical, on Gemma 3's block structure (sliding-window layers, a base model's prompt)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conva.batch.config import load_config
from conva.batch.extraction import extract_table, extraction_rows, fit_bundles
from conva.fit import ModelInfo
from conva.gates import Gate
from conva.models import load_model, model_fingerprint
from conva.steering.hf import generate, steer_logits
from conva.steering.spec import SteerSpec
from tests.test_steer_tiny import _prob, _states

pytestmark = pytest.mark.slow

PROMPTS = [
    "Should I accept a promotion that means moving away from my friends?",
    "What is the boiling point of water at sea level?",
    "Is it better to work late to finish my project or go home to rest?",
]


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    return model, tok


@pytest.fixture(scope="module")
def gemma_bundle(gemma):
    """An achievement bundle on the demo pairs, band 4–9, no gate (the gate tests give it one)."""
    model, tok = gemma
    cfg = load_config(
        None, ['--data.values=["achievement"]', "--fit.band=4-9", "--fit.p0=0.99999", "--gate.kind=none"]
    )
    rows = extraction_rows(cfg)
    layers = list(range(10))  # the band and the gate's candidates: enough for these checks
    acts = extract_table(model, tok, rows, layers, "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        len(layers), rows.num_rows, -1
    )
    info = ModelInfo(
        "gemma-3-270m", model_fingerprint(model), model.config.hidden_size, model.config.num_hidden_layers
    )
    return fit_bundles(rows, lambda l: matrix[l], layers, cfg, info)["achievement"]


def test_gemma_epsilon_reaches_p0_in_the_single_pass_and_the_reference(gemma, gemma_bundle):
    model, tok = gemma
    specs = [SteerSpec("conva_nogate", gemma_bundle, p0=0.99999)] * len(PROMPTS)
    before, after, rows = _states(model, tok, PROMPTS, specs, list(gemma_bundle.band))
    assert any(e > 0 for r in rows for e in r.eps)
    for i in range(len(PROMPTS)):
        for l in gemma_bundle.band:
            p_before = float(_prob(gemma_bundle, l, before[l][i]))
            p_after = float(_prob(gemma_bundle, l, after[l][i]))
            assert p_after == pytest.approx(max(0.99999, p_before), abs=1e-4), (i, l)
    ours = generate(model, tok, PROMPTS[:2], specs[:2], max_new_tokens=6)
    ref = generate(model, tok, PROMPTS[:2], specs[:2], max_new_tokens=6, mode="reference")
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.eps, b.eps, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(b.p_after, np.maximum(0.99999, b.p_before), atol=1e-4)
        assert a.tokens == b.tokens and len(a.tokens) > 0


def test_gemma_compiled_path_gives_the_same_tokens(gemma, gemma_bundle):
    model, tok = gemma
    specs = [SteerSpec("conva_nogate", gemma_bundle, p0=0.99999), SteerSpec("none")]
    batched = generate(model, tok, PROMPTS[:2], specs, max_new_tokens=8)
    compiled = generate(model, tok, PROMPTS[:2], specs, max_new_tokens=8, mode="compiled")
    for a, b in zip(batched, compiled):
        np.testing.assert_allclose(a.eps, b.eps, atol=1e-4, rtol=1e-4)
        assert a.tokens == b.tokens


def test_gemma_gated_off_rows_are_bit_identical(gemma, gemma_bundle):
    model, tok = gemma
    w = np.random.default_rng(0).normal(size=model.config.hidden_size).astype(np.float32)
    closed = replace(gemma_bundle, gate=Gate("probe", 2.0, 4, w, 0.0))  # reads block 4; never opens
    specs = [SteerSpec("conva", closed), SteerSpec("caa", closed, strength=2.0), SteerSpec("prompt", closed)]
    logits, rows = steer_logits(model, tok, PROMPTS, specs)
    base, _ = steer_logits(model, tok, PROMPTS, [SteerSpec("none")] * len(PROMPTS))
    assert all(r.gate_score is not None and not r.gate_open for r in rows)
    for i in range(len(PROMPTS)):
        assert torch.equal(logits[i], base[i]), specs[i].method
    got = generate(model, tok, PROMPTS, specs, max_new_tokens=8)
    plain = generate(model, tok, PROMPTS, [SteerSpec("none")] * len(PROMPTS), max_new_tokens=8)
    assert [r.tokens for r in got] == [r.tokens for r in plain]
