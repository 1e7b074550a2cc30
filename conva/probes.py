"""Per-layer linear probes: the value vector ``v_l = w_l / ‖w_l‖`` and the intercept ``b_l``.

A logistic regression per layer separates positive (label 1) from negative (label 0) activations. The
probe's probability ``P_l(e) = σ(w_lᵀe + b_l)`` is what ConVA lifts to ``P0``, so the intercept is kept.

Choices (METHOD.md §2 leaves them open; all are settings):

* ``solver``: the reference used ``saga`` on unscaled activations, which stops far from convergence in
  its default 100 iterations; we default to ``lbfgs`` (same L2 objective, C=1, run to convergence).
* ``split``: the rows are split **by pair** (both texts of a scenario on the same side), so held-out
  accuracy cannot be inflated by the scenario; ``sample`` splits by row, as the reference did.
* Three parts: the probes are fitted on ``train``; the band is chosen from accuracy on ``val``
  (:func:`choose_band`); the accuracy reported (``test_acc``) is measured on ``test``, rows that neither the
  fit nor the band choice saw. With the defaults (test 0.3, val 0.2) the reference's 70/30 test share is
  kept and the fit uses half of the pairs.
* A probe that stops at ``max_iter`` without converging is counted (``ProbeFit.converged``) and reported,
  never silenced.

Fitting streams: :func:`fit_probes` asks for one layer's matrix at a time, so a driver can read a
layer's activations from Parquet, fit, and drop them before the next layer.

Example:
    >>> fit = fit_probes(lambda l: acts[:, l], labels, groups, layers=range(30))   # doctest: +SKIP
    >>> band = choose_band(fit, width=16)                                          # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated, Callable, Sequence

import numpy as np
from pydantic import Field, model_validator

from conva.settings import KeyProblem, OneOf, Settings

__all__ = [
    "ProbeSettings",
    "ProbeFit",
    "LayerFit",
    "split_indices",
    "split_three",
    "fit_layer",
    "fit_probes",
    "choose_band",
    "BAND_PRESETS",
    "Band",
    "parse_band",
]

# The reference code's fixed bands (block indices, inclusive), keyed by model family.
BAND_PRESETS: dict[str, tuple[int, int]] = {
    "llama-2-7b": (10, 25),
    "llama-3-8b": (10, 25),
    "qwen2.5-7b": (8, 23),
    "qwen2.5-14b": (15, 36),
}


class ProbeSettings(Settings):
    """``[probe]``: how probes are fitted; every field is a config key under ``[probe]``."""

    C: float = Field(1.0, gt=0)
    """Inverse L2 strength (the reference: 1)."""
    solver: Annotated[str, OneOf(("lbfgs", "saga", "liblinear", "newton-cg", "sag"))] = "lbfgs"
    """The sklearn solver (the reference: saga)."""
    max_iter: int = Field(2000, ge=1)
    """Iterations before a fit counts as not converged."""
    test_size: float = Field(0.3, gt=0, lt=1)
    """Share of pairs held out for the reported accuracy."""
    val_size: float = Field(0.2, gt=0, lt=1)
    """Share of pairs held out to choose the band (never reported as accuracy)."""
    seed: int = 0
    """Seed of the split."""
    split: Annotated[str, OneOf(("pair", "sample"))] = "pair"
    """"pair": both texts of a pair on one side; "sample": by row (the reference)."""

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> ProbeSettings:
        if self.test_size + self.val_size >= 1.0:
            raise KeyProblem(
                "val_size",
                "must be positive, and probe.test_size + probe.val_size below 1 (the rest trains the probes)",
            )
        return self


@dataclass(frozen=True)
class ProbeFit:
    """Probes for several layers: ``w`` ``[L, d]``, ``b`` ``[L]``, accuracies ``[L]`` (float32), ``converged`` ``[L]``.

    ``val_acc`` chose the band; ``test_acc`` is on rows neither the fit nor that choice saw.
    """

    layers: np.ndarray
    w: np.ndarray
    b: np.ndarray
    train_acc: np.ndarray
    val_acc: np.ndarray
    test_acc: np.ndarray
    converged: np.ndarray
    n_train: int
    n_val: int
    n_test: int

    def index(self, layer: int) -> int:
        """Row of ``layer`` in the arrays; ``ValueError`` if it was not probed."""
        hits = np.flatnonzero(self.layers == layer)
        if hits.size == 0:
            raise ValueError(f"layer {layer} was not probed (probed: {self.layers.tolist()})")
        return int(hits[0])


def split_indices(
    labels: np.ndarray, groups: np.ndarray, settings: ProbeSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test row indices: by group (pair) or by sample, ``test_size`` held out."""
    train, val, test = _split(len(labels), groups, settings, settings.test_size, 0.0)
    return np.sort(np.concatenate([train, val])), test


def split_three(
    groups: np.ndarray, settings: ProbeSettings, test_size: float | None = None, val_size: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic, disjoint ``(train, val, test)`` row indices, by group (pair) or by sample.

    Every row of a group lands in one part. ``test_size``/``val_size`` default to the settings'.
    The test part is the one :func:`split_indices` holds out with the same seed and size.
    """
    groups = np.asarray(groups)
    return _split(
        len(groups),
        groups,
        settings,
        settings.test_size if test_size is None else test_size,
        settings.val_size if val_size is None else val_size,
    )


def _split(
    n: int, groups: np.ndarray, settings: ProbeSettings, test_size: float, val_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(settings.seed)
    if settings.split == "sample":
        order = rng.permutation(n)
        n_test, n_val = int(round(n * test_size)), int(round(n * val_size))
        parts = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        return tuple(np.sort(p) for p in (parts[2], parts[1], parts[0]))  # type: ignore[return-value]
    if settings.split != "pair":
        raise ValueError(f"unknown probe split {settings.split!r}; expected 'pair' or 'sample'")
    unique = np.unique(groups)
    shuffled = rng.permutation(unique)
    n_test, n_val = int(round(len(unique) * test_size)), int(round(len(unique) * val_size))
    part = {g: 2 for g in shuffled[:n_test].tolist()}
    part.update({g: 1 for g in shuffled[n_test : n_test + n_val].tolist()})
    where = np.array([part.get(g, 0) for g in np.asarray(groups).tolist()], dtype=np.int64)
    return np.flatnonzero(where == 0), np.flatnonzero(where == 1), np.flatnonzero(where == 2)


@dataclass(frozen=True)
class LayerFit:
    """One layer's probe: ``w`` float32 ``[d]``, intercept ``b``, and whether the solver converged."""

    w: np.ndarray
    b: float
    converged: bool

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Probe probabilities ``σ(xw + b)`` of ``[n, d]`` rows (float64)."""
        return 1.0 / (1.0 + np.exp(-(np.asarray(x, dtype=np.float64) @ self.w.astype(np.float64) + self.b)))

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Share of rows on the right side of ``wᵀx + b = 0``; NaN for no rows."""
        if len(labels) == 0:
            return float("nan")
        return float(np.mean((self.scores(x) >= 0.5) == (np.asarray(labels) == 1)))


def fit_layer(x: np.ndarray, labels: np.ndarray, train: np.ndarray, settings: ProbeSettings) -> LayerFit:
    """Fit one layer's probe on the rows ``train``; a fit that hits ``max_iter`` is marked not converged.

    The solver's BLAS runs on one thread: at these sizes multi-threaded OpenBLAS gains nothing and, on a
    busy machine, spins: one 807×576 gate fit took 29 s on 2 threads and 0.26 s on 1 (measured, load ~8).
    """
    from sklearn.exceptions import ConvergenceWarning  # imported here: config checks import this module
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=settings.C, solver=settings.solver, max_iter=settings.max_iter)
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x[train], labels[train])
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return LayerFit(clf.coef_[0].astype(np.float32), float(clf.intercept_[0]), converged)


def fit_probes(
    layer_matrix: Callable[[int], np.ndarray],
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    layers: Sequence[int],
    settings: ProbeSettings = ProbeSettings(),
) -> ProbeFit:
    """Fit one probe per layer on the train part; accuracies on train, val and test (:func:`split_three`).

    ``layer_matrix(l)`` returns that layer's ``[n, d]`` activations; only one layer's matrix is alive at
    a time. ``groups`` pairs the rows (same id for the positive and negative text of one pair).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError("probe labels must contain both classes 0 and 1")
    train, val, test = split_three(np.asarray(groups), settings)
    ws, bs, accs, converged = [], [], [], []
    for layer in layers:
        x = np.asarray(layer_matrix(layer), dtype=np.float32)
        fit = fit_layer(x, labels, train, settings)
        ws.append(fit.w)
        bs.append(fit.b)
        converged.append(fit.converged)
        accs.append([fit.accuracy(x[rows], labels[rows]) for rows in (train, val, test)])
    acc = np.asarray(accs, dtype=np.float32).reshape(len(ws), 3)
    return ProbeFit(
        layers=np.asarray(list(layers), dtype=np.int64),
        w=np.stack(ws).astype(np.float32),
        b=np.asarray(bs, dtype=np.float32),
        train_acc=acc[:, 0],
        val_acc=acc[:, 1],
        test_acc=acc[:, 2],
        converged=np.asarray(converged, dtype=bool),
        n_train=len(train),
        n_val=len(val),
        n_test=len(test),
    )


def choose_band(fit: ProbeFit, width: int) -> tuple[int, ...]:
    """The ``width`` consecutive probed layers with the highest mean **validation** accuracy (ties: earliest).

    The test accuracy plays no part, so it stays an honest estimate for the band chosen.
    """
    width = max(1, min(width, len(fit.layers)))
    acc = np.nan_to_num(fit.val_acc.astype(np.float64), nan=0.0)
    means = np.convolve(acc, np.ones(width) / width, mode="valid")
    start = int(np.argmax(means))
    return tuple(int(l) for l in fit.layers[start : start + width])


@dataclass(frozen=True)
class Band:
    """The steered layers as configured, parsed once (:meth:`parse`): ``auto``, a preset, ``"LO-HI"`` or a list.

    ``layers`` are the block indices (ascending), or None for ``auto`` (the fit chooses them from held-out
    accuracy, :func:`choose_band`). ``text`` is the band as written (a list is written ``LO-HI`` when
    contiguous).

    >>> Band.parse("2-4").layers, Band.parse("auto").layers, Band.parse([5, 3]).text
    ((2, 3, 4), None, '3,5')
    """

    layers: tuple[int, ...] | None
    text: str

    @classmethod
    def parse(cls, spec: str | Sequence[int]) -> Band:
        """A band from config text or a list; a ValueError names what is wrong."""
        if isinstance(spec, str):
            text = spec.strip()
            if text == "auto":
                return cls(None, "auto")
            if text in BAND_PRESETS:
                lo, hi = BAND_PRESETS[text]
            else:
                parts = text.split("-")
                if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                    raise ValueError(
                        f"unknown band {spec!r}: use 'auto', 'LO-HI', a list, or one of "
                        f"{sorted(BAND_PRESETS)}"
                    )
                lo, hi = (int(p) for p in parts)
                if lo > hi:
                    raise ValueError(f"band {spec!r} runs backwards (LO must not exceed HI)")
            return cls(tuple(range(lo, hi + 1)), text)
        layers = tuple(sorted(int(l) for l in spec))
        if not layers:
            raise ValueError("a band lists no layer")
        contiguous = layers == tuple(range(layers[0], layers[-1] + 1))
        return cls(layers, f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers)))

    def resolve(self, n_layers: int) -> tuple[int, ...] | None:
        """The layers on a model of ``n_layers`` blocks (None for ``auto``); a band past its last block is refused."""
        if self.layers is not None and (self.layers[0] < 0 or self.layers[-1] >= n_layers):
            raise ValueError(f"band {self.text!r} does not fit a model of {n_layers} blocks")
        return self.layers


def parse_band(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...] | None:
    """A configured band's layers on a model of ``n_layers`` blocks (:class:`Band`); None for ``auto``."""
    return Band.parse(spec).resolve(n_layers)
