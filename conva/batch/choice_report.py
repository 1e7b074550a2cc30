"""The forced-choice part of a study's summary and report: the specificity table, its sentences, the heat maps.

Reads ``specificity.parquet``, ``cross_value.parquet`` and ``cosines.parquet`` of a study folder
(:mod:`conva.batch.specificity`); :func:`forced_choice_text` is what ``conva study`` prints first,
:func:`forced_choice_html` the report's section (with ``cross_value.png``, the matrix as heat maps, and
``cosines.png``, the cosine between values' vectors by layer).
"""

from __future__ import annotations

import html
import math
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from conva.batch.specificity import specificity_sentence

__all__ = ["forced_choice_text", "forced_choice_html", "FC_NOTE"]

FC_NOTE = (
    "Forced choice, judge-free: each yes/no prompt (half have 'no' as the value's side) asked with 'Answer yes "
    "or no.'; the figure is the log-odds of the value's side at the first answer token. Every figure is a "
    "paired shift against the unsteered model on the same prompt, in log-odds, mean over the n prompts of "
    "all values [95% bootstrap interval over prompts, stratified by value]. own: the prompts' own value's "
    "vector; other: the other studied values' vectors (mean); specific = own - other; random: ConVA's "
    "per-row step size along a random direction; gated: own ConVA with its gate. All but 'gated' are "
    "ungated. fc csr: share of prompts on the value's side, unsteered -> own vector. yes push: the own "
    "vector's shift in the log-odds of 'yes' whatever the value's side (a generic yes/no direction)."
)


def _read(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def _ci(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:+.2f} [{r[f'{key}_lo']:+.2f}, {r[f'{key}_hi']:+.2f}]"


def _setting(r: dict) -> str:
    return f"{r['method']} P0 {r['p0']:g}" if r["p0"] is not None else f"{r['method']} s={r['strength']:g}"


def _rows(spec: list[dict]) -> list[dict[str, str]]:
    return [
        {
            "model": r["model"],
            "steering": _setting(r),
            "n": str(r["n"]),
            "fc csr": f"{r['fc_csr_none']:.2f} -> {r['fc_csr']:.2f}" if r["fc_csr"] is not None else "-",
            "own": _ci(r, "own"),
            "other": _ci(r, "other"),
            "specific": _ci(r, "specific"),
            "random": _ci(r, "random"),
            "gated": _ci(r, "gated"),
            "yes push": _ci(r, "yes_push"),
            "gate open": "-" if r["gate_open"] is None else f"{r['gate_open']:.2f}",
        }
        for r in spec
    ]


def _cosine_lines(cosines: list[dict]) -> list[str]:
    """Per model: the mean cosine between different values' vectors at the middle probed layer."""
    out = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in cosines:
        by_model[r["model"]].append(r)
    for model, rows in sorted(by_model.items()):
        layers = sorted({r["layer"] for r in rows})
        mid = layers[len(layers) // 2]
        parts = []
        for kind in ("probe", "caa"):
            xs = [
                r["cosine"]
                for r in rows
                if r["layer"] == mid and r["kind"] == kind and r["cosine"] is not None
            ]
            if xs:
                parts.append(f"{kind} {np.mean(xs):.2f} (range {min(xs):.2f} to {max(xs):.2f})")
        out.append(f"{model}: mean cosine between values' vectors at layer {mid}: " + "; ".join(parts))
    return out


def forced_choice_text(folder: str | Path) -> str:
    """The specificity table as plain text, one sentence per row, and the cosine lines; '' when none."""
    folder = Path(folder)
    spec = _read(folder, "specificity")
    if not spec:
        return ""
    rows = _rows(spec)
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]

    def line(xs: list[str]) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()

    out = ["forced choice (judge-free; log-odds of the value's side, paired against unsteered)"]
    out += textwrap.wrap(FC_NOTE, 110) + [""]
    out += [line(cols), line(["-" * w for w in widths]), *(line([r[c] for c in cols]) for r in rows), ""]
    out += [specificity_sentence(r) for r in spec]
    out += _cosine_lines(_read(folder, "cosines"))
    return "\n".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix_plot(cross: list[dict], path: Path) -> str | None:
    """One heat map per (model, steering setting): rows the vector's value, columns the prompts' value."""
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in cross:
        panels[(r["model"], r["method"], r["p0"] or 0.0, r["strength"] or 0.0)].append(r)
    if not panels:
        return None
    models = sorted({k[0] for k in panels})
    settings = sorted({k[1:] for k in panels})
    plt = _plt()
    fig, axes = plt.subplots(
        len(models), len(settings), figsize=(2.9 * len(settings), 2.9 * len(models)), squeeze=False
    )
    top = max(abs(r["shift"]) for r in cross if r["shift"] is not None and math.isfinite(r["shift"])) or 1.0
    for i, model in enumerate(models):
        for j, setting in enumerate(settings):
            ax, rows = axes[i][j], panels.get((model, *setting), [])
            values = sorted({r["value"] for r in rows} | {r["vector"] for r in rows})
            grid = np.full((len(values), len(values)), np.nan)
            for r in rows:
                grid[values.index(r["vector"]), values.index(r["value"])] = r["shift"]
            ax.imshow(grid, cmap="RdBu", vmin=-top, vmax=top)
            ax.set_xticks(range(len(values)), [v[:5] for v in values], rotation=90, fontsize=7)
            ax.set_yticks(range(len(values)), [v[:5] for v in values], fontsize=7)
            name = f"conva P0 {setting[1]:g}" if setting[0] == "conva" else f"caa s={setting[2]:g}"
            ax.set_title(f"{model}\n{name}", fontsize=8)
            for a in range(len(values)):
                for b in range(len(values)):
                    if not np.isnan(grid[a, b]):
                        ax.text(b, a, f"{grid[a, b]:+.1f}", ha="center", va="center", fontsize=6)
            if j == 0:
                ax.set_ylabel("vector of", fontsize=8)
            ax.set_xlabel("prompts of", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _cosine_plot(cosines: list[dict], path: Path) -> str | None:
    """Mean cosine between different values' vectors by layer, probe and CAA, one line per model."""
    if not cosines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    by: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in cosines:
        if r["cosine"] is not None:
            by[(r["model"], r["kind"])][r["layer"]].append(r["cosine"])
    for (model, kind), layers in sorted(by.items()):
        xs = sorted(layers)
        ax.plot(xs, [np.mean(layers[x]) for x in xs], "-" if kind == "caa" else "--", label=f"{model} {kind}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine, different values")
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def forced_choice_html(folder: str | Path, out: Path) -> str:
    """The report's forced-choice section (table, sentences, heat maps, cosines); '' for a study without one."""
    folder = Path(folder)
    spec = _read(folder, "specificity")
    if not spec:
        return ""
    rows = _rows(spec)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    parts = [
        "<h2>Forced choice: does the value's own vector move its prompts, more than other values' vectors?</h2>",
        f"<p>{html.escape(FC_NOTE)}</p>",
        f"<table><tr>{head}</tr>{body}</table>",
        "<ul>" + "".join(f"<li>{html.escape(specificity_sentence(r))}</li>" for r in spec) + "</ul>",
    ]
    matrix = _matrix_plot(_read(folder, "cross_value"), out / "cross_value.png")
    if matrix:
        parts.append(
            "<h3>The cross-value matrix: mean shift in the log-odds of the prompts' value (columns) under each "
            f"value's vector (rows)</h3><img src='{matrix}' alt='cross-value matrix'>"
        )
    cosines = _read(folder, "cosines")
    plot = _cosine_plot(cosines, out / "cosines.png")
    if plot:
        lines = "".join(f"<li>{html.escape(x)}</li>" for x in _cosine_lines(cosines))
        parts.append(
            f"<h3>How alike are the values' vectors?</h3><ul>{lines}</ul><img src='{plot}' alt='cosines'>"
        )
    return "".join(parts)
