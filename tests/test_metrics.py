"""CSR, bootstrap, perplexity and multiple-choice utility: known inputs and exact relationships."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conva.data import DataError
from conva.mc import LETTERS, demo_mc, letter_token_ids, load_mc, mc_prompts
from conva.metrics import (
    answer_nll,
    answer_perplexities,
    bootstrap_ci,
    cohen_kappa,
    csr,
    perplexity,
    ppl_ratio,
    roc_auc,
)
from conva.record import tokenize
from conva.steering.hf import score_mc
from conva.steering.spec import SteerSpec


def test_csr_is_the_mean_over_every_prompt() -> None:
    assert csr([1, 0, 0.5, 1]) == 0.625
    assert csr([0, 0, 0]) == 0.0
    assert math.isnan(csr([]))
    with pytest.raises(ValueError, match="gated-off"):
        csr([1.0, float("nan")])


def _exact_percentile(scores: list[float], q: float) -> tuple[float, float]:
    """The ``q`` quantile of the mean of a resample with replacement, by enumerating all n**n resamples.

    Returns the quantile and how far ``q`` lies from the nearest step of that distribution's CDF: with
    ``n_boot`` resamples the bootstrap's empirical quantile is this value exactly unless the empirical CDF
    strays across that step, whose standard error is about ``sqrt(q(1-q)/n_boot)``: a margin of five such
    errors makes the check hold for any seed (but about one in a few million).
    """
    n = len(scores)
    means = np.sort([sum(scores[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n)])
    values, counts = np.unique(means, return_counts=True)
    cdf = np.cumsum(counts) / means.size
    k = int(np.searchsorted(cdf, q))  # the first value whose CDF reaches q
    return float(values[k]), float(np.min(np.abs(cdf - q)))


@pytest.mark.parametrize(
    "scores, level",
    [([1, 0, 0.5, 1], 0.95), ([1, 0, 0.5, 1], 0.5), ([0, 0, 1], 0.9), ([0, 1, 1, 1, 0.5], 0.8)],
)
def test_bootstrap_bounds_are_the_exact_percentiles_of_the_resample_mean(scores, level) -> None:
    n_boot = 40_000
    alpha = (1 - level) / 2
    (lo, lo_margin), (hi, hi_margin) = _exact_percentile(scores, alpha), _exact_percentile(scores, 1 - alpha)
    assert min(lo_margin, hi_margin) > 5 * math.sqrt(
        alpha * (1 - alpha) / n_boot
    )  # decided by the distribution
    for seed in (0, 1, 2):  # any seed: the bounds come from the distribution, not from one RNG stream
        assert bootstrap_ci(scores, n_boot=n_boot, level=level, seed=seed) == (lo, hi)


def test_bootstrap_closed_form_cases() -> None:
    for seed in (0, 5):
        assert bootstrap_ci([0.5] * 7, n_boot=50, seed=seed) == (0.5, 0.5)  # a constant: zero width at it
        assert bootstrap_ci([1.0], n_boot=3, level=0.5, seed=seed) == (1.0, 1.0)
    # Two points: a resample mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4; the 2.5 % and 97.5 %
    # quantiles fall inside the end masses, the 40 % and 60 % ones inside the middle.
    assert bootstrap_ci([0, 1], n_boot=20_000, level=0.95, seed=3) == (0.0, 1.0)
    assert bootstrap_ci([0, 1], n_boot=20_000, level=0.2, seed=3) == (0.5, 0.5)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    for bad in ({"level": 1.0}, {"level": 0.0}, {"n_boot": 0}):
        with pytest.raises(ValueError, match="0 < level < 1 and n_boot >= 1"):
            bootstrap_ci([1, 0], **bad)


def test_ppl_ratio_is_the_geometric_mean_ratio() -> None:
    assert ppl_ratio([2.0, 8.0], [2.0, 2.0]) == pytest.approx(2.0)
    assert ppl_ratio([3.0, float("nan")], [3.0, 5.0]) == pytest.approx(1.0)  # only pairs with both finite
    assert math.isnan(ppl_ratio([float("nan")], [1.0]))


def test_cohen_kappa_on_hand_computed_label_pairs() -> None:
    # 10 items, A: 6 yes 4 no; B: 5 yes 5 no; both yes on 4, both no on 3 -> p_o = 7/10.
    # p_e = 0.6*0.5 + 0.4*0.5 = 0.5, so kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    a = ["yes"] * 4 + ["yes"] * 2 + ["no"] * 1 + ["no"] * 3
    b = ["yes"] * 4 + ["no"] * 2 + ["yes"] * 1 + ["no"] * 3
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-15)
    assert cohen_kappa(b, a) == pytest.approx(0.4, abs=1e-15)  # symmetric
    # Three categories, 6 items: A = y y n n u u, B = y n n n u y. Agree on items 1, 3, 4, 5 -> p_o = 4/6.
    # A's frequencies (2, 2, 2)/6, B's (y 2, n 3, u 1)/6: p_e = (2*2 + 2*3 + 2*1)/36 = 12/36 = 1/3,
    # kappa = (2/3 - 1/3) / (2/3) = 0.5.
    assert cohen_kappa(list("yynnuu"), list("ynnnuy")) == pytest.approx(0.5, abs=1e-15)
    # Complete disagreement on a balanced pair: p_o = 0, p_e = 0.5 -> kappa = -1.
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == -1.0
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    # One rater constant: p_o = share of the other's matching label = p_e, so kappa = 0 exactly.
    assert cohen_kappa(["no"] * 5, ["no", "no", "yes", "no", "yes"]) == 0.0
    assert cohen_kappa(["no", "yes", "no"], ["no"] * 3) == 0.0
    # Both constant, different labels: p_o = 0, p_e = 0 -> 0; the same label: p_e = 1, 0/0 -> NaN.
    assert cohen_kappa(["no"] * 3, ["yes"] * 3) == 0.0
    assert math.isnan(cohen_kappa(["no"] * 3, ["no"] * 3))
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError, match="3 labels against 2"):
        cohen_kappa([1, 0, 1], [1, 0])


def test_roc_auc_is_mann_whitney_with_ties_at_half() -> None:
    # Positives score 0.8, 0.6, 0.6; negatives 0.6, 0.2. Pairs (pos, neg): (0.8,0.6)=1, (0.8,0.2)=1,
    # (0.6,0.6)=1/2 twice, (0.6,0.2)=1 twice -> (1 + 1 + 0.5 + 0.5 + 1 + 1) / 6 = 5/6.
    # By ranks: 0.2 -> 1, the three 0.6 -> 3 (mean of 2, 3, 4), 0.8 -> 5; positives sum 5 + 3 + 3 = 11,
    # U = 11 - 3*4/2 = 5, AUC = 5 / (3*2) = 5/6.
    labels, scores = [1, 1, 1, 0, 0], [0.8, 0.6, 0.6, 0.6, 0.2]
    assert roc_auc(labels, scores) == pytest.approx(5 / 6, abs=1e-15)
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0 and roc_auc([True, False], [0.1, 0.9]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.5] * 4) == 0.5  # a judge that scores everything alike ranks nothing
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3])) and math.isnan(roc_auc([], []))
    # Against the pairwise definition on random data with many ties.
    rng = np.random.default_rng(0)
    y, s = rng.random(200) < 0.3, rng.integers(0, 5, 200) / 4
    pairwise = np.mean((s[y][:, None] > s[~y][None]) + 0.5 * (s[y][:, None] == s[~y][None]))
    assert roc_auc(y, s) == pytest.approx(float(pairwise), abs=1e-12)


def test_answer_nll_in_a_padded_batch_equals_one_row_at_a_time(tiny) -> None:
    model, tok = tiny
    prompts = [
        "Should I take the job?",
        "Is it right to break a rule to help a friend who is in trouble today?",
    ]
    answers = ["Yes, take it.", "No. Rules keep everyone safe, even when it is hard."]
    batched = answer_nll(model, tok, prompts, answers, batch_size=2)
    for (nll, n), p, a in zip(batched, prompts, answers):
        enc = tokenize(tok, [p], chat_template=True)
        target = tok(a, add_special_tokens=False)["input_ids"]
        ids = torch.cat([enc["input_ids"], torch.tensor([target])], dim=1)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = -sum(float(logp[ids.shape[1] - 1 - len(target) + k, t]) for k, t in enumerate(target))
        assert n == len(target) and nll == pytest.approx(expected, rel=1e-4)
    ppl = perplexity(model, tok, prompts + ["x"], answers + [""])
    assert ppl[0] == pytest.approx(math.exp(batched[0][0] / batched[0][1]), rel=1e-6) and math.isnan(ppl[2])


def test_answers_are_scored_under_the_context_they_were_generated_from(tiny, tiny_bundles) -> None:
    from conva.steering.hf import generate

    model, tok = tiny
    always = tiny_bundles[0]
    prompts = ["Should I take the job?", "What is the capital of France?"]
    specs = [SteerSpec("prompt", always), SteerSpec("none", always)]
    rows = generate(model, tok, prompts, specs, max_new_tokens=5)
    contexts, answers = [r.context for r in rows], [r.text for r in rows]
    assert contexts[0] != prompts[0] and contexts[1] == prompts[1]

    def score(p, a):
        return perplexity(model, tok, p, a)

    under, plain = answer_perplexities(score, prompts, contexts, answers)
    assert under[0] == pytest.approx(perplexity(model, tok, contexts[:1], answers[:1])[0], rel=1e-6)
    assert plain == pytest.approx(perplexity(model, tok, prompts, answers), rel=1e-6)
    assert under[1] == plain[1] and under[0] != plain[0]
    unknown, _ = answer_perplexities(score, prompts[:1], [None], answers[:1])
    assert unknown == [None]  # no recorded context: unknown, not the plain-prompt figure


def test_mc_loader_reads_the_demo_set_and_names_bad_rows(tmp_path) -> None:
    items = demo_mc()
    assert len(items) == 68 and all(i.answer in LETTERS and len(i.choices) == 4 for i in items)
    good = "What is 2+2?,3,4,5,6,B\n"
    cases = [
        ("Q?,a,b,c,d\n", None, "expected 6 fields"),
        ("Q?,a,b,c,d,E\n", "answer", "expected one of A, B, C, D"),
        (" ,a,b,c,d,A\n", "question", "empty text"),
        ("Q?,a,,c,d,A\n", "B", "empty text"),
    ]
    for bad, field, problem in cases:
        path = tmp_path / "mc.csv"
        path.write_text(good + bad)
        with pytest.raises(DataError, match=problem) as err:
            load_mc(path)
        assert err.value.file == str(path) and err.value.row == 2 and err.value.field == field
    with pytest.raises(DataError, match="no such file"):
        load_mc(tmp_path / "missing.csv")


def test_mc_prompts_never_use_the_question_as_its_own_shot() -> None:
    items = demo_mc()[:6]
    for shots in (0, 5):
        prompts = mc_prompts(items, shots)
        for item, prompt in zip(items, prompts):
            assert prompt.count("Answer:") == shots + 1 and prompt.count(item.question) == 1
            assert prompt.endswith("D. " + item.choices[3] + "\nAnswer:")


def test_mc_scoring_reads_the_letter_logits_with_the_gate_active(tiny, tiny_bundles) -> None:
    model, tok = tiny
    always, _, never = tiny_bundles
    items = demo_mc()[:5]
    prompts, answers = mc_prompts(items, 0), [i.answer for i in items]
    plain = score_mc(model, tok, prompts, answers, [SteerSpec("none")] * 5, batch_size=5)
    letters = letter_token_ids(tok)
    for prompt, row, answer in zip(prompts, plain, answers):  # one prompt at a time: no padding at all
        with torch.inference_mode():
            logits = model(**tokenize(tok, [prompt], chat_template=True)).logits[0, -1].float()
        best = LETTERS[int(torch.stack([logits[ids].max() for ids in letters]).argmax())]
        assert row.pred == best and row.correct == (best == answer) and not row.gate_open
    closed = score_mc(model, tok, prompts, answers, [SteerSpec("conva", never, p0=0.999)] * 5, batch_size=5)
    assert [r.pred for r in closed] == [r.pred for r in plain] and not any(r.gate_open for r in closed)
    opened = score_mc(model, tok, prompts, answers, [SteerSpec("conva", always, p0=0.999)] * 5, batch_size=5)
    assert all(r.gate_open for r in opened)
