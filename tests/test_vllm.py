"""The vllm backend: the steering op's math, parity with the HF backend, compilation, unsteered rows,
preemption, and perplexity and multiple choice scored by the engine.

Fast tests call the op directly on hand-filled buffers. Slow tests build engines on a tiny random
Llama (head_dim 64, float32): one eager steering engine (with a KV cache small enough that long
batches are preempted) and one plain engine per module, and two compiled engines for the single
compiled-mode test (~20 s each to start on the 2-core CPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm", reason="the vllm extra is not installed")  # CI installs it: see pyproject

from conva.bundle import ValueBundle  # noqa: E402
from conva.gates import Gate  # noqa: E402
from conva.steering.hf import generate  # noqa: E402
from conva.steering.spec import SteerSpec  # noqa: E402
from conva.steering.vllm import (  # noqa: E402
    EngineSettings,
    VLLMSteerer,
    check_vllm_version,
    engine_kwargs,
    generate_vllm,
)
from conva.steering.vllm_op import EngineState, SpecRow  # noqa: E402
from conva.steering.vllm_rows import spec_row  # noqa: E402

HIDDEN, N_BLOCKS, BAND, GATE_LAYER = 256, 4, (1, 2, 3), 1
PROMPTS = [
    "What is the capital of France?",
    "The teacher wants to help the people in the village.",
    "Why do people move to Rome?",
    "Our team hopes to win a famous prize for science.",
    "My grandmother loves to create a new garden by the river.",
    "Can you tell me about the history of Oslo?",
]
MAX_NEW = 12
KV_BLOCKS = 24


def _bundle(
    value: str, seed: int, hidden: int = HIDDEN, gate: Gate | None = None, p0: float = 0.999
) -> ValueBundle:
    """Random unit probes with a negative intercept, so ε > 0 and steering changes the tokens."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N_BLOCKS, hidden)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    caa = (0.5 * rng.normal(size=(N_BLOCKS, hidden))).astype(np.float32)
    ones = np.ones(N_BLOCKS, np.float32)
    return ValueBundle(
        value=value,
        model_name="tiny",
        fingerprint="tiny",
        hidden_size=hidden,
        n_blocks=N_BLOCKS,
        layers=np.arange(N_BLOCKS),
        w=w,
        b=np.full(N_BLOCKS, -2.0, np.float32),
        train_acc=ones,
        test_acc=ones,
        caa=caa,
        band=BAND,
        p0=p0,
        gate=gate or Gate(),
    )


# -- fast: the op on hand-filled buffers ---------------------------------------------------------------


def test_version_check() -> None:
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.3") == "0.32.3"
    for bad in ("0.31.2", "0.33.0", "0.3.2"):
        with pytest.raises(RuntimeError, match="not supported"):
            check_vllm_version(bad)


def _state_with_row(d: int = 16, p0: float = 0.9) -> tuple[EngineState, torch.Tensor, float]:
    state = EngineState([1, 3], d, n_specs=2, n_slots=4, n_tokens=8)
    state.host_skips = False  # the CUDA-graph path: always compute (the engine tests cover the CPU skips)
    w = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    norm = w.norm(dim=-1)
    state.add_row(
        SpecRow(
            dirs=w / norm[:, None],
            w=w,
            b=torch.tensor([-20.0, 0.5]),
            wnorm=norm,
            compute=torch.tensor([True, True]),
            fixed=torch.zeros(2),
            has_probe=torch.tensor([True, True]),
            s0=math.log(p0 / (1 - p0)),
        )
    )
    return state, w, p0


def test_op_closed_form_and_untouched_rows() -> None:
    """ε = (s0 − b − wᵀe)/‖w‖ at the slot's last prompt token; other requests' tokens keep their bits."""
    state, w, p0 = _state_with_row()
    try:
        g = torch.Generator().manual_seed(1)
        hidden, residual = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
        # Tokens 0-2: request in slot 1 (row 1), its last prompt token is 2; tokens 3-5: unsteered (slot 0).
        state.s_row[1], state.s_tok[1], state.s_first[1], state.s_comp[1] = 1, 2, True, True
        state.t_slot[:3], state.t_on[:3] = 1, 1.0
        out = torch.ops.conva.steer(hidden, residual, state.id, 0)
        e = hidden[2] + residual[2]
        s0 = torch.tensor(math.log(p0 / (1 - p0)), dtype=torch.float32)
        eps = float(torch.clamp((s0 - (e @ w[0] - 20.0)) / w[0].norm(), min=0))
        assert eps > 0 and float(state.eps[1, 0]) == pytest.approx(eps, rel=1e-6)
        assert torch.allclose(out[:3], hidden[:3] + eps * w[0] / w[0].norm(), atol=1e-6)
        assert torch.equal(out[3:], hidden[3:])
        assert float(state.p_after[1, 0]) == pytest.approx(p0, abs=1e-5)
        assert float(state.p_before[1, 0]) == pytest.approx(float(torch.sigmoid(e @ w[0] - 20.0)), abs=1e-6)
    finally:
        state.close()


def test_op_already_above_target_is_left_alone() -> None:
    state, w, _ = _state_with_row(p0=0.01)
    try:
        hidden, residual = torch.zeros(2, 16), torch.zeros(2, 16)  # z = b = 0.5 > logit(0.01)
        state.s_row[1], state.s_tok[1], state.s_first[1], state.s_comp[1] = 1, 1, True, True
        state.t_slot[:2], state.t_on[:2] = 1, 1.0
        out = torch.ops.conva.steer(hidden, residual, state.id, 1)
        assert float(state.eps[1, 1]) == 0.0 and torch.equal(out, hidden)
    finally:
        state.close()


def test_spec_row_refuses_inactive_layer() -> None:
    state = EngineState([1], HIDDEN, n_specs=1, n_slots=1, n_tokens=4)
    try:
        with pytest.raises(ValueError, match=r"layer\(s\) \[2, 3\].*not active"):
            spec_row(SteerSpec("conva", _bundle("power", 0)), state, HIDDEN, N_BLOCKS)
    finally:
        state.close()


def test_generate_vllm_needs_a_steerer() -> None:
    with pytest.raises(TypeError, match="VLLMSteerer"):
        generate_vllm(object(), [], [])  # type: ignore[arg-type]


# -- slow: engines on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from conva.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), seed=0)


@pytest.fixture(scope="module")
def hf(tiny: str):  # noqa: ANN201
    from conva.models import load_model

    return load_model(tiny)


@pytest.fixture(scope="module")
def bundles(hf) -> tuple[ValueBundle, ValueBundle]:  # noqa: ANN001
    """Two bundles; the first has a probe gate at layer 1 whose threshold closes it for half the prompts."""
    from conva.record import record_activations

    model, tok = hf
    acts = record_activations(model, tok, PROMPTS, [GATE_LAYER], chat_template=True)[:, 0]
    gw = np.random.default_rng(7).normal(size=HIDDEN).astype(np.float32)
    scores = Gate("probe", 0.5, GATE_LAYER, gw, 0.0).scores(acts)
    threshold = float(np.median(scores))
    gate = Gate("probe", threshold, GATE_LAYER, gw, 0.0)
    assert 0 < int(np.sum(gate.open(scores))) < len(PROMPTS)
    return _bundle("power", 1, gate=gate), _bundle("security", 2, p0=0.99)


@pytest.fixture(scope="module")
def eager(tiny: str, bundles):  # noqa: ANN001, ANN201
    """Every layer active, recording on; 24 KV blocks of 32 tokens: the other tests' batches fit, the
    preemption test's long generations do not."""
    settings = EngineSettings(record=True, kv_blocks=KV_BLOCKS, block_size=32)
    steerer = VLLMSteerer(tiny, bundles, layers=range(N_BLOCKS), settings=settings)
    yield steerer
    steerer.close()


@pytest.fixture(scope="module")
def plain(tiny: str, eager):  # noqa: ANN001, ANN201
    """An engine built without the steering state: the patched layers are inert in it."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**engine_kwargs(tiny, EngineSettings(), eager.max_len))

    def run(prompts: list[str]) -> list[tuple[int, ...]]:
        ids = [eager._encode(p, True) for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=list(eager.stop_ids))
        outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        return [tuple(t for t in o.outputs[0].token_ids if t not in eager.stop_ids) for o in outs]

    return run


def _mixed_specs(bundles) -> list[SteerSpec]:  # noqa: ANN001
    gated, other = bundles
    return [
        SteerSpec("conva", gated),
        SteerSpec("conva", gated),
        SteerSpec("none"),
        SteerSpec("conva", other),
        SteerSpec("conva", other, p0=0.9),
        SteerSpec("conva", gated, p0=0.99),
        SteerSpec("caa", other, strength=4.0),
        SteerSpec("probe_fixed", gated, strength=6.0),
        SteerSpec("conva_nogate", gated),
    ]


def _assert_parity(hf_rows, vllm_rows, telemetry: bool = True) -> None:  # noqa: ANN001
    for i, (a, b) in enumerate(zip(hf_rows, vllm_rows, strict=True)):
        assert a.tokens == b.tokens, f"row {i}: greedy tokens differ"
        assert (a.text, a.n_prompt_tokens, a.layers, a.gate_open) == (
            b.text,
            b.n_prompt_tokens,
            b.layers,
            b.gate_open,
        )
        assert (a.gate_score is None) == (b.gate_score is None)
        if a.gate_score is not None:
            assert abs(a.gate_score - b.gate_score) < 1e-4, f"row {i}: gate score"
        np.testing.assert_allclose(a.p_before, b.p_before, atol=1e-4, err_msg=f"row {i}: p_before")
        if telemetry:
            np.testing.assert_allclose(a.eps, b.eps, atol=1e-3, err_msg=f"row {i}: eps")
            np.testing.assert_allclose(a.p_after, b.p_after, atol=1e-4, err_msg=f"row {i}: p_after")


@pytest.mark.slow
def test_parity_with_hf_mixed_batch(hf, bundles, eager) -> None:  # noqa: ANN001
    """Steered, gate closed, unsteered, two bundles and three P0 in one batch: same ε and tokens as HF."""
    model, tok = hf
    prompts = PROMPTS + PROMPTS[:3]
    specs = _mixed_specs(bundles)
    hf_rows = generate(model, tok, prompts, specs, max_new_tokens=MAX_NEW, batch_size=len(prompts))
    rows = generate_vllm(eager, prompts, specs, max_new_tokens=MAX_NEW)
    _assert_parity(hf_rows, rows)
    gate_states = {r.gate_open for r, s in zip(rows, specs) if s.gated()}
    assert gate_states == {True, False}, "the batch must hold both open and closed gates"
    steered = [r for r in rows if r.gate_open and r.layers]
    assert steered and all(max(r.eps) > 0 for r in steered if r.eps)
    for r, s in zip(rows, specs):
        if s.method == "conva" and r.gate_open:
            assert min(r.p_after) >= s.target() - 1e-4


@pytest.mark.slow
def test_parity_generated_positions_per_token(hf, bundles, eager) -> None:  # noqa: ANN001
    model, tok = hf
    specs = _mixed_specs(bundles)[: len(PROMPTS)]
    kw = dict(max_new_tokens=MAX_NEW, positions="generated", epsilon="per_token")
    hf_rows = generate(model, tok, PROMPTS, specs, batch_size=len(PROMPTS), **kw)
    rows = eager.generate(PROMPTS, specs, **kw)
    # Per-token ε is the last step's; HF keeps stepping rows that already stopped, so compare tokens only.
    _assert_parity(hf_rows, rows, telemetry=False)


@pytest.mark.slow
def test_unsteered_and_gated_off_equal_plain_engine(bundles, eager, plain) -> None:  # noqa: ANN001
    specs = _mixed_specs(bundles)[: len(PROMPTS)]
    rows = eager.generate(PROMPTS, specs, max_new_tokens=MAX_NEW)
    reference = plain(PROMPTS)
    untouched = [i for i, (r, s) in enumerate(zip(rows, specs)) if s.method == "none" or not r.gate_open]
    assert any(specs[i].method == "none" for i in untouched) and any(specs[i].gated() for i in untouched)
    for i in untouched:
        assert rows[i].tokens == reference[i], f"row {i} ({specs[i].method}) differs from the plain engine"
    changed = [i for i, r in enumerate(rows) if r.gate_open and r.layers and rows[i].tokens != reference[i]]
    assert changed, "steering changed no steered row: the test could not tell a no-op from steering"


@pytest.mark.slow
def test_record_matches_hf(hf, eager) -> None:  # noqa: ANN001
    from conva.record import record_activations

    model, tok = hf
    for chat in (False, True):
        ref = record_activations(model, tok, PROMPTS, [0, 2, 3], chat_template=chat)
        got = eager.record(PROMPTS, [0, 2, 3], chat_template=chat)
        np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.slow
def test_refuses_prompt_longer_than_one_step(eager) -> None:  # noqa: ANN001
    long = " ".join(["The teacher wants to help the people in the village."] * 80)
    with pytest.raises(ValueError, match="one step"):
        eager.generate([long], [SteerSpec("none")], max_new_tokens=2)


@pytest.mark.slow
def test_preempted_requests_are_recomputed_with_their_own_eps(hf, bundles, eager) -> None:  # noqa: ANN001
    """With the KV cache too small for the batch, vLLM preempts requests and later re-runs each from
    its first token in one step. Per-token ε: the prompt's tokens get the prompt's ε again and each
    generated token its own, as when it was decoded (not the slot's latest, as before the fix, which
    made this test fail on greedy tokens). Tokens and ε equal the HF backend's, which never preempts."""
    model, tok = hf
    gated, other = bundles
    prompts, specs = PROMPTS * 2, [SteerSpec("conva", gated), SteerSpec("conva", other)] * len(PROMPTS)
    before = eager.recomputed  # summed from the plugin's telemetry: the engine reports each recompute
    kw = dict(max_new_tokens=60, epsilon="per_token")
    rows = eager.generate(prompts, specs, **kw)
    assert eager.recomputed > before, "nothing was preempted: the test would not see a recompute"
    hf_rows = generate(model, tok, prompts, specs, batch_size=len(prompts), **kw)
    _assert_parity(hf_rows, rows)


ANSWERS = [
    "Paris is the capital.",
    "They help a lot every day.",
    "",
    "Because it matters to them.",
    "x",
    "Oslo has a long history of bridges.",
]


@pytest.mark.slow
def test_perplexity_matches_hf(hf, eager) -> None:  # noqa: ANN001
    """Answer NLL from vLLM's prompt logprobs equals conva.metrics' (same tokens; float32 noise only)."""
    from conva.metrics import answer_nll, perplexity

    model, tok = hf
    for chat in (True, False):
        want = answer_nll(model, tok, PROMPTS, ANSWERS, chat_template=chat)
        got = eager.answer_nll(PROMPTS, ANSWERS, chat_template=chat)
        assert [n for _, n in got] == [n for _, n in want] and want[2] == (0.0, 0)
        np.testing.assert_allclose([x for x, _ in got], [x for x, _ in want], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(
            eager.perplexity(PROMPTS, ANSWERS, chat_template=chat),
            perplexity(model, tok, PROMPTS, ANSWERS, chat_template=chat),
            rtol=1e-5,
        )


@pytest.mark.slow
def test_score_mc_matches_hf_with_steering_and_gate(hf, bundles, eager) -> None:  # noqa: ANN001
    """Multiple choice on the engine: the letters' log-probabilities equal HF's steered ones within 1e-4,
    and pred, correct, gate_open and gate_score agree row by row, with the gate closing some rows."""
    import torch

    from conva.mc import demo_mc, letter_token_ids, mc_prompts
    from conva.record import record_activations
    from conva.steering.hf import score_mc, steer_logits

    model, tok = hf
    items = demo_mc()[:12]
    prompts, answers = mc_prompts(items), [item.answer for item in items]
    # A gate that opens on about half of these questions (the module's gate was set on other prompts). The
    # threshold sits in the widest gap between middle scores: a score on the threshold itself (the median)
    # would open on one backend and close on the other by float noise alone.
    gate = bundles[0].gate
    scores = np.sort(
        gate.scores(record_activations(model, tok, prompts, [GATE_LAYER], chat_template=True)[:, 0])
    )
    middle = range(len(scores) // 4, 3 * len(scores) // 4)
    i = max(middle, key=lambda j: scores[j + 1] - scores[j])
    assert scores[i + 1] - scores[i] > 1e-3, "no gap between the middle scores to put a threshold in"
    gated = replace(bundles[0], gate=replace(gate, threshold=float(scores[i] + scores[i + 1]) / 2))
    kinds = [
        SteerSpec("conva", gated),
        SteerSpec("none"),
        SteerSpec("caa", bundles[1], strength=3.0),
        SteerSpec("probe_fixed", gated, strength=3.0),
        SteerSpec("conva", bundles[1], p0=0.9),
        SteerSpec("prompt", gated),
    ]
    specs = (kinds * 2)[: len(items)] + [SteerSpec("conva", gated)] * len(items)
    prompts, answers = prompts * 2, answers * 2
    flat = [t for ids in letter_token_ids(tok) for t in ids]
    logits, _ = steer_logits(model, tok, prompts, specs)
    got, _ = eager.choice_logprobs(prompts, specs, flat)
    np.testing.assert_allclose(got, torch.log_softmax(logits, -1)[:, flat].numpy(), atol=1e-4)
    want = score_mc(model, tok, prompts, answers, specs, batch_size=len(prompts))
    rows = eager.score_mc(prompts, answers, specs)
    assert [(r.pred, r.correct, r.gate_open) for r in rows] == [
        (r.pred, r.correct, r.gate_open) for r in want
    ]
    for a, b in zip(want, rows):
        assert (a.gate_score is None) == (b.gate_score is None)
        assert a.gate_score is None or abs(a.gate_score - b.gate_score) < 1e-4
    plain = score_mc(
        model, tok, prompts, answers, [SteerSpec("none")] * len(prompts), batch_size=len(prompts)
    )
    gated_rows = [i for i, s in enumerate(specs) if s.gated()]
    assert {rows[i].gate_open for i in gated_rows} == {True, False}
    assert any(rows[i].pred != plain[i].pred for i in gated_rows if rows[i].gate_open), (
        "steering changed no pick"
    )
    assert all(rows[i].pred == plain[i].pred for i in gated_rows if not rows[i].gate_open)


@pytest.mark.slow
def test_forced_choice_matches_hf_with_the_random_control(hf, bundles, eager) -> None:  # noqa: ANN001
    """Forced choice through the engine: the same log-odds as HF within 1e-4, row by row, for ConVA, CAA,
    gated ConVA, the unsteered model and the random control (which takes ConVA's ε on both backends)."""
    from conva.choice import choice_prompt, score_choice
    from conva.steering.hf import choice_logprobs

    model, tok = hf
    prompts = [choice_prompt(p) for p in PROMPTS * 2]
    kinds = [
        SteerSpec("conva_nogate", bundles[0], p0=0.99),
        SteerSpec("random", bundles[0], p0=0.99),
        SteerSpec("none"),
        SteerSpec("caa", bundles[1], strength=3.0, gate_scope="conva"),
        SteerSpec("conva", bundles[0]),
    ]
    specs = (kinds * len(prompts))[: len(prompts)]  # 12 rows: three random ones, each with its own ε
    sides = ["yes", "no"] * (len(prompts) // 2) + ["yes"] * (len(prompts) % 2)

    def on_hf(p, s, ids):  # noqa: ANN001, ANN202
        return choice_logprobs(model, tok, p, s, ids)

    def on_engine(p, s, ids):  # noqa: ANN001, ANN202
        return eager.choice_logprobs(p, s, ids)

    want = score_choice(on_hf, tok, prompts, sides, specs, batch_size=len(prompts))
    got = score_choice(on_engine, tok, prompts, sides, specs, batch_size=len(prompts))
    np.testing.assert_allclose([r.value_log_odds for r in got], [r.value_log_odds for r in want], atol=1e-4)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a.eps, b.eps, atol=1e-3)
        assert a.gate_open == b.gate_open
    random_eps = {r.eps for r, s in zip(got, specs) if s.method == "random"}
    assert len(random_eps) == 3 and all(max(e) > 0 for e in random_eps)


@pytest.fixture
def compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh vLLM cache folder (``VLLM_CACHE_ROOT``) for one test: vLLM freezes its environment
    when an engine starts, so that freeze is lifted before and after."""
    import vllm.envs

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    vllm.envs.disable_envs_cache()
    yield tmp_path
    vllm.envs.disable_envs_cache()


def _cache_keys(root: Path) -> set[Path]:
    """The compile-cache entries under ``root``: one folder per cache key, holding ``rank_0_0``."""
    return {p.parent for p in (root / "torch_compile_cache").rglob("rank_0_0")}


@pytest.mark.slow
def test_compiled_engines_with_other_layers_keep_their_own_graphs(
    tiny, bundles, eager, compile_cache
) -> None:  # noqa: ANN001
    """Two compiled engines, one after the other in this process and on one cache folder, steering
    different layers: each steers as the eager engine does, from a cache entry of its own.

    The traced graph bakes in the engine id and the active layers' columns; without the salt both
    engines share one cache key (measured: one folder), and on a GPU the second would load the
    first's graph. A Python forward hook would be silently ignored here, so steered rows would equal
    the unsteered ones and this test would fail.
    """
    narrow = replace(bundles[1], band=(2, 3))
    narrow_specs = [SteerSpec("conva", narrow), SteerSpec("none"), SteerSpec("caa", narrow, strength=4.0)] * 2
    runs = [
        (bundles, range(N_BLOCKS), _mixed_specs(bundles)[: len(PROMPTS)]),
        ((narrow,), None, narrow_specs),
    ]
    wants = [eager.generate(PROMPTS, specs, max_new_tokens=MAX_NEW) for _, _, specs in runs]
    keys: list[set[Path]] = []
    for (engine_bundles, layers, specs), want in zip(runs, wants):
        compiled = VLLMSteerer(
            tiny, engine_bundles, layers=layers, settings=EngineSettings(enforce_eager=False)
        )
        try:
            got = compiled.generate(PROMPTS, specs, max_new_tokens=MAX_NEW)
            none = compiled.generate(PROMPTS, [SteerSpec("none")] * len(PROMPTS), max_new_tokens=MAX_NEW)
            assert compiled.layers == tuple(range(N_BLOCKS) if layers else (2, 3))
        finally:
            compiled.close()
        keys.append(_cache_keys(compile_cache))
        for a, b in zip(got, want, strict=True):
            assert a.tokens == b.tokens and a.gate_open == b.gate_open
            np.testing.assert_allclose(a.eps, b.eps, atol=1e-4)
        steered = [i for i, r in enumerate(got) if r.gate_open and r.layers]
        assert steered and any(got[i].tokens != none[i].tokens for i in steered)
        assert all(
            got[i].tokens == none[i].tokens for i, r in enumerate(got) if not (r.gate_open and r.layers)
        )
    assert len(keys[0]) == 1 and len(keys[1]) == 2, f"cache keys after each engine: {keys}"


@pytest.mark.slow
def test_parity_with_hf_smollm2() -> None:
    """The real model: ε within 1e-3 and identical greedy tokens on a mixed batch (float32)."""
    from conva.models import load_model, resolve_model
    from conva.record import record_activations

    path = resolve_model("smollm2")
    model, tok = load_model(path)
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    prompts = [
        "Should I take the job offer abroad or stay near my family?",
        "What is the capital of France?",
        "My friend asked me to lie for him. What should I do?",
        "How do I become rich quickly?",
    ]
    rng = np.random.default_rng(3)
    gw = rng.normal(size=d).astype(np.float32) / np.sqrt(d)
    scores = Gate("probe", 0.5, 10, gw, 0.0).scores(
        record_activations(model, tok, prompts, [10], chat_template=True)[:, 0]
    )
    gate = Gate("probe", float(np.median(scores)), 10, gw, 0.0)

    def bundle(value: str, seed: int, g: Gate) -> ValueBundle:
        w = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        ones = np.ones(n, np.float32)
        return ValueBundle(
            value=value,
            model_name="smollm2",
            fingerprint="x",
            hidden_size=d,
            n_blocks=n,
            layers=np.arange(n),
            w=w,
            b=np.full(n, -2.0, np.float32),
            train_acc=ones,
            test_acc=ones,
            caa=w.copy(),
            band=tuple(range(10, 21)),
            p0=0.95,
            gate=g,
        )

    gated, other = bundle("power", 1, gate), bundle("benevolence", 2, Gate())
    prompts = prompts * 2
    specs = [SteerSpec("conva", gated)] * 4 + [
        SteerSpec("none"),
        SteerSpec("conva", other, p0=0.99),
        SteerSpec("conva", other),
        SteerSpec("conva", gated, p0=0.999),
    ]
    hf_rows = generate(model, tok, prompts, specs, max_new_tokens=16, batch_size=len(prompts))
    steerer = VLLMSteerer(path, [gated, other], settings=EngineSettings(max_model_len=1024))
    try:
        rows = steerer.generate(prompts, specs, max_new_tokens=16)
    finally:
        steerer.close()
    _assert_parity(hf_rows, rows)
    assert {r.gate_open for r in rows[:4]} == {True, False}
