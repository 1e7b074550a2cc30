"""A seam for tests: a function a worker calls before each shard, installed from the environment, never by default.

``CONVA_WORKER_HOOK=module:function`` names it; a worker imports it once, when it starts. The tests'
fault plans (kill, hang, raise; :mod:`tests.faults`) live in such a module, so production code carries
no fault logic and reads no file per shard: without the variable :func:`load_hook` returns None and the
worker never calls anything.

The hook is called as ``hook(task, worker)`` with the :class:`~workers.tasks.ShardTask` about to run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

__all__ = ["HOOK_ENV", "load_hook"]

HOOK_ENV = "CONVA_WORKER_HOOK"


def load_hook() -> Callable | None:
    """The function ``CONVA_WORKER_HOOK`` names, or None when it is unset (every real run)."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
