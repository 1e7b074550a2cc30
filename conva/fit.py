"""Fitting a value bundle from activations: probes per layer, the band, the CAA vector and the gate.

This is the driver's central step. It takes activations through callables that return one layer's
matrix at a time (so a driver can stream them from Parquet) and returns a :class:`ValueBundle`.

Example:
    >>> bundle = fit_value("power", pair_acts, gate_acts, model_info, FitSettings())   # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import Annotated, Callable, Sequence

import numpy as np
from pydantic import Field, model_validator

from conva.bundle import ValueBundle
from conva.gates import (
    GATE_KINDS,
    GATE_NEGATIVES,
    GATE_SCOPES,
    GATE_TARGETS,
    PREFIX_ON,
    Gate,
    fit_probe_gate,
    gate_labels,
)
from conva.probes import ProbeFit, ProbeSettings, choose_band, fit_probes, parse_band
from conva.settings import STEER_TIME, Items, KeyProblem, OneOf, Settings, marked

__all__ = [
    "GateSettings",
    "GATE_FIT_KEYS",
    "gate_fit_keys",
    "FitSettings",
    "ModelInfo",
    "LayerData",
    "fit_value",
]

_log = logging.getLogger(__name__)


class GateSettings(Settings):
    """``[gate]``: how the gate is fitted (stored in each bundle) and, read when steering, what it gates.

    ``apply_to`` and ``prefix_on`` are read when steering: marked :data:`~conva.settings.STEER_TIME`,
    they stay out of the bundles' config hash (:data:`GATE_FIT_KEYS` holds the others).
    """

    kind: Annotated[str, OneOf(GATE_KINDS)] = "probe"
    """none | probe (on the model's activations) | external (a text classifier)."""
    target: Annotated[str, OneOf(GATE_TARGETS)] = "recall"
    """The probe gate's threshold meets this on the calibrate split: "recall" (the share of the value's own
    prompts it opens: the reference's gate lets the value's prompts through) or "precision"."""
    recall: float = Field(0.9, gt=0, le=1)
    """Target "recall": the threshold opens at least this share of the value's own prompts."""
    precision: float = Field(0.95, gt=0, le=1)
    """Target "precision": at least this share of the rows it opens are the value's."""
    negatives: Annotated[str, OneOf(GATE_NEGATIVES)] = "unrelated"
    """The probe gate's negatives: "unrelated" (neutral prompts and multiple-choice questions) or
    "unrelated+other_values" (other values' texts too: poor negatives, as a dilemma concerns two values)."""
    mc: str = "demo"
    """Multiple-choice questions among the unrelated negatives: "demo" (conva/demo_data/mc.csv), an MMLU-layout CSV,
    or "" for none; the study's utility never asks the questions the gate reads when it names the same set."""
    mc_questions: int = Field(32, ge=0)
    """The last N questions of gate.mc are the gate's (0: none)."""
    calibrate_size: float = Field(0.25, gt=0, lt=1)
    """Share of the gate's pairs that choose its layer and threshold."""
    test_size: float = Field(0.25, gt=0, lt=1)
    """Share of the gate's pairs its reported precision/recall/open rates come from."""
    other_pairs_per_value: int = Field(0, ge=0)
    """Pairs of each value outside data.values that serve as gate negatives with negatives =
    "unrelated+other_values" (0: all); unread otherwise."""
    value_prompts: int = Field(0, ge=0)
    """Each value's last N prompts train the gates (never steered); 0: pair texts only."""
    seed: int = 0
    """Seed of the gate's split."""
    apply_to: Annotated[str, OneOf(GATE_SCOPES)] = Field("all_methods", json_schema_extra=STEER_TIME)
    """``all_methods``: every method is gated alike (the reference); ``conva``: ConVA only."""
    prefix_on: Annotated[str, OneOf(PREFIX_ON)] = Field("all", json_schema_extra=STEER_TIME)
    """The opposite setting's prefix: on ``all`` rows, or only where the gate opens (``gated``)."""
    model: str | None = None
    """External: a sequence-classification model (folder or repo id)."""
    labels: Items[str] = ()
    """External: the classifier labels that mean the value (their mean is scored)."""
    threshold: float = 0.5
    """External: the open threshold."""

    @model_validator(mode="after")
    def _consistent(self) -> GateSettings:
        if self.calibrate_size + self.test_size >= 1:
            raise KeyProblem("test_size", "gate.calibrate_size and gate.test_size must sum to less than 1")
        if self.kind == "external" and not (self.model and self.labels):
            raise KeyProblem("model", "an external gate needs gate.model and gate.labels")
        return self

    @property
    def target_value(self) -> float:
        """The value the threshold must reach: ``recall`` or ``precision``, as ``target`` says."""
        return self.recall if self.target == "recall" else self.precision


def gate_fit_keys() -> tuple[str, ...]:
    """The ``[gate]`` keys a fitted bundle depends on: every key not marked steer-time."""
    return tuple(k for k, f in GateSettings.model_fields.items() if not marked(f, STEER_TIME))


# The [gate] keys a fitted bundle depends on (apply_to and prefix_on only change the steering), from the markers.
GATE_FIT_KEYS = gate_fit_keys()


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
    """Labelled activations, one layer at a time: ``matrix(l)`` is ``[n, d]`` for block ``l``.

    ``groups``: rows of one group (a pair's two texts) stay on one side of every split. ``origin``: what
    kind of text each row is (gate data: :data:`conva.gates.ROW_KINDS`), for the gate's labels and per-kind figures.
    """

    matrix: Callable[[int], np.ndarray]
    labels: np.ndarray
    groups: np.ndarray
    layers: tuple[int, ...]
    origin: np.ndarray | None = None


class _CAA:
    """The CAA steering vector (mean positive minus mean negative activation), per layer, taken in passing.

    Wraps a layer reader: every layer :func:`fit_probes` reads also yields its CAA row, so a streaming
    driver reads each layer once for both.
    """

    def __init__(self, data: LayerData) -> None:
        self.data = data
        self.rows: dict[int, np.ndarray] = {}
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
    value: str,
    pairs: LayerData,
    gate_data: LayerData | None,
    model: ModelInfo,
    settings: FitSettings,
    *,
    position: str = "last",
    chat_template: bool = False,
    dataset_hash: str = "",
) -> ValueBundle:
    """Fit probes on ``pairs`` (label 1 = promotes the value), pick the band, fit the gate; return the bundle.

    ``gate_data`` (the value's texts, other values' texts, neutral prompts and multiple-choice questions,
    each row's kind in ``origin``; labelled by ``settings.gate.negatives``) is needed for a ``probe`` gate; its candidate layers are those of ``gate_data`` up to the band's first layer.
    The band is chosen on the probes' validation accuracy; ``test_acc`` is measured on rows neither saw.
    Probes that did not converge are logged as a warning and listed in ``extra["not_converged"]``.
    """
    caa = _CAA(pairs)
    fit = fit_probes(caa.matrix, pairs.labels, pairs.groups, pairs.layers, settings.probe)
    not_converged = _not_converged(value, fit, settings.probe.max_iter)
    band = parse_band(settings.band, model.n_blocks)
    if band is None:
        band = choose_band(fit, settings.band_width or max(1, model.n_blocks // 2))
    gate = _fit_gate(settings.gate, gate_data, band, settings.probe, value)
    return ValueBundle(
        value=value,
        model_name=model.name,
        fingerprint=model.fingerprint,
        hidden_size=model.hidden_size,
        n_blocks=model.n_blocks,
        layers=fit.layers,
        w=fit.w,
        b=fit.b,
        train_acc=fit.train_acc,
        test_acc=fit.test_acc,
        val_acc=fit.val_acc,
        caa=caa.vectors(pairs.layers),
        band=band,
        p0=settings.p0,
        gate=gate,
        position=position,
        chat_template=chat_template,
        dataset_hash=dataset_hash,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={
            "probe": settings.probe.__dict__,
            "n_train": fit.n_train,
            "n_val": fit.n_val,
            "n_test": fit.n_test,
            "not_converged": not_converged,
        },
    ).with_band(band)


def _not_converged(value: str, fit: ProbeFit, max_iter: int) -> list[int]:
    """The layers whose probe did not converge, logged as a warning when there are any."""
    layers = [int(l) for l, ok in zip(fit.layers, fit.converged) if not ok]
    if layers:
        _log.warning(
            "fit %s: %d of %d layer probes did not converge in %d iterations (layers %s)",
            value,
            len(layers),
            len(fit.layers),
            max_iter,
            layers,
        )
    return layers


def _fit_gate(
    s: GateSettings, data: LayerData | None, band: tuple[int, ...], probe: ProbeSettings, value: str
) -> Gate:
    if s.kind == "none":
        return Gate("none")
    if s.kind == "external":
        return Gate("external", s.threshold, model=s.model, labels=s.labels)
    if data is None:
        raise ValueError(
            "a probe gate needs gate data (the value's texts, neutral prompts, multiple-choice questions)"
        )
    candidates = [l for l in data.layers if l <= band[0]]
    if not candidates:
        raise ValueError(f"no gate candidate layer at or before the band's first layer {band[0]}")
    labels, measured = data.labels, None
    if data.origin is not None:
        labels = gate_labels(data.origin, s.negatives)
        if np.any(data.origin == "own"):
            # The gate decides on prompts: its threshold is set on the value's own prompts, which its pair
            # texts (statements, easier to recognise) would swamp; those only train the probe.
            measured = data.origin != "own_pair"
    return fit_probe_gate(
        data.matrix,
        labels,
        data.groups,
        candidates,
        target=s.target,
        target_value=s.target_value,
        calibrate_size=s.calibrate_size,
        test_size=s.test_size,
        seed=s.seed,
        origin=data.origin,
        measured=measured,
        settings=probe,
        name=value,
    )
