"""A study's report: an HTML page with PNG plots, rebuilt from the study's Parquet files alone.

Reads ``pooled.parquet``, ``matched.parquet``, ``summary.parquet``, ``probes.parquet``, ``judges.parquet``
and ``study.json`` from a study folder (or the folder of a given ``results.parquet``) and writes
``<folder>/report/index.html`` with:

* the choices the study made (gate, what it gates, where prefixes go, splits, bootstrap, judge);
* the pooled summary: per model, method, P0, band, strength and setting, CSR with a bootstrap interval
  over **all** the row's prompts, and the perplexity ratio with its own interval;
* the CSR-vs-perplexity **frontier** per method (ConVA's P0 sweep, CAA's strength sweep, prompting,
  unsteered), both intervals drawn, and ConVA against CAA and prompting at matched fluency;
* CSR against P0, CSR against utility, probe accuracy by layer (validation and test), the gates'
  held-out figures and open rates, CSR per value, probe non-convergence, the judge's agreement.

Usage: ``python -m conva.batch.report runs/demo_study`` (or ``conva report runs/demo_study/results.parquet``).
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conva.batch import plots
from conva.batch.choice_report import forced_choice_html, forced_choice_text
from conva.batch.summary import OUTPUT_FILES as _STUDY_FILES
from conva.judge_validation import KAPPA_VALID, kappa_note

__all__ = ["write_report", "format_summary", "study_choices", "main"]

_SUMMARY_COLS = [
    "model",
    "setting",
    "method",
    "p0",
    "band",
    "strength",
    "values",
    "n",
    "csr",
    "csr_lo",
    "csr_hi",
    "csr_diff",
    "csr_diff_lo",
    "csr_diff_hi",
    "ppl_ratio",
    "ppl_ratio_lo",
    "ppl_ratio_hi",
    "ppl_plain_ratio",
    "utility_ratio",
    "gate_open_rate",
    "mc_gate_open_rate",
    "judge_agreement",
]
_CI_NOTE = (
    "csr: mean judge score over all the row's prompts (every value, gated-off ones included); csr_lo/csr_hi: "
    "95% percentile bootstrap over those n prompts. csr_diff: mean paired difference against the unsteered "
    "answer to the same prompt, same bootstrap. ppl_ratio: geometric-mean perplexity of the answers "
    "under the unsteered model, given the context each was generated from, relative to the unsteered "
    "answers (ppl_ratio_lo/hi: bootstrap over the same prompts); ppl_plain_ratio: the same given the plain "
    "prompt. utility_ratio: multiple-choice accuracy with steering and gate active / unsteered. "
    "gate_open_rate: share of the rows whose gate was read that it opened (mc_: on the multiple-choice "
    "questions). judge_agreement: the judge's agreement on held-out labelled pairs."
)


_KAPPA_NOTE = (
    "agreement/pairwise: the judge on held-out labelled statement pairs. kappa, auc: the judge against "
    "reader A's labels of real model answers (value '*': every value at once; that kappa is the one shown "
    "beside every CSR): answers A called unclear are left out (n_unclear), a judge's own unclear verdict "
    "(0.5) counts as a third category that agrees with neither yes nor no; auc ranks by the judge's "
    f"probability. kappa_ab: reader B against reader A on n_ab answers, the ceiling. A judge with kappa < "
    f"{KAPPA_VALID:g} is not valid: the CSRs it gives measure the judge, not the steering. scope: a probe "
    "judge reads one model, so it is validated on that model's answers only."
)


def _kappa_cell(kappa: float | None) -> str:
    if kappa is None or not math.isfinite(kappa):
        return "not validated"
    return f"{kappa:.2f}" + (f" < {KAPPA_VALID:g}: not valid" if kappa < KAPPA_VALID else "")


def _with_judge_kappa(rows: list[dict], pooled: list[dict], csr: str, after: str) -> list[dict]:
    """``rows`` (one per pooled row) with a ``judge κ`` column after ``after``, and the ``csr`` column's header
    saying the judge's κ, and that it is not valid where κ < 0.4 (``csr [95% CI] (judge κ=0.10 < 0.4: not valid)``)."""
    kappas = [r.get("judge_kappa") for r in pooled]
    notes = {kappa_note(k) for k in kappas}
    if len(notes) == 1:
        header = f"{csr} ({notes.pop()})"
    elif any(k is not None and math.isfinite(k) and k < KAPPA_VALID for k in kappas):
        header = f"{csr} (judge κ < {KAPPA_VALID:g} in some rows: not valid there)"
    else:
        header = f"{csr} (judge κ: see its column)"
    out = []
    for row, kappa in zip(rows, kappas):
        new: dict = {}
        for key, value in row.items():
            new[header if key == csr else key] = value
            if key == after:
                new["judge κ"] = _kappa_cell(kappa)
        out.append(new)
    return out


def _folder(path: str | Path) -> Path:
    path = Path(path)
    folder = path.parent if path.suffix == ".parquet" else path
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: point at a study's output folder or its results.parquet"
        )
    if not (folder / "pooled.parquet").is_file():
        raise FileNotFoundError(
            f"{folder} holds no pooled.parquet: point at a study folder or its results.parquet"
        )
    return folder


def _read(folder: Path, name: str) -> pa.Table:
    path = folder / f"{name}.parquet"
    return pq.read_table(path) if path.is_file() else pa.table({})


# Settings, not measurements: printed with every digit they have (P0 = 0.99999 must not read as 1).
_EXACT = ("p0", "strength")


def _fmt(x: object, exact: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return repr(x) if exact else f"{x:.3g}"
    return str(x)


def study_choices(folder: str | Path) -> list[tuple[str, str]]:
    """The choices a study made, as ``(setting, value)`` lines, from its ``study.json`` (empty if absent)."""
    path = Path(folder) / "study.json"
    if not path.is_file():
        return []
    s = json.loads(path.read_text())
    job, g, p = s["job"], s["job"]["gate"], s["job"]["probe"]
    gate = (
        g["kind"]
        if g["kind"] != "probe"
        else (
            f"probe, value-specific ({g.get('negatives', 'unrelated+other_values')} texts as negatives), threshold "
            f"to {g['target']} >= {g.get(g['target'], g.get('target_value'))} on a calibrate split "
            f"({g['calibrate_size']:g} of pairs), "
            f"figures on a test split ({g['test_size']:g})"
        )
    )
    return [
        ("gate", gate),
        (
            "gate.apply_to",
            f"{g['apply_to']} ({'every method gated alike' if g['apply_to'] == 'all_methods' else 'ConVA only'})",
        ),
        (
            "gate.prefix_on",
            f"{g['prefix_on']} (the opposite setting's prefix on "
            f"{'every row' if g['prefix_on'] == 'all' else 'rows the gate opens only'}); "
            "the gate scores the raw prompt",
        ),
        (
            "probe split",
            f"by {p['split']}: test {p['test_size']:g}, validation {p['val_size']:g} (chooses the band), "
            f"train the rest; band {job['fit']['band']}",
        ),
        (
            "steering",
            f"positions {job['steer']['positions']}, epsilon {job['steer']['epsilon']}, mode {job['steer']['mode']}, "
            f"backend {job['steer']['backend']}, {job['steer']['max_new_tokens']} new tokens",
        ),
        ("judge", _judge_choice(s["judge"])),
        (
            "intervals",
            f"percentile bootstrap, {s['study']['bootstrap']} resamples, seed {s['study']['seed']}",
        ),
        (
            "perplexity",
            "under the unsteered model, given the context the answer was generated from (ppl_plain: "
            "given the plain prompt)",
        ),
    ]


def _judge_choice(j: dict) -> str:
    """The judge as the choices table names it: its kind, an LLM's backend and model, its labelled answers."""
    kind = j["kind"] + (f" ({j.get('backend', 'http')}: {j['model']})" if j["kind"] == "llm" else "")
    labels = j.get("labels", "")
    return kind + (f"; validated on labelled answers ({labels})" if labels else "; not validated")


def _convergence(probes: pa.Table) -> str:
    if probes.num_rows == 0 or "converged" not in probes.column_names:
        return ""
    rows = probes.to_pylist()
    bad = [r for r in rows if not r["converged"]]
    line = f"probes not converged: {len(bad)} of {len(rows)} layer fits"
    if bad:
        names = [f"{r['model']}/{r['value']}/{r['layer']}" for r in bad]
        line += " (" + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") + ")"
    gates = {(r["model"], r["value"]): r for r in rows if r["gate_kind"] == "probe"}
    missed = [k for k, r in gates.items() if r["gate_target_met"] is False]
    if gates:
        line += f"; gates that missed their target on calibrate: {len(missed)} of {len(gates)}"
        line += "" if not missed else " (" + ", ".join(f"{m}/{v}" for m, v in missed) + ")"
    return line


def _interval(r: dict, key: str, lo: str, hi: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:.2f} [{r[lo]:.2f}, {r[hi]:.2f}]"


def _compact(r: dict) -> dict[str, str]:
    """One pooled row for a reader: intervals beside their means, P0 and strength in full."""
    return {
        "model": r["model"],
        "setting": r["setting"],
        "method": r["method"],
        "p0": _fmt(r["p0"], exact=True),
        "strength": _fmt(r["strength"], exact=True),
        "n": str(r["n"]),
        "csr [95% CI]": _interval(r, "csr", "csr_lo", "csr_hi"),
        "csr - none [95% CI]": _interval(r, "csr_diff", "csr_diff_lo", "csr_diff_hi"),
        "ppl ratio [95% CI]": _interval(r, "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi"),
        "ppl plain": _fmt(r["ppl_plain_ratio"]),
        "utility": _fmt(r["utility_ratio"]),
        "gate open": _fmt(r["gate_open_rate"]),
        "gate open MC": _fmt(r["mc_gate_open_rate"]),
    }


def format_summary(path: str | Path) -> str:
    """The study's pooled summary as plain text (intervals: bootstrap over all the row's prompts), with its
    choices and probe convergence."""
    folder = _folder(path)
    pooled = _read(folder, "pooled").to_pylist()
    rows = _with_judge_kappa([_compact(r) for r in pooled], pooled, "csr [95% CI]", "csr [95% CI]")
    cols = list(rows[0]) if rows else ["model"]
    widths = [max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in cols]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
    out = [f"{k}: {v}" for k, v in study_choices(folder)]
    fc = forced_choice_text(folder)
    out += ["", fc] if fc else []
    if rows:
        out += ["", "judged generations (pooled over values)", ""] if fc else [""]
        out += [line(cols), line(["-" * w for w in widths]), *(line([r[c] for c in cols]) for r in rows)]
    conv = _convergence(_read(folder, "probes"))
    return "\n".join(out + ([conv] if conv else []))


def _gate_rows(probes: list[dict], summary: list[dict]) -> list[dict]:
    """Per (model, value) probe gate: its held-out figures and its open rates on the study's prompts and MC."""
    gates = {(r["model"], r["value"]): r for r in probes if r["gate_kind"] == "probe"}
    conva = [r for r in summary if r["method"] == "conva"]
    out = []
    for (model, value), g in sorted(gates.items()):
        mine = [r for r in conva if (r["model"], r["value"]) == (model, value)]
        out.append(
            dict(
                model=model,
                value=value,
                layer=g["gate_layer"],
                threshold=g["gate_threshold"],
                target_met=g["gate_target_met"],
                test_precision=g["gate_precision"],
                test_recall=g["gate_recall"],
                test_accuracy=g["gate_accuracy"],
                test_n=g["gate_n"],
                open_heldout_neutral=g["gate_open_neutral"],
                open_heldout_other_values=g["gate_open_other"],
                open_heldout_own=g.get("gate_open_own"),
                open_heldout_mc=g.get("gate_open_mc"),
                open_own_test_prompts=_mean([r["gate_open_rate"] for r in mine]),
                open_mc=_mean([r["mc_gate_open_rate"] for r in mine]),
            )
        )
    return out


def example_rows(results: list[dict], per_cell: int = 2) -> list[dict]:
    """A few generations per steered cell, each beside the unsteered (``none``) answer to the same prompt."""

    def same(r: dict) -> tuple:  # a prompt across cells: row ids are ``<cell id>#<prompt index>``
        return r["model"], r["value"], r["setting"], r["row_id"].rsplit("#", 1)[-1]

    plain = {same(r): r for r in results if r["method"] == "none"}
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        if r["method"] != "none" and r["error"] is None and r["output"] is not None:
            cells[(r["model"], r["setting"], plots.label(r))].append(r)
    out = []
    for (model, setting, label), rows in sorted(cells.items()):
        rows.sort(key=lambda r: (r["gate_open"] is not True, r["row_id"]))
        for r in rows[:per_cell]:
            base = plain.get(same(r))
            out.append(
                {
                    "model": model,
                    "cell": f"{label} {setting}",
                    "value": r["value"],
                    "gate open": "-" if r["gate_open"] is None else ("yes" if r["gate_open"] else "no"),
                    "prompt": r["prompt"],
                    "steered answer": r["output"],
                    "unsteered answer": base["output"] if base is not None else "-",
                }
            )
    return out


def _mean(xs: list) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c], c in _EXACT))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figures(
    pooled: list[dict], summary: list[dict], probes: list[dict], gates: list[dict], out: Path
) -> list:
    """(title, PNG name or a sentence) for each of the report's figures, drawn into ``out``."""
    images = [
        (
            "Control against fluency: each method's frontier",
            plots.frontier_plot(pooled, out / "frontier.png"),
        ),
        ("CSR against P0", plots.p0_plot(pooled, out / "csr_vs_p0.png")),
        ("Control against utility", plots.utility_plot(pooled, out / "utility.png")),
        ("Probe accuracy by layer", plots.probe_plot(probes, out / "probe_accuracy.png")),
        ("CSR per value", plots.value_plot(summary, out / "csr_by_value.png")),
    ]
    if gates:
        images.append(("Gates", plots.gate_plot(gates, out / "gate.png")))
    return images


def write_report(path: str | Path) -> Path:
    """Write ``<study>/report/index.html`` and its PNGs from the study's Parquet files; returns the page's path.

    Side effect: **replaces** the ``report/`` folder's files of the same names.
    """
    folder = _folder(path)
    pooled, summary = _read(folder, "pooled").to_pylist(), _read(folder, "summary").to_pylist()
    probes, matched = _read(folder, "probes").to_pylist(), _read(folder, "matched").to_pylist()
    out = folder / "report"
    out.mkdir(exist_ok=True)
    gates = _gate_rows(probes, summary)
    images = _figures(pooled, summary, probes, gates, out)
    choices = [dict(setting=k, value=v) for k, v in study_choices(folder)]
    conv = _convergence(_read(folder, "probes"))
    parts = [
        f"<h1>ConVA study: {html.escape(folder.name)}</h1>",
        "<h2>Choices</h2>",
        _html_table(choices),
        forced_choice_html(folder, out),
        "<h2>Summary (pooled over values)</h2>",
        f"<p>{html.escape(_CI_NOTE)}</p>",
        _html_table(
            _with_judge_kappa([{c: r[c] for c in _SUMMARY_COLS} for r in pooled], pooled, "csr", "csr_hi")
        ),
        "<h2>ConVA at matched fluency</h2><p>Each ConVA point against the CAA point whose perplexity ratio is "
        "nearest, and against prompting, on the prompts both answered: CSR difference with a paired bootstrap "
        "interval; a difference is claimed only where the perplexity intervals overlap or the higher method "
        "is also the more fluent.</p>",
        _html_table(matched),
    ]
    parts += [
        f"<h2>{html.escape(title)}</h2>"
        + (
            f"<img src='{name}' alt='{html.escape(title)}'>"
            if name.endswith(".png")
            else f"<p>{html.escape(name)}</p>"
        )
        for title, name in images
    ]
    parts += [
        "<h2>Example generations</h2><p>Per cell, a few prompts (those whose gate opened first), the steered "
        "answer beside the unsteered model's answer to the same prompt.</p>",
        _html_table(example_rows(_read(folder, "results").to_pylist())),
    ]
    parts += [
        "<h2>Gates (held-out figures and open rates)</h2>",
        _html_table(gates),
        f"<h2>Probe convergence</h2><p>{html.escape(conv or '-')}</p>",
        "<h2>Judge agreement</h2>",
        f"<p>{html.escape(_KAPPA_NOTE)}</p>",
        _html_table(_read(folder, "judges").to_pylist()),
        "<h2>Every cell</h2>",
        _html_table(summary),
    ]
    return _write_page(out / "index.html", parts)


_STYLE = (
    "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
    "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style>"
)


def _write_page(page: Path, parts: list[str]) -> Path:
    """Write the report's HTML page from its parts (headings, tables, images), in order."""
    head = f"<head><meta charset='utf-8'><title>ConVA study</title>{_STYLE}</head>"
    page.write_text(f"<!doctype html><html>{head}<body>{''.join(parts)}</body></html>", encoding="utf-8")
    return page


@contextlib.contextmanager
def local_copy(out) -> Iterator[Path]:
    """A local folder holding a study's output files: the output itself where it is local, else a temporary copy.

    ``out`` is a path or a :class:`conva.batch.storage.Location` (e.g. ``s3://…``).
    """
    import shutil
    import tempfile

    from conva.batch.storage import location

    out = location(out)
    if out.is_local:
        yield Path(out.uri)
        return
    tmp = Path(tempfile.mkdtemp(prefix="conva-report-"))
    try:
        for name in (*(f"{n}.parquet" for n in _STUDY_FILES), "study.json"):
            if out.child(name).exists():
                (tmp / name).write_bytes(out.child(name).read_bytes())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_report_to(out) -> str:
    """:func:`write_report` for a study output on any storage; returns where the page is.

    Side effect: **replaces** the files of ``<out>/report/`` of the same names.
    """
    from conva.batch.storage import location

    out = location(out)
    with local_copy(out) as folder:
        page = write_report(folder)
        if not out.is_local:
            for f in sorted(page.parent.iterdir()):
                out.child("report", f.name).write_bytes(f.read_bytes())
    return out.child("report", "index.html").uri


def main(argv: list[str] | None = None) -> int:
    """``conva report <study folder | results.parquet>``: rebuild the report; prints the summary and the page's path."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: conva report <study folder | results.parquet>", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from conva.batch.storage import is_uri, location

    try:
        target = argv[0].removesuffix("/results.parquet").removesuffix("results.parquet") or "."
        if is_uri(target) and not location(target).child("pooled.parquet").exists():
            what = "holds no pooled.parquet" if location(target).list() else "does not exist (or is empty)"
            raise FileNotFoundError(f"{target} {what}: point at a study's output")
        page = write_report_to(target)
        with local_copy(target) as folder:
            text = format_summary(folder)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"conva report: error: {err}", file=sys.stderr)
        return 2
    print(text)
    print(
        f"report: {page if is_uri(target) else Path(target) / 'report' / 'index.html'}"
    )  # as the user named it
    return 0


if __name__ == "__main__":
    sys.exit(main())
