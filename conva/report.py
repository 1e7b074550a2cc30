"""A study's report: an HTML page with PNG plots, rebuilt from the study's Parquet files alone.

Reads ``summary.parquet``, ``probes.parquet`` and ``judges.parquet`` from a study folder (or the folder of a
given ``results.parquet``) and writes ``<folder>/report/index.html`` with:

* probe held-out accuracy by layer, per model and value;
* CSR against P0 per method (methods without P0 drawn as flat lines);
* the trade-offs: CSR against the perplexity ratio (fluency) and against the utility ratio;
* gate precision/recall (held-out, from the fit) and open rates on the study's prompts and on the
  multiple-choice questions;
* CSR per value and method, the judge's agreement, and the summary table.

Usage: ``python -m conva.report runs/demo_study`` (or ``conva report runs/demo_study/results.parquet``).
"""

from __future__ import annotations

import html
import math
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["write_report", "format_summary", "method_table", "main"]

_COLORS = {"conva": "tab:red", "conva_nogate": "tab:orange", "caa": "tab:blue", "prompt": "tab:green", "none": "tab:gray"}
_AGG = ["csr", "csr_lo", "csr_hi", "ppl_ratio", "utility_ratio", "mc_acc", "gate_open_rate", "judge_agreement"]


def _folder(path: str | Path) -> Path:
    path = Path(path)
    folder = path.parent if path.suffix == ".parquet" else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: point at a study's output folder or its results.parquet")
    if not (folder / "summary.parquet").is_file():
        raise FileNotFoundError(f"{folder} holds no summary.parquet: point at a study folder or its results.parquet")
    return folder


def method_table(summary: pa.Table) -> list[dict]:
    """Mean over values per (model, method, P0, band, setting): the study's headline rows."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in summary.to_pylist():
        groups[(r["model"], r["method"], r["p0"], r["band"], r["strength"], r["setting"])].append(r)
    out = []
    for (model, method, p0, band, strength, setting), rs in groups.items():
        row = dict(model=model, method=method, p0=p0, band=band, strength=strength, setting=setting, values=len(rs))
        for key in _AGG:
            vals = [r[key] for r in rs if r[key] is not None and not math.isnan(r[key])]
            row[key] = sum(vals) / len(vals) if vals else None
        out.append(row)
    order = list(_COLORS)
    return sorted(out, key=lambda r: (r["model"], r["setting"], order.index(r["method"]) if r["method"] in order else 9,
                                      r["p0"] or 0, r["band"], r["strength"] or 0))


# Settings, not measurements: printed with every digit they have (P0 = 0.99999 must not read as 1).
_EXACT = ("p0", "strength")


def _fmt(x: object, exact: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return repr(x) if exact else f"{x:.3g}"
    return str(x)


def format_summary(summary: pa.Table) -> str:
    """The summary as plain text: one line per (model, method, P0, band, setting), means over values.

    Measurements have three significant digits; the settings P0 and strength are printed exactly.
    """
    cols = ["model", "setting", "method", "p0", "band", "strength", "values", "csr", "csr_lo", "csr_hi", "ppl_ratio",
            "utility_ratio", "gate_open_rate", "judge_agreement"]
    rows = [[_fmt(r[c], c in _EXACT) for c in cols] for r in method_table(summary)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _plt():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter on first use
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


def _probe_plot(probes: pa.Table, path: Path) -> str:
    plt, rows = _plt(), probes.to_pylist()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for value in sorted({r["value"] for r in rows if r["model"] == model}):
            pts = sorted((r["layer"], r["test_acc"]) for r in rows if r["model"] == model and r["value"] == value)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=value)
        ax.set(title=f"{model}: probe held-out accuracy", xlabel="layer", ylabel="accuracy", ylim=(0.3, 1.02))
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _p0_plot(table: list[dict], path: Path) -> str:
    plt = _plt()
    panels = sorted({(r["model"], r["setting"]) for r in table})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, (model, setting) in zip(axes[0], panels):
        rows = [r for r in table if (r["model"], r["setting"]) == (model, setting) and r["csr"] is not None]
        for key in sorted({(r["method"], r["band"], r["strength"] or 0) for r in rows}):
            pts = sorted(((r["p0"], r["csr"]) for r in rows if (r["method"], r["band"], r["strength"] or 0) == key),
                         key=lambda p: p[0] or 0)
            label = key[0] + (f" ({key[1]})" if key[1] != "-" else "") + (f" s={key[2]:g}" if key[2] else "")
            color = _COLORS.get(key[0])
            if pts[0][0] is None:  # no P0: a flat line across the whole axis
                ax.axhline(pts[0][1], color=color, linestyle="--", label=label)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
        ax.set(title=f"{model}, {setting}: CSR vs P0 (mean over values)", xlabel="P0", ylabel="CSR", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    return _save(fig, path)


def _tradeoff_plot(table: list[dict], path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ppl_ratio", "perplexity ratio steered/unsteered (lower is more fluent)"),
                           (axes[1], "utility_ratio", "multiple-choice accuracy / unsteered")):
        for r in table:
            if r["csr"] is None or r[key] is None:
                continue
            ax.scatter(r[key], r["csr"], color=_COLORS.get(r["method"], "black"), s=40)
            tag = r["method"] + (f" {r['p0']:g}" if r["p0"] is not None else "") + (f" s={r['strength']:g}" if r["strength"] else "") \
                + (f" {r['band']}" if r["band"] not in ("-", "auto") else "")
            ax.annotate(tag, (r[key], r["csr"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="lightgray", lw=1)
        xs = [r[key] for r in table if r[key] is not None and r[key] > 0]
        if xs and max(xs) / min(xs) > 10:
            ax.set_xscale("log")  # one collapsed method (e.g. CAA at a large strength) would squash the rest
        ax.set(xlabel=label, ylabel="CSR (mean over values)", ylim=(-0.02, 1.02))
    axes[0].set_title("control vs fluency")
    axes[1].set_title("control vs utility")
    return _save(fig, path)


def _gate_plot(probes: pa.Table, summary: pa.Table, path: Path) -> str:
    plt = _plt()
    gates = {(r["model"], r["value"]): r for r in probes.to_pylist()}
    conva = [r for r in summary.to_pylist() if r["method"] == "conva"]
    keys = sorted(gates)
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(keys)), 4))
    series = [("held-out precision", [gates[k]["gate_precision"] for k in keys]),
              ("held-out recall", [gates[k]["gate_recall"] for k in keys]),
              ("open on study prompts", [_mean([r["gate_open_rate"] for r in conva if (r["model"], r["value"]) == k]) for k in keys]),
              ("open on MC questions", [_mean([r["mc_gate_open_rate"] for r in conva if (r["model"], r["value"]) == k]) for k in keys])]
    width = 0.8 / len(series)
    for j, (name, ys) in enumerate(series):
        ax.bar([i + j * width for i in range(len(keys))], [y if y is not None else 0 for y in ys], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [k[1] for k in keys], rotation=45, ha="right")
    ax.set(title="probe gate: precision / recall and open rates", ylim=(0, 1.3))
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    return _save(fig, path)


def _value_plot(summary: pa.Table, path: Path) -> str:
    plt, rows = _plt(), [r for r in summary.to_pylist() if r["setting"] == "plain"] or summary.to_pylist()
    values = sorted({r["value"] for r in rows})
    keys = sorted({(r["method"], r["p0"] or 0, r["band"], r["strength"] or 0) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(values)), 4))
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ys = [_mean([r["csr"] for r in rows if r["value"] == v and (r["method"], r["p0"] or 0, r["band"], r["strength"] or 0) == key])
              for v in values]
        ax.bar([i + j * width for i in range(len(values))], [y or 0 for y in ys], width, color=_COLORS.get(key[0]),
               alpha=0.5 + 0.5 * (j % 2), label=" ".join(str(k) for k in key if k not in (0, "-")))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(values))], values, rotation=45, ha="right")
    ax.set(title="CSR per value (plain prompts, all models)", ylabel="CSR", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    return _save(fig, path)


def _mean(xs: list) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: str | Path) -> Path:
    """Write ``<study>/report/index.html`` and its PNGs from the study's Parquet files; returns the page's path.

    Side effect: **replaces** the ``report/`` folder's files of the same names.
    """
    folder = _folder(path)
    summary, probes = pq.read_table(folder / "summary.parquet"), pq.read_table(folder / "probes.parquet")
    judges = pq.read_table(folder / "judges.parquet") if (folder / "judges.parquet").is_file() else pa.table({})
    out = folder / "report"
    out.mkdir(exist_ok=True)
    table = method_table(summary)
    images = [("Probe accuracy by layer", _probe_plot(probes, out / "probe_accuracy.png")),
              ("CSR against P0", _p0_plot(table, out / "csr_vs_p0.png")),
              ("Control against fluency and utility", _tradeoff_plot(table, out / "tradeoff.png")),
              ("Gate precision / recall", _gate_plot(probes, summary, out / "gate.png")),
              ("CSR per value", _value_plot(summary, out / "csr_by_value.png"))]
    parts = [f"<h1>ConVA study: {html.escape(folder.name)}</h1>",
             "<p>CSR: mean judge score over all prompts (gated-off included), 95% percentile bootstrap CI. "
             "ppl_ratio: geometric-mean perplexity of the answers under the unsteered model, relative to the "
             "unsteered answers. utility_ratio: multiple-choice accuracy with steering and gate active, relative "
             "to the unsteered model. judge_agreement: the judge's agreement on held-out labelled pairs.</p>",
             "<h2>Summary (mean over values)</h2>", _html_table(table)]
    parts += [f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>" for title, name in images]
    parts += ["<h2>Judge agreement</h2>", _html_table(judges.to_pylist()),
              "<h2>Every cell</h2>", _html_table(summary.to_pylist())]
    style = "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}" \
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style>"
    page = out / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>ConVA study</title>{style}</head>"
                    f"<body>{''.join(parts)}</body></html>", encoding="utf-8")
    return page


def write_report_to(out) -> str:
    """:func:`write_report` for a study output on any storage (a :class:`conva.storage.Location`); returns the page's URI.

    The Parquet files are copied to a temporary folder, the report is built there and its files are
    written back under ``<out>/report/`` (**replacing** files of the same names).
    """
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="conva-report-"))
    try:
        for name in ("summary", "probes", "judges"):
            source = out.child(f"{name}.parquet")
            if source.exists():
                (tmp / f"{name}.parquet").write_bytes(source.read_bytes())
        page = write_report(tmp)
        for f in sorted(page.parent.iterdir()):
            out.child("report", f.name).write_bytes(f.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.child("report", "index.html").uri


def main(argv: list[str] | None = None) -> int:
    """``conva report <study folder | results.parquet>``: rebuild the report; prints the page's path."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: conva report <study folder | results.parquet>", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from conva.storage import is_uri, location

    try:
        if is_uri(argv[0]):
            out = location(argv[0].removesuffix("/results.parquet"))
            if not out.child("summary.parquet").exists():
                what = "holds no summary.parquet" if out.list() else "does not exist (or is empty)"
                raise FileNotFoundError(f"{out} {what}: point at a study's output")
            page = write_report_to(out)
            summary = pq.read_table(pa.BufferReader(out.child("summary.parquet").read_bytes()))
        else:
            local = write_report(argv[0])
            page, summary = str(local), pq.read_table(local.parent.parent / "summary.parquet")
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"conva report: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
