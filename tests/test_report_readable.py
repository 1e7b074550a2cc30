"""A report a researcher reads: rounded numbers, example generations beside the unsteered answer, no degenerate plot.

Built from hand-made rows in the study tables' shapes (the real study's report: ``tests/test_study.py``).
"""

from __future__ import annotations

from conva.batch import plots, report


def _row(method: str, index: int, output: str, gate_open: bool | None = True, **extra) -> dict:
    return dict(
        model="m",
        value="power",
        setting="plain",
        method=method,
        p0=extra.get("p0"),
        strength=extra.get("strength"),
        band="auto",
        row_id=f"{method}-cell#{index:04d}",
        prompt=f"prompt {index}",
        output=output,
        gate_open=gate_open,
        error=None,
    )


def test_example_generations_put_the_steered_answer_beside_the_unsteered_one() -> None:
    results = [
        _row("none", 0, "plain 0", None),
        _row("none", 1, "plain 1", None),
        _row("none", 2, "plain 2", None),
        _row("conva", 0, "steered 0", False, p0=0.99),
        _row("conva", 1, "steered 1", True, p0=0.99),
        _row("conva", 2, "steered 2", True, p0=0.99),
        _row("caa", 2, "caa 2", True, strength=0.25),
    ]
    rows = report.example_rows(results)
    assert [
        (r["cell"], r["prompt"], r["gate open"], r["steered answer"], r["unsteered answer"]) for r in rows
    ] == [
        ("caa s=0.25 plain", "prompt 2", "yes", "caa 2", "plain 2"),
        ("conva 0.99 plain", "prompt 1", "yes", "steered 1", "plain 1"),  # prompts whose gate opened first
        ("conva 0.99 plain", "prompt 2", "yes", "steered 2", "plain 2"),
    ]


def test_numbers_are_rounded_in_tables_but_p0_and_strength_keep_their_digits() -> None:
    page = report._html_table([{"ppl_ratio": 1.0429098957332406, "p0": 0.99999, "strength": 0.25}])
    assert "<td>1.04</td>" in page and "<td>0.99999</td>" in page and "1.0429" not in page


def test_a_utility_plot_whose_points_coincide_is_a_sentence(tmp_path) -> None:
    pooled = [dict(csr=c, utility_ratio=1.0) for c in (0.2, 0.5)]
    said = plots.utility_plot(pooled, tmp_path / "utility.png")
    assert said == (
        "Every cell's multiple-choice accuracy equals the unsteered model's (utility ratio 1): no steering "
        "setting changed an answer."
    )
    assert not (tmp_path / "utility.png").exists()
