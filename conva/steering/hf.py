"""Gated minimal steering (ConVA, METHOD.md §3) and its baselines on the HuggingFace backend, eager.

Because block ``l`` runs after blocks ``< l``, every ε_l is found inside **one** batched forward pass
with per-row ε (``mode="batched"``; the solve is :mod:`conva.steering.core`). ``mode="reference"``
reproduces the paper's procedure literally (one prompt at a time, one forward pass per steered layer)
for parity tests and benchmarks; ``mode="compiled"`` hands over to :mod:`conva.steering.compiled`.

Example:
    >>> spec = SteerSpec("conva", bundle, p0=0.95)                              # doctest: +SKIP
    >>> rows = generate(model, tok, ["Should I take the job?"], [spec])         # doctest: +SKIP
    >>> rows[0].eps, rows[0].p_after                                            # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence, cast

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conva.blocks import block_hooks, find_blocks
from conva.mc import LETTERS, MCRow, letter_token_ids
from conva.record import tokenize, with_positions
from conva.steering.compiled import generate_compiled
from conva.steering.core import (
    Plan,
    Steering,
    eos_ids,
    gate_decisions,
    plan_rows,
    prepare,
    row_results,
    steered,
)
from conva.steering.spec import Decision, RowResult, SteerSpec, prompt_text

__all__ = ["steer_logits", "choice_logprobs", "score_mc", "generate"]


@torch.inference_mode()
def steer_logits(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    chat_template: bool = True,
    positions: str = "all",
) -> tuple[torch.Tensor, list[RowResult]]:
    """One steered forward pass: next-token logits ``[B, vocab]`` (float32) at the last prompt token."""
    texts, enc, plan = prepare(model, tok, prompts, specs, chat_template)
    steering = Steering(plan, positions, "frozen")
    with steered(model, steering):
        logits = model(**with_positions(enc), use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
    n_prompt = enc["attention_mask"].sum(1).tolist()
    return logits.cpu(), row_results(steering, specs, [""] * len(specs), [()] * len(specs), n_prompt, texts)


def choice_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    token_ids: Sequence[int],
    *,
    chat_template: bool = True,
    positions: str = "all",
) -> tuple[np.ndarray, list[RowResult]]:
    """Next-token log-probabilities of ``token_ids`` (log-softmax over the vocabulary) after each prompt.

    :func:`steer_logits` read at the listed tokens: float32 ``[len(prompts), len(token_ids)]``, the same
    array the vLLM engine's ``choice_logprobs`` gives (:mod:`conva.choice` reads both).
    """
    logits, results = steer_logits(
        model, tok, prompts, specs, chat_template=chat_template, positions=positions
    )
    lp = torch.log_softmax(logits, dim=-1)[:, list(token_ids)]
    return lp.numpy().astype(np.float32), results


def _generate_batch(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    enc: dict[str, torch.Tensor],
    steering: Steering,
    max_new_tokens: int,
) -> tuple[list[str], list[tuple[int, ...]]]:
    with steered(model, steering):
        # ``generate`` comes from GenerationMixin, which mypy does not see on PreTrainedModel.
        out = model.generate(  # type: ignore[operator]
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    tokens, texts = [], []
    stops = set(eos_ids(model, tok))
    for row in new.tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        tokens.append(tuple(row[:cut]))
        texts.append(cast(str, tok.decode(row[:cut], skip_special_tokens=True)))  # one row: one text
    return texts, tokens


def _reference_scales(
    model: PreTrainedModel, enc: dict[str, torch.Tensor], plan: Plan
) -> tuple[Steering, Steering]:
    """The paper's procedure for one prompt: one forward pass per steered layer, ascending.

    Pass ``j`` applies the ε already found for layers ``< j`` at every position, reads ``e`` at layer
    ``j``'s last token and solves for ε_j in closed form. Returns the state that generates with those ε
    frozen, and the state holding the telemetry (same fields as the batched path).
    """
    fixed = replace(plan, compute=torch.zeros_like(plan.compute), fixed=torch.zeros_like(plan.fixed))
    final = Steering(plan, "all", "frozen")
    final.step = 0
    for j, layer in enumerate(plan.layers):
        captured: list[torch.Tensor] = []
        with (
            steered(model, Steering(fixed, "all", "frozen")),
            block_hooks(model, {layer: lambda _l, h: captured.append(h[:, -1, :].float())}),
        ):
            model(**with_positions(enc), use_cache=False, logits_to_keep=1)
        plan.open, plan.gate_score = fixed.open, fixed.gate_score  # the gate was read in pass 0
        final.set_scale(j, captured[0])
        fixed.fixed[:, j] = final.scale[:, j]
        final.p_after[:, j] = final.prob(j, captured[0] + final.scale[:, j, None] * plan.dirs[:, j])
        if not bool(plan.open.any()):
            break  # gate closed: the paper generates unsteered, without the remaining passes
    return Steering(fixed, "all", "frozen"), final


def _reference_row(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    spec: SteerSpec,
    decision: Decision | None,
    chat_template: bool,
    max_new_tokens: int,
) -> RowResult:
    text = prompt_text(prompt, spec, decision[1] if decision else True)
    device = next(model.parameters()).device
    enc = tokenize(tok, [text], chat_template, device)
    plan = plan_rows([spec], [text], model.config.hidden_size, len(find_blocks(model)), [decision])
    if plan.layers:
        gen_state, final = _reference_scales(model, enc, plan)
    else:
        gen_state = final = Steering(plan, "all", "frozen")
    texts, tokens = _generate_batch(model, tok, enc, gen_state, max_new_tokens)
    return row_results(final, [spec], texts, tokens, enc["attention_mask"].sum(1).tolist(), [text])[0]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    max_new_tokens: int = 100,
    chat_template: bool = True,
    positions: str = "all",
    epsilon: str = "frozen",
    mode: str = "batched",
    batch_size: int = 16,
) -> list[RowResult]:
    """Steered greedy generation, one :class:`RowResult` per prompt, in order.

    ``mode="batched"`` computes every ε in the prefill of each batch (per-row ε, one pass) and decodes
    with HF ``generate``; ``mode="compiled"`` is the same single pass with a static KV cache and a
    compiled decode step that steers inside the graph (:func:`conva.steering.compiled.generate_compiled`: the fast path on
    a GPU; the first batch of each shape compiles); ``mode="reference"`` runs the paper's algorithm one
    prompt at a time (positions ``all``, ε frozen), the gates scored first over the whole list as the
    reference code does (in the same chunks of ``batch_size`` as the batched mode, so with the same scores).
    """
    if mode == "reference":
        if positions != "all" or epsilon != "frozen":
            raise ValueError("the reference mode reproduces the paper: positions='all', epsilon='frozen'")
        decisions: list[Decision | None] = []
        for start in range(0, len(prompts), batch_size):
            decisions += gate_decisions(
                model,
                tok,
                prompts[start : start + batch_size],
                specs[start : start + batch_size],
                chat_template=chat_template,
                batch_size=batch_size,
            )
        return [
            _reference_row(model, tok, p, s, d, chat_template, max_new_tokens)
            for p, s, d in zip(prompts, specs, decisions)
        ]
    if mode == "compiled":
        return generate_compiled(
            model,
            tok,
            prompts,
            specs,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            positions=positions,
            epsilon=epsilon,
            batch_size=batch_size,
        )
    if mode != "batched":
        raise ValueError(f"unknown steering mode {mode!r}; expected 'batched', 'compiled' or 'reference'")
    results: list[RowResult] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p, chunk_s = prompts[start : start + batch_size], specs[start : start + batch_size]
        results += _generate_chunk(
            model, tok, chunk_p, chunk_s, chat_template, positions, epsilon, max_new_tokens
        )
    return results


def _generate_chunk(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    chat_template: bool,
    positions: str,
    epsilon: str,
    max_new_tokens: int,
) -> list[RowResult]:
    """One batch of the batched mode: every ε found in the prefill, then HF ``generate`` with them."""
    contexts, enc, plan = prepare(model, tok, prompts, specs, chat_template)
    steering = Steering(plan, positions, epsilon)
    texts, tokens = _generate_batch(model, tok, enc, steering, max_new_tokens)
    return row_results(steering, specs, texts, tokens, enc["attention_mask"].sum(1).tolist(), contexts)


def score_mc(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    chat_template: bool = True,
    positions: str = "all",
    batch_size: int = 8,
) -> list[MCRow]:
    """Answer each prompt by the best letter logit under its :class:`~conva.steering.spec.SteerSpec` (gate active)."""
    if not len(answers) == len(prompts) == len(specs):
        raise ValueError(f"{len(prompts)} prompts, {len(answers)} answers and {len(specs)} specs must match")
    letters = letter_token_ids(tok)
    out: list[MCRow] = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        logits, results = steer_logits(
            model,
            tok,
            prompts[start:stop],
            specs[start:stop],
            chat_template=chat_template,
            positions=positions,
        )
        best = torch.stack([logits[:, ids].max(dim=-1).values for ids in letters], dim=-1).argmax(-1).tolist()
        for answer, k, res in zip(answers[start:stop], best, results):
            out.append(MCRow(LETTERS[k], LETTERS[k] == answer, res.gate_open, res.gate_score))
    return out
