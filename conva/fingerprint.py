"""A model's fingerprint read from its weight files, without loading the model: for pre-flight checks.

:func:`conva.models.model_fingerprint` hashes the config's shape, the first rows of the input
embedding and the final norm. Those are a few kilobytes of an 8B checkpoint, so the driver can refuse
a bundle made for another model before any worker loads anything: build the model on the ``meta``
device (no memory), read just those tensors from the safetensors files and hash them the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from conva.models import SMOLLM2, TINY, check_model, model_fingerprint, resolve_model

__all__ = ["file_fingerprint"]

_log = logging.getLogger(__name__)


def file_fingerprint(spec: str, dtype: str = "float32") -> str | None:
    """The fingerprint ``load_model(spec, dtype)`` would give, or None if it cannot be read from files.

    None (logged) for hub ids, remote code, non-safetensors checkpoints and renamed weights: the
    workers then check bundles themselves once the model is loaded.
    """
    canonical = check_model(spec)
    path = resolve_model(spec) if canonical in (SMOLLM2, TINY) else canonical
    if not os.path.isdir(path):
        _log.info("model %s is not a local folder: bundles are checked by the workers", spec)
        return None
    try:
        return _from_folder(Path(path), dtype)
    except Exception as err:  # any architecture surprise just means "check later, in the worker"
        _log.info("cannot fingerprint %s from its files (%s): bundles are checked by the workers", path, err)
        return None


def _from_folder(folder: Path, dtype: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings()
    norm = _final_norm(model)
    names = {id(m): n for n, m in model.named_modules()}
    wanted = {names[id(embedding)]: embedding, **({names[id(norm)]: norm} if norm is not None else {})}
    prefix = f"{model.base_model_prefix}."
    for name, module in wanted.items():
        tensor = _read(folder, f"{name}.weight", name.removeprefix(prefix) + ".weight")
        # as from_pretrained(dtype=...) would hold it; model_fingerprint then hashes it as float32
        module.weight = torch.nn.Parameter(tensor.to(getattr(torch, dtype)), requires_grad=False)
    return model_fingerprint(model)


def _final_norm(model):
    from conva.models import FINAL_NORM_NAMES

    for name in FINAL_NORM_NAMES:
        module = getattr(model.base_model, name, None)
        if getattr(module, "weight", None) is not None:
            return module
    return None


def _read(folder: Path, *keys: str):
    """The first of ``keys`` found in the folder's safetensors files (only the first 64 rows of 2-D tensors)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        if index.exists()
        else {}
    )
    for key in keys:
        file = files.get(key, folder / "model.safetensors")
        if not file.exists():
            continue
        with safe_open(str(file), framework="pt") as handle:
            if key in handle.keys():
                part = handle.get_slice(key)
                return part[:64] if len(part.get_shape()) == 2 else part[:]
    raise KeyError(f"none of {keys} in the safetensors files of {folder}")
