"""The benchmark suite runs end to end: the runner, its quick mode's isolation, the fit benchmark's figures."""

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
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Results\n\nA reading.\n\n{report.BEGIN}\nstale\n{report.END}\n\nMore reading.\n")
    report.update(doc)
    text = doc.read_text()
    assert "stale" not in text and text.count(report.BEGIN) == 1
    assert text.startswith("# Results\n\nA reading.") and text.rstrip().endswith("More reading.")


@pytest.mark.slow
def test_quick_fit_benchmark_through_the_runner():
    """``python -m benchmarks --quick fit``: the real fit stage on a synthetic activation store, figures out,
    and neither ``results/`` nor ``RESULTS.md`` touched."""
    before = {p: p.read_bytes() for p in [report.DOC, *report.RESULTS.glob("*.json")]}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "fit"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    quick = [Path(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("quick results in")]
    assert quick, proc.stdout[-2000:]
    fit = json.loads((quick[0] / "fit.json").read_text())["synthetic"]
    assert not fit.get("failed"), fit
    assert fit["values"] == 10 and fit["layers"] == 24 and fit["texts"] >= 500
    # The activations are separable by construction: a misaligned read would fit noise (about 0.5).
    assert fit["best_held_out_acc_min"] >= 0.9
    assert fit["peak_rss_mb"] > fit["rss_after_imports_mb"] > 0
    assert "| synthetic (Gaussian) |" in proc.stdout
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_gpu_script_cpu_smoke_and_its_table(tmp_path):
    """The prepared device script runs end to end on a tiny shape (Inductor on CPU), its compiled steered
    rows equal HF's, and its JSON renders into the RESULTS.md block like any other benchmark's."""
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    rows = {row["what"]: row for row in r["rows"]}
    assert not any("skipped" in row["note"] for row in r["rows"])
    for what in ("plain forward (base model)", "extraction, all layers to CPU", "HF eager, plain", "HF eager, steered",
                 "fast (compiled), plain", "fast (compiled), steered"):
        assert rows[what]["tokens_per_s"] > 0, what
    assert "rows = HF tokens: 1.00" in rows["fast (compiled), steered / roofline"]["note"]
    table = report.gpu(r)
    assert "| tiny | fast (compiled), steered | 8 |" in table and table.count("\n| tiny |") == len(r["rows"])
