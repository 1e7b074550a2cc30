"""Forced choice: the judge-free reading of what steering does to a yes/no question (METHOD.md §4, beyond the paper).

A prompt that asks a yes/no question (``value_side``: which answer takes the value's side) is fed as
:func:`choice_prompt` (the question and "Answer yes or no.", in the steering template), and the model's
next-token distribution at the first answer position is read, steered by the row's
:class:`~conva.steering.spec.SteerSpec` (gate active). The measure is the **log-odds of the value's side**::

    log_odds_yes = log Σ_{t ∈ yes} p(t) − log Σ_{t ∈ no} p(t)
    value_log_odds = +log_odds_yes if value_side == "yes" else −log_odds_yes

over every single-token spelling of the two answers (:func:`answer_token_ids`: ``Yes``, `` Yes``, ``yes``…).
A row is on the value's side when ``value_log_odds > 0`` (the forced-choice CSR). A study compares each
steered row with the unsteered row of the same prompt (the paired shift). On a balanced prompt set (half
the prompts have ``no`` as the value's side) a vector that only pushes "yes" moves half the prompts
toward the value and half away, so its mean shift is about zero; a value-specific vector moves them all.

One forward pass per prompt: any backend that can give next-token log-probabilities of listed tokens
under a spec (:data:`ChoiceLogprobs`: :func:`conva.steering.hf.choice_logprobs`, or the vLLM engine's
``choice_logprobs``) scores it. The ``random`` control's ε is ConVA's own ε for the same row: found by
scoring the row's ConVA twin first (one more pass for those rows only).

Example:
    >>> import numpy as np
    >>> yes_log_odds(np.log(np.array([[0.5, 0.1, 0.2, 0.2]])), n_yes=2)   # (0.5+0.1) vs (0.2+0.2)
    array([0.4054651])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from conva.data import VALUE_SIDES
from conva.steering.spec import RowResult, SteerSpec

__all__ = [
    "YES_WORDS",
    "NO_WORDS",
    "ChoiceRow",
    "ChoiceLogprobs",
    "choice_prompt",
    "question_of",
    "answer_token_ids",
    "yes_log_odds",
    "side_sign",
    "score_choice",
]

YES_WORDS = ("Yes", "yes", "YES")
NO_WORDS = ("No", "no", "NO")

# (prompts, specs, token ids) -> (log-probabilities [rows, len(token ids)], each row's steering telemetry)
ChoiceLogprobs = Callable[[list[str], list[SteerSpec], list[int]], tuple[np.ndarray, list[RowResult]]]


@dataclass(frozen=True)
class ChoiceRow:
    """One prompt's forced choice under its spec: the log-odds of yes and of the value's side, and telemetry."""

    log_odds_yes: float
    value_log_odds: float
    gate_open: bool
    gate_score: float | None
    eps: tuple[float, ...]


ANSWER_INSTRUCTION = " Answer yes or no."


def choice_prompt(prompt: str) -> str:
    """The user message of a forced choice: the yes/no question and an instruction to answer it."""
    return f"{prompt.strip()}{ANSWER_INSTRUCTION}"


def question_of(prompt: str) -> str:
    """The question a :func:`choice_prompt` asks, without the instruction (what a gate reads)."""
    return prompt[: -len(ANSWER_INSTRUCTION)] if prompt.endswith(ANSWER_INSTRUCTION) else prompt


def answer_token_ids(tok, words: Sequence[str]) -> list[int]:
    """The first token of every spelling of ``words``, bare and after a space (``"Yes"``, ``" Yes"``), sorted.

    The token the model would emit first when it answers with that word: the word itself where the
    tokenizer has it as one token (SmolLM2, Gemma), else the word's first piece.
    """
    ids = {t[0] for w in words for t in (tok.encode(s, add_special_tokens=False) for s in (w, f" {w}")) if t}
    if not ids:
        raise ValueError(f"the tokenizer encodes none of {list(words)}")
    return sorted(ids)


def yes_log_odds(logprobs: np.ndarray, n_yes: int) -> np.ndarray:
    """``log Σ p(yes tokens) − log Σ p(no tokens)`` per row, from log-probabilities ``[rows, n_yes + n_no]``.

    The first ``n_yes`` columns are the yes spellings, the rest the no spellings; a log-softmax over the
    whole vocabulary or raw logits give the same result (the normaliser cancels).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    return _logsumexp(lp[:, :n_yes]) - _logsumexp(lp[:, n_yes:])


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def side_sign(side: str) -> float:
    """+1 when ``yes`` takes the value's side, −1 when ``no`` does."""
    if side not in VALUE_SIDES:
        raise ValueError(f"value_side must be one of {VALUE_SIDES}, got {side!r}")
    return 1.0 if side == "yes" else -1.0


def score_choice(
    logprobs: ChoiceLogprobs,
    tok,
    prompts: Sequence[str],
    sides: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    batch_size: int = 16,
    words: tuple[Sequence[str], Sequence[str]] = (YES_WORDS, NO_WORDS),
) -> list[ChoiceRow]:
    """Score each yes/no ``prompt`` (already in :func:`choice_prompt` form) under its spec, in order.

    ``words``: the spellings of yes and of no (:func:`answer_token_ids` finds their first tokens; a token
    that starts both a yes and a no spelling is left out).

    ``random`` specs without ``eps`` take ConVA's ε of the same row: their ConVA twin (``conva_nogate``
    with the same bundle, P0 and band) is scored first and its per-layer ε given to the random step.
    Gated specs decide their gate on the question alone, without the instruction (one more pass for them).
    """
    if not len(prompts) == len(sides) == len(specs):
        raise ValueError(f"{len(prompts)} prompts, {len(sides)} sides and {len(specs)} specs must match")
    signs = [side_sign(s) for s in sides]
    yes, no = answer_token_ids(tok, words[0]), answer_token_ids(tok, words[1])
    both = set(yes) & set(no)  # a piece that starts a yes and a no spelling (a bare space) says neither
    yes, no = [t for t in yes if t not in both], [t for t in no if t not in both]
    if not yes or not no:
        raise ValueError(f"the tokenizer has no first token that tells {words[0][0]!r} from {words[1][0]!r}")
    specs = _with_gate_on_question(logprobs, list(prompts), list(specs), yes + no, batch_size)
    specs = _with_conva_eps(logprobs, list(prompts), list(specs), yes + no, batch_size)
    out: list[ChoiceRow] = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        lp, results = logprobs(list(prompts[start:stop]), list(specs[start:stop]), yes + no)
        odds = yes_log_odds(lp, len(yes))
        for k, res in enumerate(results):
            o = float(odds[k])
            out.append(ChoiceRow(o, signs[start + k] * o, res.gate_open, res.gate_score, res.eps))
    return out


def _prepass(
    logprobs: ChoiceLogprobs,
    rows: list[int],
    text: Callable[[int], str],
    spec: Callable[[int], SteerSpec],
    ids: list[int],
    batch_size: int,
) -> Iterator[tuple[int, RowResult]]:
    """Score ``rows`` once more, batched, as ``text(i)`` under ``spec(i)``; yield each row's telemetry."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        _, results = logprobs([text(i) for i in chunk], [spec(i) for i in chunk], ids)
        yield from zip(chunk, results)


def _with_gate_on_question(
    logprobs: ChoiceLogprobs, prompts: list[str], specs: list[SteerSpec], ids: list[int], batch_size: int
) -> list[SteerSpec]:
    """``specs`` with each gated spec's decision taken on the question alone (:func:`question_of`).

    The gate was calibrated on the prompts as a study asks them, not with the instruction to answer yes
    or no appended (which changes the last token it reads): it decides on the question, and the answer is
    then read with the question as asked.
    """
    todo = [i for i, s in enumerate(specs) if s.gate_applies() and s.decision is None and s.layers()]
    out = list(specs)
    for i, res in _prepass(
        logprobs, todo, lambda i: question_of(prompts[i]), specs.__getitem__, ids, batch_size
    ):
        if res.gate_score is not None:
            out[i] = replace(specs[i], decision=(res.gate_score, res.gate_open))
    return out


def _with_conva_eps(
    logprobs: ChoiceLogprobs, prompts: list[str], specs: list[SteerSpec], ids: list[int], batch_size: int
) -> list[SteerSpec]:
    """``specs`` with each eps-less ``random`` spec given its ConVA twin's per-layer ε."""
    todo = [i for i, s in enumerate(specs) if s.method == "random" and s.eps is None]
    out = list(specs)
    twin = lambda i: conva_twin(specs[i])  # noqa: E731
    for i, res in _prepass(logprobs, todo, prompts.__getitem__, twin, ids, batch_size):
        out[i] = replace(specs[i], eps=tuple(res.eps))
    return out


def conva_twin(spec: SteerSpec) -> SteerSpec:
    """The ungated ConVA spec whose ε a ``random`` spec copies: same bundle, P0, band and setting."""
    return SteerSpec(
        "conva_nogate",
        spec.bundle,
        p0=spec.p0,
        band=spec.band,
        setting=spec.setting,
        prefix_on=spec.prefix_on,
    )
