"""The patches that put ConVA's steering op into vLLM: decoder layers and model runners (vLLM 0.32).

Installed by the plugin's ``register`` (:mod:`conva.steering.vllm_plugin`) in every vLLM process:

* each supported decoder layer's ``forward`` calls ``conva::steer`` (:mod:`conva.steering.vllm_op`) after
  the layer when the layer is tagged *active* (a plain attribute set before the first trace);
* a runner's ``load_model`` asks :data:`plugin_factory` for the runner's steering state and binds it
  (tags the active layers); ``_prepare_inputs`` fills the state's per-step buffers from the runner's
  batch; ``_model_forward`` makes it the op's current state and collects the telemetry afterwards.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from conva.steering.vllm_op import CURRENT, EngineState

__all__ = ["install_patches", "plugin_factory"]

# Decoder layers whose forward returns (hidden, residual): module path and class name in vLLM.
_LAYER_CLASSES = (
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.mistral", "MistralDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
    # Gemma 3 norms the attention and MLP outputs before they join the residual, and returns the
    # MLP output unadded: hidden + residual is still the block's output (HF hidden_states[l+1]).
    ("vllm.model_executor.models.gemma3", "Gemma3DecoderLayer"),
)

_PATCHED = False
# Set by the plugin: makes the state of each runner built (None: the runners stay plain).
plugin_factory: Callable[[Any], "EngineState | None"] | None = None


def _wrap_forward(orig: Any) -> Any:
    def forward(
        self: torch.nn.Module,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, res = orig(self, positions, hidden_states, residual, *args, **kwargs)
        tag = getattr(self, "_conva_tag", None)  # (engine, column); set before the first trace
        if tag is not None:
            hidden = torch.ops.conva.steer(hidden, res, tag[0], tag[1])
        return hidden, res

    forward._conva_wrapped = True  # type: ignore[attr-defined]
    return forward


def _wrap_load_model(orig: Any) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        state = plugin_factory(self) if plugin_factory is not None else None
        if state is not None and not getattr(self, "_conva_state", None):
            _bind(self, state)
        return out

    load_model._conva_wrapped = True  # type: ignore[attr-defined]
    return load_model


def _wrap_prepare_inputs(orig: Any) -> Any:
    def _prepare_inputs(
        self: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *a: Any, **k: Any
    ) -> Any:
        out = orig(self, scheduler_output, num_scheduled_tokens, *a, **k)
        state = getattr(self, "_conva_state", None)
        if state is not None:
            state.fill(self, num_scheduled_tokens)
        return out

    _prepare_inputs._conva_wrapped = True  # type: ignore[attr-defined]
    return _prepare_inputs


def _wrap_model_forward(orig: Any) -> Any:
    def _model_forward(self: Any, *a: Any, **k: Any) -> Any:
        CURRENT.state = getattr(self, "_conva_state", None)
        out = orig(self, *a, **k)
        state = getattr(self, "_conva_state", None)
        if state is not None:
            state.after_forward()
        return out

    _model_forward._conva_wrapped = True  # type: ignore[attr-defined]
    return _model_forward


def _bind(runner: Any, state: EngineState) -> None:
    """Tag the active decoder layers of the runner's model and attach the state to the runner."""
    from conva.blocks import find_blocks

    blocks = find_blocks(runner.model)
    n_tagged = 0
    for index, block in enumerate(blocks):
        if index in state.col:
            if not getattr(type(block).forward, "_conva_wrapped", False):
                raise ValueError(
                    f"decoder layer {index} is a {type(block).__name__}, which ConVA's vLLM backend "
                    f"does not patch (supported: {', '.join(c for _, c in _LAYER_CLASSES)})"
                )
            # Module.__getattr__ types unknown attributes as Tensor | Module; the tag is a plain attribute.
            block._conva_tag = (state.op_id, state.col[index])  # type: ignore[assignment]
            n_tagged += 1
    if n_tagged != len(state.layers):
        missing = [l for l in state.layers if l >= len(blocks)]
        raise ValueError(
            f"steered layer(s) {missing} out of range: the model has {len(blocks)} decoder layers"
        )
    runner._conva_state = state
    state.bound = True
    CURRENT.state = state  # warm-up and graph capture run forwards before the first step


def install_patches() -> None:
    """Patch vLLM's decoder layers and model runners (idempotent); called by the plugin's ``register``."""
    global _PATCHED
    if _PATCHED:
        return
    import importlib

    from vllm.v1.worker import cpu_model_runner, gpu_model_runner

    for module, name in _LAYER_CLASSES:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        # Patch only a class that defines forward itself: a subclass inheriting a patched forward
        # must not be wrapped twice (the op would run twice).
        if "forward" in cls.__dict__ and not getattr(cls.forward, "_conva_wrapped", False):
            cls.forward = _wrap_forward(cls.forward)
    # Replacing the runners' methods is the patch itself; mypy forbids assigning to a method.
    for cls in (gpu_model_runner.GPUModelRunner, cpu_model_runner.CPUModelRunner):
        if "load_model" in cls.__dict__ and not getattr(cls.load_model, "_conva_wrapped", False):
            cls.load_model = _wrap_load_model(cls.load_model)  # type: ignore[method-assign]
    runner = gpu_model_runner.GPUModelRunner
    runner._prepare_inputs = _wrap_prepare_inputs(runner._prepare_inputs)  # type: ignore[method-assign]
    runner._model_forward = _wrap_model_forward(runner._model_forward)  # type: ignore[method-assign]
    _PATCHED = True
