"""Study configs, cells, the one steering table, the summary's arithmetic, and a two-cell study end to end."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conva.batch.cells import expand_cells, steering_table, utility_cells
from conva.batch.config import ConfigError
from conva.batch.schemas import POOLED_SCHEMA, RESULT_SCHEMA
from conva.batch.steer_rows import row_spec
from conva.batch.study import load_study, model_config
from conva.batch.summary import matched_fluency, pool, summarize
from conva.metrics import bootstrap_ci
from conva.values import VALUES

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_study.toml"


def test_demo_study_config_expands_to_its_cells(tmp_path) -> None:
    study = load_study(DEMO)
    cells, s = expand_cells(study, "smollm2"), study.study
    per_value = len(s.p0) + len(s.caa_strengths) + 2  # ConVA per P0, CAA per strength, prompting, unsteered
    values = study.job.data.values
    assert len(cells) == len(values) * per_value and {c.method for c in cells} == {
        "conva",
        "caa",
        "prompt",
        "none",
    }
    assert len(utility_cells(study, "smollm2")) == 1 + len(values) * (
        per_value - 1
    )  # one unsteered MC cell per model
    sweep = load_study(
        DEMO,
        [
            "--study.p0=[0.9, 0.99]",
            '--study.bands=["auto", "10-20"]',
            '--study.settings=["plain", "opposite"]',
            "--study.caa_strengths=[0.25]",
            f"--data.values={list(VALUES)}".replace("'", '"'),
        ],
    )
    per_value = {
        m: sum(c.method == m for c in expand_cells(sweep, "smollm2")) // len(VALUES)
        for m in sweep.study.methods
    }
    assert per_value == {"conva": 2 * 2 * 2, "caa": 2 * 2, "prompt": 2, "none": 2}
    strengths = load_study(DEMO, ["--study.caa_strengths=[0.25, 0.5, 1.0]"])
    assert sum(c.method == "caa" for c in expand_cells(strengths, "smollm2")) == 3 * len(values)
    for bad, key in (
        (['--study.methods=["lora"]'], "study.methods"),
        (["--study.p0=[1.0]"], "study.p0"),
        (['--study.bands=["x"]'], "study.bands"),
        (["--study.caa_strengths=[0]"], "study.caa_strengths"),
        (["--judge.kind=oracle"], "judge.kind"),
        (["--model.name=x"], "model.name"),
        (["--judge.kind=llm"], "judge.base_url"),
        (["--judge.kind=llm", "--judge.backend=grpc"], "judge.backend"),
        (["--judge.kind=llm", "--judge.backend=local"], "judge.model"),
        (["--fluency.llm=true", "--judge.backend=local"], "judge.model"),
        (
            [
                "--judge.kind=llm",
                "--judge.backend=local",
                "--judge.model=smollm2",
                "--judge.base_url=http://x/v1",
            ],
            "judge.base_url",
        ),
        (["--judge.kind=llm", "--judge.backend=local", f"--judge.model={tmp_path}"], "judge.model"),
        ([f"--judge.labels={tmp_path}"], "judge.labels"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_study(DEMO, bad)
    # A local LLM judge needs a model to load, not an endpoint; the labels may be any folder that holds them.
    local = load_study(DEMO, ["--judge.kind=llm", "--judge.backend=local", "--judge.model=smollm2"])
    assert (local.judge.backend, local.judge.model, local.judge.base_url) == ("local", "smollm2", "")
    (tmp_path / "answers.jsonl").write_text("")
    (tmp_path / "labels_a.jsonl").write_text("")
    assert load_study(DEMO, [f"--judge.labels={tmp_path}"]).judge.labels == str(tmp_path)
    assert load_study(DEMO, ["--judge.labels="]).judge.labels == ""


def test_one_steering_table_carries_each_cells_overrides(tiny_bundles) -> None:
    study = load_study(
        DEMO,
        [
            '--data.values=["power"]',
            "--data.max_prompts_per_value=2",
            '--study.bands=["auto", "1-2"]',
            '--study.methods=["conva", "caa", "none"]',
            '--study.settings=["plain", "opposite"]',
        ],
    )
    cfg = model_config(study, "smollm2", "/tmp/x")
    cells = expand_cells(study, "smollm2")
    table = steering_table(cfg, cells)
    assert table.num_rows == 2 * len(cells) and len(set(table.column("row_id").to_pylist())) == table.num_rows
    bundle = tiny_bundles[0]
    for row in table.to_pylist():
        spec = row_spec(cfg, bundle, row)
        assert (spec.method, spec.setting) == (row["method"], row["setting"]) and row["row_id"].startswith(
            row["cell_id"]
        )
        if row["method"] == "conva":
            assert spec.target() == row["p0"] and row["p0"] in study.study.p0
            assert spec.layers() == (tuple(row["band"]) if row["band"] else bundle.band)
        if row["method"] == "caa":
            assert spec.strength in study.study.caa_strengths and f"s={spec.strength:g}" in row["cell_id"]
    assert steering_table(cfg, cells, 1).num_rows == len(
        cells
    )  # study.generate_prompts: the first prompt only


def test_forced_choice_cells_form_the_cross_value_matrix_and_its_controls() -> None:
    from conva.batch.cells import choice_cells, choice_table

    study = load_study(
        DEMO,
        [
            '--data.values=["power", "tradition", "hedonism"]',
            "--data.max_prompts_per_value=10",
            "--study.p0=[0.9, 0.99]",
            "--study.caa_strengths=[0.1, 0.2, 0.3, 0.4, 0.5]",
        ],
    )
    cells = choice_cells(study, "smollm2")
    # per value: unsteered; ConVA per P0 with each of the 3 vectors, the random control and gated ConVA; CAA
    # per strength with each of the 3 vectors
    assert len(cells) == 3 * (1 + 2 * (3 + 1 + 1) + 5 * 3) and len({c.id for c in cells}) == len(cells)
    assert {(c.method, c.vector == c.value) for c in cells if c.method in ("random", "conva")} == {
        ("random", True),
        ("conva", True),
    }
    table = choice_table(model_config(study, "smollm2", "/tmp/x"), cells).to_pylist()
    assert len(table) == 10 * len(cells)  # every demo prompt is a yes/no question with its value side
    assert all(r["prompt"].endswith("Answer yes or no.") and r["value_side"] in ("yes", "no") for r in table)
    sides = [r["value_side"] for r in table if r["method"] == "none"]
    assert sides.count("yes") == sides.count("no")  # balanced: five of each value's first ten


def _result(
    cell: str,
    method: str,
    score: float,
    ppl: float,
    prompt: str,
    gate: bool | None = None,
    value: str = "power",
    p0: float | None = 0.99,
    strength: float | None = None,
) -> dict:
    return dict(
        cell_id=cell,
        row_id=f"{cell}#{prompt}",
        model="m",
        value=value,
        method=method,
        p0=p0 if method == "conva" else None,
        band="auto" if method in ("conva", "caa") else "-",
        setting="plain",
        strength=strength,
        prompt=prompt,
        context=prompt,
        output="x",
        n_output_tokens=1,
        gate_open=gate,
        gate_score=None if gate is None else 0.5,
        eps_mean=None,
        judge="classifier",
        judge_score=score,
        judge_prob=None,
        judge_raw=None,
        ppl=ppl,
        ppl_plain=ppl,
        fluency=None,
        error=None,
    )


def test_summary_arithmetic_on_known_rows() -> None:
    conva, none = "m|power|conva|p0=0.99|band=auto|plain", "m|power|none|p0=-|band=-|plain"
    rows = [
        _result(conva, "conva", 1.0, 8.0, "a", True),
        _result(conva, "conva", 0.5, 2.0, "b", False),
        _result(conva, "conva", 0.0, 4.0, "c", True),
        _result(none, "none", 0.0, 2.0, "a"),
        _result(none, "none", 0.0, 2.0, "b"),
        _result(none, "none", 0.0, 4.0, "c"),
    ]
    errored = {
        **_result(conva, "conva", 0.0, 1.0, "d"),
        "judge_score": None,
        "ppl": None,
        "error": "empty prompt",
    }
    results = pa.Table.from_pylist(rows + [errored], schema=RESULT_SCHEMA)
    utility = pa.table(
        {
            "cell_id": ["m|*|none|p0=-|band=-"] * 4 + ["m|power|conva|p0=0.99|band=auto"] * 4,
            "model": ["m"] * 8,
            "method": ["none"] * 4 + ["conva"] * 4,
            "correct": [True, True, False, False, True, False, False, False],
            "gate_open": [False] * 4 + [True, False, False, False],
            "gate_score": [None] * 4 + [0.5] * 4,
        }
    )
    validity = {"m": {"kappa": 0.1, "auc": 0.65}}
    summary = {
        r["method"]: r
        for r in summarize(results, utility, {("m", "power"): 0.9}, n_boot=100, validity=validity).to_pylist()
    }
    assert all((r["judge_kappa"], r["judge_auc"]) == (0.1, 0.65) for r in summary.values())
    pooled = pool(results, utility, n_boot=10, validity=validity).to_pylist()
    assert [(r["judge_kappa"], r["judge_auc"]) for r in pooled] == [(0.1, 0.65)] * 2
    assert pool(results, utility, n_boot=10).to_pylist()[0]["judge_kappa"] is None  # not validated
    c = summary["conva"]
    assert (c["n"], c["n_error"], c["csr"], c["gate_open_rate"]) == (4, 1, 0.5, pytest.approx(2 / 3))
    assert c["ppl_ratio"] == pytest.approx(
        math.exp(
            (math.log(8) + math.log(2) + math.log(4)) / 3 - (math.log(2) + math.log(2) + math.log(4)) / 3
        )
    )
    assert (c["mc_acc"], c["mc_acc_none"], c["utility_ratio"], c["mc_gate_open_rate"]) == (
        0.25,
        0.5,
        0.5,
        0.25,
    )
    assert c["csr_lo"] <= 0.5 <= c["csr_hi"] and c["judge_agreement"] == 0.9
    assert summary["none"]["ppl_ratio"] == pytest.approx(1.0) and summary["none"]["utility_ratio"] == 1.0


def _two_value_results() -> pa.Table:
    """ConVA, CAA (two strengths) and unsteered cells over two values with unequal success, 30 prompts each."""
    rng = np.random.default_rng(5)
    rows = []
    for value, rate in (("power", 0.9), ("benevolence", 0.2)):
        for method, strength, shift in (
            ("conva", None, 0.0),
            ("caa", 0.1, -0.3),
            ("caa", 0.5, -0.1),
            ("none", None, -0.4),
        ):
            cell = f"m|{value}|{method}|s={strength}"
            for i in range(30):
                score = float(rng.random() < rate + shift)
                ppl = 4.0 * (1 + 4 * (strength or 0.0)) * float(rng.uniform(0.8, 1.25))
                rows.append(_result(cell, method, score, ppl, f"{i:04d}", None, value, 0.99, strength))
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def test_pooled_interval_is_a_bootstrap_over_all_the_rows_prompts() -> None:
    from scipy.stats import bootstrap

    results = _two_value_results()
    pooled = {(r["method"], r["strength"]): r for r in pool(results, n_boot=4000, seed=3).to_pylist()}
    per_cell = summarize(results, n_boot=4000, seed=3).to_pylist()
    conva = pooled[("conva", None)]
    scores = [r["judge_score"] for r in results.to_pylist() if r["method"] == "conva"]
    assert (conva["n"], conva["values"], conva["csr"]) == (60, 2, float(np.mean(scores)))
    assert (conva["csr_lo"], conva["csr_hi"]) == bootstrap_ci(scores, n_boot=4000, seed=3)
    # An independent implementation agrees within the bootstrap's own resolution (a step of the mean, 1/60,
    # plus Monte-Carlo error), and the old "mean of the per-value bounds" does not.
    ref = bootstrap(
        (np.asarray(scores),), np.mean, n_resamples=20000, method="percentile", random_state=3
    ).confidence_interval
    assert (
        abs(conva["csr_lo"] - ref.low) <= 1 / 60 + 0.01 and abs(conva["csr_hi"] - ref.high) <= 1 / 60 + 0.01
    )
    mean_of_bounds = np.mean([r["csr_lo"] for r in per_cell if r["method"] == "conva"])
    assert abs(mean_of_bounds - conva["csr_lo"]) > 0.05
    # The perplexity ratio's interval: the same bootstrap over the per-prompt log ratios against unsteered.
    rows = results.to_pylist()
    base = {(r["value"], r["prompt"]): r["ppl"] for r in rows if r["method"] == "none"}
    logs = [np.log(r["ppl"]) - np.log(base[(r["value"], r["prompt"])]) for r in rows if r["strength"] == 0.5]
    lo, hi = bootstrap_ci(logs, n_boot=4000, seed=3)
    caa = pooled[("caa", 0.5)]
    assert caa["ppl_ratio"] == pytest.approx(np.exp(np.mean(logs))) and (
        caa["ppl_ratio_lo"],
        caa["ppl_ratio_hi"],
    ) == pytest.approx((np.exp(lo), np.exp(hi)))
    # The paired difference against unsteered: per prompt, the cell's score minus the unsteered one's.
    score = {(r["method"], r["strength"], r["value"], r["prompt"]): r["judge_score"] for r in rows}
    diffs = [
        score[("conva", None, v, p)] - score[("none", None, v, p)] for (m, _, v, p) in score if m == "conva"
    ]
    assert conva["csr_diff"] == pytest.approx(np.mean(diffs))
    assert (conva["csr_diff_lo"], conva["csr_diff_hi"]) == bootstrap_ci(diffs, n_boot=4000, seed=3)
    assert pooled[("none", None)]["csr_diff"] is None


def test_matched_fluency_pairs_each_conva_point_with_the_nearest_caa_point() -> None:
    results = _two_value_results()
    pooled = pool(results, n_boot=2000, seed=0)
    (row,) = matched_fluency(results, pooled, n_boot=2000, seed=0).to_pylist()
    assert (row["other"], row["other_strength"], row["n_pairs"]) == (
        "caa",
        0.1,
        60,
    )  # 0.1: nearest perplexity
    by = {
        (r["method"], r["strength"], r["value"], r["prompt"]): r["judge_score"] for r in results.to_pylist()
    }
    diffs = [by[("conva", None, v, p)] - by[("caa", 0.1, v, p)] for (m, s, v, p) in by if m == "conva"]
    assert row["csr_diff"] == pytest.approx(np.mean(diffs))
    assert (row["csr_diff_lo"], row["csr_diff_hi"]) == bootstrap_ci(diffs, n_boot=2000, seed=0)
    fluent = row["ppl_conva_hi"] < row["ppl_other_lo"]  # ConVA is the more fluent here
    expected = "conva higher, fluency matched or better" if row["csr_diff_lo"] > 0 else "no difference shown"
    assert fluent and row["verdict"] == expected


def test_matched_fluency_interpolates_caa_between_the_strengths_that_bracket_conva() -> None:
    rows = _two_value_results().to_pylist()
    for r in rows:  # ConVA's answers become as disfluent as CAA's between strengths 0.1 and 0.5
        if r["method"] == "conva":
            r["ppl"] *= 2.2
    results = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    pooled = {(r["method"], r["strength"]): r for r in pool(results, n_boot=500, seed=0).to_pylist()}
    (row,) = matched_fluency(results, pool(results, n_boot=500, seed=0), n_boot=500, seed=0).to_pylist()
    x, lo, hi = (math.log(pooled[k]["ppl_ratio"]) for k in (("conva", None), ("caa", 0.1), ("caa", 0.5)))
    assert lo < x < hi
    t = (x - lo) / (hi - lo)
    assert row["other_strength"] == pytest.approx(0.1 + t * 0.4)
    assert row["ppl_ratio_other"] == pytest.approx(pooled[("conva", None)]["ppl_ratio"])
    by = {(r["method"], r["strength"], r["value"], r["prompt"]): r["judge_score"] for r in rows}
    diffs = [
        by[("conva", None, v, p)] - ((1 - t) * by[("caa", 0.1, v, p)] + t * by[("caa", 0.5, v, p)])
        for (m, _, v, p) in by
        if m == "conva"
    ]
    assert row["csr_diff"] == pytest.approx(np.mean(diffs))


def _drawn(png: Path) -> bool:
    """A PNG that decodes, with marks on it: more than the background and one ink colour, in both halves."""
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]
    colours = lambda part: len(np.unique(part.reshape(-1, 3), axis=0))  # noqa: E731
    half = pixels.shape[1] // 2
    return pixels.shape[0] > 100 and colours(pixels[:, :half]) > 2 and colours(pixels[:, half:]) > 2


@pytest.fixture(scope="module")
def study_run(tiny_path, tmp_path_factory, ray_session):
    """A four-cell study (ConVA, CAA, prompting, unsteered; one value) on the tiny model, as one embedded-Ray job."""
    from conva.jobs.study import main
    from tests.test_judges import write_labels

    out = tmp_path_factory.mktemp("study")
    labels = write_labels(tmp_path_factory.mktemp("labels"))
    argv = [
        "--config",
        str(DEMO),
        f'--study.models=["{tiny_path}"]',
        '--study.methods=["conva", "caa", "prompt", "none"]',
        "--study.p0=[0.99]",
        "--study.caa_strengths=[0.5]",
        '--data.values=["power"]',
        "--data.max_prompts_per_value=3",
        "--gate.other_pairs_per_value=6",
        "--fit.band=1-3",
        "--steer.max_new_tokens=4",
        "--utility.max_items=4",
        "--ray.num_workers=1",
        "--ray.rows_per_shard=4",
        f"--judge.labels={labels}",
        f"--output.dir={out}",
    ]
    assert main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_four_cell_study_writes_results_and_a_report(study_run, capsys) -> None:
    out, _ = study_run
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert len(results) == 4 * 3 and {r["method"] for r in results} == {"conva", "caa", "prompt", "none"}
    assert all(
        r["error"] is None and r["judge_score"] in (0.0, 1.0) and r["ppl"] > 0 and r["ppl_plain"] > 0
        for r in results
    )
    for (
        r
    ) in results:  # perplexity given the answer's own context; the plain prompt's where that is the context
        assert (r["ppl"] == r["ppl_plain"]) == (r["context"] == r["prompt"])
        assert r["context"] == r["prompt"] or (r["method"] == "prompt" and r["gate_open"])
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(summary) == 4 and all(
        r["mc_acc"] is not None and r["judge_agreement"] is not None for r in summary
    )
    assert (
        pq.read_table(out / "utility.parquet").num_rows == 4 * 4
    )  # the unsteered cell and three steered ones
    pooled = pq.read_table(out / "pooled.parquet").to_pylist()
    assert {r["method"] for r in pooled} == {"conva", "caa", "prompt", "none"} and all(
        r["n"] == 3 for r in pooled
    )
    matched = pq.read_table(out / "matched.parquet").to_pylist()
    assert {r["other"] for r in matched} == {"caa", "prompt"} and all(r["n_pairs"] == 3 for r in matched)
    # Forced choice: per prompt, unsteered, ConVA ungated, the random control, gated ConVA and CAA (one value,
    # so the matrix is its diagonal and the specific effect is not measured).
    choice = pq.read_table(out / "choice.parquet").to_pylist()
    assert len(choice) == 5 * 3 and all(r["error"] is None for r in choice)
    assert {r["method"] for r in choice} == {"none", "conva_nogate", "random", "conva", "caa"}
    for r in choice:
        assert r["value_log_odds"] == (1 if r["value_side"] == "yes" else -1) * r["log_odds_yes"]
    eps = {(r["method"], r["item"]): r["eps_norm"] for r in choice}
    assert all(eps[("random", i)] == pytest.approx(eps[("conva_nogate", i)], abs=1e-4) for i in range(3))
    spec = {r["method"]: r for r in pq.read_table(out / "specificity.parquet").to_pylist()}
    assert spec["conva"]["n"] == 3 and spec["conva"]["specific"] is None and spec["caa"]["strength"] == 0.5
    base = {r["item"]: r["value_log_odds"] for r in choice if r["method"] == "none"}
    own = [r["value_log_odds"] - base[r["item"]] for r in choice if r["method"] == "conva_nogate"]
    assert spec["conva"]["own"] == pytest.approx(np.mean(own))
    pngs = sorted((out / "report").glob("*.png"))
    page = (out / "report" / "index.html").read_text()
    # a figure whose points would all coincide (every utility ratio 1) is a sentence instead
    drawn = (out / "report" / "utility.png").exists()
    assert drawn or "no steering setting changed an answer" in page
    assert {p.name for p in pngs} == {
        "frontier.png",
        "csr_vs_p0.png",
        "probe_accuracy.png",
        "csr_by_value.png",
        "cross_value.png",
        "gate.png",
    } | ({"utility.png"} if drawn else set())  # one value: no cosines between values' vectors
    assert set(re.findall(r"<img src=['\"]([^'\"]+\.png)['\"]", page)) == {p.name for p in pngs}
    assert all(_drawn(p) for p in pngs)
    assert "<img" in page and "gate.apply_to" in page and "all_methods" in page
    # The judge validated on the labelled answers: a '*' row, its kappa beside every CSR.
    judges = {r["value"]: r for r in pq.read_table(out / "judges.parquet").to_pylist()}
    star = judges["*"]
    assert set(judges) == {"power", "*"} and (star["n_labelled"], star["n_unclear"], star["n_ab"]) == (
        7,
        1,
        5,
    )
    assert math.isfinite(star["kappa"]) and judges["power"]["kappa"] == star["kappa"]
    assert all(r["judge_kappa"] == star["kappa"] for r in summary + pooled)
    assert "<th>judge κ</th>" in page
    assert page.count("Example generations") == 1 and "unsteered answer" in page


@pytest.mark.slow
def test_study_rerun_starts_nothing_and_report_rebuilds_from_parquet(study_run, monkeypatch) -> None:
    from conva.batch.report import main as report_main
    from conva.jobs import runner, study

    out, argv = study_run
    before = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("part-*.parquet")}
    monkeypatch.setattr(runner, "WorkerPool", lambda *a, **k: pytest.fail("a worker was started"))
    monkeypatch.setattr(study, "connect_ray", lambda *a, **k: pytest.fail("Ray was started"))
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "models").rglob("part-*.parquet")} == before
    assert study.main([*argv, "--study.p0=[0.9]"]) == 2  # a changed config is refused, naming the keys
    before_pngs = [p.name for p in (out / "report").glob("*.png")]
    shutil.rmtree(out / "report")
    assert report_main([str(out / "results.parquet")]) == 0
    rebuilt = sorted((out / "report").glob("*.png"))
    assert {p.name for p in rebuilt} == set(before_pngs) and all(_drawn(p) for p in rebuilt)


def _shard_intervals(model_out: Path) -> list[tuple[float, float]]:
    """Actor-side (start, end) of every shard committed under one model's folder, read from the commit logs."""
    import json

    spans = []
    for path in model_out.rglob("_log/*.json"):
        body = json.loads(path.read_text())
        logged = body.get("records", [body])  # a segment holds its records; a single record is itself
        records = [r for c in logged if c.get("op") == "commit" for r in c.get("records", [c.get("record")])]
        spans += [(r["worker"]["started"], r["worker"]["finished"]) for r in records if r.get("worker")]
    return spans


@pytest.mark.slow
def test_two_models_run_at_once_and_each_worker_loads_its_model_once(tmp_path_factory, ray_session) -> None:
    """A study of two models × two methods, each model with one worker of its own (both fit on two CPUs)."""
    import json
    import re

    from conva.jobs.study import main
    from conva.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("two")
    a, b = make_tiny_model(root / "alpha", seed=0), make_tiny_model(root / "beta", seed=1)
    out = root / "study"
    models = f'[{{name = "{a}", ray = {{num_workers = 1}}}}, {{name = "{b}", ray = {{num_workers = 1}}}}]'
    argv = [
        "--config",
        str(DEMO),
        f"--study.models={models}",
        '--study.methods=["conva", "none"]',
        "--study.p0=[0.99]",
        '--data.values=["power"]',
        "--data.max_prompts_per_value=6",
        "--study.generate_prompts=0",
        "--fit.band=1-3",
        "--steer.max_new_tokens=6",
        "--utility.max_items=6",
        "--ray.rows_per_shard=32",
        "--ray.steer_rows_per_shard=2",
        f"--output.dir={out}",
    ]
    assert main(argv) == 0
    log = (out / "run.log").read_text()
    for name in ("alpha", "beta"):
        found = re.findall(
            rf"\[{name}\] {name}: workers returned \d+ bytes .*model loads per worker: (\{{.*\}})", log
        )
        assert len(found) == 1 and list(json.loads(found[0]).values()) == [1], (
            found
        )  # one worker, loaded once, all stages
    spans = {name: _shard_intervals(out / "models" / name) for name in ("alpha", "beta")}
    assert len(spans["alpha"]) > 10 and len(spans["beta"]) > 10
    overlapping = [(x, y) for x in spans["alpha"] for y in spans["beta"] if x[0] < y[1] and y[0] < x[1]]
    assert overlapping, "no shard of one model ran while a shard of the other ran"
    results = pq.read_table(out / "results.parquet")
    assert sorted(set(results.column("model").to_pylist())) == ["alpha", "beta"]
    assert results.num_rows == 2 * 2 * 6  # models × methods × prompts, each once


def test_a_models_own_sections_override_the_job_for_it_alone() -> None:
    study = load_study(
        DEMO,
        [
            '--study.models=["smollm2", {name = "smollm2-bf16", model = {dtype = "bfloat16"}, '
            "ray = {num_workers = 1, num_gpus_per_worker = 0.5}}]"
        ],
    )
    first, second = (model_config(study, m, "/tmp/x") for m in study.study.models)
    assert (first.model.dtype, first.ray.num_workers, first.ray.num_gpus_per_worker) == ("float32", 2, 0.0)
    assert (second.model.dtype, second.ray.num_workers, second.ray.num_gpus_per_worker) == (
        "bfloat16",
        1,
        0.5,
    )
    assert second.model.name == "smollm2-bf16" and second.output.dir == "/tmp/x/models/smollm2-bf16"
    assert (first.data, first.probe, first.steer) == (second.data, second.probe, second.steer)
    with pytest.raises(ConfigError, match="may only set model, ray, vllm, steer, extract of its own"):
        load_study(DEMO, ['--study.models=[{name = "m", data = {max_prompts_per_value = 1}}]'])
    with pytest.raises(ConfigError, match=r"study.models \(m\): ray.num_workers: must be at least 1"):
        load_study(DEMO, ['--study.models=[{name = "m", ray = {num_workers = 0}}]'])
    with pytest.raises(ConfigError, match="needs name"):
        load_study(DEMO, ["--study.models=[{ray = {num_workers = 1}}]"])


def test_report_prints_the_judges_kappa_beside_every_csr(tmp_path) -> None:
    from conva.batch.report import format_summary, write_report

    def row(model: str, kappa: float | None) -> dict:
        base = dict.fromkeys(POOLED_SCHEMA.names)
        base.update(model=model, method="none", band="-", setting="plain", values=1, n=4)
        return {**base, "csr": 0.5, "csr_lo": 0.25, "csr_hi": 0.75, "judge_kappa": kappa}

    def table(rows: list[dict]) -> list[str]:
        pq.write_table(pa.Table.from_pylist(rows, schema=POOLED_SCHEMA), tmp_path / "pooled.parquet")
        lines = format_summary(tmp_path).splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("---")) - 1 :]

    lines = table([row("a", 0.1), row("b", 0.1)])
    assert "csr [95% CI] (judge κ=0.10 < 0.4: not valid)  judge κ" in lines[0]
    cells = [re.split(r"\s{2,}", line) for line in lines]
    assert cells[0][cells[0].index("judge κ") - 1] == "csr [95% CI] (judge κ=0.10 < 0.4: not valid)"
    assert all(
        c[cells[0].index("judge κ") - 1 :][:2] == ["0.50 [0.25, 0.75]", "0.10 < 0.4: not valid"]
        for c in cells[2:]
    )
    lines = table([row("a", 0.62), row("b", 0.05)])  # a probe judge: one kappa per model
    assert "csr [95% CI] (judge κ < 0.4 in some rows: not valid there)" in lines[0]
    cells = [re.split(r"\s{2,}", line) for line in lines]
    assert [c[cells[0].index("judge κ")] for c in cells[2:]] == ["0.62", "0.05 < 0.4: not valid"]
    lines = table([row("a", None)])
    assert "csr [95% CI] (judge not validated on labelled answers)  judge κ" in lines[0]
    assert "not validated" in lines[2]
    page = write_report(tmp_path).read_text()
    assert (
        "<th>csr (judge not validated on labelled answers)</th><th>csr_lo</th><th>csr_hi</th><th>judge κ</th>"
        in page
    )


class _Worker:
    """The part of a model worker the agreement shard uses, with ModelWorker's own judge and chat methods
    (a ModelWorker itself would look for Ray to name its node)."""

    def __init__(self, cfg, judge, tiny) -> None:
        from conva.workers.tasks import WorkerSpec

        self.spec, self.cfg, self._tiny = WorkerSpec(cfg, judge=judge), cfg, tiny
        self._judge = self._local_chat = None
        self.loads = 0

    def hf(self):
        return self._tiny

    def bundles(self, where) -> dict:
        return {}

    from conva.workers.worker import ModelWorker

    judge, _chat = ModelWorker.judge, ModelWorker._chat


def test_agreement_stage_validates_the_judge_on_labelled_answers(tmp_path, tiny_path, tiny) -> None:
    """The agreement shard, as a worker runs it: per-value and '*' rows with the judge's kappa on the labels.
    The local LLM judge is the worker's own model when judge.model names it (a random model: garbage
    verdicts, one per answer; the figures are checked against validate_per_value on the same judge)."""
    from conva.batch.config import load_config
    from conva.batch.schemas import SCHEMA_VERSION
    from conva.batch.storage import location
    from conva.batch.store import Stage
    from conva.judge_validation import load_labelled, validate_per_value
    from conva.judges import JudgeSettings
    from conva.workers.shards import agreement
    from conva.workers.tasks import ShardTask
    from tests.test_judges import write_labels

    labels = write_labels(tmp_path / "labels")
    labelled = load_labelled(labels)
    cfg = load_config(None, [f"--model.name={tiny_path}", '--data.values=["power", "benevolence"]'])
    root = location(tmp_path / "out")

    def run(name: str, judge: JudgeSettings) -> tuple[list[dict], _Worker]:
        stage = Stage.open(root, name, {"t": name}, SCHEMA_VERSION, n_shards=1)
        worker = _Worker(cfg, judge, tiny)
        assert stage.commit(agreement(worker, ShardTask("agreement", stage.ref(0, "a"))))
        return pq.read_table(tmp_path / "out" / name / "part-00000.parquet").to_pylist(), worker

    for name, judge in (
        ("classifier", JudgeSettings(kind="classifier", labels=str(labels))),
        (
            "llm",
            JudgeSettings(kind="llm", backend="local", model=tiny_path, max_tokens=2, labels=str(labels)),
        ),
    ):
        rows, worker = run(name, judge)
        assert [r["value"] for r in rows] == ["power", "benevolence", "*"]
        power, benevolence, star = rows
        expected = validate_per_value(worker._judge, labelled, values=["power", "benevolence"])["*"]
        assert (star["kappa"], star["auc"]) == (
            pytest.approx(expected.kappa, nan_ok=True),
            pytest.approx(expected.auc, nan_ok=True),
        )
        assert (star["n_labelled"], star["n_unclear"], star["n_ab"], star["scope"]) == (
            7,
            1,
            5,
            "all models' answers",
        )
        assert (power["n_labelled"], benevolence["n_labelled"]) == (
            7,
            0,
        )  # the fixture's answers are all power
        assert star["agreement"] is None and power["agreement"] is not None and star["judge"] == name
    assert worker._local_chat is not None and worker.loads == 0  # the llm judge ran on the worker's own model
    rows, _ = run(
        "unlabelled", JudgeSettings(kind="classifier", labels="")
    )  # no labels: the held-out pairs only
    assert [r["value"] for r in rows] == ["power", "benevolence"] and rows[0]["kappa"] is None
