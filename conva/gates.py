"""Gates: decide per prompt whether it concerns the value, so that only those prompts are steered.

Gated-off prompts must come out exactly as without steering; the gate is what keeps general ability
(e.g. MMLU) intact. Kinds (config ``gate.kind``):

* ``none``: every prompt is steered.
* ``probe``: a logistic probe on the model's own activation at the prompt's last token, at a layer no
  later than the first steered layer (so it reads an unsteered state and can run inside the same forward
  pass). Fitted centrally on the value's texts (label 1) against value-neutral prompts (label 0); its
  threshold is **calibrated on held-out rows** to a stated target, e.g. precision ≥ 0.95.
* ``external``: a HuggingFace sequence-classification model (the paper used a DeBERTa value detector)
  with a label map and a threshold; scored on the prompt text before generation.

Example:
    >>> gate = fit_probe_gate(lambda l: x_by_layer[l], labels, layers=[2, 4, 6])  # doctest: +SKIP
    >>> gate.open(x_by_layer[gate.layer])                                         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from conva.probes import ProbeSettings, fit_layer, split_indices

__all__ = ["GATE_KINDS", "Gate", "fit_probe_gate", "calibrate_threshold", "external_scores"]

GATE_KINDS = ("none", "probe", "external")


@dataclass(frozen=True)
class Gate:
    """A fitted gate. ``heldout`` holds the calibration figures (precision, recall, accuracy, n)."""

    kind: str = "none"
    threshold: float = 0.5
    layer: int | None = None
    w: np.ndarray | None = None
    b: float = 0.0
    model: str | None = None
    labels: tuple[str, ...] = ()
    target: str = "precision"
    target_value: float = 0.95
    heldout: dict[str, float] = field(default_factory=dict)

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


def _precision_recall(scores: np.ndarray, labels: np.ndarray, t: float) -> tuple[float, float]:
    pred = scores >= t
    tp = int(np.sum(pred & (labels == 1)))
    precision = tp / max(int(pred.sum()), 1) if pred.any() else 1.0
    recall = tp / max(int(np.sum(labels == 1)), 1)
    return precision, recall


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray, target: str, value: float) -> float:
    """The threshold that meets ``target`` (``precision`` or ``recall``) ≥ ``value`` on held-out rows.

    For precision: the lowest threshold whose precision reaches ``value`` (most recall at that
    precision). For recall: the highest threshold whose recall reaches ``value``. If no threshold
    reaches the target, the one with the best F1 is returned (the achieved figures are recorded).
    """
    if target not in ("precision", "recall"):
        raise ValueError(f"unknown gate target {target!r}; expected 'precision' or 'recall'")
    candidates = np.unique(scores)
    ok = []
    for t in candidates:
        p, r = _precision_recall(scores, labels, float(t))
        if (p if target == "precision" else r) >= value:
            ok.append(float(t))
    if ok:
        return min(ok) if target == "precision" else max(ok)
    f1 = [(2 * p * r / max(p + r, 1e-12)) for p, r in (_precision_recall(scores, labels, float(t)) for t in candidates)]
    return float(candidates[int(np.argmax(f1))])


def fit_probe_gate(
    layer_matrix: Callable[[int], np.ndarray],
    labels: Sequence[int],
    layers: Sequence[int],
    *,
    target: str = "precision",
    target_value: float = 0.95,
    settings: ProbeSettings = ProbeSettings(split="sample"),
) -> Gate:
    """Fit a probe gate at each candidate layer, keep the best held-out one, calibrate its threshold.

    ``labels``: 1 for texts that concern the value, 0 for neutral ones. Ties in held-out accuracy go to
    the later layer (later layers carry more of the prompt's meaning).
    """
    labels = np.asarray(labels, dtype=np.int64)
    train, test = split_indices(labels, np.arange(len(labels)), settings)
    best: tuple[float, int, np.ndarray, float, np.ndarray] | None = None
    for layer in layers:
        x = np.asarray(layer_matrix(layer), dtype=np.float32)
        w, b, _, acc = fit_layer(x, labels, train, test, settings)
        if best is None or acc >= best[0]:
            scores = 1.0 / (1.0 + np.exp(-(x[test].astype(np.float64) @ w.astype(np.float64) + b)))
            best = (acc, int(layer), w, b, scores)
    assert best is not None, "fit_probe_gate needs at least one candidate layer"
    acc, layer, w, b, scores = best
    threshold = calibrate_threshold(scores, labels[test], target, target_value)
    precision, recall = _precision_recall(scores, labels[test], threshold)
    heldout = {"accuracy": acc, "precision": precision, "recall": recall, "n": float(len(test))}
    return Gate("probe", threshold, layer, w, b, target=target, target_value=target_value, heldout=heldout)


def external_scores(gate: Gate, texts: Sequence[str], batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Score texts with an external classifier gate: the highest probability among ``gate.labels``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gate.model)
    clf = AutoModelForSequenceClassification.from_pretrained(gate.model).to(device).eval()
    label_ids = {name: int(i) for i, name in clf.config.id2label.items()}
    missing = [l for l in gate.labels if l not in label_ids]
    if missing:
        raise ValueError(f"gate labels {missing} are not labels of {gate.model} (it has {sorted(label_ids)})")
    idx = [label_ids[l] for l in gate.labels]
    multi = clf.config.problem_type == "multi_label_classification"
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True)
            logits = clf(**{k: v.to(device) for k, v in enc.items()}).logits.float()
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
            out.append(probs[:, idx].max(dim=-1).values.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
