"""The study report's figures: one function per PNG, each from the rows of one of the study's tables.

Each ``*_plot(rows, path)`` draws with matplotlib (the ``report`` extra; imported on first use, with the
Agg backend) and returns the file's name, or, where the rows hold nothing to draw (a single point, every
ratio 1), a sentence saying so that the page prints instead of an image. Used by
:func:`conva.batch.report.write_report`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["label", "frontier_plot", "p0_plot", "utility_plot", "probe_plot", "gate_plot", "value_plot"]
_COLORS = {
    "conva": "tab:red",
    "conva_nogate": "tab:orange",
    "caa": "tab:blue",
    "prompt": "tab:green",
    "none": "tab:gray",
}
_STYLES = ("-", "--", ":", "-.")  # settings of one method (CAA strengths) told apart by line style


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


def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["model"], r["setting"]) for r in rows})


def _axes(n: int, width: float = 6):
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, n), figsize=(width * max(1, n), 4.2), squeeze=False)
    return fig, axes[0]


def _say(ax, sentence: str) -> None:
    """A panel whose points would all coincide says so in words instead of drawing one dot."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, sentence, ha="center", va="center", wrap=True, fontsize=10, transform=ax.transAxes)


def label(r: dict) -> str:
    """A pooled row's setting as a short label: method, P0, CAA strength and band (``conva 0.99 10-20``)."""
    return (
        r["method"]
        + (f" {r['p0']:g}" if r["p0"] is not None else "")
        + (f" s={r['strength']:g}" if r["strength"] else "")
        + (f" {r['band']}" if r["band"] not in ("-", "auto") else "")
    )


def frontier_plot(pooled: list[dict], path: Path) -> str:
    """Per (model, setting): each method's sweep in the (perplexity ratio, CSR) plane, both intervals drawn."""
    panels = _panels(pooled)
    fig, axes = _axes(len(panels))
    for ax, (model, setting) in zip(axes, panels):
        rows = [
            r for r in pooled if (r["model"], r["setting"]) == (model, setting) and r["ppl_ratio"] is not None
        ]
        series: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            series[(r["method"], r["band"])].append(r)
        if len({(round(r["ppl_ratio"], 6), round(r["csr"], 6)) for r in rows}) == 1:
            _say(
                ax,
                f"{model}, {setting}: every cell at perplexity ratio {rows[0]['ppl_ratio']:.2f} and CSR "
                f"{rows[0]['csr']:.2f}: no method changed an answer here",
            )
            continue
        for (method, band), pts in sorted(series.items()):
            pts.sort(key=lambda r: r["ppl_ratio"])
            x, y = [r["ppl_ratio"] for r in pts], [r["csr"] for r in pts]
            xerr = [
                [r["ppl_ratio"] - r["ppl_ratio_lo"] for r in pts],
                [r["ppl_ratio_hi"] - r["ppl_ratio"] for r in pts],
            ]
            yerr = [[r["csr"] - r["csr_lo"] for r in pts], [r["csr_hi"] - r["csr"] for r in pts]]
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                marker="o",
                capsize=3,
                color=_COLORS.get(method, "black"),
                label=method + (f" ({band})" if band not in ("-", "auto") else ""),
            )
            for r in pts:
                ax.annotate(
                    label(r).split(" ", 1)[1] if " " in label(r) else "",
                    (r["ppl_ratio"], r["csr"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axvline(1.0, color="lightgray", lw=1)
        xs = [r["ppl_ratio_hi"] for r in rows] + [r["ppl_ratio_lo"] for r in rows]
        if xs and max(xs) / max(min(xs), 1e-9) > 10:
            ax.set_xscale("log")  # one collapsed point (e.g. CAA at a large strength) would squash the rest
        ax.set(
            title=f"{model}, {setting}: control vs fluency",
            xlabel="perplexity ratio (given the answer's context)",
            ylabel="CSR (all prompts)",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=7)
    return _save(fig, path)


def _shade(color: str, k: int) -> tuple[float, float, float]:
    """``color`` darkened by 35 % ``k`` times (a sweep longer than the line styles cycles through shades)."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    f = 0.65**k
    return (r * f, g * f, b * f)


def p0_plot(pooled: list[dict], path: Path) -> str:
    panels = _panels(pooled)
    fig, axes = _axes(len(panels))
    for ax, (model, setting) in zip(axes, panels):
        rows = [r for r in pooled if (r["model"], r["setting"]) == (model, setting) and r["csr"] is not None]
        seen: dict[str, int] = defaultdict(int)  # keys drawn per method: each gets its own line style
        for key in sorted({(r["method"], r["band"], r["strength"] or 0) for r in rows}):
            n = seen[key[0]]
            style = _STYLES[n % len(_STYLES)]
            seen[key[0]] += 1
            pts = sorted(
                (r for r in rows if (r["method"], r["band"], r["strength"] or 0) == key),
                key=lambda r: r["p0"] or 0,
            )
            # A sweep's later members darken too, so no two of them share both colour and line style.
            color = _shade(_COLORS.get(key[0], "tab:gray"), n // len(_STYLES))
            label = (
                key[0]
                + (f" ({key[1]})" if key[1] not in ("-", "auto") else "")
                + (f" s={key[2]:g}" if key[2] else "")
            )
            if pts[0]["p0"] is None:  # no P0: a flat band across the whole axis
                ax.axhspan(pts[0]["csr_lo"], pts[0]["csr_hi"], color=color, alpha=0.08)
                ax.axhline(pts[0]["csr"], color=color, linestyle=style, label=label)
            else:
                x = list(range(len(pts)))
                ax.errorbar(
                    x,
                    [r["csr"] for r in pts],
                    yerr=[[r["csr"] - r["csr_lo"] for r in pts], [r["csr_hi"] - r["csr"] for r in pts]],
                    marker="o",
                    capsize=3,
                    color=color,
                    linestyle=style,
                    label=label,
                )
                ax.set_xticks(x, [f"{r['p0']:g}" for r in pts])
        ax.set(
            title=f"{model}, {setting}: CSR vs P0",
            xlabel="P0",
            ylabel="CSR (all prompts)",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=7)
    return _save(fig, path)


def utility_plot(pooled: list[dict], path: Path) -> str:
    ratios = {
        round(r["utility_ratio"], 6)
        for r in pooled
        if r["csr"] is not None and r["utility_ratio"] is not None
    }
    if len(ratios) <= 1:  # a plot whose points share one x says only this
        return (
            f"Every cell's multiple-choice accuracy equals the unsteered model's (utility ratio {ratios.pop():g}): "
            "no steering setting changed an answer."
            if ratios
            else "No utility figures (no multiple-choice questions were scored)."
        )
    fig, axes = _axes(1, 7)
    ax = axes[0]
    for r in pooled:
        if r["csr"] is None or r["utility_ratio"] is None:
            continue
        ax.scatter(r["utility_ratio"], r["csr"], color=_COLORS.get(r["method"], "black"), s=40)
        ax.annotate(
            f"{r['model'][:12]} {label(r)} {r['setting']}",
            (r["utility_ratio"], r["csr"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axvline(1.0, color="lightgray", lw=1)
    ax.set(
        title="control vs utility",
        xlabel="multiple-choice accuracy / unsteered",
        ylabel="CSR",
        ylim=(-0.02, 1.02),
    )
    return _save(fig, path)


def probe_plot(probes: list[dict], path: Path) -> str:
    models = sorted({r["model"] for r in probes})
    fig, axes = _axes(len(models))
    for ax, model in zip(axes, models):
        for value in sorted({r["value"] for r in probes if r["model"] == model}):
            pts = sorted(
                (r for r in probes if r["model"] == model and r["value"] == value), key=lambda r: r["layer"]
            )
            (line,) = ax.plot(
                [r["layer"] for r in pts], [r["test_acc"] for r in pts], marker=".", label=value
            )
            ax.plot([r["layer"] for r in pts], [r["val_acc"] for r in pts], ls=":", color=line.get_color())
        ax.set(
            title=f"{model}: probe accuracy (test solid, validation dotted)",
            xlabel="layer",
            ylabel="accuracy",
            ylim=(0.3, 1.02),
        )
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def gate_plot(gates: list[dict], path: Path) -> str:
    fig, axes = _axes(1, max(6, 1.5 * len(gates)))
    ax, keys = axes[0], [f"{g['model']}\n{g['value']}" for g in gates]
    series = [
        ("test precision", "test_precision"),
        ("test recall", "test_recall"),
        ("open: held-out neutral", "open_heldout_neutral"),
        ("open: held-out other values", "open_heldout_other_values"),
        ("open: own test prompts", "open_own_test_prompts"),
        ("open: MC questions", "open_mc"),
    ]
    width = 0.8 / len(series)
    for j, (name, key) in enumerate(series):
        ax.bar([i + j * width for i in range(len(gates))], [g[key] or 0 for g in gates], width, label=name)
    ax.axhline(0.1, color="black", lw=0.8, ls=":")  # the open-rate target on text the gate should leave alone
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(gates))], keys, fontsize=7)
    ax.set(title="probe gates: held-out precision / recall, open rates", ylim=(0, 1.3))
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    return _save(fig, path)


def value_plot(summary: list[dict], path: Path) -> str:
    """CSR per value, one panel per model, each cell's bar with its bootstrap interval (plain prompts)."""
    rows = [r for r in summary if r["setting"] == "plain"] or summary
    models = sorted({r["model"] for r in rows})
    values = sorted({r["value"] for r in rows})
    keys = sorted({(r["method"], r["p0"] or 0, r["band"], r["strength"] or 0) for r in rows})
    fig, axes = _axes(len(models), max(6, 1.1 * len(values)))
    width = 0.8 / max(1, len(keys))
    for ax, model in zip(axes, models):
        for j, key in enumerate(keys):
            cells = {
                r["value"]: r
                for r in rows
                if r["model"] == model and (r["method"], r["p0"] or 0, r["band"], r["strength"] or 0) == key
            }
            ys = [
                cells[v]["csr"] if v in cells and cells[v]["csr"] is not None else float("nan")
                for v in values
            ]
            lo = [
                y - cells[v]["csr_lo"] if v in cells and cells[v]["csr_lo"] is not None else 0
                for v, y in zip(values, ys)
            ]
            hi = [
                cells[v]["csr_hi"] - y if v in cells and cells[v]["csr_hi"] is not None else 0
                for v, y in zip(values, ys)
            ]
            ax.bar(
                [i + j * width for i in range(len(values))],
                ys,
                width,
                yerr=[lo, hi],
                capsize=2,
                color=_COLORS.get(key[0]),
                alpha=0.45 + 0.55 * (j % 2),
                label=" ".join(
                    f"{k:g}" if isinstance(k, float) else str(k) for k in key if k not in (0, "-", "auto")
                ),
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(values))], values, rotation=45, ha="right")
        ax.set(title=f"{model}: CSR per value (plain prompts, 95% CI)", ylabel="CSR", ylim=(0, 1.05))
        ax.legend(fontsize=6)
    return _save(fig, path)
