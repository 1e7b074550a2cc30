"""Running shards on a set of Ray actors: resources and bounded retries from the config, results as they finish.

Failure policy: an actor whose process dies is restarted by Ray at most ``ray.max_restarts`` times; the
call it was running is retried **by the driver** (:func:`run_shards`), at most ``ray.max_task_retries``
times (never infinite; the config refuses values over 100). Retrying here rather than in Ray lets the
driver charge a death to the shard that was running, not to the shards queued behind it on the same
actor, count every attempt, and log each death and restart in the job's log. A Python exception
raised by a worker is deterministic (a bad shard, a broken bundle), so it is not retried: it fails the
job at once, naming the shard.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

from conva.config import Config

__all__ = ["ShardFailedError", "WorkerStartError", "actor_options", "start_actors", "stop_actors", "run_shards"]

_log = logging.getLogger(__name__)

# Calls in flight per actor. One, so that when an actor dies the driver knows which shard it was running:
# with two, the reply of a finished call can be lost with the process, and the death would be charged to
# it instead of to the shard that killed it. The actor still does not wait for the driver's commit: its
# next shard is submitted as soon as its result arrives, before the result is committed.
QUEUE_DEPTH = 1


class ShardFailedError(RuntimeError):
    """A shard failed for good (a worker error, or a worker that kept dying past its retries)."""

    def __init__(self, stage: str, shard: int, cause: BaseException, attempts: int = 0) -> None:
        if isinstance(cause, RayTaskError) and cause.cause is not None:
            cause = cause.cause  # the worker's own exception, without Ray's wrapping traceback
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        died = f"its worker died on each of {attempts} attempt(s); last: " if attempts else ""
        super().__init__(f"{stage} shard {shard} failed: {died}{type(cause).__name__}: {reason}")
        self.shard = shard


class WorkerStartError(RuntimeError):
    """An actor could not be constructed (e.g. its model failed to load)."""


def actor_options(cfg: Config) -> dict[str, Any]:
    """``ray.remote`` options for a worker: CPUs and (fractional) GPUs, bounded restarts; Ray retries no call.

    Calls are retried by :func:`run_shards` (``retries=cfg.ray.max_task_retries``), never by Ray.
    """
    r = cfg.ray
    return dict(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker, max_restarts=r.max_restarts,
                max_task_retries=0)


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
               args: Callable[[int], tuple], retries: int = 0) -> Iterator[tuple[int, Any]]:
    """Call ``actor.<method>(shard, *args(shard))`` for every shard; yield ``(shard, result)`` as each finishes.

    At most ``QUEUE_DEPTH`` calls wait on each actor, so only that many shards' inputs exist at once. When
    an actor's process dies, the shard it was running is charged one attempt and, with attempts left, run
    again on whichever actor is free; calls Ray refused because the actor was already restarting go back
    uncharged, and the dead actor gets no work until a ping says Ray has restarted it. Every death is
    logged, and a summary line gives the attempts in all (shards + deaths). Raises
    :class:`ShardFailedError` naming the shard when one fails for good (a worker exception, ``retries + 1``
    deaths, or no actor left); the shards yielded before stay valid (the caller has committed them).
    """
    pool = _Pool(actors, method, stage, args, retries)
    pool.pending.extend(shards)
    while pool.pending or any(pool.calls):
        pool.submit()
        # Our own loop rather than ActorPool: ActorPool hands back a result or an error without saying which
        # input it belongs to, and the driver needs the shard index to commit it, retry it or name it.
        ready, _ = ray.wait([*pool.refs(), *pool.pings], num_returns=1, timeout=_PING_EVERY_S)
        if not ready:
            continue
        if ready[0] in pool.pings:
            pool.pinged(ready[0])
            continue
        i, shard = pool.owner(ready[0])
        try:
            result = ray.get(ready[0])
        except RayActorError as err:
            pool.died(i, err)
            continue
        except RayError as err:
            raise ShardFailedError(stage, shard, err) from err
        pool.calls[i].remove((ready[0], shard))
        pool.submit()  # before the caller commits this result
        if pool.deaths[shard]:
            _log.info("%s: shard %d succeeded on attempt %d", stage, shard, pool.deaths[shard] + 1)
        yield shard, result
    deaths = sum(pool.deaths.values())
    _log.info("%s: %d shards done in %d attempts (%d worker deaths)", stage, len(shards), len(shards) + deaths, deaths)


_PING_EVERY_S = 0.5


class _Pool:
    """The driver's view of the actors: calls in flight per actor (in submission order), who is restarting."""

    def __init__(self, actors: Sequence[Any], method: str, stage: str, args: Callable[[int], tuple],
                 retries: int) -> None:
        self.actors, self.method, self.stage, self.args, self.retries = actors, method, stage, args, retries
        self.pending: deque[int] = deque()
        self.calls: list[list[tuple[ray.ObjectRef, int]]] = [[] for _ in actors]
        self.ready = set(range(len(actors)))  # alive and taking work
        self.pings: dict[ray.ObjectRef, int] = {}  # actors restarting after a death
        self.gone: set[int] = set()
        self.deaths: Counter[int] = Counter()

    def refs(self) -> list[ray.ObjectRef]:
        return [ref for queue in self.calls for ref, _ in queue]

    def owner(self, ref: ray.ObjectRef) -> tuple[int, int]:
        return next((i, s) for i, queue in enumerate(self.calls) for r, s in queue if r == ref)

    def submit(self) -> None:
        """Fill every ready actor's queue up to ``QUEUE_DEPTH``, least loaded first."""
        while self.pending:
            room = [i for i in sorted(self.ready) if len(self.calls[i]) < QUEUE_DEPTH]
            if not room:
                return
            i = min(room, key=lambda k: len(self.calls[k]))
            shard = self.pending.popleft()
            self.calls[i].append((getattr(self.actors[i], self.method).remote(shard, *self.args(shard)), shard))

    def died(self, i: int, err: RayActorError) -> None:
        """Charge actor ``i``'s death to the shard it was running; put its lost calls back in the queue."""
        # A call that finished before the death keeps its result (it is yielded as usual); of the others, the
        # oldest was running, since an actor runs one caller's calls in submission order.
        kept = [(ref, s) for ref, s in self.calls[i] if _succeeded(ref)]
        lost = [s for ref, s in self.calls[i] if (ref, s) not in kept]
        self.calls[i] = kept
        self.pending.extendleft(reversed(lost))
        if not _never_ran(err):
            running = lost[0]
            self.deaths[running] += 1
            _log.warning("%s: worker %d died while running shard %d (attempt %d of %d): %s", self.stage, i, running,
                         self.deaths[running], self.retries + 1, _first_line(err))
            if self.deaths[running] > self.retries:
                raise ShardFailedError(self.stage, running, err, attempts=self.deaths[running])
        self._wait_for_restart(i, err, lost)

    def _wait_for_restart(self, i: int, err: RayActorError, lost: list[int]) -> None:
        self.ready.discard(i)
        if isinstance(err, ActorDiedError):  # not restarting: its restarts are used up (or it cannot start)
            self._gone(i, err, lost[0])
            return
        _log.warning("%s: worker %d is restarting; shards %s go back in the queue", self.stage, i, lost)
        if i not in self.pings.values():
            self.pings[self.actors[i].__ray_ready__.remote()] = i

    def pinged(self, ref: ray.ObjectRef) -> None:
        """A restarting actor answered its ping: ready again, still restarting (ping later), or gone."""
        i = self.pings.pop(ref)
        try:
            ray.get(ref)
        except ActorDiedError as err:
            self._gone(i, err, None)
            return
        except RayActorError:
            time.sleep(_PING_EVERY_S)  # Ray refused the ping while the actor restarts: ask again shortly
            self.pings[self.actors[i].__ray_ready__.remote()] = i
            return
        _log.info("%s: worker %d restarted and takes work again", self.stage, i)
        self.ready.add(i)

    def _gone(self, i: int, err: RayActorError, shard: int | None) -> None:
        self.gone.add(i)
        _log.warning("%s: worker %d is gone for good (%s); %d left", self.stage, i, _first_line(err),
                     len(self.actors) - len(self.gone))
        if len(self.gone) == len(self.actors):
            stuck = shard if shard is not None else (self.pending[0] if self.pending else -1)
            raise ShardFailedError(self.stage, stuck, err, attempts=self.deaths[stuck])


def _never_ran(err: RayActorError) -> bool:
    """Whether Ray refused the call because the actor was already restarting (so it never started)."""
    return "actor is restarting" in str(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _succeeded(ref: ray.ObjectRef) -> bool:
    """Whether the call behind ``ref`` already returned a result (not an error); never waits."""
    if not ray.wait([ref], timeout=0)[0]:
        return False
    try:
        ray.get(ref)
    except RayError:
        return False
    return True
