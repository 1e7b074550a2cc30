"""Study configs, cells, the one steering table, the summary's arithmetic, and a two-cell study end to end."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conva.config import ConfigError
from conva.pipeline import row_spec
from conva.study import (RESULT_SCHEMA, expand_cells, load_study, model_config, steering_table, summarize,
                         utility_cells)
from conva.values import VALUES

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_study.toml"


def test_demo_study_config_expands_to_its_cells(tmp_path) -> None:
    study = load_study(DEMO)
    cells = expand_cells(study, "smollm2")
    assert len(cells) == len(VALUES) * 4 and {c.method for c in cells} == {"conva", "caa", "prompt", "none"}
    assert len(utility_cells(study, "smollm2")) == 1 + len(VALUES) * 3  # one unsteered MC cell per model
    sweep = load_study(DEMO, ["--study.p0=[0.9, 0.99]", '--study.bands=["auto", "10-20"]', '--study.settings=["plain", "opposite"]'])
    per_value = {m: sum(c.method == m for c in expand_cells(sweep, "smollm2")) // len(VALUES) for m in sweep.study.methods}
    assert per_value == {"conva": 2 * 2 * 2, "caa": 2 * 2, "prompt": 2, "none": 2}
    strengths = load_study(DEMO, ["--study.caa_strengths=[0.25, 0.5, 1.0]"])
    assert sum(c.method == "caa" for c in expand_cells(strengths, "smollm2")) == 3 * len(VALUES)
    for bad, key in ((["--study.methods=[\"lora\"]"], "study.methods"), (["--study.p0=[1.0]"], "study.p0"),
                     (["--study.bands=[\"x\"]"], "study.bands"), (["--study.caa_strengths=[0]"], "study.caa_strengths"), (["--judge.kind=oracle"], "judge.kind"),
                     (["--model.name=x"], "model.name"), (["--judge.kind=llm"], "judge.base_url")):
        with pytest.raises(ConfigError, match=key):
            load_study(DEMO, bad)


def test_one_steering_table_carries_each_cells_overrides(tiny_bundles) -> None:
    study = load_study(DEMO, ['--data.values=["power"]', "--data.max_prompts_per_value=2", '--study.bands=["auto", "1-2"]',
                              '--study.methods=["conva", "caa", "none"]', '--study.settings=["plain", "opposite"]'])
    cfg = model_config(study, "smollm2", "/tmp/x")
    cells = expand_cells(study, "smollm2")
    table = steering_table(cfg, cells)
    assert table.num_rows == 2 * len(cells) and len(set(table.column("row_id").to_pylist())) == table.num_rows
    bundle = tiny_bundles[0]
    for row in table.to_pylist():
        spec = row_spec(cfg, bundle, row)
        assert (spec.method, spec.setting) == (row["method"], row["setting"]) and row["row_id"].startswith(row["cell_id"])
        if row["method"] == "conva":
            assert spec.target() == 0.99 and spec.layers() == (tuple(row["band"]) if row["band"] else bundle.band)
        if row["method"] == "caa":
            assert spec.strength in study.study.caa_strengths and f"s={spec.strength:g}" in row["cell_id"]


def _result(cell: str, method: str, score: float, ppl: float, prompt: str, gate: bool | None = None) -> dict:
    return dict(cell_id=cell, row_id=f"{cell}#{prompt}", model="m", value="power", method=method,
                p0=0.99 if method == "conva" else None, band="auto" if method == "conva" else "-", setting="plain",
                strength=None, prompt=prompt, output="x", n_output_tokens=1, gate_open=gate, gate_score=None,
                eps_mean=None, judge="classifier", judge_score=score, judge_prob=None, judge_raw=None, ppl=ppl,
                fluency=None, error=None)


def test_summary_arithmetic_on_known_rows() -> None:
    conva, none = "m|power|conva|p0=0.99|band=auto|plain", "m|power|none|p0=-|band=-|plain"
    rows = [_result(conva, "conva", 1.0, 8.0, "a", True), _result(conva, "conva", 0.5, 2.0, "b", False),
            _result(conva, "conva", 0.0, 4.0, "c", True), _result(none, "none", 0.0, 2.0, "a"),
            _result(none, "none", 0.0, 2.0, "b"), _result(none, "none", 0.0, 4.0, "c")]
    errored = {**_result(conva, "conva", 0.0, 1.0, "d"), "judge_score": None, "ppl": None, "error": "empty prompt"}
    results = pa.Table.from_pylist(rows + [errored], schema=RESULT_SCHEMA)
    utility = pa.table({"cell_id": ["m|*|none|p0=-|band=-"] * 4 + ["m|power|conva|p0=0.99|band=auto"] * 4,
                        "model": ["m"] * 8, "method": ["none"] * 4 + ["conva"] * 4,
                        "correct": [True, True, False, False, True, False, False, False],
                        "gate_open": [False] * 4 + [True, False, False, False]})
    summary = {r["method"]: r for r in summarize(results, utility, {("m", "power"): 0.9}, n_boot=100).to_pylist()}
    c = summary["conva"]
    assert (c["n"], c["n_error"], c["csr"], c["gate_open_rate"]) == (4, 1, 0.5, pytest.approx(2 / 3))
    assert c["ppl_ratio"] == pytest.approx(math.exp((math.log(8) + math.log(2) + math.log(4)) / 3
                                                    - (math.log(2) + math.log(2) + math.log(4)) / 3))
    assert (c["mc_acc"], c["mc_acc_none"], c["utility_ratio"], c["mc_gate_open_rate"]) == (0.25, 0.5, 0.5, 0.25)
    assert c["csr_lo"] <= 0.5 <= c["csr_hi"] and c["judge_agreement"] == 0.9
    assert summary["none"]["ppl_ratio"] == pytest.approx(1.0) and summary["none"]["utility_ratio"] == 1.0


@pytest.fixture(scope="module")
def study_run(tiny_path, tmp_path_factory, ray_session):
    """A two-cell study (ConVA and unsteered, one value) on the tiny model, as one embedded-Ray job."""
    from jobs.study import main

    out = tmp_path_factory.mktemp("study")
    argv = ["--config", str(DEMO), f'--study.models=["{tiny_path}"]', '--study.methods=["conva", "none"]',
            '--data.values=["power"]', "--data.max_prompts_per_value=3", "--fit.band=1-3", "--steer.max_new_tokens=4",
            "--utility.max_items=4", "--ray.num_workers=1", "--ray.rows_per_shard=4", f"--output.dir={out}"]
    assert main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_two_cell_study_writes_results_and_a_report(study_run, capsys) -> None:
    out, _ = study_run
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert len(results) == 2 * 3 and {r["method"] for r in results} == {"conva", "none"}
    assert all(r["error"] is None and r["judge_score"] in (0.0, 1.0) and r["ppl"] > 0 for r in results)
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(summary) == 2 and all(r["mc_acc"] is not None and r["judge_agreement"] is not None for r in summary)
    assert pq.read_table(out / "utility.parquet").num_rows == 2 * 4  # the unsteered cell and the ConVA cell
    pngs = sorted((out / "report").glob("*.png"))
    assert len(pngs) == 5 and all(p.stat().st_size > 1000 for p in pngs)
    assert "<img" in (out / "report" / "index.html").read_text()


@pytest.mark.slow
def test_study_rerun_starts_nothing_and_report_rebuilds_from_parquet(study_run, monkeypatch) -> None:
    from conva.report import main as report_main
    from jobs import runner, study

    out, argv = study_run
    before = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("part-*.parquet")}
    monkeypatch.setattr(runner, "WorkerPool", lambda *a, **k: pytest.fail("a worker was started"))
    monkeypatch.setattr(study, "connect_ray", lambda *a, **k: pytest.fail("Ray was started"))
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "models").rglob("part-*.parquet")} == before
    assert study.main([*argv, "--study.p0=[0.9]"]) == 2  # a changed config is refused, naming the keys
    shutil.rmtree(out / "report")
    assert report_main([str(out / "results.parquet")]) == 0
    assert all(p.stat().st_size > 1000 for p in (out / "report").glob("*.png"))


def _shard_intervals(model_out: Path) -> list[tuple[float, float]]:
    """Actor-side (start, end) of every shard committed under one model's folder, read from the commit logs."""
    import json

    spans = []
    for record in model_out.rglob("_log/*.json"):
        body = json.loads(record.read_text())
        records = [body["record"]] if body.get("op") == "commit" else \
            [r for g in body.get("state", {}).get("gens", []) for r in g["shards"]]
        spans += [(r["worker"]["started"], r["worker"]["finished"]) for r in records if r.get("worker")]
    return spans


@pytest.mark.slow
def test_two_models_run_at_once_and_each_worker_loads_its_model_once(tmp_path_factory, ray_session) -> None:
    """A study of two models × two methods, each model with one worker of its own (both fit on two CPUs)."""
    import json
    import re

    from conva.tiny import make_tiny_model
    from jobs.study import main

    root = tmp_path_factory.mktemp("two")
    a, b = make_tiny_model(root / "alpha", seed=0), make_tiny_model(root / "beta", seed=1)
    out = root / "study"
    models = f'[{{name = "{a}", ray = {{num_workers = 1}}}}, {{name = "{b}", ray = {{num_workers = 1}}}}]'
    argv = ["--config", str(DEMO), f"--study.models={models}", '--study.methods=["conva", "none"]',
            '--data.values=["power"]', "--data.max_prompts_per_value=6", "--fit.band=1-3", "--steer.max_new_tokens=6",
            "--utility.max_items=6", "--ray.rows_per_shard=32", "--ray.steer_rows_per_shard=2", f"--output.dir={out}"]
    assert main(argv) == 0
    log = (out / "run.log").read_text()
    for name in ("alpha", "beta"):
        found = re.findall(rf"\[{name}\] {name}: workers returned \d+ bytes .*model loads per worker: (\{{.*\}})", log)
        assert len(found) == 1 and list(json.loads(found[0]).values()) == [1], found  # one worker, loaded once, all stages
    spans = {name: _shard_intervals(out / "models" / name) for name in ("alpha", "beta")}
    assert len(spans["alpha"]) > 10 and len(spans["beta"]) > 10
    overlapping = [(x, y) for x in spans["alpha"] for y in spans["beta"] if x[0] < y[1] and y[0] < x[1]]
    assert overlapping, "no shard of one model ran while a shard of the other ran"
    results = pq.read_table(out / "results.parquet")
    assert sorted(set(results.column("model").to_pylist())) == ["alpha", "beta"]
    assert results.num_rows == 2 * 2 * 6  # models × methods × prompts, each once


def test_a_models_own_sections_override_the_job_for_it_alone() -> None:
    study = load_study(DEMO, ['--study.models=["smollm2", {name = "smollm2-bf16", model = {dtype = "bfloat16"}, '
                              'ray = {num_workers = 1, num_gpus_per_worker = 0.5}}]'])
    first, second = (model_config(study, m, "/tmp/x") for m in study.study.models)
    assert (first.model.dtype, first.ray.num_workers, first.ray.num_gpus_per_worker) == ("float32", 2, 0.0)
    assert (second.model.dtype, second.ray.num_workers, second.ray.num_gpus_per_worker) == ("bfloat16", 1, 0.5)
    assert second.model.name == "smollm2-bf16" and second.output.dir == "/tmp/x/models/smollm2-bf16"
    assert (first.data, first.probe, first.steer) == (second.data, second.probe, second.steer)
    with pytest.raises(ConfigError, match="may only set model, ray, vllm, steer, extract of its own"):
        load_study(DEMO, ['--study.models=[{name = "m", data = {max_prompts_per_value = 1}}]'])
    with pytest.raises(ConfigError, match=r"study.models \(m\): ray.num_workers: must be at least 1"):
        load_study(DEMO, ['--study.models=[{name = "m", ray = {num_workers = 0}}]'])
    with pytest.raises(ConfigError, match="needs name"):
        load_study(DEMO, ['--study.models=[{ray = {num_workers = 1}}]'])
