"""Exact steering math on a tiny random Llama: ε closed form, single pass = reference, batching, gates, hooks."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conva.blocks import block_hooks, find_blocks
from conva.steering.hf import generate, steer_logits
from conva.steering.spec import SteerSpec

PROMPTS = [
    "Should I take the job abroad even though my family wants me to stay?",
    "What is the capital of France?",
    "Is it right to break a rule to help a friend?",
    "Write a short poem about the sea.",
    "Should I spend my savings on a long trip?",
    "How many legs does a spider have?",
]


def _hooks_left(model) -> int:
    mods = [model, *find_blocks(model)]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def _mixed_specs(bundle, other, closed_gate):
    """Steered (two values, two P0), gate closed, unsteered, CAA and text-only rows in one batch."""
    return [
        SteerSpec("conva", bundle, p0=0.99),
        SteerSpec("none"),
        SteerSpec("conva", closed_gate, p0=0.99),
        SteerSpec("conva", other, p0=0.9),
        SteerSpec("caa", bundle, strength=3.0),
        SteerSpec("conva_nogate", other, p0=0.999),
    ]


def _states(model, tok, prompts, specs, layers):
    """Block outputs at the last prompt token before and after the steering add, read independently."""
    blocks = find_blocks(model)
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}
    handles = []
    for l in layers:
        nxt = blocks[l + 1] if l + 1 < len(blocks) else model.model.norm
        handles.append(
            nxt.register_forward_pre_hook(
                lambda _m, args, l=l: after.__setitem__(l, args[0][:, -1].float().clone())
            )
        )
    try:
        # Registered before the steering hooks, so it sees block l's output before the add at l.
        with block_hooks(
            model, {l: (lambda i, h: before.__setitem__(i, h[:, -1].float().clone())) for l in layers}
        ):
            _, rows = steer_logits(model, tok, prompts, specs)
    finally:
        for h in handles:
            h.remove()
    return before, after, rows


def _prob(bundle, layer, e):
    r = bundle.rows((layer,))[0]
    w, b = torch.from_numpy(bundle.w[r]).double(), float(bundle.b[r])
    return torch.sigmoid(e.double() @ w + b)


def test_epsilon_lifts_probe_exactly_to_p0(tiny, tiny_bundles):
    model, tok = tiny
    bundle, other, closed = tiny_bundles
    specs = _mixed_specs(bundle, other, closed)
    layers = sorted({l for s in specs for l in s.layers()})
    before, after, rows = _states(model, tok, PROMPTS, specs, layers)
    checked = 0
    for i, (spec, row) in enumerate(zip(specs, rows)):
        if spec.method not in ("conva", "conva_nogate"):
            continue
        for l, eps in zip(spec.layers(), row.eps):
            p_before = float(_prob(spec.bundle, l, before[l][i]))
            p_after = float(_prob(spec.bundle, l, after[l][i]))
            expected = max(spec.target(), p_before) if row.gate_open else p_before
            assert p_after == pytest.approx(expected, abs=1e-4), (i, l)
            # The closed form: ε = max(0, (logit P0 − b − wᵀe)/‖w‖).
            r = spec.bundle.rows((l,))[0]
            w = spec.bundle.w[r].astype(np.float64)
            z = float(before[l][i].double() @ torch.from_numpy(w)) + float(spec.bundle.b[r])
            s0 = math.log(spec.target() / (1 - spec.target()))
            closed_form = max(0.0, (s0 - z) / np.linalg.norm(w)) if row.gate_open else 0.0
            assert eps == pytest.approx(closed_form, rel=1e-4, abs=1e-5)
            checked += 1
    assert checked >= 3 * len(bundle.band)
    assert any(e > 0 for r in rows for e in r.eps), "the test must exercise a non-zero step"
    assert rows[2].gate_open is False and all(e == 0 for e in rows[2].eps)


def test_single_pass_equals_reference(tiny, tiny_bundles):
    model, tok = tiny
    bundle, other, closed = tiny_bundles
    specs = _mixed_specs(bundle, other, closed)
    ours = generate(model, tok, PROMPTS, specs, max_new_tokens=12)
    ref = generate(model, tok, PROMPTS, specs, max_new_tokens=12, mode="reference")
    for a, b in zip(ours, ref):
        assert a.layers == b.layers and a.gate_open == b.gate_open
        np.testing.assert_allclose(a.eps, b.eps, atol=1e-4, rtol=1e-4)
        assert a.tokens == b.tokens


def test_batched_equals_one_at_a_time(tiny, tiny_bundles):
    model, tok = tiny
    specs = _mixed_specs(*tiny_bundles)
    batched = generate(model, tok, PROMPTS, specs, max_new_tokens=10, batch_size=len(PROMPTS))
    for p, s, b in zip(PROMPTS, specs, batched):
        (single,) = generate(model, tok, [p], [s], max_new_tokens=10)
        np.testing.assert_allclose(single.eps, b.eps, atol=1e-4, rtol=1e-4)
        assert single.tokens == b.tokens and single.gate_open == b.gate_open


def test_gated_off_and_unsteered_rows_are_bit_identical(tiny, tiny_bundles):
    model, tok = tiny
    specs = _mixed_specs(*tiny_bundles)
    steered, rows = steer_logits(model, tok, PROMPTS, specs)
    plain, _ = steer_logits(model, tok, PROMPTS, [SteerSpec("none")] * len(PROMPTS))
    untouched = [i for i, r in enumerate(rows) if not any(r.eps)]
    assert 1 in untouched and 2 in untouched  # the unsteered row and the closed-gate row
    for i in range(len(PROMPTS)):
        same = torch.equal(steered[i], plain[i])
        assert same == (i in untouched), i


def _greedy_with_fixed_steps(model, tok, prompt: str, adds: dict[int, torch.Tensor], n_new: int, first: int):
    """Greedy decoding written here: no KV cache, the whole sequence re-run each step, and ``adds[l]`` added
    to block ``l``'s output at every position from ``first`` on (plain forward hooks, none of the library's)."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    eos = model.generation_config.eos_token_id
    stops = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    blocks, out = find_blocks(model), []

    def add(l):
        def hook(_m, _a, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, first:] += adds[l].to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [blocks[l].register_forward_hook(add(l)) for l in adds]
    try:
        with torch.no_grad():
            for _ in range(n_new):
                token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                if token in stops:
                    break
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    finally:
        for h in handles:
            h.remove()
    return tuple(out), ids.shape[1] - len(out)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_fixed_probe_step_equals_a_greedy_decode_written_here(tiny, tiny_bundles, positions):
    """probe_fixed adds strength·w_l/‖w_l‖ at each band layer: to every position (``all``), or to the last
    prompt token and each new token (``generated``). Our generation equals that decode token for token, and
    the step is large enough to change the answer (so equality is not the unsteered answer twice)."""
    model, tok = tiny
    bundle, strength = tiny_bundles[0], 50.0
    spec = SteerSpec("probe_fixed", bundle, strength=strength)
    adds = {}
    for l in spec.layers():
        w = torch.from_numpy(bundle.w[bundle.rows((l,))[0]]).double()
        adds[l] = (strength * w / w.norm()).float()
    (ours,) = generate(model, tok, PROMPTS[:1], [spec], max_new_tokens=8, positions=positions)
    (plain,) = generate(model, tok, PROMPTS[:1], [SteerSpec("none")], max_new_tokens=8)
    _, n_prompt = _greedy_with_fixed_steps(model, tok, PROMPTS[0], {}, 0, 0)
    assert ours.n_prompt_tokens == n_prompt
    first = 0 if positions == "all" else n_prompt - 1
    want, _ = _greedy_with_fixed_steps(model, tok, PROMPTS[0], adds, 8, first)
    assert ours.tokens == want and len(want) > 0
    assert ours.tokens != plain.tokens
    assert ours.eps == tuple([strength] * len(spec.layers()))


def test_positions_modes_share_the_prefill_step(tiny, tiny_bundles):
    model, tok = tiny
    spec = [SteerSpec("conva_nogate", tiny_bundles[0], p0=0.999)]
    base = generate(model, tok, PROMPTS[:1], spec, max_new_tokens=8)[0]
    gen_only = generate(model, tok, PROMPTS[:1], spec, max_new_tokens=8, positions="generated")[0]
    # At the first steered layer no earlier steering exists, so the prefill ε agrees in every mode (the
    # per-token mode's ε at every step is checked against a loop written by hand in test_epsilon_per_token).
    assert base.eps[0] > 0 and gen_only.eps[0] == pytest.approx(base.eps[0], rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        generate(model, tok, PROMPTS[:1], spec, mode="reference", positions="generated")


def test_no_hook_left_after_calls_even_on_error(tiny, tiny_bundles, monkeypatch):
    model, tok = tiny
    # transformers itself keeps recording hooks on the blocks once output_hidden_states was asked for.
    baseline = _hooks_left(model)
    specs = _mixed_specs(*tiny_bundles)
    generate(model, tok, PROMPTS, specs, max_new_tokens=2)
    steer_logits(model, tok, PROMPTS, specs)
    assert _hooks_left(model) == baseline

    def boom(*_a, **_k):
        raise RuntimeError("engine failure")

    monkeypatch.setattr(model, "generate", boom)
    with pytest.raises(RuntimeError, match="engine failure"):
        generate(model, tok, PROMPTS, specs, max_new_tokens=2)
    assert _hooks_left(model) == baseline


def test_bad_specs_are_refused(tiny, tiny_bundles):
    model, tok = tiny
    bundle = tiny_bundles[0]
    with pytest.raises(ValueError, match="P0"):
        SteerSpec("conva", bundle, p0=1.0)
    with pytest.raises(ValueError, match="needs a value bundle"):
        SteerSpec("caa")
    late_gate = replace(bundle, gate=replace(bundle.gate, layer=max(bundle.band)))
    with pytest.raises(ValueError, match="gate layer"):
        steer_logits(model, tok, PROMPTS[:1], [SteerSpec("conva", late_gate)])
    with pytest.raises(ValueError, match="out of range"):
        steer_logits(model, tok, PROMPTS[:1], [SteerSpec("conva", bundle, band=(9,))])


@pytest.mark.parametrize("setting", ["plain", "opposite"])
def test_closed_gate_leaves_every_method_unsteered(tiny, tiny_bundles, setting):
    """gate.apply_to = all_methods: a gated-off row equals the unsteered model on the same prompt, bit for bit."""
    model, tok = tiny
    _, _, closed = tiny_bundles
    prompts = PROMPTS[:4]
    specs = [
        SteerSpec("conva", closed, setting=setting),
        SteerSpec("caa", closed, strength=3.0, setting=setting),
        SteerSpec("probe_fixed", closed, strength=6.0, setting=setting),
        SteerSpec("prompt", closed, setting=setting),
    ]
    unsteered = [SteerSpec("none", closed, setting=setting)] * len(specs)
    logits, rows = steer_logits(model, tok, prompts, specs)
    base, base_rows = steer_logits(model, tok, prompts, unsteered)
    assert all(r.gate_score is not None and r.gate_open is False for r in rows)
    assert [r.context for r in rows] == [r.context for r in base_rows]
    for i in range(len(prompts)):
        assert torch.equal(logits[i], base[i]), specs[i].method
    for mode in ("batched", "reference"):
        got = generate(model, tok, prompts, specs, max_new_tokens=6, mode=mode)
        ref = generate(model, tok, prompts, unsteered, max_new_tokens=6, mode=mode)
        assert [r.tokens for r in got] == [r.tokens for r in ref] and all(not any(r.eps) for r in got)
    # Gating ConVA only: the same closed gate no longer holds CAA back.
    caa_free, _ = steer_logits(model, tok, prompts[:1], [replace(specs[1], gate_scope="conva")])
    assert not torch.equal(caa_free[0], base[0])


def test_gate_scores_the_raw_prompt_and_prefixes_follow_it(tiny, tiny_bundles):
    model, tok = tiny
    always, _, closed = tiny_bundles
    prompt = PROMPTS[:1]
    _, (plain,) = steer_logits(model, tok, prompt, [SteerSpec("conva", always)])
    _, (opposite,) = steer_logits(model, tok, prompt, [SteerSpec("conva", always, setting="opposite")])
    # Read in the steering pass (plain) or scored first (opposite): the same raw prompt, the same score.
    assert opposite.gate_score == pytest.approx(plain.gate_score, abs=1e-5) and opposite.context != prompt[0]
    _, (shown,) = steer_logits(model, tok, prompt, [SteerSpec("prompt", always)])
    _, (hidden,) = steer_logits(model, tok, prompt, [SteerSpec("prompt", closed)])
    assert shown.context.endswith(prompt[0]) and shown.context != prompt[0] and hidden.context == prompt[0]
    # prefix_on = gated: a closed gate also drops the opposite prefix, so the row equals the plain unsteered one.
    logits, (row,) = steer_logits(
        model, tok, prompt, [SteerSpec("caa", closed, strength=3.0, setting="opposite", prefix_on="gated")]
    )
    plain_logits, _ = steer_logits(model, tok, prompt, [SteerSpec("none")])
    assert row.context == prompt[0] and torch.equal(logits[0], plain_logits[0])
