"""Gates: decide per prompt whether it concerns the value, so that only those prompts are steered.

Gated-off prompts must come out exactly as without steering; the gate is what keeps general ability
(e.g. MMLU) intact. Kinds (config ``gate.kind``):

* ``none``: every prompt is steered.
* ``probe``: a logistic probe on the model's own activation at the prompt's last token, at a layer no
  later than the first steered layer (so it reads an unsteered state). It is **value-specific**: the
  value's own texts (label 1) against **unrelated** inputs: value-neutral prompts and multiple-choice
  questions (label 0; :func:`gate_labels`). Other values' texts are not negatives by default (a dilemma
  pits two values, so it concerns both); their open rate is reported. The rows are split **by pair**,
  stratified by kind of row, into train / calibrate / test (:func:`gate_splits`): the probe is fitted on
  train; its layer and its threshold are chosen on calibrate, the threshold to a stated target: by
  default **recall ≥ 0.9** on the value's own prompts (the reference's gate is a recall gate: it lets
  the value's prompts through and keeps unrelated inputs unsteered), or precision ≥ 0.95. Precision,
  recall, accuracy and the open rate per kind of row are reported on test, at that threshold. A target
  that cannot be met is logged as a warning and recorded (``target_met``), never papered over.
* ``external``: a HuggingFace sequence-classification model (the paper used a DeBERTa value detector)
  with a label map and a hand-set threshold; scored on the prompt text before generation, as the mean
  of the probabilities of the labels that mean the value (the reference's per-label averaging). The
  classifier is loaded once per process.

Example:
    >>> gate = fit_probe_gate(lambda l: x_by_layer[l], labels, groups, layers=[2, 4, 6])  # doctest: +SKIP
    >>> gate.open(gate.scores(x_by_layer[gate.layer]))                                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from conva.probes import LayerFit, ProbeSettings, fit_layer, split_three

__all__ = [
    "GATE_KINDS",
    "GATE_SCOPES",
    "GATE_TARGETS",
    "GATE_NEGATIVES",
    "ROW_KINDS",
    "PREFIX_ON",
    "Gate",
    "GateSplit",
    "Calibration",
    "gate_splits",
    "gate_labels",
    "open_rates",
    "fit_probe_gate",
    "calibrate_threshold",
    "gate_metrics",
    "external_scores",
]

GATE_KINDS = ("none", "probe", "external")
# What a gate gates (config gate.apply_to): ConVA only, or every method alike (the reference code).
GATE_SCOPES = ("conva", "all_methods")
# Where the opposite setting's prefix goes (gate.prefix_on): every row, or only rows the gate opens.
PREFIX_ON = ("all", "gated")
# What the probe gate's threshold is calibrated to (gate.target): recall on the value's own prompts (the
# reference's kind of gate), or precision.
GATE_TARGETS = ("recall", "precision")
# The probe gate's negatives (gate.negatives): unrelated inputs only, or other values' texts as well.
GATE_NEGATIVES = ("unrelated", "unrelated+other_values")
# Kinds of gate rows (``origin``): the value's own prompts and pair texts, the other values' prompts and pair
# texts, value-neutral prompts, multiple-choice questions.
ROW_KINDS = ("own", "own_pair", "other", "other_pair", "neutral", "mc")
_OWN, _UNRELATED, _OTHER = ("own", "own_pair"), ("neutral", "mc"), ("other", "other_pair")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    """A fitted gate.

    ``heldout``: figures on the **test** rows at ``threshold``: precision, recall, accuracy and n on the
    rows the target is measured on, and ``open_rate_<kind>`` (with its row count ``open_n_<kind>``) on every
    test row of each kind (:data:`ROW_KINDS`). ``calibration``: the same on the calibrate rows that chose
    layer and threshold.
    ``target_met``: whether the threshold reached ``target ≥ target_value`` on calibrate (None: not fitted).
    """

    kind: str = "none"
    threshold: float = 0.5
    layer: int | None = None
    w: np.ndarray | None = None
    b: float = 0.0
    model: str | None = None
    labels: tuple[str, ...] = ()
    target: str = "recall"
    target_value: float = 0.9
    heldout: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)
    target_met: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {self.kind!r}; expected one of {GATE_KINDS}")
        if self.kind == "probe" and (self.w is None or self.layer is None):
            raise ValueError("a probe gate needs its layer and weights")
        if self.kind == "external" and not (self.model and self.labels):
            raise ValueError("an external gate needs a classifier model and the labels that mean the value")

    def scores(self, activations: np.ndarray) -> np.ndarray:
        """Probe-gate probability for ``[n, d]`` activations at ``self.layer``."""
        assert self.w is not None, "scores() is for probe gates"
        z = activations.astype(np.float64) @ self.w.astype(np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def open(self, scores: np.ndarray) -> np.ndarray:
        """Which rows pass: ``score >= threshold`` (every row for kind ``none``)."""
        if self.kind == "none":
            return np.ones(len(scores), dtype=bool)
        return np.asarray(scores) >= self.threshold


@dataclass(frozen=True)
class GateSplit:
    """Disjoint row indices of the gate data: fit on ``train``, choose on ``calibrate``, report on ``test``."""

    train: np.ndarray
    calibrate: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class Calibration:
    """A threshold and whether it meets the target on the rows it was chosen on."""

    threshold: float
    met: bool


def gate_splits(
    groups: Sequence | np.ndarray,
    calibrate_size: float,
    test_size: float,
    seed: int = 0,
    strata: Sequence | np.ndarray | None = None,
) -> GateSplit:
    """Split gate rows **by group** (a pair's two texts share one) into train / calibrate / test.

    With ``strata`` (a label or a kind per row), the groups of each stratum are split apart, so every part
    gets its share of each, however few (e.g. the value's own prompts). Deterministic for a seed; every
    group lands in one part.
    """
    groups = np.asarray(groups)
    strata = np.zeros(len(groups), dtype=np.int64) if strata is None else np.asarray(strata)
    parts: list[list[np.ndarray]] = [[], [], []]
    for k, stratum in enumerate(np.unique(strata)):
        rows = np.flatnonzero(strata == stratum)
        split = split_three(
            groups[rows], ProbeSettings(seed=seed + k, split="pair"), test_size, calibrate_size
        )
        for part, idx in zip(parts, split):
            part.append(rows[idx])
    train, cal, test = (np.sort(np.concatenate(p)) for p in parts)
    return GateSplit(train, cal, test)


def gate_labels(origin: Sequence[str] | np.ndarray, negatives: str = "unrelated") -> np.ndarray:
    """Per gate row: 1 for the value's own texts, 0 for its negatives, -1 for rows only reported on.

    ``negatives``: ``unrelated`` (neutral prompts and multiple-choice questions) or
    ``unrelated+other_values`` (the other values' texts too). A -1 row is neither fitted nor calibrated on;
    its kind's open rate is still reported.
    """
    if negatives not in GATE_NEGATIVES:
        raise ValueError(f"unknown gate negatives {negatives!r}; expected one of {GATE_NEGATIVES}")
    origin = np.asarray(origin)
    unknown = sorted(set(origin.tolist()) - set(ROW_KINDS))
    if unknown:
        raise ValueError(f"unknown kinds of gate rows {unknown}; expected among {ROW_KINDS}")
    negative = _UNRELATED + (_OTHER if negatives == "unrelated+other_values" else ())
    return np.where(np.isin(origin, _OWN), 1, np.where(np.isin(origin, negative), 0, -1)).astype(np.int64)


def _precision_recall(scores: np.ndarray, labels: np.ndarray, t: float) -> tuple[float, float]:
    pred = scores >= t
    tp = int(np.sum(pred & (labels == 1)))
    precision = tp / int(pred.sum()) if pred.any() else 1.0
    recall = tp / max(int(np.sum(labels == 1)), 1)
    return precision, recall


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray, target: str, value: float) -> Calibration:
    """The threshold that meets ``target`` (``precision`` or ``recall``) ≥ ``value`` on these rows.

    For precision: the lowest threshold whose precision reaches ``value`` (most recall at that
    precision). For recall: the highest threshold whose recall reaches ``value`` (fewest unrelated rows
    opened at that recall). If no threshold reaches the target, the one with the best F1 is returned with
    ``met=False``: the caller must say so.
    """
    if target not in GATE_TARGETS:
        raise ValueError(f"unknown gate target {target!r}; expected one of {GATE_TARGETS}")
    candidates = np.unique(scores)
    stats = [_precision_recall(scores, labels, float(t)) for t in candidates]
    ok = [float(t) for t, (p, r) in zip(candidates, stats) if (p if target == "precision" else r) >= value]
    if ok:
        return Calibration(min(ok) if target == "precision" else max(ok), True)
    f1 = [2 * p * r / max(p + r, 1e-12) for p, r in stats]
    return Calibration(float(candidates[int(np.argmax(f1))]), False)


def open_rates(scores: np.ndarray, origin: Sequence[str] | np.ndarray, threshold: float) -> dict[str, float]:
    """Per kind of row: ``open_rate_<kind>``, the share of its rows scoring ≥ ``threshold``, and ``open_n_<kind>``."""
    opened, origin = np.asarray(scores, dtype=np.float64) >= threshold, np.asarray(origin)
    out = {}
    for kind in sorted(set(origin.tolist())):
        mine = origin == kind
        out[f"open_rate_{kind}"] = float(np.mean(opened[mine]))
        out[f"open_n_{kind}"] = float(mine.sum())
    return out


def gate_metrics(
    scores: np.ndarray, labels: np.ndarray, threshold: float, origin: Sequence[str] | np.ndarray | None = None
) -> dict[str, float]:
    """Precision, recall, accuracy, n and (with ``origin``) the open rates per kind of row, at ``threshold``."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    precision, recall = _precision_recall(scores, labels, threshold)
    opened = scores >= threshold
    out = {
        "precision": precision,
        "recall": recall,
        "accuracy": float(np.mean(opened == (labels == 1))),
        "n": float(len(labels)),
    }
    return out if origin is None else {**out, **open_rates(scores, origin, threshold)}


def _choose(
    fits: dict[int, tuple[LayerFit, np.ndarray]], labels: np.ndarray, target: str, value: float
) -> tuple[int, Calibration]:
    """The layer and threshold chosen on calibrate: meet the target first, then most of the other metric.

    Ties go to the later layer (later layers carry more of the prompt's meaning).
    """
    best: tuple[tuple, int, Calibration] | None = None
    for layer, (_, scores) in fits.items():
        cal = calibrate_threshold(scores, labels, target, value)
        p, r = _precision_recall(scores, labels, cal.threshold)
        key = (cal.met, r if target == "precision" else p, 2 * p * r / max(p + r, 1e-12), layer)
        if best is None or key >= best[0]:
            best = (key, layer, cal)
    assert best is not None, "fit_probe_gate needs at least one candidate layer"
    return best[1], best[2]


def _figures(
    scores: np.ndarray, labels: np.ndarray, measured: np.ndarray, origin: np.ndarray | None, t: float
) -> dict[str, float]:
    """Precision, recall, accuracy and n on the ``measured`` rows; open rates on every row, per kind."""
    out = gate_metrics(scores[measured], labels[measured], t)
    return out if origin is None else {**out, **open_rates(scores, origin, t)}


def _check_both_classes(name: str, labels: np.ndarray, **parts: np.ndarray) -> None:
    """Refuse a split part (``train=rows, ...``) that lacks rows of either class, naming the gate and part."""
    for part, rows in parts.items():
        if set(labels[rows].tolist()) != {0, 1}:
            raise ValueError(
                f"gate {name}: its {part} split needs rows of both classes (got {len(rows)} rows)"
            )


def fit_probe_gate(
    layer_matrix: Callable[[int], np.ndarray],
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray,
    layers: Sequence[int],
    *,
    target: str = "recall",
    target_value: float = 0.9,
    calibrate_size: float = 0.25,
    test_size: float = 0.25,
    seed: int = 0,
    origin: Sequence[str] | np.ndarray | None = None,
    measured: Sequence[bool] | np.ndarray | None = None,
    settings: ProbeSettings = ProbeSettings(),
    name: str = "",
) -> Gate:
    """Fit a probe gate per candidate layer on train; choose layer and threshold on calibrate; report on test.

    ``labels``: 1 for texts that concern the value, 0 for its negatives, -1 for rows that are only
    reported on (:func:`gate_labels`). ``groups``: rows of one group (a pair's two texts) stay in one
    split. ``origin``: a kind per row (:data:`ROW_KINDS`); the split is stratified by it, and every kind's
    open rate is reported. ``measured``: the labelled rows the threshold is calibrated on and precision
    and recall are reported on (default: all; e.g. the value's own prompts but not its pair texts). Rows
    of one part never reach another: the probe sees train only, the threshold calibrate only, and
    ``heldout`` is computed on test alone. A missed target is logged as a warning (``name`` says whose
    gate) and recorded in ``target_met``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    use = labels >= 0 if measured is None else np.asarray(measured, dtype=bool) & (labels >= 0)
    org = None if origin is None else np.asarray(origin)
    split = gate_splits(groups, calibrate_size, test_size, seed, labels if org is None else org)
    train = split.train[labels[split.train] >= 0]
    cal = split.calibrate[use[split.calibrate]]
    _check_both_classes(name, labels, train=train, calibrate=cal)
    fits, converged = _fit_layers(layer_matrix, labels, train, split.calibrate, layers, settings)
    in_cal = use[split.calibrate]
    chosen = {l: (f, s[in_cal]) for l, (f, s) in fits.items()}
    layer, c = _choose(chosen, labels[cal], target, target_value)
    fit, cal_scores = fits[layer]
    test_scores = fit.scores(np.asarray(layer_matrix(layer), dtype=np.float32)[split.test])

    def figures(rows: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return _figures(scores, labels[rows], use[rows], None if org is None else org[rows], c.threshold)

    calibration, heldout = figures(split.calibrate, cal_scores), figures(split.test, test_scores)
    heldout["not_converged"] = float(sum(not ok for ok in converged))
    _warn_missed(name, target, target_value, c.met, heldout)
    return Gate(
        "probe",
        c.threshold,
        layer,
        fit.w,
        fit.b,
        target=target,
        target_value=target_value,
        heldout=heldout,
        calibration=calibration,
        target_met=c.met,
    )


def _fit_layers(
    layer_matrix: Callable[[int], np.ndarray],
    labels: np.ndarray,
    train: np.ndarray,
    calibrate: np.ndarray,
    layers: Sequence[int],
    settings: ProbeSettings,
) -> tuple[dict[int, tuple[LayerFit, np.ndarray]], list[bool]]:
    """A probe per candidate layer fitted on ``train``, with its scores on ``calibrate``; whether each converged."""
    fits, converged = {}, []
    for layer in layers:
        x = np.asarray(layer_matrix(layer), dtype=np.float32)
        fit = fit_layer(x, labels, train, settings)
        fits[int(layer)] = (fit, fit.scores(x[calibrate]))
        converged.append(fit.converged)
    return fits, converged


def _warn_missed(name: str, target: str, value: float, met: bool, heldout: dict[str, float]) -> None:
    if not met:
        _log.warning(
            "gate %s: no threshold reaches %s >= %g on the calibrate split; using the best-F1 threshold "
            "(recorded as target_met = false)",
            name,
            target,
            value,
        )
    if heldout[target] < value:
        _log.warning(
            "gate %s: %s on the test split is %.3f, below the target %g (n = %d)",
            name,
            target,
            heldout[target],
            value,
            int(heldout["n"]),
        )


@functools.lru_cache(maxsize=4)
def _classifier(model: str, device: str):
    """The external gate's tokenizer and classifier, loaded once per process and device."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    clf = AutoModelForSequenceClassification.from_pretrained(model).to(device).eval()
    return tok, clf


def external_scores(
    gate: Gate, texts: Sequence[str], batch_size: int = 16, device: str = "cpu"
) -> np.ndarray:
    """Score texts with an external classifier gate: the mean probability of ``gate.labels``.

    A value maps to several of the classifier's labels (e.g. ValueEval's "Power: dominance" and "Power:
    resources"); the reference averages their probabilities, and so does this.

    The classifier is loaded on first use and kept for the process (:func:`functools.lru_cache`).
    """
    import torch

    assert gate.model is not None, "external_scores() is for external gates"
    tok, clf = _classifier(gate.model, device)
    label_ids = {name: int(i) for i, name in clf.config.id2label.items()}
    missing = [l for l in gate.labels if l not in label_ids]
    if missing:
        raise ValueError(f"gate labels {missing} are not labels of {gate.model} (it has {sorted(label_ids)})")
    idx = [label_ids[l] for l in gate.labels]
    multi = clf.config.problem_type == "multi_label_classification"
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(
                list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True
            )
            logits = clf(**{k: v.to(device) for k, v in enc.items()}).logits.float()
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
            out.append(probs[:, idx].mean(dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
