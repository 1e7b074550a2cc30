"""Steering backends, chosen by name in ``steer.backend``: a small registry the vLLM backend plugs into.

A backend is a factory ``(cfg) -> Steerer``. A :class:`Steerer` owns a loaded model and turns one
shard of steering rows into generation rows (``conva.pipeline.GENERATION_SCHEMA``), one per input row.

To add a backend, register a factory::

    @register_backend("mine")
    def _mine(cfg: Config) -> Steerer: ...

``vllm`` is looked up lazily: it works as soon as ``conva.vllm_backend`` exposes ``VLLMSteerer(cfg)``
with the :class:`Steerer` attributes; until then selecting it fails with a clear message.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import pyarrow as pa

from conva.blocks import find_blocks
from conva.bundle import ValueBundle
from conva.config import Config
from conva.models import load_model, model_fingerprint, model_name
from conva.pipeline import steer_table

__all__ = ["Steerer", "HFSteerer", "BACKENDS", "register_backend", "make_steerer", "check_backend"]


class Steerer(Protocol):
    """A loaded model that steers shards. ``fingerprint``/``hidden_size`` check bundles against it."""

    fingerprint: str
    hidden_size: int

    def steer(self, rows: pa.Table, bundles: dict[str, ValueBundle]) -> pa.Table: ...


BACKENDS: dict[str, Callable[[Config], Steerer]] = {}


def register_backend(name: str) -> Callable[[Callable[[Config], Steerer]], Callable[[Config], Steerer]]:
    """Register a steering backend factory under ``name`` (the value of ``steer.backend``)."""
    def add(factory: Callable[[Config], Steerer]) -> Callable[[Config], Steerer]:
        BACKENDS[name] = factory
        return factory
    return add


def make_steerer(cfg: Config) -> Steerer:
    """Build the backend ``cfg.steer.backend`` names (loads the model)."""
    name = cfg.steer.backend
    if name not in BACKENDS:
        raise ValueError(f"steer.backend: unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](cfg)


class HFSteerer:
    """The Hugging Face backend: ``conva.pipeline.steer_table`` on a model loaded with ``load_model``."""

    def __init__(self, cfg: Config) -> None:
        m = cfg.model
        self.cfg = cfg
        self.model, self.tok = load_model(m.name, m.dtype, m.device, m.trust_remote_code)
        self.name = model_name(m.name)
        self.fingerprint = model_fingerprint(self.model)
        self.hidden_size = int(self.model.config.hidden_size)
        self.n_blocks = len(find_blocks(self.model))

    def steer(self, rows: pa.Table, bundles: dict[str, ValueBundle]) -> pa.Table:
        return steer_table(self.model, self.tok, rows, bundles, self.cfg, self.name)


register_backend("hf")(HFSteerer)


def check_backend(name: str) -> None:
    """Raise if backend ``name`` cannot be built here (without loading any model): for pre-flight checks."""
    if name not in BACKENDS:
        raise ValueError(f"steer.backend: unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    if name == "vllm":
        _vllm_class()


def _vllm_class() -> type:
    try:
        module = importlib.import_module("conva.vllm_backend")
    except ModuleNotFoundError as err:
        if err.name != "conva.vllm_backend":
            raise  # the module exists but one of its own imports (e.g. vllm) is missing: say that
        module = None
    steerer = getattr(module, "VLLMSteerer", None)
    if steerer is None:
        raise NotImplementedError("steer.backend: 'vllm' is not available yet (conva.vllm_backend does not "
                                  "expose VLLMSteerer); use steer.backend = 'hf'")
    return steerer


@register_backend("vllm")
def _vllm(cfg: Config) -> Steerer:
    return _vllm_class()(cfg)
