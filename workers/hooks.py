"""A seam for tests: a function a worker calls before each shard, installed from the environment, never by default.

``CONVA_WORKER_HOOK=module:function`` (or ``/path/to/file.py:function``, which needs no importable
package: a job's workers need not share the test driver's ``sys.path``) names it; a worker imports it
once, when it starts. The tests'
fault plans (kill, hang, raise; :mod:`tests.faults`) live in such a module, so production code carries
no fault logic and reads no file per shard: without the variable :func:`load_hook` returns None and the
worker never calls anything.

The hook is called as ``hook(task, worker)`` with the :class:`~conva.workers.tasks.ShardTask` about to run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

__all__ = ["HOOK_ENV", "load_hook"]

HOOK_ENV = "CONVA_WORKER_HOOK"


def load_hook() -> Callable | None:
    """The function ``CONVA_WORKER_HOOK`` names, or None when it is unset (every real run)."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.rpartition(":")
    if module.endswith(".py"):
        loader = importlib.util.spec_from_file_location(f"conva_worker_hook_{abs(hash(module))}", module)
        if loader is None or loader.loader is None:
            raise ImportError(f"{HOOK_ENV}: cannot load {module!r}")
        loaded = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(loaded)
        return getattr(loaded, name)
    return getattr(importlib.import_module(module), name)
