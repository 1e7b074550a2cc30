"""Forced choice (conva.choice) and its specificity figures (conva.batch.specificity): exact relationships.

On the tiny random model: the log-odds equal a hand computation from the model's own logits; a prompt
whose value side is "no" reads the same log-odds with the sign flipped; the random control takes exactly
ConVA's per-row ε along unit directions. On synthetic rows: a pure "yes" push on a balanced prompt set
gives no value-specific effect, while the same push on an all-"yes" set looks like one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from conva.batch.schemas import CHOICE_SCHEMA
from conva.batch.specificity import (
    choice_tables,
    cosine_rows,
    specificity_sentence,
    stratified_ci,
)
from conva.choice import answer_token_ids, choice_prompt, conva_twin, score_choice, yes_log_odds
from conva.record import tokenize, with_positions
from conva.steering.core import plan_rows, random_direction
from conva.steering.hf import choice_logprobs
from conva.steering.spec import SteerSpec

# The tiny tokenizer is byte-level BPE on a small corpus: the answers' first tokens are pieces of the words.
WORDS = (("Yes", "yes", "YES"), ("No", "no", "NO"))
PROMPTS = [choice_prompt(p) for p in ("Should I take the job abroad?", "Should I stay home tonight?")]


def _hf(tiny):
    model, tok = tiny

    def logprobs(p, s, ids):
        return choice_logprobs(model, tok, p, s, ids, chat_template=True)

    return logprobs


def test_log_odds_equal_a_hand_computation_from_the_logits(tiny):
    model, tok = tiny
    rows = score_choice(_hf(tiny), tok, PROMPTS, ["yes", "yes"], [SteerSpec("none")] * 2, words=WORDS)
    enc = tokenize(tok, PROMPTS, True, "cpu")
    with torch.inference_mode():
        logits = model(**with_positions(enc), use_cache=False).logits[:, -1, :].double()
    yes, no = answer_token_ids(tok, WORDS[0]), answer_token_ids(tok, WORDS[1])
    yes, no = [t for t in yes if t not in no], [t for t in no if t not in yes]  # a shared piece says neither
    # log Σ_yes softmax − log Σ_no softmax = logsumexp(logits[yes]) − logsumexp(logits[no])
    hand = torch.logsumexp(logits[:, yes], -1) - torch.logsumexp(logits[:, no], -1)
    assert [r.log_odds_yes for r in rows] == pytest.approx(hand.tolist(), abs=1e-5)
    assert [r.value_log_odds for r in rows] == [r.log_odds_yes for r in rows]


def test_yes_log_odds_formula():
    p = np.array([[0.5, 0.1, 0.2, 0.2], [0.1, 0.1, 0.4, 0.4]])
    assert yes_log_odds(np.log(p), 2) == pytest.approx([np.log(0.6 / 0.4), np.log(0.2 / 0.8)], abs=1e-12)


def test_value_side_no_flips_the_sign(tiny, tiny_bundles):
    _, tok = tiny
    power = tiny_bundles[0]
    spec = SteerSpec("conva_nogate", power, p0=0.99)
    yes = score_choice(_hf(tiny), tok, PROMPTS, ["yes", "yes"], [spec] * 2, words=WORDS)
    no = score_choice(_hf(tiny), tok, PROMPTS, ["no", "no"], [spec] * 2, words=WORDS)
    assert [r.value_log_odds for r in no] == [-r.value_log_odds for r in yes]
    assert [r.log_odds_yes for r in no] == [r.log_odds_yes for r in yes]
    with pytest.raises(ValueError, match="value_side"):
        score_choice(_hf(tiny), tok, PROMPTS[:1], ["maybe"], [spec], words=WORDS)


def test_random_control_takes_convas_eps_along_unit_directions(tiny, tiny_bundles):
    model, tok = tiny
    power = tiny_bundles[0]  # its gate opens on every prompt
    conva = SteerSpec("conva_nogate", power, p0=0.999)
    rnd = SteerSpec("random", power, p0=0.999)
    rows = score_choice(_hf(tiny), tok, PROMPTS, ["yes", "no"], [conva, rnd], words=WORDS)
    rows += score_choice(_hf(tiny), tok, PROMPTS[::-1], ["yes", "no"], [conva, rnd], words=WORDS)
    # Rows 0 and 3 are prompt 0 under ConVA and under the random control; rows 2 and 1 prompt 1. (Equal up to
    # float rounding: the twin is scored in another batch, padded to another length.)
    assert rows[3].eps == pytest.approx(rows[0].eps, abs=1e-5) and any(e > 0 for e in rows[0].eps)
    assert rows[1].eps == pytest.approx(rows[2].eps, abs=1e-5)
    assert rows[3].log_odds_yes != pytest.approx(rows[0].log_odds_yes, abs=1e-4)  # the direction differs
    # The step added is eps × a unit direction: the plan holds ConVA's ε as the fixed scale.
    spec = SteerSpec("random", power, p0=0.999, eps=rows[0].eps)
    plan = plan_rows([spec], PROMPTS[:1], model.config.hidden_size, model.config.num_hidden_layers)
    assert plan.fixed[0].tolist() == pytest.approx(list(rows[0].eps))
    assert plan.dirs[0].norm(dim=-1).tolist() == pytest.approx([1.0] * len(plan.layers), abs=1e-6)
    assert not plan.compute.any()
    # The directions are not the value's: far from the probe direction, and fixed by seed, value and layer.
    w = torch.from_numpy(power.w[power.rows(spec.layers())]).float()
    cos = torch.nn.functional.cosine_similarity(plan.dirs[0], w, dim=-1)
    assert cos.abs().max() < 0.35
    assert np.array_equal(random_direction("power", 1, 8), random_direction("power", 1, 8))
    assert not np.array_equal(random_direction("power", 1, 8), random_direction("power", 2, 8))
    assert conva_twin(rnd).method == "conva_nogate" and conva_twin(rnd).p0 == 0.999
    with pytest.raises(ValueError, match="needs eps"):
        plan_rows([rnd], PROMPTS[:1], model.config.hidden_size, model.config.num_hidden_layers)


def _rows(push: dict[str, float], sides: dict[str, list[str]], noise: float = 0.05) -> pa.Table:
    """Synthetic forced-choice rows: every vector adds ``push[vector]`` to the log-odds of *yes*."""
    rng = np.random.default_rng(1)
    rows = []
    for value, value_sides in sides.items():
        for item, side in enumerate(value_sides):
            sign = 1.0 if side == "yes" else -1.0
            base = rng.normal()

            def add(method: str, vector: str | None, yes: float) -> None:
                rows.append(
                    dict(
                        row_id=f"{value}|{vector}|{method}#{item}",
                        cell_id=f"{value}|{vector}|{method}",
                        model="m",
                        value=value,
                        vector=vector,
                        method=method,
                        p0=0.99 if method != "none" else None,
                        strength=None,
                        item=item,
                        value_side=side,
                        log_odds_yes=yes,
                        value_log_odds=sign * yes,
                        gate_open=True,
                        gate_score=None,
                        eps_norm=1.0,
                        error=None,
                    )
                )

            add("none", None, base)
            for vector in sides:
                add("conva_nogate", vector, base + push[vector] + rng.normal(scale=noise))
    return pa.Table.from_pylist(rows, schema=CHOICE_SCHEMA)


def test_a_pure_yes_push_is_not_value_specific_on_a_balanced_set():
    balanced = {v: ["yes", "no"] * 10 for v in ("power", "tradition", "hedonism")}
    tables = choice_tables(_rows({v: 1.0 for v in balanced}, balanced), n_boot=500, seed=0)
    row = tables["specificity"].to_pylist()[0]
    assert row["n"] == 60
    assert row["specific_lo"] <= 0.0 <= row["specific_hi"]
    assert row["own_lo"] <= 0.0 <= row["own_hi"]  # half the prompts toward the value, half away
    assert row["yes_push_lo"] > 0.9  # ... which the yes push shows: +1 on every prompt
    assert "not shown to be value-specific" in specificity_sentence(row)
    # The same push on prompts whose value side is always "yes" looks like alignment:
    all_yes = {v: ["yes"] * 20 for v in balanced}
    row = choice_tables(_rows({v: 1.0 for v in all_yes}, all_yes), n_boot=500, seed=0)[
        "specificity"
    ].to_pylist()[0]
    assert row["own_lo"] > 0.9 and row["specific_lo"] <= 0.0 <= row["specific_hi"]


def test_a_value_specific_push_is_found_and_the_matrix_has_every_cell():
    sides = {v: ["yes", "no"] * 10 for v in ("power", "tradition")}
    # A vector that pushes toward its own value: +1 on yes-side prompts of its value, −1 on its no-side ones.
    table = _rows({v: 0.0 for v in sides}, sides, noise=0.0)
    rows = table.to_pylist()
    for r in rows:
        if r["method"] == "conva_nogate" and r["vector"] == r["value"]:
            sign = 1.0 if r["value_side"] == "yes" else -1.0
            r["log_odds_yes"] += sign
            r["value_log_odds"] += 1.0
    tables = choice_tables(pa.Table.from_pylist(rows, schema=CHOICE_SCHEMA), n_boot=200, seed=0)
    row = tables["specificity"].to_pylist()[0]
    assert row["own"] == pytest.approx(1.0) and row["other"] == pytest.approx(0.0)
    assert row["yes_push"] == pytest.approx(0.0)  # +1 on yes-side prompts, -1 on no-side ones
    assert row["specific"] == pytest.approx(1.0) and row["specific_lo"] == pytest.approx(1.0)
    assert "value-specific:" in specificity_sentence(row)
    matrix = {(r["vector"], r["value"]): r["shift"] for r in tables["cross_value"].to_pylist()}
    assert matrix == pytest.approx(
        {
            ("power", "power"): 1.0,
            ("power", "tradition"): 0.0,
            ("tradition", "power"): 0.0,
            ("tradition", "tradition"): 1.0,
        }
    )


def test_stratified_bootstrap_resamples_within_values():
    # Two values with constant scores: any within-value resample keeps each value's mean, so the CI is a point.
    x = np.array([1.0] * 5 + [3.0] * 15)
    mean, lo, hi = stratified_ci(x, ["a"] * 5 + ["b"] * 15, n_boot=300, seed=0)
    assert mean == lo == hi == pytest.approx(2.5)


def test_cosines_of_two_values_vectors(tiny_bundles):
    power, benevolence, _ = tiny_bundles
    table = cosine_rows("tiny", {"power": power, "benevolence": benevolence}).to_pylist()
    layers = sorted(set(power.layers) & set(benevolence.layers))
    assert len(table) == 2 * len(layers)
    for r in table:
        a = power.w if r["kind"] == "probe" else power.caa
        b = benevolence.w if r["kind"] == "probe" else benevolence.caa
        va, vb = a[power.rows((r["layer"],))[0]], b[benevolence.rows((r["layer"],))[0]]
        assert r["cosine"] == pytest.approx(
            float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)), abs=1e-6
        )


def test_a_gate_decides_on_the_question_without_the_instruction(tiny, tiny_bundles):
    """The gate was calibrated on questions as a study asks them: it reads the question, not the appended
    "Answer yes or no.", and the answer is then read with the question as asked."""
    from dataclasses import replace

    from conva.choice import question_of
    from conva.steering.hf import steer_logits

    model, tok = tiny
    power = tiny_bundles[0]
    scores = [r.gate_score for r in steer_logits(model, tok, PROMPTS, [SteerSpec("conva", power)] * 2)[1]]
    mid = (scores[0] + scores[1]) / 2
    gated = replace(power, gate=replace(power.gate, threshold=mid))  # opens on one question as asked
    spec = SteerSpec("conva", gated, p0=0.999)
    rows = score_choice(_hf(tiny), tok, PROMPTS, ["yes", "no"], [spec] * 2, words=WORDS)
    on_question = steer_logits(model, tok, [question_of(p) for p in PROMPTS], [spec] * 2)[1]
    assert [r.gate_score for r in rows] == pytest.approx([r.gate_score for r in on_question], abs=1e-6)
    assert [r.gate_open for r in rows] == [r.gate_open for r in on_question]
    assert [r.gate_score for r in rows] != pytest.approx(scores, abs=1e-6)  # the instruction changes the read
    assert question_of(PROMPTS[0]) == "Should I take the job abroad?"
    # A closed gate leaves the row exactly as unsteered; an open one steers it.
    plain = score_choice(_hf(tiny), tok, PROMPTS, ["yes", "no"], [SteerSpec("none")] * 2, words=WORDS)
    for r, p in zip(rows, plain):
        assert (r.log_odds_yes == p.log_odds_yes) == (not r.gate_open)
