"""Running shards on a set of Ray actors: resources and bounded retries from the config, results as they finish.

Failure policy, all Ray's own: an actor whose process dies is restarted at most ``ray.max_restarts``
times, and the call it was running is retried at most ``ray.max_task_retries`` times (never infinite;
the config refuses values over 100). A Python exception raised by a worker is deterministic (a bad
shard, a broken bundle), so it is not retried: it fails the job at once, naming the shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from conva.config import Config

__all__ = ["ShardFailedError", "WorkerStartError", "actor_options", "start_actors", "stop_actors", "run_shards"]

# Calls queued per actor: the next shard is already waiting on the actor while the driver commits the
# previous result, so an actor never idles on the driver's round trip.
QUEUE_DEPTH = 2


class ShardFailedError(RuntimeError):
    """A shard failed for good (a worker error, or a worker that kept dying past its retries)."""

    def __init__(self, stage: str, shard: int, cause: BaseException) -> None:
        if isinstance(cause, RayTaskError) and cause.cause is not None:
            cause = cause.cause  # the worker's own exception, without Ray's wrapping traceback
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(f"{stage} shard {shard} failed: {type(cause).__name__}: {reason}")
        self.shard = shard


class WorkerStartError(RuntimeError):
    """An actor could not be constructed (e.g. its model failed to load)."""


def actor_options(cfg: Config) -> dict[str, Any]:
    """``ray.remote`` options for a worker: CPUs and (fractional) GPUs, bounded restarts and retries."""
    r = cfg.ray
    return dict(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker, max_restarts=r.max_restarts,
                max_task_retries=r.max_task_retries if r.max_restarts > 0 else 0)


def start_actors(cls: type, cfg: Config, n: int | None = None) -> list[Any]:
    """Create ``n`` (default ``ray.num_workers``) actors of ``cls(cfg)`` and wait until all are constructed."""
    remote = ray.remote(cls).options(**actor_options(cfg))
    actors = [remote.remote(cfg) for _ in range(n or cfg.ray.num_workers)]
    try:
        ray.get([a.__ray_ready__.remote() for a in actors])
    except RayError as err:
        stop_actors(actors)
        cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
        raise WorkerStartError(f"{cls.__name__} failed to start: {str(cause).strip().splitlines()[-1]}") from err
    return actors


def stop_actors(actors: Sequence[Any]) -> None:
    """Kill the actors (no restart); safe to call twice."""
    for actor in actors:
        ray.kill(actor, no_restart=True)


def run_shards(actors: Sequence[Any], method: str, stage: str, shards: Sequence[int],
               args: Callable[[int], tuple]) -> Iterator[tuple[int, Any]]:
    """Call ``actor.<method>(shard, *args(shard))`` for every shard; yield ``(shard, result)`` as each finishes.

    At most ``QUEUE_DEPTH`` calls wait on each actor, so only that many shards' inputs exist at once.
    Raises :class:`ShardFailedError` naming the shard when one fails for good; the shards yielded before
    stay valid (the caller has committed them).
    """
    todo = list(reversed(shards))
    free = [a for _ in range(QUEUE_DEPTH) for a in actors]  # round-robin: a0, a1, a0, a1
    in_flight: dict[ray.ObjectRef, tuple[int, Any]] = {}
    while todo or in_flight:
        while free and todo:
            shard, actor = todo.pop(), free.pop(0)
            in_flight[getattr(actor, method).remote(shard, *args(shard))] = (shard, actor)
        # Our own loop rather than ActorPool: ActorPool hands back a result or an error without saying which
        # input it belongs to, and the driver needs the shard index to commit it or to name it in a failure.
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        shard, actor = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayError as err:
            raise ShardFailedError(stage, shard, err) from err
        free.append(actor)
        yield shard, result
