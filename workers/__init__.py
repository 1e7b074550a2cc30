"""Ray actors that own a model and process one shard of rows per call.

The classes here are plain Python: :func:`workers.pool.start_actors` turns them into Ray actors with
the resources and bounded restart policy of the job's ``[ray]`` config, and
:func:`workers.pool.run_shards` feeds them shards and yields results as they finish. ``conva/`` holds
the method; this package only adds "load once, process many shards, check the row contract".
"""

from workers.backends import BACKENDS, Steerer, make_steerer, register_backend
from workers.contract import RowContractError, check_rows
from workers.extraction import ExtractionWorker
from workers.pool import ShardFailedError, actor_options, run_shards, start_actors, stop_actors
from workers.steering import SteeringWorker

__all__ = [
    "BACKENDS", "Steerer", "make_steerer", "register_backend", "RowContractError", "check_rows",
    "ExtractionWorker", "SteeringWorker", "ShardFailedError", "actor_options", "run_shards", "start_actors",
    "stop_actors",
]
