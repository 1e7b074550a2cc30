"""Study metrics: control success rate with a bootstrap interval, and answer perplexity (fluency).

* **CSR** (METHOD.md §4): the mean judge score over **all** prompts of a cell, gated-off ones included
  (a prompt the gate left alone still has an answer, judged like any other).
* **Bootstrap CI**: percentile interval of the mean over ``n_boot`` resamples with replacement, seeded.
* **Perplexity** of an answer under the **unsteered** model, ``exp(mean NLL of the answer tokens)``,
  conditioned on the context the answer was generated from (the user message with any prefix: the
  ``prompt`` method's, the ``opposite`` setting's) in the chat template, so prompting is not penalised for
  answering its own prompt; ``ppl_plain`` conditions on the plain prompt instead (a second column). The
  steered/unsteered **ratio** of a cell is the geometric-mean ratio over the prompts both answered:
  ``exp(mean log ppl_steered − mean log ppl_none)``.
* **Judge validity**: :func:`cohen_kappa` (agreement of two raters' labels beyond chance) and
  :func:`roc_auc` (how well a judge's probability ranks the answers a reader said yes to above the others).

Example:
    >>> csr([1, 0, 0.5, 1])
    0.625
    >>> lo, hi = bootstrap_ci([1, 0, 1, 1], n_boot=200, seed=0); 0.0 <= lo <= 0.75 <= hi <= 1.0
    True
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Hashable, Sequence

import numpy as np

__all__ = [
    "csr",
    "bootstrap_ci",
    "answer_ids",
    "answer_nll",
    "perplexity",
    "answer_perplexities",
    "ppl_ratio",
    "cohen_kappa",
    "roc_auc",
]


def csr(scores: Sequence[float]) -> float:
    """Mean of judge scores (1 / 0.5 / 0) over every prompt; NaN for an empty cell."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(
            "CSR needs a score for every prompt (got NaN): judge every answer, gated-off ones too"
        )
    return float(arr.mean()) if arr.size else float("nan")


def bootstrap_ci(
    scores: Sequence[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; deterministic for a seed. ``(nan, nan)`` when empty."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def answer_ids(tok, prompt: str, answer: str, chat_template: bool) -> tuple[list[int], int]:
    """The tokens scored for ``answer`` after ``prompt``: ``(prompt ids + answer ids, n answer ids)``."""
    from conva.record import format_prompt

    context = tok(format_prompt(tok, prompt, chat_template), add_special_tokens=not chat_template)[
        "input_ids"
    ]
    # Tokenized apart, so the answer's tokens are exactly those a prompt-conditioned model would score.
    target = tok(answer, add_special_tokens=False)["input_ids"]
    return list(context) + list(target), len(target)


def answer_nll(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    chat_template: bool = True,
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """``(summed NLL, n answer tokens)`` of each answer given its prompt, under ``model`` as it is (unsteered)."""
    import torch

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    encoded = [answer_ids(tok, p, a or "", chat_template) for p, a in zip(prompts, answers)]
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (row, _) in enumerate(chunk):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
        # Positions count real tokens only, so left padding does not shift a row's positions.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # Left padding puts every answer at the end: only the last ``keep`` positions need logits (a large
        # vocabulary, e.g. Gemma's 262k, makes the prompt's logits the bulk of the cost).
        keep = max(n for _, n in chunk) + 1
        with torch.inference_mode():
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                use_cache=False,
                logits_to_keep=keep,
            ).logits.float()
        targets = ids[:, width - keep + 1 :, None].to(device)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets)[..., 0].cpu()
        for i, (_, n) in enumerate(chunk):
            out.append((float(-logp[i, keep - 1 - n :].sum()) if n else 0.0, n))
    return out


def perplexity(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    chat_template: bool = True,
    batch_size: int = 8,
) -> list[float]:
    """Per-answer perplexity given the prompt; NaN for an empty answer."""
    return [
        math.exp(nll / n) if n else float("nan")
        for nll, n in answer_nll(
            model, tok, prompts, answers, chat_template=chat_template, batch_size=batch_size
        )
    ]


def answer_perplexities(
    score: Callable[[list[str], list[str]], list[float]],
    prompts: Sequence[str],
    contexts: Sequence[str | None],
    answers: Sequence[str],
) -> tuple[list[float | None], list[float]]:
    """Per answer: perplexity under the context it was generated from, and under the plain prompt.

    ``score(prompts, answers)`` gives perplexities under the unsteered model (:func:`perplexity` on an HF
    model, or a backend's own scorer). A row whose context is the prompt itself is scored once. A row
    without a recorded context (None) gets None for the first: it is unknown, not replaced by the
    plain-prompt figure.
    """
    if not len(prompts) == len(contexts) == len(answers):
        raise ValueError(
            f"{len(prompts)} prompts, {len(contexts)} contexts and {len(answers)} answers must match"
        )
    plain = score(list(prompts), list(answers))
    other = [i for i, (p, c) in enumerate(zip(prompts, contexts)) if c is not None and c != p]
    scored = score([contexts[i] for i in other], [answers[i] for i in other]) if other else []  # type: ignore[misc]
    under: list[float | None] = [plain[i] if c is not None else None for i, c in enumerate(contexts)]
    for i, value in zip(other, scored):
        under[i] = value
    return under, plain


def ppl_ratio(steered: Sequence[float], unsteered: Sequence[float]) -> float:
    """Geometric-mean perplexity ratio over the pairs where both are finite; NaN if there are none."""
    s, u = np.asarray(steered, dtype=np.float64), np.asarray(unsteered, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(u) & (s > 0) & (u > 0)
    return float(np.exp(np.mean(np.log(s[ok])) - np.mean(np.log(u[ok])))) if ok.any() else float("nan")


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's κ of two raters' labels of the same items: ``(p_o − p_e) / (1 − p_e)``, exact.

    ``p_o`` is the share of items both label alike; ``p_e = Σ_c p_a(c)·p_b(c)`` the share chance alone
    would give with each rater's own label frequencies. Labels are any hashable values (a label one rater
    never uses simply has frequency 0 for them). When exactly one rater is constant, ``p_o = p_e`` and
    κ = 0: a rater who says the same thing to everything carries no information. When both give the same
    single label to every item, ``p_e = 1`` and κ is 0/0: NaN (agreement is perfect but says nothing).
    NaN for no items.

    >>> cohen_kappa(["y", "y", "n", "n"], ["y", "n", "n", "n"])
    0.5
    >>> cohen_kappa(["y", "y", "n"], ["y", "y", "y"])
    0.0
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} labels against {len(b)}: kappa needs one label per item from each rater")
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if p_e == 1.0:
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def roc_auc(labels: Sequence[bool | int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(a positive item scores above a negative one), ties counting half.

    Computed as the Mann–Whitney U statistic with average ranks for ties:
    ``(Σ ranks of positives − n₁(n₁+1)/2) / (n₁·n₀)``. NaN when either class is empty.

    >>> roc_auc([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1])
    0.875
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.arange(1, s.size + 1)
    # Tied scores share the mean of the ranks they span.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))
