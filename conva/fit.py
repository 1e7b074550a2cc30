"""Fitting a value bundle from activations: probes per layer, the band, the CAA vector and the gate.

This is the driver's central step. It takes activations through callables that return one layer's
matrix at a time (so a driver can stream them from Parquet) and returns a :class:`ValueBundle`.

Example:
    >>> bundle = fit_value("power", pair_acts, gate_acts, model_info, FitSettings())   # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from conva.bundle import ValueBundle
from conva.gates import GATE_KINDS, Gate, fit_probe_gate
from conva.probes import ProbeSettings, choose_band, fit_probes, parse_band

__all__ = ["GateSettings", "FitSettings", "ModelInfo", "LayerData", "fit_value"]


@dataclass(frozen=True)
class GateSettings:
    """``[gate]`` config: kind, calibration target, and for ``external`` the classifier and labels."""

    kind: str = "probe"  # probe (a probe on the model's own activations), external (a text classifier) or none
    target: str = "precision"  # the probe gate's threshold is calibrated on held-out rows to reach this measure
    target_value: float = 0.95  # the value that measure must reach (else the best-F1 threshold, recorded)
    model: str | None = None  # external: a sequence-classification model (folder or repo id)
    labels: tuple[str, ...] = ()  # external: the classifier's labels that mean the value
    threshold: float = 0.5  # external: open the gate when the labels' score reaches this

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {self.kind!r}; expected one of {GATE_KINDS}")


@dataclass(frozen=True)
class FitSettings:
    """How a bundle is fitted. ``band``: ``auto``, a preset, ``"LO-HI"`` or a list of block indices."""

    probe: ProbeSettings = field(default_factory=ProbeSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    band: str | tuple[int, ...] = "auto"
    band_width: int = 0  # 0: half of the model's blocks
    p0: float = 0.95


@dataclass(frozen=True)
class ModelInfo:
    """What a bundle records about the model it was fitted on."""

    name: str
    fingerprint: str
    hidden_size: int
    n_blocks: int


@dataclass(frozen=True)
class LayerData:
    """Labelled activations, one layer at a time: ``matrix(l)`` is ``[n, d]`` for block ``l``."""

    matrix: Callable[[int], np.ndarray]
    labels: np.ndarray
    groups: np.ndarray
    layers: tuple[int, ...]


class _CAA:
    """The CAA steering vector (mean positive minus mean negative activation), per layer, taken in passing.

    Wraps a layer reader: every layer :func:`fit_probes` reads also yields its CAA row, so a streaming
    driver reads each layer once for both.
    """

    def __init__(self, data: LayerData) -> None:
        self.data, self.rows = data, {}
        self.pos, self.neg = data.labels == 1, data.labels == 0

    def matrix(self, layer: int) -> np.ndarray:
        x = self.data.matrix(layer)
        x64 = np.asarray(x, dtype=np.float64)
        self.rows[layer] = x64[self.pos].mean(0) - x64[self.neg].mean(0)
        return x

    def vectors(self, layers: Sequence[int]) -> np.ndarray:
        for layer in layers:
            if layer not in self.rows:
                self.matrix(layer)
        return np.stack([self.rows[l] for l in layers]).astype(np.float32)


def fit_value(
    value: str, pairs: LayerData, gate_data: LayerData | None, model: ModelInfo, settings: FitSettings,
    *, position: str = "last", chat_template: bool = False, dataset_hash: str = "",
) -> ValueBundle:
    """Fit probes on ``pairs`` (label 1 = promotes the value), pick the band, fit the gate; return the bundle.

    ``gate_data`` (label 1 = concerns the value, 0 = neutral) is needed for a ``probe`` gate; its
    candidate layers are those of ``gate_data`` up to the band's first layer.
    """
    caa = _CAA(pairs)
    fit = fit_probes(caa.matrix, pairs.labels, pairs.groups, pairs.layers, settings.probe)
    band = parse_band(settings.band, model.n_blocks)
    if band is None:
        band = choose_band(fit, settings.band_width or max(1, model.n_blocks // 2))
    gate = _fit_gate(settings.gate, gate_data, band)
    return ValueBundle(
        value=value, model_name=model.name, fingerprint=model.fingerprint, hidden_size=model.hidden_size,
        n_blocks=model.n_blocks, layers=fit.layers, w=fit.w, b=fit.b, train_acc=fit.train_acc,
        test_acc=fit.test_acc, caa=caa.vectors(pairs.layers), band=band, p0=settings.p0, gate=gate,
        position=position, chat_template=chat_template, dataset_hash=dataset_hash,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"probe": settings.probe.__dict__, "n_train": fit.n_train, "n_test": fit.n_test},
    ).with_band(band)


def _fit_gate(s: GateSettings, data: LayerData | None, band: tuple[int, ...]) -> Gate:
    if s.kind == "none":
        return Gate("none")
    if s.kind == "external":
        return Gate("external", s.threshold, model=s.model, labels=s.labels)
    if data is None:
        raise ValueError("a probe gate needs gate data (value texts and neutral prompts)")
    candidates = [l for l in data.layers if l <= band[0]]
    if not candidates:
        raise ValueError(f"no gate candidate layer at or before the band's first layer {band[0]}")
    return fit_probe_gate(data.matrix, data.labels, candidates, target=s.target, target_value=s.target_value)
