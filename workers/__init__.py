"""Ray actors that own a model and process one shard of rows per call.

:class:`conva.workers.worker.ModelWorker` is plain Python: :class:`conva.workers.pool.WorkerPool` turns it into Ray
actors with the resources of the job's ``[ray]`` config, one pool per model serving every stage, and
:func:`conva.workers.scheduler.run_stages` feeds them shards. Each shard is read and written by the worker itself
(:mod:`conva.workers.shards`); only its record goes back. ``conva/`` holds the method; this package only adds
"load once, process many shards, check the row contract".

Names are imported lazily, so a process that needs only :mod:`conva.workers.contract` never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BACKENDS": "backends",
    "Steerer": "backends",
    "check_backend": "backends",
    "make_steerer": "backends",
    "register_backend": "backends",
    "RowContractError": "contract",
    "check_rows": "contract",
    "ShardError": "errors",
    "ModelWorker": "worker",
    "WorkerSpec": "tasks",
    "ShardTask": "tasks",
    "WorkerPool": "pool",
    "StageRun": "tasks",
    "run_stages": "scheduler",
    "ShardFailedError": "calls",
    "WorkerStartError": "pool",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
