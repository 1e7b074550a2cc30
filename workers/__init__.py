"""Ray actors that own a model and process one shard of rows per call.

The classes here are plain Python: :func:`workers.pool.start_actors` turns them into Ray actors with
the resources and bounded restart policy of the job's ``[ray]`` config, and
:func:`workers.pool.run_shards` feeds them shards and yields results as they finish. ``conva/`` holds
the method; this package only adds "load once, process many shards, check the row contract".

Names are imported lazily, so a process that needs only :mod:`workers.contract` never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BACKENDS": "backends", "Steerer": "backends", "check_backend": "backends", "make_steerer": "backends",
    "register_backend": "backends", "RowContractError": "contract", "check_rows": "contract",
    "ExtractionWorker": "extraction", "SteeringWorker": "steering", "ShardFailedError": "pool",
    "WorkerStartError": "pool", "actor_options": "pool", "run_shards": "pool", "start_actors": "pool",
    "stop_actors": "pool",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"workers.{_EXPORTS[name]}"), name)
