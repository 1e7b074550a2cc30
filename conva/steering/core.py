"""The steering core every HF backend shares: the gate's decisions, the per-row plan, the ε solve in hooks.

For each steered layer ``l``, in ascending order and with the earlier layers' steering already applied,
ConVA reads ``e_l`` at the last prompt token and adds the smallest step along ``v_l = w_l/‖w_l‖`` that
lifts the probe to ``P0`` (METHOD.md §3)::

    ε_l = max(0, (logit(P0) − b_l − w_lᵀe_l) / ‖w_l‖)        e'_l = e_l + ε_l · v_l

Every method is one mechanism: per row and steered layer, a direction and a scale added to the block's
output (:class:`Plan`). ConVA computes the scale (ε) at the prompt's last token; CAA and the fixed probe
direction use a constant; ``prompt`` only prefixes text; ``none`` does nothing. Rows whose scale is zero
(gate closed, already at P0, unsteered) are left bit-identical: the add is skipped with ``torch.where``.
:class:`Steering` is the per-forward state that solves ε inside block hooks (:func:`steered` installs
it); :func:`row_results` turns its telemetry into :class:`~conva.steering.spec.RowResult` rows.

The gate (``SteerSpec.gate_scope``): ``all_methods`` (the reference code's choice, the default) gates every
method alike: a closed gate leaves a CAA or ``probe_fixed`` row unsteered and a ``prompt`` row without its
prefix; ``conva`` gates ConVA only. The gate always scores the **raw** prompt, in the steering template, as
the reference does: where the text fed to the model is the raw prompt, the probe gate is read inside the
steering pass (at a layer no later than the first steered one, so the state is unsteered); where a prefix
is added (the ``prompt`` method, the ``opposite`` setting) or the gate is an external classifier, it is
scored first (:func:`gate_decisions`). ``prefix_on`` says where the opposite setting's prefix goes: on
``all`` rows (default: the user's text stays the user's text, so a gated-off row equals the unsteered
model on the same prompt) or only on rows the gate opens (``gated``, as the reference code does).
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conva.blocks import block_hooks, find_blocks
from conva.gates import external_scores
from conva.record import record_activations, tokenize
from conva.steering.spec import EPSILON_MODES, STEER_POSITIONS, Decision, RowResult, SteerSpec, prompt_text

__all__ = [
    "gate_decisions",
    "decide_first",
    "Recorder",
    "Plan",
    "plan_rows",
    "Steering",
    "steered",
    "row_results",
    "prepare",
    "eos_ids",
    "random_direction",
]


@torch.inference_mode()
def gate_decisions(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    chat_template: bool = True,
    batch_size: int = 16,
) -> list[Decision | None]:
    """``(score, open)`` of the gate on the **raw** prompt for rows scored first (:meth:`SteerSpec.scored_first`).

    Other rows get None (their gate, if any, is read inside the steering pass). A probe gate reads the
    prompt in the steering template at its layer; an external classifier reads the prompt text.
    """
    return decide_first(
        prompts,
        specs,
        lambda texts, layers: record_activations(
            model, tok, texts, layers, chat_template=chat_template, batch_size=batch_size
        ),
    )


Recorder = Callable[[list[str], list[int]], np.ndarray]


def decide_first(
    prompts: Sequence[str], specs: Sequence[SteerSpec], record: Recorder
) -> list[Decision | None]:
    """The gate decisions of :func:`gate_decisions` for any backend: ``record(texts, layers)`` gives the
    last-token activations ``[len(texts), len(layers), hidden]`` a probe gate reads (the backend's own
    recorder); an external classifier scores the prompt text. None for rows not scored first."""
    out: list[Decision | None] = [None] * len(specs)
    rows = []
    for i, s in enumerate(specs):
        if s.scored_first() and s.decision is not None:
            out[i] = s.decision  # decided by the caller, on the text it chose
        elif s.scored_first():
            rows.append(i)
    probe = [i for i in rows if specs[i].bundle.gate.kind == "probe"]  # type: ignore[union-attr]
    if probe:
        layers = sorted({int(specs[i].bundle.gate.layer) for i in probe})  # type: ignore[union-attr, arg-type]
        acts = record([prompts[i] for i in probe], layers)
        for k, i in enumerate(probe):
            gate = specs[i].bundle.gate  # type: ignore[union-attr]
            assert gate.layer is not None  # a probe gate has its layer (Gate.__post_init__)
            score = float(gate.scores(acts[k, layers.index(int(gate.layer))][None])[0])
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
class Plan:
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
    def empty(cls, layers: list[int], rows: int, hidden: int) -> "Plan":
        """A plan that steers nothing: zero directions and scales, every gate open."""
        B, U = rows, len(layers)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float32)

        return cls(
            layers=layers,
            dirs=zeros(B, U, hidden),
            w=zeros(B, U, hidden),
            b=zeros(B, U),
            wnorm=torch.ones(B, U),
            compute=torch.zeros(B, U, dtype=torch.bool),
            fixed=zeros(B, U),
            s0=zeros(B),
            has_probe=torch.zeros(B, U, dtype=torch.bool),
            gate_layer=[None] * B,
            gate_w=zeros(B, hidden),
            gate_b=zeros(B),
            gate_thr=zeros(B),
            open=torch.ones(B, dtype=torch.bool),
            gate_score=torch.full((B,), float("nan")),
        )


def plan_rows(
    specs: Sequence[SteerSpec],
    texts: Sequence[str],
    hidden: int,
    n_blocks: int,
    decisions: Sequence[Decision | None] | None = None,
) -> Plan:
    """Per-row steering tensors. ``decisions``: gates already scored (:func:`gate_decisions`), None elsewhere."""
    layers = sorted({l for s in specs for l in s.layers()})
    bad = [l for l in layers if not 0 <= l < n_blocks]
    if bad:
        raise ValueError(f"steered layer(s) {bad} out of range for a model of {n_blocks} blocks")
    col = {l: j for j, l in enumerate(layers)}
    p = Plan.empty(layers, len(specs), hidden)
    for i, spec in enumerate(specs):
        decided = decisions[i] if decisions is not None else None
        if decided is not None:
            p.gate_score[i], p.open[i] = decided[0], decided[1]
        if spec.bundle is None or not spec.layers():
            continue
        bundle = spec.bundle
        if bundle.hidden_size != hidden:
            raise ValueError(
                f"bundle for {bundle.value!r} has hidden size {bundle.hidden_size}, the model {hidden}"
            )
        rows, cols = bundle.rows(spec.layers()), [col[l] for l in spec.layers()]
        w = torch.from_numpy(bundle.w[rows]).float()
        norm = w.norm(dim=-1)
        p.w[i, cols], p.b[i, cols], p.wnorm[i, cols], p.has_probe[i, cols] = (
            w,
            torch.from_numpy(bundle.b[rows]),
            norm,
            True,
        )
        if spec.method == "caa":
            p.dirs[i, cols], p.fixed[i, cols] = torch.from_numpy(bundle.caa[rows]).float(), spec.strength
        elif spec.method == "random":
            if spec.eps is None:
                raise ValueError(
                    "a 'random' spec needs eps (ConVA's ε of the row): score it with conva.choice"
                )
            dirs = [random_direction(bundle.value, l, hidden, spec.seed) for l in spec.layers()]
            p.dirs[i, cols] = torch.from_numpy(np.stack(dirs))
            p.fixed[i, cols] = torch.tensor(spec.eps, dtype=torch.float32)
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


def random_direction(value: str, layer: int, hidden: int, seed: int = 0) -> np.ndarray:
    """A unit vector ``[hidden]`` (float32) drawn uniformly on the sphere, fixed by ``seed``, value and layer.

    The ``random`` control's direction: the same for every row of a value and layer, so a study's random
    rows differ from ConVA's only in where the step points.
    """
    rng = np.random.default_rng([seed, layer, zlib.crc32(value.encode())])
    v = rng.standard_normal(hidden)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _plan_gate(p: Plan, i: int, spec: SteerSpec) -> None:
    """Set up the probe gate read inside the steering pass, on the raw prompt's unsteered state."""
    gate = spec.bundle.gate  # type: ignore[union-attr]
    if gate.kind != "probe":
        raise ValueError(
            f"a {gate.kind!r} gate is scored before the pass: pass its decision (gate_decisions)"
        )
    first = min(spec.layers())
    if gate.layer is None or gate.layer > first:
        raise ValueError(
            f"the probe gate reads layer {gate.layer}, after the first steered layer {first}; "
            "it must read an unsteered state (gate layer <= first steered layer)"
        )
    p.gate_layer[i] = gate.layer
    p.gate_w[i], p.gate_b[i], p.gate_thr[i] = torch.from_numpy(gate.w).float(), gate.b, gate.threshold


class Steering:
    """The per-forward state of one steered batch: step counter, ε per row and layer, telemetry."""

    def __init__(self, plan: Plan, positions: str, epsilon: str) -> None:
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
            self.set_scale(j, e)
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
            self.p_after[:, j] = self.prob(j, out[:, -1, :].float())
        return out

    def prob(self, j: int, e: torch.Tensor) -> torch.Tensor:
        p = self.plan
        z = (e * p.w[:, j].to(e.device)).sum(-1) + p.b[:, j].to(e.device)
        return torch.where(p.has_probe[:, j].to(e.device), torch.sigmoid(z), float("nan")).cpu()

    def set_scale(self, j: int, e: torch.Tensor) -> None:
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
def steered(model: PreTrainedModel, steering: Steering) -> Iterator[Steering]:
    """Install the steering hooks for one batch; all are removed on exit, also after an error."""
    handle = model.register_forward_pre_hook(steering.on_forward)
    try:
        with block_hooks(model, {l: steering for l in steering.hook_layers()}):
            yield steering
    finally:
        handle.remove()


def row_results(
    steering: Steering,
    specs: Sequence[SteerSpec],
    texts: list[str],
    tokens: list[tuple[int, ...]],
    n_prompt: list[int],
    contexts: Sequence[str | None] | None = None,
) -> list[RowResult]:
    p, out = steering.plan, []
    for i, spec in enumerate(specs):
        cols = [p.layers.index(l) for l in spec.layers()]
        score = float(p.gate_score[i])
        read = not math.isnan(score)
        out.append(
            RowResult(
                text=texts[i],
                tokens=tokens[i],
                n_prompt_tokens=n_prompt[i],
                gate_score=score if read else None,
                gate_open=bool(p.open[i]) if spec.layers() or read else False,
                layers=spec.layers(),
                eps=tuple(float(steering.scale[i, c]) for c in cols),
                p_before=tuple(float(steering.p_before[i, c]) for c in cols),
                p_after=tuple(float(steering.p_after[i, c]) for c in cols),
                context=contexts[i] if contexts is not None else None,
            )
        )
    return out


def prepare(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    chat_template: bool,
) -> tuple[list[str], dict[str, torch.Tensor], Plan]:
    """The batch's user messages (prefixes as the gate decides), their encoding, and the steering plan."""
    if len(prompts) != len(specs):
        raise ValueError(f"{len(prompts)} prompts but {len(specs)} steering specs")
    decisions = gate_decisions(
        model, tok, prompts, specs, chat_template=chat_template, batch_size=max(1, len(prompts))
    )
    texts = [prompt_text(p, s, d[1] if d else True) for p, s, d in zip(prompts, specs, decisions)]
    device = next(model.parameters()).device
    enc = tokenize(tok, texts, chat_template, device)
    plan = plan_rows(specs, texts, model.config.hidden_size, len(find_blocks(model)), decisions)
    return texts, enc, plan


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return [i for i in ids + [tok.eos_token_id] if i is not None]
