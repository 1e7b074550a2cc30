"""One model's worker pool and the one stage runner that keeps it busy with shards of any stage.

:class:`WorkerPool` starts ``ray.num_workers`` :class:`~conva.workers.worker.ModelWorker` actors with the
job's resources, loads the model once in each, and keeps them for every stage of the job. It starts
work as soon as ``ray.min_workers`` are ready (the rest join when Ray places them) and fails after
``ray.startup_timeout_s`` with a message that names what is missing. A worker that dies is replaced, so
the pool holds its size, within a budget that grows with the pool and the run: ``ray.max_restarts`` +
``ray.restarts_per_worker_hour`` x ``ray.num_workers`` x hours so far (:attr:`WorkerPool.restart_budget`).
With ``steer.backend = "fake"`` the workers are :class:`~conva.workers.fake.FakeWorker` s (a simulation).

Workers return :class:`~conva.batch.store.ShardRecord` s only; :attr:`WorkerPool.returned_bytes` counts what
they sent back (the records' size as JSON), and anything else (a table, say) fails the job: no shard
data passes through the driver.

The stage runner that keeps the pool busy is :func:`conva.workers.scheduler.run_stages`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

from conva.batch.store import ShardRecord, Stage
from conva.workers.tasks import WorkerSpec
from conva.workers.worker import ModelWorker

__all__ = [
    "WorkerPool",
    "PoolMember",
    "WorkerStartError",
    "cause_text",
    "first_line",
    "delete_location",
    "result_if_done",
    "record_bytes",
]

_log = logging.getLogger("conva.jobs")
_SETTLE_S = 10.0  # how long a dead worker's calls may take to resolve

_log = logging.getLogger("conva.jobs")


class WorkerStartError(RuntimeError):
    """The pool could not get enough workers started (resources, a model that fails to load, a bad node)."""


@dataclass
class PoolMember:
    """One worker of a pool: its actor, what it reported when ready, its calls in flight (oldest first)."""

    actor: Any
    info: dict
    calls: deque = field(default_factory=deque)
    last_done: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return f"worker {self.info.get('worker', '?')} (node {self.info.get('ip', '?')})"


class WorkerPool:
    """``ray.num_workers`` model workers for one model, kept for every stage; dead ones are replaced.

    The pool runs by the ``[ray]`` section of ``spec.cfg`` (see :class:`conva.batch.config.RayConfig`). ``load``
    names what each worker loads when it starts (``"hf"``: the model, ``"steer"``: the steering backend;
    empty for a pool that only fits). ``label`` prefixes its log lines (the model's name).
    """

    def __init__(self, spec: WorkerSpec, label: str, load: tuple[str, ...]) -> None:
        self.spec, self.settings, self.label, self.load = spec, spec.cfg.ray, label, load
        self.members: list[PoolMember] = []
        self.starting: dict[Any, tuple[Any, float]] = {}
        self.replacements = 0
        self.failures: list[str] = []
        self.busy: list[tuple[str, float, float]] = []  # (worker, start, end): actor-side time spent working
        self.returned_bytes = 0
        self.loads: Counter[str] = Counter()
        self.since = time.monotonic()
        self.orphans: list[tuple[Stage, int, str]] = []  # speculative losers still running when the run ended

    @property
    def restart_budget(self) -> int:
        """Replacements allowed by now: ``max_restarts`` + ``restarts_per_worker_hour`` x workers x hours so far."""
        s, hours = self.settings, (time.monotonic() - self.since) / 3600.0
        return s.max_restarts + int(s.restarts_per_worker_hour * s.num_workers * hours)

    def _spawn(self) -> None:
        s = self.settings
        # Ray restarts nothing and retries nothing: the runner replaces dead workers and retries shards itself.
        # steer.backend = "fake": a simulated worker (a sleep per shard, no model, no torch; workers/fake.py)
        if self.spec.cfg.steer.backend == "fake":
            from conva.workers.fake import FakeWorker

            cls: type = FakeWorker
        else:
            cls = ModelWorker
        remote: Any = ray.remote(cls).options(
            num_cpus=s.num_cpus_per_worker, num_gpus=s.num_gpus_per_worker, max_restarts=0, max_task_retries=0
        )
        actor: Any = remote.remote(self.spec)  # an actor handle: its methods are called with .remote()
        self.starting[actor.load.remote(self.load)] = (actor, time.time())

    def start(self) -> float:
        """Start the workers; return once ``min_workers`` are ready (seconds taken). Raises :class:`WorkerStartError`."""
        t0, s = time.monotonic(), self.settings
        for _ in range(s.num_workers):
            self._spawn()
        need = max(1, min(s.min_workers, s.num_workers))
        while len(self.members) < need:
            if not self.starting:
                raise WorkerStartError(f"{self.label}: no worker could start: {self.failures[-1]}")
            left = s.startup_timeout_s - (time.monotonic() - t0)
            if left <= 0:
                raise WorkerStartError(self._diagnose(time.monotonic() - t0, need))
            ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=min(left, 5.0))
            for ref in ready:
                self._joined(ref)
        seconds = time.monotonic() - t0
        _log.info(
            "%s: %d of %d workers ready after %.1f s (the rest join when placed)",
            self.label,
            len(self.members),
            s.num_workers,
            seconds,
        )
        return seconds

    def grow(self) -> None:
        """Let workers that finished starting (late placements, replacements) join, without waiting."""
        if self.starting:
            ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
            for ref in ready:
                self._joined(ref)

    def _joined(self, ref: Any) -> None:
        actor, since = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except RayError as err:
            reason = cause_text(err)
            self.failures.append(reason)
            _log.warning("%s: a worker failed to start: %s", self.label, reason)
            ray.kill(actor, no_restart=True)
            self._replace_slot(reason)
            return
        self.members.append(PoolMember(actor, info))
        self.busy.append((info["worker"], info["started"], info["finished"]))
        self.loads[info["worker"]] = info["loads"]
        _log.info(
            "%s: worker %s ready on node %s (pid %d) after %.1f s, model loads %d",
            self.label,
            info["worker"],
            info["ip"],
            info["pid"],
            time.time() - since,
            info["loads"],
        )

    def _replace_slot(self, reason: str) -> None:
        budget = self.restart_budget
        if self.replacements >= budget:
            _log.warning(
                "%s: not replacing the worker (the budget of %d replacements by now is used up: "
                "ray.max_restarts=%d + ray.restarts_per_worker_hour=%g per worker per hour); %d left",
                self.label,
                budget,
                self.settings.max_restarts,
                self.settings.restarts_per_worker_hour,
                len(self.members) + len(self.starting),
            )
            return
        self.replacements += 1
        _log.info(
            "%s: starting a replacement worker (%d of %d): %s",
            self.label,
            self.replacements,
            budget,
            reason,
        )
        self._spawn()

    def remove(self, member: PoolMember, reason: str) -> None:
        """Drop a dead (or killed) worker and start a replacement if the budget allows."""
        if member in self.members:
            self.members.remove(member)
        ray.kill(member.actor, no_restart=True)
        self._replace_slot(f"{member.label} {reason}")

    def stop(self) -> None:
        """Kill every worker of the pool (idempotent)."""
        for member in self.members:
            ray.kill(member.actor, no_restart=True)
        for actor, _ in self.starting.values():
            ray.kill(actor, no_restart=True)
        self.members, self.starting = [], {}
        for stage, shard, attempt in self.orphans:  # their workers are dead now: collect what they wrote
            delete_location(
                stage.attempt_location(shard, attempt), f"{stage.name} shard {shard} attempt {attempt}"
            )
        self.orphans = []

    def _diagnose(self, waited: float, need: int) -> str:
        s = self.settings
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        wants = {"CPU": s.num_cpus_per_worker, "GPU": s.num_gpus_per_worker}
        fits = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in wants.items() if v)]
        shape = ", ".join(
            f"{n['NodeManagerAddress']} (CPU {n['Resources'].get('CPU', 0):g}, "
            f"GPU {n['Resources'].get('GPU', 0):g})"
            for n in nodes
        )
        free = ray.available_resources()
        msg = (
            f"{self.label}: {len(self.members)} of the {need} worker(s) needed were ready after {waited:.0f} s "
            f"(ray.startup_timeout_s); each asks for {s.num_cpus_per_worker:g} CPU and {s.num_gpus_per_worker:g} GPU; "
        )
        if not fits:
            msg += (
                f"no alive node has that much (nodes: {shape}): lower ray.num_cpus_per_worker / "
                "ray.num_gpus_per_worker, or add nodes"
            )
        else:
            msg += (
                f"free now in the cluster: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU (nodes: {shape}); "
                "other jobs or models may hold the rest"
            )
        if self.failures:
            msg += f"; a worker failed to start: {self.failures[-1]}"
        return msg


def delete_location(where: Any, what: str) -> None:
    """Delete a folder (an attempt's files) at ``where``, logging instead of raising if it fails; ``what`` names it."""
    try:
        where.delete_tree()
    except OSError as err:
        _log.warning("%s: could not delete its files: %s", what, err)


def cause_text(err: BaseException) -> str:
    """An error's type and the first line of its message (of its ``cause`` for a Ray task error)."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {first_line(cause)}"


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def result_if_done(ref: Any) -> ShardRecord | None:
    """The result of a call that finished before its worker died, or None (it never finished, or failed).

    Waits a little: every call of a dead worker resolves soon (an error, or the reply of a call that
    finished just before the death and is still on its way). Looking without waiting would mistake such a
    finished call for the one that was running, and charge the death to the wrong shard.
    """
    if not ray.wait([ref], timeout=_SETTLE_S)[0]:
        return None
    try:
        return ray.get(ref)
    except RayError:
        return None


def record_bytes(record: ShardRecord) -> int:
    """A record's size as JSON (what ``to_json`` gives), without ``dataclasses.asdict``'s deep copies: it runs
    once per shard on the driver."""

    def fields(obj: object) -> dict:  # slotted dataclasses: no __dict__, and asdict would deep-copy
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]

    return len(json.dumps({**fields(record), "objects": [fields(o) for o in record.objects]}))
