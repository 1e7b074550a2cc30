"""A study's figures from its per-prompt results: per cell, pooled per method, and compared at matched fluency.

* :func:`summarize`: one row per **cell** (model, value, method, P0, band, setting, strength): CSR with a
  percentile-bootstrap interval over the cell's prompts, the perplexity ratios, utility and gate rates.
* :func:`pool`: one row per (model, method, P0, band, strength, setting) over **all** values: CSR with a
  percentile-bootstrap interval over **all prompts of the row** (not the mean of per-value bounds), the
  perplexity ratio with a bootstrap interval over the same prompts (paired with the unsteered answers),
  utility and gate rates pooled the same way. These are the study's headline rows.
* :func:`matched_fluency`: each ConVA point against the CAA point (and the prompting point) whose
  perplexity ratio is nearest, on the same prompts: the CSR difference with a paired bootstrap interval,
  both perplexity intervals, and a verdict that claims only what the intervals allow.
* :func:`probe_rows`: probe accuracies (train / val / test), convergence and the gate's figures per layer.

Every bootstrap is percentile, ``n_boot`` resamples, seeded, over the rows in the results table's order.

Example:
    >>> pooled = pool(results, utility, n_boot=1000, seed=0)           # doctest: +SKIP
    >>> matched = matched_fluency(results, pooled, n_boot=1000, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np
import pyarrow as pa

from conva.batch.cells import UtilityCell, results_table
from conva.batch.schemas import MATCHED_SCHEMA, POOLED_SCHEMA, STUDY_PROBE_SCHEMA, SUMMARY_SCHEMA
from conva.bundle import ValueBundle
from conva.metrics import bootstrap_ci, csr

__all__ = ["summarize", "pool", "matched_fluency", "probe_rows", "pool_key", "OUTPUT_FILES", "study_tables"]

# The study's output tables, in the order they are written (``<study>/<name>.parquet``).
OUTPUT_FILES = (
    "results",
    "pooled",
    "matched",
    "summary",
    "utility",
    "probes",
    "judges",
    "choice",
    "specificity",
    "cross_value",
    "cosines",
)


def _finite(xs: Sequence[float | None]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = _finite(xs)
    return float(np.mean(vals)) if vals else None


def _geomean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in _finite(xs) if x > 0]
    return float(np.exp(np.mean(np.log(vals)))) if vals else None


def _prompt_key(row: dict) -> tuple[str, str, str, str]:
    """The prompt a result row answers, the same across the cells of one (model, value, setting)."""
    return row["model"], row["value"], row["setting"], row["row_id"].rsplit("#", 1)[1]


def _log_ratios(rows: list[dict], base: dict[tuple, dict], key: str) -> list[float]:
    """Per prompt: log(ppl / the unsteered answer's ppl) for ``key`` (``ppl`` or ``ppl_plain``), where both exist."""
    out = []
    for r in rows:
        b = base.get(_prompt_key(r))
        p, q = r.get(key), b.get(key) if b else None
        if p is not None and q is not None and math.isfinite(p) and math.isfinite(q) and p > 0 and q > 0:
            out.append(math.log(p) - math.log(q))
    return out


def _paired_diffs(rows: list[dict], base: dict[tuple, dict]) -> list[float]:
    """Per prompt: the judge's score minus the unsteered answer's score on the same prompt, where both exist."""
    out = []
    for r in rows:
        b = base.get(_prompt_key(r))
        if b is not None and r["judge_score"] is not None and b["judge_score"] is not None:
            out.append(float(r["judge_score"]) - float(b["judge_score"]))
    return out


def _gate_rate(rows: list[dict]) -> float | None:
    """Share of the rows whose gate was read (a score recorded) that it opened."""
    return _mean(
        [
            float(r["gate_open"])
            for r in rows
            if r.get("gate_score") is not None and r["gate_open"] is not None
        ]
    )


def _utility(utility: pa.Table | None) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Multiple-choice rows per utility cell, and the unsteered accuracy per model."""
    groups: dict[str, list[dict]] = defaultdict(list)
    if utility is not None:
        for r in utility.to_pylist():
            groups[r["cell_id"]].append(r)
    none = {
        rs[0]["model"]: float(np.mean([r["correct"] for r in rs]))
        for rs in groups.values()
        if rs[0]["method"] == "none"
    }
    return groups, none


def _utility_id(row: dict, value: str) -> str:
    return UtilityCell(
        row["model"],
        "*" if row["method"] == "none" else value,
        row["method"],
        row["p0"],
        row["band"],
        row["strength"],
    ).id


def _cell_row(
    cid: str,
    rs: list[dict],
    base: dict,
    utility: tuple[dict, dict],
    agreement: dict[tuple[str, str], float] | None,
    validity: dict[str, dict] | None,
    n_boot: int,
    seed: int,
) -> dict:
    """One summary row: cell ``cid``'s rows ``rs`` against the unsteered answers ``base``."""
    mc, acc_none = utility
    c, ok = rs[0], [r for r in rs if r["error"] is None]
    scores = [r["judge_score"] for r in ok]
    lo, hi = bootstrap_ci(scores, n_boot=n_boot, seed=seed)
    ratio, plain = (_log_ratios(ok, base, k) for k in ("ppl", "ppl_plain"))
    mrows = mc.get(_utility_id(c, c["value"]), [])
    acc = float(np.mean([r["correct"] for r in mrows])) if mrows else None
    none = acc_none.get(c["model"])
    return dict(
        cell_id=cid,
        model=c["model"],
        value=c["value"],
        method=c["method"],
        p0=c["p0"],
        band=c["band"],
        setting=c["setting"],
        strength=c["strength"],
        n=len(rs),
        n_error=len(rs) - len(ok),
        csr=csr(scores),
        csr_lo=lo,
        csr_hi=hi,
        gate_open_rate=_gate_rate(ok),
        eps_mean=_mean([r["eps_mean"] for r in ok]),
        ppl=_geomean([r["ppl"] for r in ok]),
        ppl_ratio=math.exp(np.mean(ratio)) if ratio else None,
        ppl_plain_ratio=math.exp(np.mean(plain)) if plain else None,
        fluency=_mean([r["fluency"] for r in ok]),
        mc_acc=acc,
        mc_acc_none=none,
        utility_ratio=acc / none if acc is not None and none else None,
        mc_gate_open_rate=_gate_rate(mrows),
        judge=c["judge"],
        judge_agreement=(agreement or {}).get((c["model"], c["value"])),
        **_judge_validity(validity, c["model"]),
    )


def summarize(
    results: pa.Table,
    utility: pa.Table | None = None,
    agreement: dict[tuple[str, str], float] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    validity: dict[str, dict] | None = None,
) -> pa.Table:
    """One row per cell: CSR over all prompts (errors excluded, counted), its CI, fluency, utility, gate rates.

    ``ppl_ratio`` compares each cell with the ``none`` cell of the same (model, value, setting), prompt
    by prompt, under the answers' own contexts; ``ppl_plain_ratio`` under the plain prompts.
    ``agreement`` maps ``(model, value)`` to the judge's held-out agreement; ``validity`` maps a model to
    its judge's validity on labelled answers (the agreement table's ``*`` row: ``kappa``, ``auc``), shown
    beside every CSR as ``judge_kappa`` and ``judge_auc``.
    """
    rows = results.to_pylist()
    cells: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        cells[r["cell_id"]].append(r)
    base = {_prompt_key(r): r for r in rows if r["method"] == "none"}
    mc, acc_none = _utility(utility)
    out = [
        _cell_row(cid, rs, base, (mc, acc_none), agreement, validity, n_boot, seed)
        for cid, rs in cells.items()
    ]
    return pa.Table.from_pylist(out, schema=SUMMARY_SCHEMA)


def _judge_validity(validity: dict[str, dict] | None, model: str) -> dict:
    """The judge's κ and AUC on labelled answers for ``model``'s rows (None where it was not validated)."""
    v = (validity or {}).get(model) or {}
    return dict(judge_kappa=v.get("kappa"), judge_auc=v.get("auc"))


def pool_key(row: dict) -> tuple:
    """The pooled row a result or summary row belongs to: (model, method, P0, band, strength, setting)."""
    return row["model"], row["method"], row["p0"], row["band"], row["strength"], row["setting"]


def _pooled_row(
    key: tuple,
    rs: list[dict],
    base: dict,
    utility: tuple[dict, dict],
    agreement: dict[tuple[str, str], float] | None,
    validity: dict[str, dict] | None,
    n_boot: int,
    seed: int,
) -> dict:
    """One pooled row: the rows ``rs`` of one (model, method, P0, band, strength, setting) over every value."""
    mc, acc_none = utility
    model, method, p0, band, strength, setting = key
    ok = [r for r in rs if r["error"] is None]
    scores = [r["judge_score"] for r in ok]
    lo, hi = bootstrap_ci(scores, n_boot=n_boot, seed=seed)
    logs = _log_ratios(ok, base, "ppl")
    llo, lhi = bootstrap_ci(logs, n_boot=n_boot, seed=seed)
    plain = _log_ratios(ok, base, "ppl_plain")
    diffs = _paired_diffs(ok, base)
    dlo, dhi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    values = sorted({r["value"] for r in rs})
    cells = dict.fromkeys(_utility_id(rs[0], v) for v in values)  # one unsteered cell serves every value
    mrows = [m for cell in cells for m in mc.get(cell, [])]
    acc, none = (float(np.mean([m["correct"] for m in mrows])) if mrows else None), acc_none.get(model)
    return dict(
        model=model,
        method=method,
        p0=p0,
        band=band,
        strength=strength,
        setting=setting,
        values=len(values),
        n=len(rs),
        n_error=len(rs) - len(ok),
        csr=csr(scores),
        csr_lo=lo,
        csr_hi=hi,
        csr_diff=float(np.mean(diffs)) if diffs and method != "none" else None,
        csr_diff_lo=dlo if diffs and method != "none" else None,
        csr_diff_hi=dhi if diffs and method != "none" else None,
        ppl_ratio=math.exp(np.mean(logs)) if logs else None,
        ppl_ratio_lo=math.exp(llo) if logs else None,
        ppl_ratio_hi=math.exp(lhi) if logs else None,
        ppl_plain_ratio=math.exp(np.mean(plain)) if plain else None,
        utility_ratio=acc / none if acc is not None and none else None,
        gate_open_rate=_gate_rate(ok),
        mc_gate_open_rate=_gate_rate(mrows),
        eps_mean=_mean([r["eps_mean"] for r in ok]),
        judge_agreement=_mean([(agreement or {}).get((model, v)) for v in values]),
        **_judge_validity(validity, model),
    )


def pool(
    results: pa.Table,
    utility: pa.Table | None = None,
    agreement: dict[tuple[str, str], float] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    validity: dict[str, dict] | None = None,
) -> pa.Table:
    """One row per (model, method, P0, band, strength, setting), pooled over values.

    ``csr_lo``/``csr_hi``: percentile bootstrap of the mean over **all** the row's prompts (every value's),
    in the results table's order. ``csr_diff``: the mean paired difference against the unsteered answer to
    the same prompt, with the same bootstrap (``_lo``/``_hi``). ``ppl_ratio_lo``/``_hi``: the same bootstrap over the per-prompt log
    ratios against the unsteered answers. Utility and gate rates pool every value's rows.
    """
    rows = results.to_pylist()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[pool_key(r)].append(r)
    base = {_prompt_key(r): r for r in rows if r["method"] == "none"}
    mc, acc_none = _utility(utility)
    out = [
        _pooled_row(key, rs, base, (mc, acc_none), agreement, validity, n_boot, seed)
        for key, rs in groups.items()
    ]
    order = ("conva", "conva_nogate", "caa", "prompt", "none")
    out.sort(
        key=lambda r: (
            r["model"],
            r["setting"],
            order.index(r["method"]) if r["method"] in order else 9,
            r["p0"] or 0,
            r["band"],
            r["strength"] or 0,
        )
    )
    return pa.Table.from_pylist(out, schema=POOLED_SCHEMA)


def _verdict(diff_lo: float, diff_hi: float, a: tuple[float, float], b: tuple[float, float]) -> str:
    """What the intervals allow: a CSR difference only where fluency is matched (or the winner is more fluent)."""
    matched = a[0] <= b[1] and b[0] <= a[1]
    if diff_lo > 0 and (matched or a[1] < b[0]):
        return "conva higher, fluency matched or better"
    if diff_hi < 0 and (matched or b[1] < a[0]):
        return "other higher, fluency matched or better"
    return "no difference shown" if matched else "fluency not matched"


def matched_fluency(results: pa.Table, pooled: pa.Table, *, n_boot: int = 1000, seed: int = 0) -> pa.Table:
    """Each ConVA point against the nearest-fluency CAA point and the prompting point, on the same prompts.

    For every pooled ConVA row and each other method (``caa``, ``prompt``) of the same (model, setting),
    the comparison is the other method **at ConVA's perplexity ratio**: interpolated (linearly in log
    perplexity, per prompt) between the two points of a sweep that bracket it (CAA's strengths; the
    strength reported is interpolated the same way), else the nearest point (no extrapolation). The CSR
    difference is bootstrapped over the prompts both answered (paired); the verdict reads the CSR
    interval and the two perplexity-ratio intervals (:func:`_verdict`).
    """
    points = [p for p in pooled.to_pylist() if p["ppl_ratio"] is not None]
    by_key: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for r in results.to_pylist():
        if r["error"] is None:
            by_key[pool_key(r)][_prompt_key(r)] = r["judge_score"]
    out = []
    for a in (p for p in points if p["method"] == "conva"):
        for other in ("caa", "prompt"):
            rivals = [
                p
                for p in points
                if p["method"] == other and (p["model"], p["setting"]) == (a["model"], a["setting"])
            ]
            if not rivals:
                continue
            b, sb = _rival(a, rivals, by_key)
            sa = by_key[pool_key(a)]
            both = [k for k in sa if k in sb]
            diffs = [sa[k] - sb[k] for k in both]
            lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
            out.append(
                dict(
                    model=a["model"],
                    setting=a["setting"],
                    p0=a["p0"],
                    band=a["band"],
                    other=other,
                    other_strength=b["strength"],
                    other_band=b["band"],
                    n_pairs=len(both),
                    csr_conva=float(np.mean([sa[k] for k in both])) if both else None,
                    csr_other=float(np.mean([sb[k] for k in both])) if both else None,
                    csr_diff=float(np.mean(diffs)) if diffs else None,
                    csr_diff_lo=lo,
                    csr_diff_hi=hi,
                    ppl_ratio_conva=a["ppl_ratio"],
                    ppl_conva_lo=a["ppl_ratio_lo"],
                    ppl_conva_hi=a["ppl_ratio_hi"],
                    ppl_ratio_other=b["ppl_ratio"],
                    ppl_other_lo=b["ppl_ratio_lo"],
                    ppl_other_hi=b["ppl_ratio_hi"],
                    verdict=_verdict(
                        lo, hi, (a["ppl_ratio_lo"], a["ppl_ratio_hi"]), (b["ppl_ratio_lo"], b["ppl_ratio_hi"])
                    )
                    if diffs
                    else "no shared prompts",
                )
            )
    return pa.Table.from_pylist(out, schema=MATCHED_SCHEMA)


def _rival(a: dict, rivals: list[dict], by_key: dict) -> tuple[dict, dict[tuple, float]]:
    """The rival point at ``a``'s perplexity ratio, and its per-prompt scores (interpolated or the nearest)."""
    x = math.log(a["ppl_ratio"])
    pts = sorted(rivals, key=lambda p: math.log(p["ppl_ratio"]))
    below = [p for p in pts if math.log(p["ppl_ratio"]) <= x]
    above = [p for p in pts if math.log(p["ppl_ratio"]) > x]
    if not below or not above:
        b = min(rivals, key=lambda p: abs(math.log(p["ppl_ratio"]) - x))
        return b, by_key[pool_key(b)]
    p, q = below[-1], above[0]
    t = (x - math.log(p["ppl_ratio"])) / (math.log(q["ppl_ratio"]) - math.log(p["ppl_ratio"]))
    sp, sq = by_key[pool_key(p)], by_key[pool_key(q)]
    scores = {k: (1 - t) * sp[k] + t * sq[k] for k in sp if k in sq}

    def mix(key: str) -> float | None:
        u, v = p.get(key), q.get(key)
        return None if u is None or v is None else (1 - t) * u + t * v

    point = {
        **p,
        "strength": mix("strength"),
        "ppl_ratio": a["ppl_ratio"],
        "ppl_ratio_lo": mix("ppl_ratio_lo"),
        "ppl_ratio_hi": mix("ppl_ratio_hi"),
    }
    return point, scores


def probe_rows(model: str, bundles: dict[str, ValueBundle]) -> pa.Table:
    """Per (value, layer): probe accuracies (val chose the band; test is reported), convergence, the gate's figures."""
    rows = []
    for value, b in bundles.items():
        g, h = b.gate, b.gate.heldout or {}
        bad = set(b.extra.get("not_converged", []))
        for i, layer in enumerate(b.layers.tolist()):
            rows.append(
                dict(
                    model=model,
                    value=value,
                    layer=int(layer),
                    train_acc=float(b.train_acc[i]),
                    val_acc=float(b.val_acc[i]) if b.val_acc is not None else None,
                    test_acc=float(b.test_acc[i]),
                    converged=int(layer) not in bad,
                    in_band=int(layer) in b.band,
                    gate_kind=g.kind,
                    gate_layer=g.layer,
                    gate_threshold=g.threshold if g.kind != "none" else None,
                    gate_target_met=g.target_met,
                    gate_precision=h.get("precision"),
                    gate_recall=h.get("recall"),
                    gate_accuracy=h.get("accuracy"),
                    gate_n=h.get("n"),
                    gate_open_neutral=h.get("open_rate_neutral"),
                    gate_open_other=h.get("open_rate_other"),
                    gate_open_own=h.get("open_rate_own"),
                    gate_open_mc=h.get("open_rate_mc"),
                    gate_not_converged=h.get("not_converged"),
                )
            )
    return pa.Table.from_pylist(rows, schema=STUDY_PROBE_SCHEMA)


def study_tables(parts: Sequence[dict], *, n_boot: int, seed: int) -> dict[str, pa.Table]:
    """Every output table of a study from its models' parts, keyed by :data:`OUTPUT_FILES`.

    Each part holds one model's ``cells``, ``generations``, ``judged``, ``utility``, ``choice`` and
    ``agreement`` tables, its ``probes`` table (:func:`probe_rows`) and its ``cosines`` table
    (:func:`conva.batch.specificity.cosine_rows`).
    """
    from conva.batch.schemas import CHOICE_SCHEMA, COSINE_SCHEMA
    from conva.batch.specificity import choice_tables

    choice = pa.concat_tables(
        [p.get("choice", CHOICE_SCHEMA.empty_table()).cast(CHOICE_SCHEMA) for p in parts]
    )
    cosines = pa.concat_tables([p.get("cosines", COSINE_SCHEMA.empty_table()) for p in parts])
    results = pa.concat_tables([results_table(p["cells"], p["generations"], p["judged"]) for p in parts])
    utility = pa.concat_tables([p["utility"] for p in parts])
    judges = pa.concat_tables([p["agreement"] for p in parts])
    agreement = {(r["model"], r["value"]): r["agreement"] for r in judges.to_pylist()}
    validity = {r["model"]: r for r in judges.to_pylist() if r["value"] == "*"}
    pooled = pool(results, utility, agreement, n_boot=n_boot, seed=seed, validity=validity)
    return dict(
        results=results,
        pooled=pooled,
        matched=matched_fluency(results, pooled, n_boot=n_boot, seed=seed),
        summary=summarize(results, utility, agreement, n_boot=n_boot, seed=seed, validity=validity),
        utility=utility,
        probes=pa.concat_tables([p["probes"] for p in parts]),
        judges=judges,
        **choice_tables(choice, n_boot=n_boot, seed=seed),
        cosines=cosines,
    )
