"""The names of the plug-in parts a config chooses among, registered in one place.

``steer.backend`` is validated against :func:`backend_names`. The Ray side builds a backend from a
factory registered with :func:`conva.workers.backends.register_backend`, which also registers the name
here, so one registration makes a backend both buildable and accepted by the config. The built-in names
are listed here too, so that ``conva validate`` accepts them without importing the Ray side (a test
checks that every built-in name has a factory there). The steering methods have their one list in
:data:`conva.steering.spec.METHODS`.

Example:
    >>> "hf" in backend_names()
    True
"""

from __future__ import annotations

__all__ = ["BUILTIN_BACKENDS", "BACKEND_NAMES", "register_backend_name", "backend_names"]

BUILTIN_BACKENDS = ("hf", "vllm", "fake")
"""hf: transformers in each worker; vllm: ConVA inside the vLLM engine (:mod:`conva.steering.vllm`); fake: a
simulation of the orchestration (workers that sleep and write small Parquet shards, ``workers/fake.py``)."""
BACKEND_NAMES: dict[str, None] = dict.fromkeys(BUILTIN_BACKENDS)
"""The names registered now (an ordered set): the built-in ones, then those the Ray side registered."""


def register_backend_name(name: str) -> None:
    """Let ``steer.backend`` take ``name`` (idempotent)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a backend name must be non-empty text, got {name!r}")
    BACKEND_NAMES[name] = None


def backend_names() -> tuple[str, ...]:
    """The backend names registered now, built-in ones first."""
    return tuple(BACKEND_NAMES)
