"""Per-layer linear probes: the value vector ``v_l = w_l / ‖w_l‖`` and the intercept ``b_l``.

A logistic regression per layer separates positive (label 1) from negative (label 0) activations. The
probe's probability ``P_l(e) = σ(w_lᵀe + b_l)`` is what ConVA lifts to ``P0``, so the intercept is kept.

Choices (METHOD.md §2 leaves them open; all are settings):

* ``solver``: the reference used ``saga`` on unscaled activations, which stops far from convergence in
  its default 100 iterations; we default to ``lbfgs`` (same L2 objective, C=1, run to convergence).
* ``split``: the 70/30 held-out split is made **by pair** (both texts of a scenario on the same side), so
  held-out accuracy cannot be inflated by the scenario; ``sample`` reproduces the reference's split.
* The steering band is chosen from held-out accuracy (:func:`choose_band`), or taken from a preset.

Fitting streams: :func:`fit_probes` asks for one layer's matrix at a time, so a driver can read a
layer's activations from Parquet, fit, and drop them before the next layer.

Example:
    >>> fit = fit_probes(lambda l: acts[:, l], labels, groups, layers=range(30))   # doctest: +SKIP
    >>> band = choose_band(fit, width=16)                                          # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

__all__ = ["ProbeSettings", "ProbeFit", "split_indices", "fit_layer", "fit_probes", "choose_band", "BAND_PRESETS",
           "parse_band"]

# The reference code's fixed bands (block indices, inclusive), keyed by model family.
BAND_PRESETS: dict[str, tuple[int, int]] = {
    "llama-2-7b": (10, 25),
    "llama-3-8b": (10, 25),
    "qwen2.5-7b": (8, 23),
    "qwen2.5-14b": (15, 36),
}


@dataclass(frozen=True)
class ProbeSettings:
    """How probes are fitted; every field is a config key under ``[probe]``."""

    C: float = 1.0  # inverse L2 regularisation strength of the logistic regression (sklearn's C; the reference: 1)
    solver: str = "lbfgs"  # sklearn's solver (the reference uses saga)
    max_iter: int = 2000  # solver iterations, at most
    test_size: float = 0.3  # share held out to measure each layer's probe accuracy (the reference: 0.3)
    seed: int = 0  # seed of the train/test split
    split: str = "pair"  # hold out whole pairs (both texts of a scenario on one side) or single texts (the reference)


@dataclass(frozen=True)
class ProbeFit:
    """Probes for several layers: ``w`` ``[L, d]``, ``b`` ``[L]``, accuracies ``[L]``, all float32."""

    layers: np.ndarray
    w: np.ndarray
    b: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    n_train: int
    n_test: int

    def index(self, layer: int) -> int:
        """Row of ``layer`` in the arrays; ``ValueError`` if it was not probed."""
        hits = np.flatnonzero(self.layers == layer)
        if hits.size == 0:
            raise ValueError(f"layer {layer} was not probed (probed: {self.layers.tolist()})")
        return int(hits[0])


def split_indices(labels: np.ndarray, groups: np.ndarray, settings: ProbeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test row indices: by group (pair) or by sample, ``test_size`` held out."""
    n = len(labels)
    rng = np.random.default_rng(settings.seed)
    if settings.split == "sample":
        order = rng.permutation(n)
        n_test = int(round(n * settings.test_size))
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    if settings.split != "pair":
        raise ValueError(f"unknown probe split {settings.split!r}; expected 'pair' or 'sample'")
    unique = np.unique(groups)
    shuffled = rng.permutation(unique)
    n_test = int(round(len(unique) * settings.test_size))
    test_groups = set(shuffled[:n_test].tolist())
    is_test = np.array([g in test_groups for g in groups])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def fit_layer(
    x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, settings: ProbeSettings
) -> tuple[np.ndarray, float, float, float]:
    """Fit one layer's probe; return ``(w, b, train_accuracy, held_out_accuracy)``."""
    clf = LogisticRegression(C=settings.C, solver=settings.solver, max_iter=settings.max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x[train], labels[train])
    train_acc = float(clf.score(x[train], labels[train]))
    test_acc = float(clf.score(x[test], labels[test])) if len(test) else float("nan")
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0]), train_acc, test_acc


def fit_probes(
    layer_matrix: Callable[[int], np.ndarray],
    labels: Sequence[int],
    groups: Sequence[int],
    layers: Sequence[int],
    settings: ProbeSettings = ProbeSettings(),
) -> ProbeFit:
    """Fit one probe per layer; ``layer_matrix(l)`` returns that layer's ``[n, d]`` activations.

    Only one layer's matrix is alive at a time. ``groups`` pairs the rows (same id for the positive and
    negative text of one pair) for the by-pair split.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError("probe labels must contain both classes 0 and 1")
    train, test = split_indices(labels, np.asarray(groups), settings)
    ws, bs, tr, te = [], [], [], []
    for layer in layers:
        w, b, a_train, a_test = fit_layer(np.asarray(layer_matrix(layer), dtype=np.float32), labels, train, test, settings)
        ws.append(w), bs.append(b), tr.append(a_train), te.append(a_test)
    return ProbeFit(
        layers=np.asarray(list(layers), dtype=np.int64),
        w=np.stack(ws).astype(np.float32),
        b=np.asarray(bs, dtype=np.float32),
        train_acc=np.asarray(tr, dtype=np.float32),
        test_acc=np.asarray(te, dtype=np.float32),
        n_train=len(train),
        n_test=len(test),
    )


def choose_band(fit: ProbeFit, width: int) -> tuple[int, ...]:
    """The ``width`` consecutive probed layers with the highest mean held-out accuracy (ties: earliest)."""
    width = max(1, min(width, len(fit.layers)))
    acc = np.nan_to_num(fit.test_acc.astype(np.float64), nan=0.0)
    means = np.convolve(acc, np.ones(width) / width, mode="valid")
    start = int(np.argmax(means))
    return tuple(int(l) for l in fit.layers[start : start + width])


def parse_band(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...] | None:
    """A band from config: ``"auto"`` (None: choose from accuracy), a preset name, ``"10-25"``, or a list."""
    if isinstance(spec, str):
        if spec == "auto":
            return None
        if spec in BAND_PRESETS:
            lo, hi = BAND_PRESETS[spec]
        elif "-" in spec and all(p.strip().isdigit() for p in spec.split("-", 1)):
            lo, hi = (int(p) for p in spec.split("-", 1))
        else:
            raise ValueError(f"unknown band {spec!r}: use 'auto', 'LO-HI', a list, or one of {sorted(BAND_PRESETS)}")
        band = tuple(range(lo, hi + 1))
    else:
        band = tuple(sorted(int(l) for l in spec))
    if not band or band[0] < 0 or band[-1] >= n_layers:
        raise ValueError(f"band {spec!r} does not fit a model of {n_layers} blocks")
    return band
