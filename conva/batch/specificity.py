"""Is an effect the value's own? Paired forced-choice shifts, the cross-value matrix, the random control, cosines.

A study's forced-choice stage (:mod:`conva.choice`) reads, for every yes/no prompt, the log-odds of the
value's side under many steerings in the same run. Here they become figures, each a **paired** shift:
a steered row minus the unsteered row of the same prompt (same model, value, item). Per model and
steering setting (ConVA at one P0, CAA at one strength):

* ``own``: the mean shift when the prompts' own value's vector steers them;
* ``other``: per prompt, the mean shift over the **other** studied values' vectors, then the mean;
* ``specific`` = own − other, per prompt, then the mean: what the value adds beyond any steering;
* ``random``: ConVA's per-row ε along a random direction (ConVA settings only): what a step of that size
  does when it points nowhere in particular;
* ``gated``: the value's own ConVA with its gate active (ConVA settings only);
* ``fc_csr``: the share of prompts on the value's side with the own vector (``fc_csr_none`` unsteered);
* ``yes_push``: the own vector's mean shift in the log-odds of **yes**, whichever side the value is on: a
  vector that only pushes toward "yes" shows here, and cancels in ``own`` on a balanced prompt set.

Every interval is a 95 % percentile bootstrap over prompts, **stratified by value** (each resample
draws each value's prompts from that value's prompts), paired (the same draw for every figure).
:func:`cross_value_rows` gives the matrix cell by cell; :func:`cosine_rows` the cosines between the
values' probe directions and CAA vectors, layer by layer; :func:`specificity_sentence` reads a row in
one sentence that claims no more than its interval allows.

Example:
    >>> tables = choice_tables(choice, n_boot=1000, seed=0)             # doctest: +SKIP
    >>> tables["specificity"].to_pylist()[0]["specific"]                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from conva.batch.schemas import CHOICE_SCHEMA, COSINE_SCHEMA, CROSS_VALUE_SCHEMA, SPECIFICITY_SCHEMA
from conva.bundle import ValueBundle

__all__ = [
    "MATRIX_METHODS",
    "stratified_ci",
    "paired_shifts",
    "specificity_rows",
    "cross_value_rows",
    "cosine_rows",
    "choice_tables",
    "specificity_sentence",
]

# The methods whose vectors form the cross-value matrix, and the name each setting is reported under.
MATRIX_METHODS = {"conva_nogate": "conva", "caa": "caa"}

Prompt = tuple[str, str, int]  # (model, value, item)
Setting = tuple[str, str, float | None, float | None]  # (model, reported method, p0, strength)


def stratified_ci(
    values: np.ndarray, groups: Sequence[str], *, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its percentile bootstrap interval, resampling within groups.

    Rows whose value is NaN are dropped first. ``(nan, nan, nan)`` for no rows.
    """
    x = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(x)
    x, g = x[keep], np.asarray(groups)[keep]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(g == k) for k in sorted(set(g.tolist()))]
    draws = np.concatenate([m[rng.integers(0, m.size, size=(n_boot, m.size))] for m in members], axis=1)
    means = x[draws].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def paired_shifts(choice: pa.Table) -> list[dict]:
    """The steered rows of a forced-choice table, each with ``shift``: its value log-odds minus the unsteered one.

    Rows with an error, and prompts without an unsteered row, are left out.
    """
    rows = [r for r in choice.to_pylist() if r["error"] is None and r["value_log_odds"] is not None]
    base = {(r["model"], r["value"], r["item"]): r["value_log_odds"] for r in rows if r["method"] == "none"}
    out = []
    for r in rows:
        b = base.get((r["model"], r["value"], r["item"]))
        if r["method"] != "none" and b is not None:
            out.append({**r, "shift": r["value_log_odds"] - b})
    return out


def _setting(r: dict) -> Setting:
    method = MATRIX_METHODS.get(r["method"], r["method"])
    return r["model"], "caa" if method == "caa" else "conva", r["p0"], r["strength"]


def specificity_rows(choice: pa.Table, *, n_boot: int, seed: int) -> pa.Table:
    """:data:`~conva.batch.schemas.SPECIFICITY_SCHEMA`: one row per (model, ConVA P0 or CAA strength)."""
    shifts = paired_shifts(choice)
    base = [r for r in choice.to_pylist() if r["method"] == "none" and r["error"] is None]
    by_setting: dict[Setting, dict[str, dict[Prompt, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    extra: dict[Setting, list[dict]] = defaultdict(list)
    for r in shifts:
        key, prompt = _setting(r), (r["model"], r["value"], r["item"])
        if r["method"] in MATRIX_METHODS:
            part = "own" if r["vector"] == r["value"] else "other"
            by_setting[key][part].setdefault(prompt, []).append(r["shift"])
            if part == "own":
                by_setting[key]["fc"][prompt] = [float(r["value_log_odds"] > 0)]
                sign = 1.0 if r["value_side"] == "yes" else -1.0
                by_setting[key]["yes"][prompt] = [sign * r["shift"]]
                by_setting[key]["eps"][prompt] = [r["eps_norm"]] if r["eps_norm"] is not None else []
        elif r["method"] in ("random", "conva"):
            by_setting[key][r["method"]][prompt] = [r["shift"]]
            if r["method"] == "conva":
                extra[key].append(r)
    rows = []
    for key in sorted(by_setting, key=lambda k: (k[0], k[1], k[2] or 0.0, k[3] or 0.0)):
        parts = by_setting[key]
        prompts = sorted(parts["own"])
        if not prompts:
            continue
        groups = [p[1] for p in prompts]

        def col(part: str, prompts: list[Prompt] = prompts, parts: Mapping = parts) -> np.ndarray:
            return np.array([np.mean(parts[part][p]) if parts[part].get(p) else np.nan for p in prompts])

        own, other = col("own"), col("other")
        figures = {
            "fc_csr": col("fc"),
            "own": own,
            "other": other,
            "specific": own - other,
            "random": col("random"),
            "gated": col("conva"),
            "yes_push": col("yes"),
        }
        row: dict = dict(model=key[0], method=key[1], p0=key[2], strength=key[3], n=len(prompts))
        for name, x in figures.items():
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = stratified_ci(
                x, groups, n_boot=n_boot, seed=seed
            )
        none = [float(r["value_log_odds"] > 0) for r in base if r["model"] == key[0]]
        row["fc_csr_none"] = float(np.mean(none)) if none else None
        opened = [float(r["gate_open"]) for r in extra[key] if r["gate_score"] is not None]
        row["gate_open"] = float(np.mean(opened)) if opened else None
        eps = [e for p in prompts for e in parts["eps"].get(p, [])]
        row["eps_norm"] = float(np.mean(eps)) if eps else None
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return pa.Table.from_pylist(rows, schema=SPECIFICITY_SCHEMA)


def cross_value_rows(choice: pa.Table, *, n_boot: int, seed: int) -> pa.Table:
    """:data:`~conva.batch.schemas.CROSS_VALUE_SCHEMA`: the mean shift of each value's prompts under each vector."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in paired_shifts(choice):
        if r["method"] in MATRIX_METHODS:
            cells[(*_setting(r), r["vector"], r["value"])].append(r)
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2] or 0.0, k[3] or 0.0, k[4], k[5])):
        x = np.array([r["shift"] for r in cells[key]])
        mean, lo, hi = stratified_ci(x, [key[5]] * len(x), n_boot=n_boot, seed=seed)
        rows.append(
            dict(
                model=key[0],
                method=key[1],
                p0=key[2],
                strength=key[3],
                vector=key[4],
                value=key[5],
                n=len(x),
                shift=mean,
                shift_lo=lo,
                shift_hi=hi,
            )
        )
    return pa.Table.from_pylist(rows, schema=CROSS_VALUE_SCHEMA)


def cosine_rows(model: str, bundles: Mapping[str, ValueBundle]) -> pa.Table:
    """:data:`~conva.batch.schemas.COSINE_SCHEMA`: every pair of values, every layer both probed, probe ``w`` and CAA."""
    rows = []
    for a, b in combinations(sorted(bundles), 2):
        ba, bb = bundles[a], bundles[b]
        for layer in sorted(set(ba.layers) & set(bb.layers)):
            ia, ib = ba.rows((layer,))[0], bb.rows((layer,))[0]
            for kind, va, vb in (("probe", ba.w[ia], bb.w[ib]), ("caa", ba.caa[ia], bb.caa[ib])):
                va, vb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
                denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
                cos = float(va @ vb) / denom if denom > 0 else None
                rows.append(dict(model=model, layer=int(layer), kind=kind, value_a=a, value_b=b, cosine=cos))
    return pa.Table.from_pylist(rows, schema=COSINE_SCHEMA)


def choice_tables(choice: pa.Table, *, n_boot: int, seed: int) -> dict[str, pa.Table]:
    """The forced-choice outputs of a study: ``choice`` (every row), ``specificity`` and ``cross_value``."""
    choice = choice.cast(CHOICE_SCHEMA)
    return dict(
        choice=choice,
        specificity=specificity_rows(choice, n_boot=n_boot, seed=seed),
        cross_value=cross_value_rows(choice, n_boot=n_boot, seed=seed),
    )


def specificity_sentence(row: Mapping) -> str:
    """One sentence on a :func:`specificity_rows` row that claims only what its intervals allow."""
    what = f"{row['method']} " + (
        f"P0 {row['p0']:g}" if row["p0"] is not None else f"strength {row['strength']:g}"
    )
    lo, hi = row.get("specific_lo"), row.get("specific_hi")
    if lo is None or hi is None:
        return f"{row['model']}, {what}: no other value's vector was scored, so specificity is not measured."
    own = f"own vector {row['own']:+.2f} [{row['own_lo']:+.2f}, {row['own_hi']:+.2f}]"
    other = f"other values' {row['other']:+.2f} [{row['other_lo']:+.2f}, {row['other_hi']:+.2f}]"
    if lo > 0:
        verdict = (
            "value-specific: the own vector moves its prompts toward the value more than other values' do"
        )
    elif hi < 0:
        verdict = (
            "anti-specific: other values' vectors move these prompts toward the value more than the own one"
        )
    else:
        verdict = "not shown to be value-specific: the own and other vectors' effects cannot be told apart"
    return (
        f"{row['model']}, {what}: {verdict} (specific {row['specific']:+.2f} [{lo:+.2f}, {hi:+.2f}] log-odds; "
        f"{own}, {other})."
    )
