"""The vllm backend on Gemma 3's block: a tiny random Gemma 3 (4 blocks, head_dim 64, sliding window of
16 tokens on even blocks), one eager steering engine for the module.

Gemma 3's block norms the attention and MLP outputs before they join the residual (four norms per
block) and vLLM's ``Gemma3DecoderLayer`` returns the MLP output unadded, as Llama's does: these tests
check that ``hidden + residual`` is the block's output, and that steering, gating and telemetry on it
match the HF backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm", reason="the vllm extra is not installed")  # CI installs it: see pyproject

from conva.gates import Gate  # noqa: E402
from conva.steering.hf import generate  # noqa: E402
from conva.steering.spec import SteerSpec  # noqa: E402
from conva.steering.vllm import EngineSettings, VLLMSteerer  # noqa: E402
from tests.test_vllm import (  # noqa: E402
    GATE_LAYER,
    HIDDEN,
    MAX_NEW,
    N_BLOCKS,
    PROMPTS,
    _assert_parity,
    _bundle,
    _mixed_specs,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> str:
    from conva.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), arch="gemma3", seed=0)


@pytest.fixture(scope="module")
def hf(gemma: str):  # noqa: ANN201
    from conva.models import load_model

    return load_model(gemma)


@pytest.fixture(scope="module")
def bundles(hf):  # noqa: ANN001, ANN201
    """A bundle with a probe gate at layer 1 that closes for half the prompts, and an ungated one."""
    from conva.record import record_activations

    model, tok = hf
    acts = record_activations(model, tok, PROMPTS, [GATE_LAYER], chat_template=True)[:, 0]
    gw = np.random.default_rng(7).normal(size=HIDDEN).astype(np.float32)
    gate = Gate(
        "probe", float(np.median(Gate("probe", 0.5, GATE_LAYER, gw, 0.0).scores(acts))), GATE_LAYER, gw, 0.0
    )
    return _bundle("power", 1, gate=gate), _bundle("security", 2, p0=0.99)


@pytest.fixture(scope="module")
def engine(gemma: str, bundles):  # noqa: ANN001, ANN201
    steerer = VLLMSteerer(gemma, bundles, layers=range(N_BLOCKS), settings=EngineSettings(record=True))
    yield steerer
    steerer.close()


def test_hidden_plus_residual_is_the_residual_stream(hf, engine) -> None:  # noqa: ANN001
    """vLLM block l's hidden + residual equals HF's hidden_states[l + 1] (the last one through the final
    norm, which HF applies there), and conva.record's block outputs, raw and in the chat template."""
    import torch

    from conva.record import record_activations, tokenize

    model, tok = hf
    layers = list(range(N_BLOCKS))
    for chat in (False, True):
        got = engine.record(PROMPTS, layers, chat_template=chat)
        np.testing.assert_allclose(
            got, record_activations(model, tok, PROMPTS, layers, chat_template=chat), atol=1e-4
        )
    with torch.no_grad():
        states = model(**tokenize(tok, PROMPTS[:1], True), output_hidden_states=True).hidden_states
        last = model.model.norm(torch.from_numpy(got[:1, -1]))
    for l in layers[:-1]:
        np.testing.assert_allclose(got[0, l], states[l + 1][0, -1].numpy(), atol=1e-4)
    np.testing.assert_allclose(last[0].numpy(), states[-1][0, -1].numpy(), atol=1e-4)


def test_parity_with_hf_and_eps_property(hf, bundles, engine) -> None:  # noqa: ANN001
    """A mixed batch (gate open and closed, two bundles, three P0, CAA, fixed probe): same tokens, gate,
    ε, p_before and p_after as the HF backend; on steered ConVA rows p_after = max(P0, p_before)."""
    model, tok = hf
    prompts, specs = PROMPTS + PROMPTS[:3], _mixed_specs(bundles)
    rows = engine.generate(prompts, specs, max_new_tokens=MAX_NEW)
    _assert_parity(
        generate(model, tok, prompts, specs, max_new_tokens=MAX_NEW, batch_size=len(prompts)), rows
    )
    assert {r.gate_open for r, s in zip(rows, specs) if s.gated()} == {True, False}
    conva = [(r, s) for r, s in zip(rows, specs) if s.method in ("conva", "conva_nogate") and r.gate_open]
    assert conva and any(max(r.eps) > 0 for r, _ in conva)
    for r, s in conva:
        np.testing.assert_allclose(r.p_after, np.maximum(s.target(), r.p_before), atol=1e-4)


def test_gated_off_and_unsteered_rows_are_bit_identical(bundles, engine) -> None:  # noqa: ANN001
    """Rows the gate closes, and unsteered rows, give the same next-token log-probabilities (exactly) and
    the same generated tokens as the same batch run unsteered; open rows change."""
    specs = _mixed_specs(bundles)[: len(PROMPTS)]
    vocab = list(range(engine.tokenizer.vocab_size))[:64]
    steered, rows = engine.choice_logprobs(PROMPTS, specs, vocab)
    plain, _ = engine.choice_logprobs(PROMPTS, [SteerSpec("none")] * len(PROMPTS), vocab)
    gen = engine.generate(PROMPTS, specs, max_new_tokens=MAX_NEW)
    ref = engine.generate(PROMPTS, [SteerSpec("none")] * len(PROMPTS), max_new_tokens=MAX_NEW)
    untouched = [i for i, (r, s) in enumerate(zip(rows, specs)) if not (r.gate_open and s.layers())]
    assert any(specs[i].gated() for i in untouched) and any(specs[i].method == "none" for i in untouched)
    for i in untouched:
        assert np.array_equal(steered[i], plain[i]), f"row {i} ({specs[i].method}): logprobs differ"
        assert gen[i].tokens == ref[i].tokens, f"row {i} ({specs[i].method}): tokens differ"
    assert any(not np.array_equal(steered[i], plain[i]) for i in range(len(PROMPTS)) if i not in untouched)
