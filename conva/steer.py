"""Gated minimal steering (ConVA, METHOD.md §3) and its baselines on the HuggingFace backend.

For each steered layer ``l``, in ascending order and with the earlier layers' steering already applied,
ConVA reads ``e_l`` at the last prompt token and adds the smallest step along ``v_l = w_l/‖w_l‖`` that
lifts the probe to ``P0``::

    ε_l = max(0, (logit(P0) − b_l − w_lᵀe_l) / ‖w_l‖)        e'_l = e_l + ε_l · v_l

Because block ``l`` runs after blocks ``< l``, every ε_l is found inside **one** batched forward pass
with per-row ε (``mode="batched"``). ``mode="reference"`` reproduces the paper's procedure literally (one
prompt at a time, one forward pass per steered layer) for parity tests and benchmarks.

Every method is one mechanism: per row and steered layer, a direction and a scale added to the block's
output. ConVA computes the scale (ε) at the prompt's last token; CAA and the fixed probe direction use a
constant; ``prompt`` only prefixes text; ``none`` does nothing. Rows whose scale is zero (gate closed,
already at P0, unsteered) are left bit-identical: the add is skipped with ``torch.where``.

The gate (``SteerSpec.gate_scope``): ``all_methods`` (the reference code's choice, the default) gates every
method alike: a closed gate leaves a CAA or ``probe_fixed`` row unsteered and a ``prompt`` row without its
prefix; ``conva`` gates ConVA only. The gate always scores the **raw** prompt, in the steering template, as
the reference does: where the text fed to the model is the raw prompt, the probe gate is read inside the
steering pass (at a layer no later than the first steered one, so the state is unsteered); where a prefix
is added (the ``prompt`` method, the ``opposite`` setting) or the gate is an external classifier, it is
scored first (:func:`gate_decisions`). ``prefix_on`` says where the opposite setting's prefix goes: on
``all`` rows (default: the user's text stays the user's text, so a gated-off row equals the unsteered
model on the same prompt) or only on rows the gate opens (``gated``, as the reference code does).

Example:
    >>> spec = SteerSpec("conva", bundle, p0=0.95)                              # doctest: +SKIP
    >>> rows = generate(model, tok, ["Should I take the job?"], [spec])         # doctest: +SKIP
    >>> rows[0].eps, rows[0].p_after                                            # doctest: +SKIP
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conva.blocks import block_hooks, find_blocks
from conva.bundle import ValueBundle
from conva.gates import GATE_SCOPES, PREFIX_ON, external_scores
from conva.record import record_activations, tokenize, with_positions
from conva.values import definition

__all__ = [
    "METHODS", "STEER_POSITIONS", "EPSILON_MODES", "SETTINGS", "SteerSpec", "RowResult",
    "prompt_text", "gate_decisions", "steer_logits", "generate",
]

METHODS = ("none", "conva", "conva_nogate", "caa", "probe_fixed", "prompt")
STEER_POSITIONS = ("all", "generated")
EPSILON_MODES = ("frozen", "per_token")
SETTINGS = ("plain", "opposite")
_VECTOR_METHODS = ("conva", "conva_nogate", "caa", "probe_fixed")


@dataclass(frozen=True)
class SteerSpec:
    """How to treat one prompt.

    ``method``: one of :data:`METHODS`. ``p0``: ConVA's target probability (default: the bundle's).
    ``strength``: the constant scale of ``caa`` (times the mean difference) or ``probe_fixed`` (times
    ``v_l``). ``band``: steered layers (default: the bundle's). ``setting``: ``opposite`` prefixes a
    prompt pushing against the value (METHOD.md §4). ``gate_scope``: which methods the bundle's gate gates
    (``all_methods`` or ``conva``). ``prefix_on``: the opposite prefix on ``all`` rows or only ``gated`` ones.
    """

    method: str = "none"
    bundle: ValueBundle | None = None
    p0: float | None = None
    strength: float = 0.0
    band: tuple[int, ...] | None = None
    setting: str = "plain"
    gate_scope: str = "all_methods"
    prefix_on: str = "all"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown steering method {self.method!r}; expected one of {METHODS}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; expected one of {SETTINGS}")
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"unknown gate scope {self.gate_scope!r}; expected one of {GATE_SCOPES}")
        if self.prefix_on not in PREFIX_ON:
            raise ValueError(f"unknown prefix_on {self.prefix_on!r}; expected one of {PREFIX_ON}")
        if self.method in _VECTOR_METHODS and self.bundle is None:
            raise ValueError(f"method {self.method!r} needs a value bundle")
        if self.method == "prompt" and self.bundle is None:
            raise ValueError("method 'prompt' needs a value bundle (for the value's name)")
        p0 = self.target()
        if p0 is not None and not 0.0 < p0 < 1.0:
            raise ValueError(f"P0 must lie strictly between 0 and 1, got {p0}")

    def target(self) -> float | None:
        """The effective P0 for ConVA rows, else None."""
        if self.method not in ("conva", "conva_nogate"):
            return None
        return self.p0 if self.p0 is not None else self.bundle.p0  # type: ignore[union-attr]

    def layers(self) -> tuple[int, ...]:
        """The layers this row steers (empty for text-only methods)."""
        if self.method not in _VECTOR_METHODS:
            return ()
        return tuple(self.band) if self.band is not None else self.bundle.band  # type: ignore[union-attr]

    def gate_applies(self) -> bool:
        """Whether the bundle's gate governs this row: ConVA always, the others under ``all_methods``."""
        if self.bundle is None or self.bundle.gate.kind == "none" or self.method == "conva_nogate":
            return False
        return self.method == "conva" or self.gate_scope == "all_methods"

    def gated(self) -> bool:
        """Whether the gate must be read for this row: it decides the steering, or a prefix."""
        if not self.gate_applies():
            return False
        if self.method in _VECTOR_METHODS or self.method == "prompt":
            return True
        return self.setting == "opposite" and self.prefix_on == "gated"

    def scored_first(self) -> bool:
        """Whether the gate is scored before the steering pass (:func:`gate_decisions`), not inside it.

        So it is when the model is fed more than the raw prompt (a prefix depends on the gate or is added)
        or the gate is an external classifier; otherwise the steering pass reads it on the raw prompt.
        """
        if not self.gated():
            return False
        external = self.bundle.gate.kind == "external"  # type: ignore[union-attr]
        return external or self.method == "prompt" or self.setting == "opposite"


@dataclass(frozen=True)
class RowResult:
    """One prompt's outcome and telemetry (per steered layer, ascending).

    ``gate_score`` is None where no gate was read; ``context`` is the user message the answer was
    generated from (the prompt with any prefix).
    """

    text: str
    tokens: tuple[int, ...]
    n_prompt_tokens: int
    gate_score: float | None
    gate_open: bool
    layers: tuple[int, ...] = ()
    eps: tuple[float, ...] = ()
    p_before: tuple[float, ...] = ()
    p_after: tuple[float, ...] = ()
    context: str | None = None


def prompt_text(prompt: str, spec: SteerSpec, gate_open: bool = True) -> str:
    """The user message for ``spec``: the ``opposite`` setting and the ``prompt`` method add prefixes.

    ``gate_open``: the gate's decision on the raw prompt. A closed gate drops the ``prompt`` method's
    prefix where the gate applies, and the opposite prefix where ``prefix_on = "gated"``.
    """
    if spec.bundle is None:
        return prompt
    value = spec.bundle.value
    closed = spec.gate_applies() and not gate_open
    prefix = ""
    if spec.setting == "opposite" and not (closed and spec.prefix_on == "gated"):
        prefix += f"You have low level of {value}. {value.capitalize()} means {definition(value)}. "
    if spec.method == "prompt" and not closed:
        prefix += f"You have high level of {value}. {value.capitalize()} means {definition(value)}. "
    return prefix + prompt


Decision = tuple[float, bool]


@torch.inference_mode()
def gate_decisions(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                   specs: Sequence[SteerSpec], *, chat_template: bool = True, batch_size: int = 16
                   ) -> list[Decision | None]:
    """``(score, open)`` of the gate on the **raw** prompt for rows scored first (:meth:`SteerSpec.scored_first`).

    Other rows get None (their gate, if any, is read inside the steering pass). A probe gate reads the
    prompt in the steering template at its layer; an external classifier reads the prompt text.
    """
    out: list[Decision | None] = [None] * len(specs)
    rows = [i for i, s in enumerate(specs) if s.scored_first()]
    probe = [i for i in rows if specs[i].bundle.gate.kind == "probe"]  # type: ignore[union-attr]
    if probe:
        layers = sorted({int(specs[i].bundle.gate.layer) for i in probe})  # type: ignore[union-attr, arg-type]
        acts = record_activations(model, tok, [prompts[i] for i in probe], layers, chat_template=chat_template,
                                  batch_size=batch_size)
        for k, i in enumerate(probe):
            gate = specs[i].bundle.gate  # type: ignore[union-attr]
            score = float(gate.scores(acts[k, layers.index(int(gate.layer))][None])[0])  # type: ignore[arg-type]
            out[i] = (score, score >= gate.threshold)
    groups: dict[int, list[int]] = {}
    for i in rows:
        if specs[i].bundle.gate.kind == "external":  # type: ignore[union-attr]
            groups.setdefault(id(specs[i].bundle.gate), []).append(i)  # type: ignore[union-attr]
    for members in groups.values():
        gate = specs[members[0]].bundle.gate  # type: ignore[union-attr]
        scores = external_scores(gate, [prompts[i] for i in members])
        for i, score in zip(members, scores):
            out[i] = (float(score), float(score) >= gate.threshold)
    return out


@dataclass
class _Plan:
    """Per-row steering tensors over the union of steered layers ``layers`` (ascending)."""

    layers: list[int]
    dirs: torch.Tensor  # [B, U, d] direction added (unit v, or the CAA difference)
    w: torch.Tensor  # [B, U, d] probe weights (zeros where a row has no probe)
    b: torch.Tensor  # [B, U]
    wnorm: torch.Tensor  # [B, U]
    compute: torch.Tensor  # [B, U] bool: ConVA computes ε here
    fixed: torch.Tensor  # [B, U] constant scale (CAA, probe_fixed, or ε given by the reference mode)
    s0: torch.Tensor  # [B] logit(P0)
    has_probe: torch.Tensor  # [B, U] bool
    gate_layer: list[int | None]
    gate_w: torch.Tensor  # [B, d]
    gate_b: torch.Tensor  # [B]
    gate_thr: torch.Tensor  # [B]
    open: torch.Tensor  # [B] bool: starts True; probe gates set it during the prefill
    gate_score: torch.Tensor  # [B] float (NaN where no gate)

    @classmethod
    def empty(cls, layers: list[int], rows: int, hidden: int) -> "_Plan":
        """A plan that steers nothing: zero directions and scales, every gate open."""
        B, U = rows, len(layers)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float32)

        return cls(layers=layers, dirs=zeros(B, U, hidden), w=zeros(B, U, hidden), b=zeros(B, U),
                   wnorm=torch.ones(B, U), compute=torch.zeros(B, U, dtype=torch.bool), fixed=zeros(B, U),
                   s0=zeros(B), has_probe=torch.zeros(B, U, dtype=torch.bool), gate_layer=[None] * B,
                   gate_w=zeros(B, hidden), gate_b=zeros(B), gate_thr=zeros(B), open=torch.ones(B, dtype=torch.bool),
                   gate_score=torch.full((B,), float("nan")))


def _plan(specs: Sequence[SteerSpec], texts: Sequence[str], hidden: int, n_blocks: int,
          decisions: Sequence[Decision | None] | None = None) -> _Plan:
    """Per-row steering tensors. ``decisions``: gates already scored (:func:`gate_decisions`), None elsewhere."""
    layers = sorted({l for s in specs for l in s.layers()})
    bad = [l for l in layers if not 0 <= l < n_blocks]
    if bad:
        raise ValueError(f"steered layer(s) {bad} out of range for a model of {n_blocks} blocks")
    col = {l: j for j, l in enumerate(layers)}
    p = _Plan.empty(layers, len(specs), hidden)
    for i, spec in enumerate(specs):
        decided = decisions[i] if decisions is not None else None
        if decided is not None:
            p.gate_score[i], p.open[i] = decided[0], decided[1]
        if spec.bundle is None or not spec.layers():
            continue
        bundle = spec.bundle
        if bundle.hidden_size != hidden:
            raise ValueError(f"bundle for {bundle.value!r} has hidden size {bundle.hidden_size}, the model {hidden}")
        rows, cols = bundle.rows(spec.layers()), [col[l] for l in spec.layers()]
        w = torch.from_numpy(bundle.w[rows]).float()
        norm = w.norm(dim=-1)
        p.w[i, cols], p.b[i, cols], p.wnorm[i, cols], p.has_probe[i, cols] = w, torch.from_numpy(bundle.b[rows]), norm, True
        if spec.method == "caa":
            p.dirs[i, cols], p.fixed[i, cols] = torch.from_numpy(bundle.caa[rows]).float(), spec.strength
        else:
            p.dirs[i, cols] = w / norm[:, None]
            if spec.method == "probe_fixed":
                p.fixed[i, cols] = spec.strength
            else:
                p.compute[i, cols] = True
                p0 = spec.target()
                p.s0[i] = math.log(p0 / (1.0 - p0))  # type: ignore[operator]
        if spec.gated() and decided is None:
            _plan_gate(p, i, spec)
    return p


def _plan_gate(p: _Plan, i: int, spec: SteerSpec) -> None:
    """Set up the probe gate read inside the steering pass, on the raw prompt's unsteered state."""
    gate = spec.bundle.gate  # type: ignore[union-attr]
    if gate.kind != "probe":
        raise ValueError(f"a {gate.kind!r} gate is scored before the pass: pass its decision (gate_decisions)")
    first = min(spec.layers())
    if gate.layer is None or gate.layer > first:
        raise ValueError(f"the probe gate reads layer {gate.layer}, after the first steered layer {first}; "
                         "it must read an unsteered state (gate layer <= first steered layer)")
    p.gate_layer[i] = gate.layer
    p.gate_w[i], p.gate_b[i], p.gate_thr[i] = torch.from_numpy(gate.w).float(), gate.b, gate.threshold


class _Steering:
    """The per-forward state of one steered batch: step counter, ε per row and layer, telemetry."""

    def __init__(self, plan: _Plan, positions: str, epsilon: str) -> None:
        if positions not in STEER_POSITIONS:
            raise ValueError(f"unknown steering positions {positions!r}; expected one of {STEER_POSITIONS}")
        if epsilon not in EPSILON_MODES:
            raise ValueError(f"unknown epsilon mode {epsilon!r}; expected one of {EPSILON_MODES}")
        self.plan, self.positions, self.epsilon = plan, positions, epsilon
        B, U = plan.b.shape
        self.step = -1
        self.scale = torch.zeros(B, U)
        self.p_before = torch.full((B, U), float("nan"))
        self.p_after = torch.full((B, U), float("nan"))
        self.captured: dict[int, torch.Tensor] = {}
        self.gate_layers = {l for l in plan.gate_layer if l is not None}

    def on_forward(self, *_: object) -> None:
        self.step += 1

    def hook_layers(self) -> list[int]:
        return sorted(set(self.plan.layers) | self.gate_layers)

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        if self.step == 0 and layer in self.gate_layers:
            self._gate(layer, h[:, -1, :].float())
        if layer not in self.plan.layers:
            return None
        j = self.plan.layers.index(layer)
        e = h[:, -1, :].float()
        if self.step == 0 or self.epsilon == "per_token":
            self._set_scale(j, e)
        scale = self.scale[:, j].to(h.device)
        if not bool((scale != 0).any()):
            return None
        delta = (scale[:, None] * self.plan.dirs[:, j].to(h.device)).to(h.dtype)
        if self.step == 0 and self.positions == "generated":
            # Steer only the position that predicts the first new token; decode steps steer the rest.
            steered = h.clone()
            steered[:, -1, :] = h[:, -1, :] + delta
        else:
            steered = h + delta[:, None, :]
        out = torch.where((scale != 0)[:, None, None], steered, h)
        if self.step == 0:
            self.p_after[:, j] = self._prob(j, out[:, -1, :].float())
        return out

    def _prob(self, j: int, e: torch.Tensor) -> torch.Tensor:
        p = self.plan
        z = (e * p.w[:, j].to(e.device)).sum(-1) + p.b[:, j].to(e.device)
        return torch.where(p.has_probe[:, j].to(e.device), torch.sigmoid(z), float("nan")).cpu()

    def _set_scale(self, j: int, e: torch.Tensor) -> None:
        p = self.plan
        z = (e * p.w[:, j].to(e.device)).sum(-1).cpu() + p.b[:, j]
        eps = torch.clamp((p.s0 - z) / p.wnorm[:, j], min=0.0)
        scale = torch.where(p.compute[:, j], eps, p.fixed[:, j])
        self.scale[:, j] = torch.where(p.open, scale, torch.zeros_like(scale))
        if self.step == 0:
            self.p_before[:, j] = torch.where(p.has_probe[:, j], torch.sigmoid(z), float("nan"))
            self.p_after[:, j] = self.p_before[:, j]

    def _gate(self, layer: int, e: torch.Tensor) -> None:
        p = self.plan
        rows = torch.tensor([gl == layer for gl in p.gate_layer])
        score = torch.sigmoid((e.cpu() * p.gate_w).sum(-1) + p.gate_b)
        p.gate_score = torch.where(rows, score, p.gate_score)
        p.open = torch.where(rows, score >= p.gate_thr, p.open)


@contextmanager
def _steered(model: PreTrainedModel, steering: _Steering) -> Iterator[_Steering]:
    """Install the steering hooks for one batch; all are removed on exit, also after an error."""
    handle = model.register_forward_pre_hook(steering.on_forward)
    try:
        with block_hooks(model, {l: steering for l in steering.hook_layers()}):
            yield steering
    finally:
        handle.remove()


def _results(
    steering: _Steering, specs: Sequence[SteerSpec], texts: list[str], tokens: list[tuple[int, ...]], n_prompt: list[int],
    contexts: Sequence[str | None] | None = None,
) -> list[RowResult]:
    p, out = steering.plan, []
    for i, spec in enumerate(specs):
        cols = [p.layers.index(l) for l in spec.layers()]
        score = float(p.gate_score[i])
        read = not math.isnan(score)
        out.append(RowResult(
            text=texts[i], tokens=tokens[i], n_prompt_tokens=n_prompt[i],
            gate_score=score if read else None, gate_open=bool(p.open[i]) if spec.layers() or read else False,
            layers=spec.layers(), eps=tuple(float(steering.scale[i, c]) for c in cols),
            p_before=tuple(float(steering.p_before[i, c]) for c in cols),
            p_after=tuple(float(steering.p_after[i, c]) for c in cols),
            context=contexts[i] if contexts is not None else None,
        ))
    return out


def _prepare(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], specs: Sequence[SteerSpec],
             chat_template: bool) -> tuple[list[str], dict[str, torch.Tensor], _Plan]:
    """The batch's user messages (prefixes as the gate decides), their encoding, and the steering plan."""
    if len(prompts) != len(specs):
        raise ValueError(f"{len(prompts)} prompts but {len(specs)} steering specs")
    decisions = gate_decisions(model, tok, prompts, specs, chat_template=chat_template, batch_size=max(1, len(prompts)))
    texts = [prompt_text(p, s, d[1] if d else True) for p, s, d in zip(prompts, specs, decisions)]
    device = next(model.parameters()).device
    enc = tokenize(tok, texts, chat_template, device)
    plan = _plan(specs, texts, model.config.hidden_size, len(find_blocks(model)), decisions)
    return texts, enc, plan


@torch.inference_mode()
def steer_logits(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], specs: Sequence[SteerSpec], *,
    chat_template: bool = True, positions: str = "all",
) -> tuple[torch.Tensor, list[RowResult]]:
    """One steered forward pass: next-token logits ``[B, vocab]`` (float32) at the last prompt token."""
    texts, enc, plan = _prepare(model, tok, prompts, specs, chat_template)
    steering = _Steering(plan, positions, "frozen")
    with _steered(model, steering):
        logits = model(**with_positions(enc), use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
    n_prompt = enc["attention_mask"].sum(1).tolist()
    return logits.cpu(), _results(steering, specs, [""] * len(specs), [()] * len(specs), n_prompt, texts)


def _generate_batch(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, enc: dict[str, torch.Tensor], steering: _Steering,
    max_new_tokens: int,
) -> tuple[list[str], list[tuple[int, ...]]]:
    with _steered(model, steering):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:].cpu()
    tokens, texts = [], []
    stops = set(_eos_ids(model, tok))
    for row in new.tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        tokens.append(tuple(row[:cut]))
        texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    return texts, tokens


def _eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return [i for i in ids + [tok.eos_token_id] if i is not None]


def _reference_scales(model: PreTrainedModel, enc: dict[str, torch.Tensor], plan: _Plan) -> tuple[_Steering, _Steering]:
    """The paper's procedure for one prompt: one forward pass per steered layer, ascending.

    Pass ``j`` applies the ε already found for layers ``< j`` at every position, reads ``e`` at layer
    ``j``'s last token and solves for ε_j in closed form. Returns the state that generates with those ε
    frozen, and the state holding the telemetry (same fields as the batched path).
    """
    fixed = replace(plan, compute=torch.zeros_like(plan.compute), fixed=torch.zeros_like(plan.fixed))
    final = _Steering(plan, "all", "frozen")
    final.step = 0
    for j, layer in enumerate(plan.layers):
        captured: list[torch.Tensor] = []
        with _steered(model, _Steering(fixed, "all", "frozen")), \
                block_hooks(model, {layer: lambda _l, h: captured.append(h[:, -1, :].float())}):
            model(**with_positions(enc), use_cache=False, logits_to_keep=1)
        plan.open, plan.gate_score = fixed.open, fixed.gate_score  # the gate was read in pass 0
        final._set_scale(j, captured[0])
        fixed.fixed[:, j] = final.scale[:, j]
        final.p_after[:, j] = final._prob(j, captured[0] + final.scale[:, j, None] * plan.dirs[:, j])
        if not bool(plan.open.any()):
            break  # gate closed: the paper generates unsteered, without the remaining passes
    return _Steering(fixed, "all", "frozen"), final


def _reference_row(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, spec: SteerSpec,
                   decision: Decision | None, chat_template: bool, max_new_tokens: int) -> RowResult:
    text = prompt_text(prompt, spec, decision[1] if decision else True)
    device = next(model.parameters()).device
    enc = tokenize(tok, [text], chat_template, device)
    plan = _plan([spec], [text], model.config.hidden_size, len(find_blocks(model)), [decision])
    if plan.layers:
        gen_state, final = _reference_scales(model, enc, plan)
    else:
        gen_state = final = _Steering(plan, "all", "frozen")
    texts, tokens = _generate_batch(model, tok, enc, gen_state, max_new_tokens)
    return _results(final, [spec], texts, tokens, enc["attention_mask"].sum(1).tolist(), [text])[0]


@torch.inference_mode()
def generate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], specs: Sequence[SteerSpec], *,
    max_new_tokens: int = 100, chat_template: bool = True, positions: str = "all", epsilon: str = "frozen",
    mode: str = "batched", batch_size: int = 16,
) -> list[RowResult]:
    """Steered greedy generation, one :class:`RowResult` per prompt, in order.

    ``mode="batched"`` computes every ε in the prefill of each batch (per-row ε, one pass) and decodes
    with HF ``generate``; ``mode="compiled"`` is the same single pass with a static KV cache and a
    compiled decode step that steers inside the graph (:func:`conva.fast.generate_fast`: the fast path on
    a GPU; the first batch of each shape compiles); ``mode="reference"`` runs the paper's algorithm one
    prompt at a time (positions ``all``, ε frozen), the gates scored first over the whole list as the
    reference code does (in the same chunks of ``batch_size`` as the batched mode, so with the same scores).
    """
    if mode == "reference":
        if positions != "all" or epsilon != "frozen":
            raise ValueError("the reference mode reproduces the paper: positions='all', epsilon='frozen'")
        decisions: list[Decision | None] = []
        for start in range(0, len(prompts), batch_size):
            decisions += gate_decisions(model, tok, prompts[start:start + batch_size], specs[start:start + batch_size],
                                        chat_template=chat_template, batch_size=batch_size)
        return [_reference_row(model, tok, p, s, d, chat_template, max_new_tokens)
                for p, s, d in zip(prompts, specs, decisions)]
    if mode == "compiled":
        from conva.fast import generate_fast  # conva.fast builds on this module

        return generate_fast(model, tok, prompts, specs, max_new_tokens=max_new_tokens, chat_template=chat_template,
                             positions=positions, epsilon=epsilon, batch_size=batch_size)
    if mode != "batched":
        raise ValueError(f"unknown steering mode {mode!r}; expected 'batched', 'compiled' or 'reference'")
    results: list[RowResult] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p, chunk_s = prompts[start:start + batch_size], specs[start:start + batch_size]
        contexts, enc, plan = _prepare(model, tok, chunk_p, chunk_s, chat_template)
        steering = _Steering(plan, positions, epsilon)
        texts, tokens = _generate_batch(model, tok, enc, steering, max_new_tokens)
        results += _results(steering, chunk_s, texts, tokens, enc["attention_mask"].sum(1).tolist(), contexts)
    return results
