"""The benchmark suite runs end to end: the runner and its quick mode's isolation, the figures the benchmarks compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]


def test_report_renders_every_committed_results_file(tmp_path):
    """Each results file in the repository renders (its section, machine line and table) into the block."""
    block = report.render()
    present = [name for name, *_ in report.SECTIONS if (report.RESULTS / f"{name}.json").exists()]
    assert present, "the repository keeps its benchmark results"
    for name, title, *_ in report.SECTIONS:
        assert (f"### {title}" in block) == (name in present)
    assert ("### Scaling model" in block) == ("scaleout" in present)
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Results\n\nA reading.\n\n{report.BEGIN}\nstale\n{report.END}\n\nMore reading.\n")
    report.update(doc)
    text = doc.read_text()
    assert "stale" not in text and text.count(report.BEGIN) == 1
    assert text.startswith("# Results\n\nA reading.") and text.rstrip().endswith("More reading.")


def _quick(*names: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``python -m benchmarks --quick NAMES``: its output and the folder its results went to."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    quick = [
        Path(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("quick results in")
    ]
    assert quick, proc.stdout[-2000:]
    return proc, quick[0]


@pytest.mark.slow
def test_quick_commit_benchmark_through_the_runner():
    """``python -m benchmarks --quick commit``: every shard of every run is committed and its stage reopens whole
    (the benchmark checks both), the log holds exactly what compaction leaves, the table renders, and neither
    ``results/`` nor ``RESULTS.md`` is touched."""
    before = {p: p.read_bytes() for p in [report.DOC, *report.RESULTS.glob("*.json")]}
    proc, quick = _quick("commit")
    commit = json.loads((quick / "commit.json").read_text())
    assert commit["compact_every"] == 50
    for where, sizes in (("local", [20, 200, 20]), ("s3", [20, 20])):
        runs = commit[where]["runs"]
        assert [x["shards"] for x in runs] == sizes
        # The open and begin records and n commits, a segment every 50 records and one at finish (their single
        # records deleted), then the reopening's open record: one segment and a record at n = 20; at n = 200
        # the segments of records 50, 100, 150, 200 and 202, and record 203.
        assert [x["log_objects_after"] for x in runs] == [2 if n == 20 else 6 for n in sizes]
    assert "| local disk | 200 |" in proc.stdout and "| S3 (moto, loopback) | 20 |" in proc.stdout
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_fit_benchmark_streams_under_a_memory_cap(tmp_path):
    """The workers' fit function fits ten values of a synthetic activation store in a memory-capped process;
    the activations are separable by construction, so a misaligned read would show (accuracy about 0.5)."""
    env = {**os.environ, "CONVA_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_fit",
            "--skip-model",
            "--synthetic-gb",
            "0.1",
            "--cap-gb",
            "0.8",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    fit = json.loads((tmp_path / "fit.json").read_text())["synthetic"]
    assert not fit.get("failed"), fit
    assert fit["values"] == 10 and fit["layers"] == 24 and fit["texts"] >= 500
    assert fit["best_held_out_acc_min"] >= 0.9
    assert fit["peak_rss_mb"] > fit["rss_after_imports_mb"] > 0
    assert "A worker's memory" in report.fit(json.loads((tmp_path / "fit.json").read_text()))


def test_busy_fraction_is_the_time_every_worker_works():
    """Every worker busy: the intersection of the workers' merged intervals over the window (closed form)."""
    from benchmarks.common import busy_fraction

    # a: [0, 4] and [3, 7] merge to [0, 7]; b: [2, 5] and [6, 12] (clipped to 10); together [2, 5] and [6, 7].
    f = busy_fraction([("a", 0, 4), ("b", 2, 5), ("a", 3, 7), ("b", 6, 12)], 0, 10)
    assert f == {"all": 0.4, "per_worker": {"a": 0.7, "b": 0.7}, "mean": 0.7}
    # A third worker that never got to work (still starting): nobody-idle time is zero, its share counts as 0.
    g = busy_fraction([("a", 0, 4), ("b", 2, 5), ("a", 3, 7), ("b", 6, 12)], 0, 10, workers=3)
    assert g["all"] == 0.0 and g["mean"] == round(1.4 / 3, 6)


@pytest.mark.slow
def test_gpu_script_cpu_smoke_and_its_table(tmp_path):
    """The prepared device script runs end to end on a tiny shape (Inductor on CPU), its compiled steered
    rows equal HF's, and its JSON renders into the RESULTS.md block like any other benchmark's."""
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--cpu-smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    rows = {row["what"]: row for row in r["rows"]}
    assert not any("skipped" in row["note"] for row in r["rows"])
    tok_s = {what: row["tokens_per_s"] for what, row in rows.items()}
    # Each ratio is the quotient of the throughputs it names, in the same run.
    assert rows["extraction, all layers to CPU"]["ratio"] == pytest.approx(
        tok_s["extraction, all layers to CPU"] / tok_s["plain forward (base model)"], rel=1e-9
    )
    assert rows["HF eager, steered"]["ratio"] == pytest.approx(
        tok_s["HF eager, steered"] / tok_s["HF eager, plain"], rel=1e-9
    )
    assert rows["fast (compiled), steered"]["ratio"] == pytest.approx(
        tok_s["fast (compiled), steered"] / tok_s["fast (compiled), plain"], rel=1e-9
    )
    roofline = tok_s["HF eager, plain"] / rows["HF eager, plain"]["ratio"]
    assert rows["fast (compiled), plain"]["ratio"] == pytest.approx(
        tok_s["fast (compiled), plain"] / roofline
    )
    assert rows["fast (compiled), steered / roofline"]["ratio"] == pytest.approx(
        tok_s["fast (compiled), steered"] / roofline
    )
    assert "rows = HF tokens: 1.00" in rows["fast (compiled), steered / roofline"]["note"]
    table = report.gpu(r)
    assert "| tiny | fast (compiled), steered | 8 |" in table and table.count("\n| tiny |") == len(r["rows"])


def test_scaling_model_from_the_measured_components():
    """Serial fraction = (1-worker wall - its shard work) / wall; E(N) = 1 / (s·N + 1 - s); the driver's ceiling t / c."""
    stage = lambda work: {"worker_s": work}  # noqa: E731
    scaleout = {
        "runs": [
            {
                "workers": 1,
                "wall_s": 100.0,
                "to_first_busy_s": 6.0,
                "load_s": 2.0,
                "stages": {"extract": stage(60.0), "fit": stage(10.0), "steer": stage(20.0)},
            }
        ],
        "efficiency": {"2": {"job_wall": 0.9}},
    }
    commit = {"local": {"ms_per_shard_largest": 10.0}, "s3": {"ms_per_shard_largest": 50.0}}
    text = report.scaling({"scaleout": scaleout, "commit": commit})
    # serial 10 s of 100: s = 0.1; E(2) = 1/1.1, E(8) = 1/1.7, E(64) = 1/7.3, E(256) = 1/26.5.
    assert "serial 10.0 s" in text and "between and after the shards 2.0 s" in text and "s = 0.100" in text
    assert "| 0.91 | 0.59 | 0.14 | 0.04 |" in text and "| measured, this job | 0.90 |" in text
    # 10 ms a commit: 100, 500 and 3,000 workers fed for 1, 5 and 30 s shards; 50 ms: 20, 100, 600.
    assert "| local disk | 10.0 | 100 | 500 | 3,000 |" in text and "| 50.0 | 20 | 100 | 600 |" in text
    assert report.scaling({"commit": commit}) is None


def test_judges_benchmark_on_hand_made_labels(tmp_path, tiny_path):
    """bench_judges on a labelled fixture: every judge kind (the tiny random model as the probe's model and as
    the local LLM judge: its figures are garbage, its plumbing is what runs), and reader B's ceiling."""
    from benchmarks.bench_judges import main
    from conva.judge_validation import load_labelled, validate_judge
    from conva.judges import JudgeSettings, make_judge
    from tests.test_judges import LABELLED, write_labels

    rows = [(i, tiny_path if m == "smollm2" else m, a, b, v) for i, m, a, b, v in LABELLED]
    labels = write_labels(tmp_path / "labels", rows)
    out = tmp_path / "judges.json"
    argv = ["--labels", str(labels), "--probe-models", tiny_path, "--llm-models", tiny_path]
    main([*argv, "--max-tokens", "2", "--n-boot", "50", "--out", str(out)])
    report = json.loads(out.read_text())
    judges = report["judges"]
    assert list(judges) == ["classifier", "probe:llama", "llm:llama", "reader_b"]
    assert (report["n_answers"], report["n_reader_b"], report["values"]) == (8, 6, ["power"])
    classifier = validate_judge(make_judge(JudgeSettings(), values=["power"]), load_labelled(labels))
    c = judges["classifier"]
    assert (c["n"], c["n_unclear"]) == (7, 1) and c["kappa"] == pytest.approx(classifier.kappa, nan_ok=True)
    assert set(c["by_model"]) == {"llama", "gemma-3-270m"} and c["by_model"]["llama"]["n"] == 4
    assert (judges["probe:llama"]["n"], judges["probe:llama"]["scope"]) == (4, "llama answers only")
    assert judges["llm:llama"]["n"] == 7 and judges["llm:llama"]["judge_unclear"] <= 7
    # Reader B held to reader A as a judge is: on a1-a4 and a6 (a5: A unclear), kappa 1/3, as kappa_ab says.
    b = judges["reader_b"]
    assert (b["n"], b["kappa"], b["kappa_ab"]) == (5, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert b["kappa_ci"][0] <= 1 / 3 <= b["kappa_ci"][1]
