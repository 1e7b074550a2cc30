"""The fast path (static cache, compiled decode, in-graph steering) against conva.steering on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conva.blocks import find_blocks
from conva.steering.compiled import FastSteering, generate_compiled
from conva.steering.hf import generate
from conva.steering.spec import SteerSpec
from tests.test_steer_tiny import _mixed_specs

# Mixed lengths, so the batch is left-padded and positions differ per row.
PROMPTS = [
    "Should I take the job abroad even though my family wants me to stay?",
    "What is the capital of France?",
    "Is it right to break a rule to help a friend who is in trouble with the school?",
    "Write a short poem.",
    "Should I spend my savings on a long trip?",
    "How many legs?",
]
NEW = 12


def _patched_blocks(model) -> int:
    return sum("forward" in vars(b) for b in find_blocks(model))


def _assert_same(fast, ref, eps_tol=1e-4):
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.tokens == b.tokens, i
        assert a.text == b.text and a.n_prompt_tokens == b.n_prompt_tokens, i
        assert a.layers == b.layers and a.gate_open == b.gate_open, i
        assert (a.gate_score is None) == (b.gate_score is None), i
        np.testing.assert_allclose(a.eps, b.eps, atol=eps_tol, rtol=eps_tol)
        np.testing.assert_allclose(a.p_before, b.p_before, atol=1e-5)
        np.testing.assert_allclose(a.p_after, b.p_after, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tiny, tiny_bundles):
    model, tok = tiny
    specs = _mixed_specs(*tiny_bundles)
    return specs, generate(model, tok, PROMPTS, specs, max_new_tokens=NEW, batch_size=len(PROMPTS))


def test_eager_fast_path_equals_steer_generate(tiny, reference):
    model, tok = tiny
    specs, ref = reference
    fast = generate_compiled(model, tok, PROMPTS, specs, max_new_tokens=NEW, compile=False)
    _assert_same(fast, ref)
    assert any(e > 0 for r in fast for e in r.eps), "the test must exercise a non-zero step"
    assert fast[2].gate_open is False and not any(fast[2].eps)
    assert _patched_blocks(model) == 0


def test_untouched_rows_equal_unsteered(tiny, tiny_bundles):
    model, tok = tiny
    specs = _mixed_specs(*tiny_bundles)
    fast = generate_compiled(model, tok, PROMPTS, specs, max_new_tokens=NEW, compile=False)
    plain = generate_compiled(
        model, tok, PROMPTS, [SteerSpec()] * len(PROMPTS), max_new_tokens=NEW, compile=False
    )
    untouched = [i for i, r in enumerate(fast) if not any(r.eps)]
    assert 1 in untouched and 2 in untouched  # the unsteered row and the closed-gate row
    for i in untouched:
        assert fast[i].tokens == plain[i].tokens, i
    assert any(fast[i].tokens != plain[i].tokens for i in range(len(PROMPTS)) if i not in untouched)


def test_steering_in_the_decode_graph_changes_tokens(tiny, tiny_bundles):
    """A strong constant push must reach the decode steps too: compare ε frozen at prefill only."""
    model, tok = tiny
    strong = [SteerSpec("probe_fixed", tiny_bundles[0], strength=50.0)]
    steered = generate_compiled(model, tok, PROMPTS[:1], strong, max_new_tokens=8, compile=False)
    ref = generate(model, tok, PROMPTS[:1], strong, max_new_tokens=8)
    gen_only = generate_compiled(
        model, tok, PROMPTS[:1], strong, max_new_tokens=8, compile=False, positions="generated"
    )
    ref_gen = generate(model, tok, PROMPTS[:1], strong, max_new_tokens=8, positions="generated")
    assert steered[0].tokens == ref[0].tokens and gen_only[0].tokens == ref_gen[0].tokens


def test_per_token_epsilon_equals_steer_generate(tiny, tiny_bundles):
    model, tok = tiny
    specs = _mixed_specs(*tiny_bundles)
    ref = generate(
        model, tok, PROMPTS, specs, max_new_tokens=NEW, epsilon="per_token", batch_size=len(PROMPTS)
    )
    if any(len(r.tokens) < NEW for r in ref):
        pytest.fail(
            "a row ended early: HF would then stop before the fixed step count and ε telemetry differs"
        )
    fast = generate_compiled(
        model, tok, PROMPTS, specs, max_new_tokens=NEW, compile=False, epsilon="per_token"
    )
    _assert_same(fast, ref)


def test_batches_and_errors(tiny, tiny_bundles):
    model, tok = tiny
    specs = _mixed_specs(*tiny_bundles)
    one_by_one = generate_compiled(model, tok, PROMPTS, specs, max_new_tokens=6, compile=False, batch_size=4)
    together = generate_compiled(model, tok, PROMPTS, specs, max_new_tokens=6, compile=False)
    assert [r.tokens for r in one_by_one] == [r.tokens for r in together]
    runner = FastSteering(model, batch_size=8, max_len=64, layers=(1,), compile=False)
    with pytest.raises(ValueError, match="built for"):
        runner.generate(tok, PROMPTS[:1], specs[:1], max_new_tokens=4)
    with pytest.raises(ValueError, match="cache length"):
        runner.generate(tok, PROMPTS[:1], [SteerSpec()], max_new_tokens=60)
    with pytest.raises(ValueError, match="out of range"):
        FastSteering(model, batch_size=8, max_len=64, layers=(9,))
    assert _patched_blocks(model) == 0


@pytest.mark.slow  # one Inductor compile: ~55 s on the 2-core CI machine
def test_compiled_equals_eager(tiny, reference):
    """torch.compile(fullgraph=True) of the decode step (Inductor on CPU): one graph, same tokens as HF."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    specs, ref = reference
    torch._dynamo.reset()
    counters.clear()
    fast = generate_compiled(model, tok, PROMPTS, specs, max_new_tokens=NEW, compile=True)
    _assert_same(fast, ref)
    # A second batch of the same shape reuses the compiled step: still one graph, no recompile.
    again = generate_compiled(model, tok, PROMPTS[::-1], specs[::-1], max_new_tokens=NEW, compile=True)
    assert [r.tokens for r in again] == [r.tokens for r in fast[::-1]]
    assert counters["stats"]["unique_graphs"] == 1
    assert _patched_blocks(model) == 0


def test_compiled_mode_through_the_steering_stage(tiny, tiny_bundles):
    """``steer.mode = "compiled"``: the HF backend's stage (``steer_table``) on the fast path, same rows as batched."""
    import pyarrow as pa

    from conva.batch.config import ConfigError, load_config
    from conva.batch.schemas import STEERING_INPUT_SCHEMA
    from conva.batch.steer_rows import steer_table

    model, tok = tiny
    prompts = [*PROMPTS, "", None]  # two error rows among the good ones: the row contract is unchanged
    rows = pa.Table.from_pylist(
        [dict(row_id=f"r{i}", value="power", prompt=p, error=None) for i, p in enumerate(prompts)],
        schema=STEERING_INPUT_SCHEMA,
    )
    tables = {}
    for mode in ("batched", "compiled"):
        cfg = load_config(
            None,
            [
                f"--steer.mode={mode}",
                f"--steer.max_new_tokens={NEW}",
                "--steer.p0=0.99",
                "--steer.batch_size=8",
            ],
        )
        tables[mode] = steer_table(model, tok, rows, {"power": tiny_bundles[0]}, cfg, "tiny")
    batched, compiled = tables["batched"].to_pylist(), tables["compiled"].to_pylist()
    assert len(compiled) == len(prompts)
    assert [r["error"] for r in compiled] == [r["error"] for r in batched] and compiled[-1][
        "error"
    ] == "prompt is null"
    for a, b in zip(compiled, batched):
        assert (a["output"], a["n_output_tokens"], a["gate_open"]) == (
            b["output"],
            b["n_output_tokens"],
            b["gate_open"],
        )
        if a["eps"] is not None:
            np.testing.assert_allclose(a["eps"], b["eps"], atol=1e-4)
    assert any(e > 0 for r in compiled if r["eps"] for e in r["eps"])
    assert _patched_blocks(model) == 0
    with pytest.raises(ConfigError, match="steer.mode"):
        load_config(None, ["--steer.mode=compiled", "--steer.backend=vllm"])
