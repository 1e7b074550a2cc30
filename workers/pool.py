"""One model's worker pool and the one stage runner that keeps it busy with shards of any stage.

:class:`WorkerPool` starts ``ray.num_workers`` :class:`~conva.workers.worker.ModelWorker` actors with the
job's resources, loads the model once in each, and keeps them for every stage of the job. It starts
work as soon as ``ray.min_workers`` are ready (the rest join when Ray places them) and fails after
``ray.startup_timeout_s`` with a message that names what is missing. A worker that dies is replaced, so
the pool holds its size, within a budget that grows with the pool and the run: ``ray.max_restarts`` +
``ray.restarts_per_worker_hour`` x ``ray.num_workers`` x hours so far (:attr:`WorkerPool.restart_budget`).
With ``steer.backend = "fake"`` the workers are :class:`~conva.workers.fake.FakeWorker` s (a simulation).

:func:`run_stages` runs the pending shards of several stages on the pool at once:

* **Two calls in flight per worker** (``ray.queue_depth``): a worker starts its next shard the moment it
  finishes one, never waiting for the driver's round trip.
* **Dependencies per shard**: a stage's shard starts when its inputs are committed (``StageRun.after``),
  so e.g. the study's evaluation of generation shard ``i`` runs while later shards are still steered.
* **Exactly one commit per shard**: every call carries a fresh attempt id; the first record of a shard
  is committed through :meth:`conva.batch.store.Stage.commit`, a later one is ignored.
* **Failures by type**: a worker's :class:`~conva.workers.errors.ShardError` says ``fatal``
  (the job fails naming the shard), ``transient`` (retried after a backoff, at most
  ``ray.transient_retries`` times), ``oom`` (retried with batches half as large) or ``hardware`` (a CUDA,
  ECC or NCCL fault: the worker is replaced and the shard retried elsewhere, counted like a death). A worker that dies
  or hangs past ``ray.shard_timeout_s`` (then it is killed) is charged to the attempt it was running,
  which it noted in Ray's GCS as it started (:func:`conva.workers.worker.mark_running`); every other call it
  held goes back uncharged (a finished call whose reply was lost with the process, the calls queued behind). A shard whose workers died ``ray.max_task_retries + 1`` times
  fails the job.

* **Speculation at the tail**: once no shard is queued, a worker's shard that has run
  ``ray.speculate_after`` times its stage's median shard time (and any queued behind it) gets a second
  attempt on an idle worker. The first record commits; the other attempt's record is ignored and its
  files deleted as it arrives, or, if it is still running when the run ends, once the pool stops its
  worker (:meth:`WorkerPool.stop`).
* **O(1) driver work per reply**: the scheduling loop handles every reply that is ready in one pass, and
  rescans a stage's queue for met dependencies only after a commit (nothing else can meet one).

**Progress** goes to the log as ``<stage>: shard i of N committed, x rows/s, ETA …`` lines, at most every
few seconds, so it shows in ``run.log`` and under ``ray job submit`` alike; on a terminal each stage also
gets a bar (which the job's log lines print above, see :func:`conva.jobs.common.setup_logging`).

Workers return :class:`~conva.batch.store.ShardRecord` s only; :attr:`WorkerPool.returned_bytes` counts what
they sent back (the records' size as JSON), and anything else (a table, say) fails the job: no shard
data passes through the driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from conva.batch.store import ShardRecord, ShardRef, Stage
from conva.workers.tasks import ShardTask, WorkerSpec
from conva.workers.worker import ModelWorker, running_attempt

__all__ = ["WorkerPool", "StageRun", "run_stages", "ShardFailedError", "WorkerStartError", "Cancelled"]

_log = logging.getLogger("conva.jobs")
_TICK_S = 0.5
_SETTLE_S = 10.0  # how long a dead worker's calls may take to resolve
_PROGRESS_EVERY_S = 10.0
_DURATION_SAMPLES = 256  # recent shard times per stage, for the median a straggler is measured against
_MIN_SAMPLES = 3  # no speculation before this many shards of the stage finished


class ShardFailedError(RuntimeError):
    """A shard failed for good: a fatal worker error, or retries (deaths, timeouts, transient errors) used up."""

    def __init__(self, stage: str, shard: int, message: str) -> None:
        super().__init__(f"{stage} shard {shard} failed: {message}")
        self.stage, self.shard = stage, shard


class WorkerStartError(RuntimeError):
    """The pool could not get enough workers started (resources, a model that fails to load, a bad node)."""


class Cancelled(RuntimeError):
    """The run was asked to stop (its ``cancel`` event was set, e.g. by a signal to a study's driver)."""


@dataclass
class StageRun:
    """One stage as the runner sees it: its store, how to build an attempt's task, when a shard may start."""

    name: str
    stage: Stage
    make_task: Callable[[ShardRef], ShardTask]
    after: Callable[[int], bool] | None = None  # None: every shard may start now
    on_commit: Callable[[ShardRecord], None] | None = None


@dataclass
class _Call:
    ref: Any
    run: StageRun
    shard: int
    attempt: str
    submitted: float
    timed_out: bool = False
    speculative: bool = False  # a second attempt at a straggler (first record wins)


@dataclass
class _Member:
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
        self.members: list[_Member] = []
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
            reason = _cause_text(err)
            self.failures.append(reason)
            _log.warning("%s: a worker failed to start: %s", self.label, reason)
            ray.kill(actor, no_restart=True)
            self._replace_slot(reason)
            return
        self.members.append(_Member(actor, info))
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

    def remove(self, member: _Member, reason: str) -> None:
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
            _delete_location(
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


class _Progress:
    """``shard i of N, rows/s, ETA`` log lines for one stage, at most every few seconds; a bar too on a terminal."""

    def __init__(self, run: StageRun, label: str = "") -> None:
        self.run, self.total = run, run.stage.n_shards
        self.done, self.rows, self.last = len(run.stage.committed()), 0, 0.0
        self.start: float | None = None  # when the stage's first shard was handed out
        self.todo = self.total - self.done
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=f"{label}{run.name}",
                unit="shard",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def dispatched(self) -> None:
        if self.start is None:
            self.start = time.monotonic()

    def committed(self, record: ShardRecord) -> None:
        self.done, self.rows = self.done + 1, self.rows + record.rows
        if self.bar is not None:
            self.bar.update(1)
        now = time.monotonic()
        if now - self.last < _PROGRESS_EVERY_S and self.done < self.total:
            return
        self.last = now
        elapsed, finished = now - (self.start or now), self.todo - (self.total - self.done)
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = elapsed / finished * (self.total - self.done) if finished else 0.0
        _log.info(
            "%s: shard %d of %d committed, %.1f rows/s, ETA %s",
            self.run.name,
            self.done,
            self.total,
            rate,
            _duration(eta),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class _Runner:
    def __init__(
        self, pool: WorkerPool, runs: Sequence[StageRun], cancel: threading.Event | None = None
    ) -> None:
        self.pool, self.runs, self.cancel = pool, list(runs), cancel
        self.queue: dict[str, deque[int]] = {r.name: deque(r.stage.pending()) for r in runs}
        self.delayed: list[tuple[float, StageRun, int]] = []
        self.calls: dict[Any, tuple[_Member, _Call]] = {}
        # Calls whose shard another attempt committed first (speculation): collected as they finish.
        self.losers: dict[Any, tuple[_Member, _Call]] = {}
        self.live: defaultdict[tuple[str, int], list[_Call]] = defaultdict(
            list
        )  # attempts in flight per shard
        self.done: set[tuple[str, int]] = set()  # shards committed in this run
        self.speculated: set[tuple[str, int]] = set()
        self.durations: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=_DURATION_SAMPLES))
        self.commits = 0
        self.scanned: dict[str, int] = {}  # per stage: the commit count at its last scan that found nothing
        self.deaths: Counter[tuple[str, int]] = Counter()
        self.transient: Counter[tuple[str, int]] = Counter()
        self.divisor: defaultdict[tuple[str, int], int] = defaultdict(lambda: 1)
        self.progress: dict[str, _Progress] = {}

    def run(self) -> None:
        for r in self.runs:
            if self.queue[r.name]:
                _log.info("%s: %d of %d shards pending", r.name, len(self.queue[r.name]), r.stage.n_shards)
        self.progress = {r.name: _Progress(r, f"{self.pool.label}: ") for r in self.runs}
        try:
            self._loop()
        finally:
            for progress in self.progress.values():
                progress.close()
            for _, call in self.losers.values():  # still running: collected once the pool stops its worker
                self.pool.orphans.append((call.run.stage, call.shard, call.attempt))

    def _loop(self) -> None:
        s = self.pool.settings
        while any(self.queue.values()) or self.delayed or self.calls:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled(f"{self.pool.label}: stopped with {len(self.calls)} shard(s) in flight")
            self.pool.grow()
            self._release_delayed()
            self._fill(s.queue_depth)
            self._speculate(s.speculate_after)
            waits = [*self.calls, *self.losers, *self.pool.starting]
            if not self.calls:
                self._idle()
            if not waits:
                time.sleep(_TICK_S)
                continue
            ready, _ = ray.wait(waits, num_returns=1, timeout=_TICK_S)
            if ready:  # everything else that is ready too: one scheduling pass per batch, not per reply
                ready, _ = ray.wait(waits, num_returns=len(waits), timeout=0)
            for ref in ready:
                if ref in self.pool.starting:
                    self.pool._joined(ref)
                elif ref in self.calls or ref in self.losers:  # not taken by a death handled just before
                    self._finished(ref)
            self._check_timeouts(s.shard_timeout_s)

    def _idle(self) -> None:
        """Nothing in flight: fail if nothing can ever run again (no workers left, or a dependency never met)."""
        if not self.pool.members and not self.pool.starting:
            stuck = next((r.name for r in self.runs if self.queue[r.name]), "?")
            raise WorkerStartError(
                f"{self.pool.label}: no worker left to run {stuck} "
                f"(the budget of {self.pool.restart_budget} replacements by now is used up: "
                f"ray.max_restarts={self.pool.settings.max_restarts}, "
                f"ray.restarts_per_worker_hour={self.pool.settings.restarts_per_worker_hour:g}; "
                f"last failure: {self.pool.failures[-1] if self.pool.failures else 'a worker died'})"
            )
        if self.pool.members and not self.delayed:
            waiting = [r.name for r in self.runs if self.queue[r.name]]
            if waiting:
                raise RuntimeError(f"stages {waiting} wait on shards that can no longer be committed")

    def _release_delayed(self) -> None:
        if not self.delayed:
            return
        now = time.monotonic()
        for item in [d for d in self.delayed if d[0] <= now]:
            self.delayed.remove(item)
            self._push(item[1].name, item[2])

    def _next(self) -> tuple[StageRun, int] | None:
        for run in self.runs:
            queue = self.queue[run.name]
            if not queue:
                continue
            if run.after is None:
                return run, queue.popleft()
            # A dependency can only become true when a shard commits: no rescan until one has.
            if self.scanned.get(run.name) == self.commits:
                continue
            for k, shard in enumerate(queue):
                if k >= 256:
                    break
                if run.after(shard):
                    del queue[k]
                    return run, shard
            self.scanned[run.name] = self.commits
        return None

    def _fill(self, depth: int) -> None:
        while True:
            room = [m for m in self.pool.members if len(m.calls) < depth]
            if not room:
                return
            member = min(room, key=lambda m: len(m.calls))
            picked = self._next()
            if picked is None:
                return
            self._submit(member, *picked)

    def _submit(self, member: _Member, run: StageRun, shard: int, speculative: bool = False) -> None:
        attempt = uuid.uuid4().hex[:12]
        task = run.make_task(run.stage.ref(shard, attempt))
        divisor = self.divisor[(run.name, shard)]
        if divisor > 1:
            task = replace(task, batch_divisor=divisor)
        call = _Call(member.actor.run.remote(task), run, shard, attempt, time.time(), speculative=speculative)
        self.progress[run.name].dispatched()
        member.calls.append(call)
        self.calls[call.ref] = (member, call)
        self.live[(run.name, shard)].append(call)

    def _speculate(self, factor: float) -> None:
        """Nothing left to hand out: give an idle worker a second attempt at a straggler (first record wins).

        A straggler is a worker's running shard that has run ``factor`` times the stage's median shard
        time, or a shard queued behind one; each shard is tried speculatively once.
        """
        if not factor or any(self.queue.values()) or self.delayed:
            return
        idle = [m for m in self.pool.members if not m.calls]
        if not idle:
            return
        now = time.time()
        for member in list(self.pool.members):
            if not member.calls or member.calls[0].timed_out:
                continue
            head = member.calls[0]
            times = self.durations.get(head.run.name)
            if not times or len(times) < _MIN_SAMPLES:
                continue
            running = now - max(head.submitted, member.last_done)
            median = statistics.median(times)
            if running < factor * median:
                continue
            for call in list(member.calls):
                key = (call.run.name, call.shard)
                if key in self.speculated or key in self.done or call.speculative:
                    continue
                if not idle:
                    return
                self.speculated.add(key)
                target = idle.pop()
                _log.info(
                    "%s: shard %d has run %.1f s on %s (median %.1f s): a speculative attempt on %s",
                    call.run.name,
                    call.shard,
                    running,
                    member.label,
                    median,
                    target.label,
                )
                self._submit(target, call.run, call.shard, speculative=True)

    def _finished(self, ref: Any) -> None:
        member, call = self.calls.get(ref) or self.losers[ref]
        try:
            record = ray.get(ref)
        except RayActorError as err:
            self._died(member, err)
            return
        except RayTaskError as err:
            self._forget(member, call)
            cause = getattr(err, "cause", None) or err
            if getattr(cause, "kind", "") == "hardware" and (call.run.name, call.shard) not in self.done:
                self._hardware(member, call, cause)
            else:
                self._failed(call, cause)
            return
        except RayError as err:  # e.g. Ray's own out-of-memory kill: the worker process is gone
            self._died(member, err)
            return
        self._forget(member, call)
        self._accept(call, record)

    def _forget(self, member: _Member, call: _Call) -> None:
        self.calls.pop(call.ref, None)
        self.losers.pop(call.ref, None)
        live = self.live.get((call.run.name, call.shard))
        if live is not None:
            if call in live:
                live.remove(call)
            if not live:
                del self.live[(call.run.name, call.shard)]
        if call in member.calls:
            member.calls.remove(call)
        member.last_done = time.time()

    def _accept(self, call: _Call, record: Any) -> None:
        if not isinstance(record, ShardRecord):
            raise TypeError(
                f"{call.run.name} shard {call.shard}: a worker returned {type(record).__name__}; "
                "workers must write their shard to the store and return only its ShardRecord"
            )
        if (record.shard, record.attempt, record.stage) != (call.shard, call.attempt, call.run.stage.name):
            raise ShardFailedError(
                call.run.name,
                call.shard,
                f"the worker answered for {record.stage} shard "
                f"{record.shard} attempt {record.attempt}, not attempt {call.attempt}",
            )
        self.pool.returned_bytes += _record_bytes(record)  # what a worker sent back: this record
        w = record.worker
        self.pool.busy.append((w.get("worker", "?"), w.get("started", 0.0), w.get("finished", 0.0)))
        self.pool.loads[w.get("worker", "?")] = w.get("loads", 0)
        key = (call.run.name, call.shard)
        if w.get("finished") and w.get("started"):
            self.durations[call.run.name].append(w["finished"] - w["started"])
        if key not in self.done and (self.deaths[key] or self.transient[key]):
            _log.info(
                "%s: shard %d succeeded on attempt %d",
                call.run.name,
                call.shard,
                self.deaths[key] + self.transient[key] + 1,
            )
        # A later record of a shard (the loser of a speculative pair) is ignored and its objects deleted.
        if call.run.stage.commit(record):
            self.done.add(key)
            self.commits += 1
            for other in self.live.get(key, []):  # a speculative twin still running: collect it when it ends
                if other.ref in self.calls:
                    self.losers[other.ref] = self.calls.pop(other.ref)
            if call.speculative:
                _log.info("%s: shard %d: the speculative attempt finished first", call.run.name, call.shard)
            self.progress[call.run.name].committed(record)
            call.run.stage.compact_if_due()
            if call.run.on_commit is not None:
                call.run.on_commit(record)

    def _failed(self, call: _Call, cause: BaseException) -> None:
        kind, key = getattr(cause, "kind", "fatal"), (call.run.name, call.shard)
        text = f"{type(cause).__name__}: {_first_line(cause)}"
        if key in self.done or self.live.get(
            key
        ):  # its twin committed, or is still running: nothing to retry
            _delete_attempt(call)
            return
        if kind == "fatal":
            raise ShardFailedError(call.run.name, call.shard, f"attempt {call.attempt}: {text}")
        self.transient[key] += 1
        n, limit = self.transient[key], self.pool.settings.transient_retries
        if n > limit:
            raise ShardFailedError(
                call.run.name,
                call.shard,
                f"{n} attempts failed ({kind}; ray.transient_retries={limit}); last: {text}",
            )
        if kind == "oom":
            self.divisor[key] *= 2
        delay = min(60.0, 2.0 ** (n - 1))
        _log.warning(
            "%s: shard %d attempt %s failed (%s, retry %d of %d in %.0f s%s): %s",
            call.run.name,
            call.shard,
            call.attempt,
            kind,
            n,
            limit,
            delay,
            f", batches 1/{self.divisor[key]} of the configured size" if kind == "oom" else "",
            text,
        )
        self.delayed.append((time.monotonic() + delay, call.run, call.shard))

    def _hardware(self, member: _Member, call: _Call, cause: BaseException) -> None:
        """A hardware-class error (CUDA, ECC, NCCL): the worker's accelerator is suspect, so the worker is
        replaced and the shard retried elsewhere, counted like a death (``ray.max_task_retries``)."""
        key = (call.run.name, call.shard)
        self.deaths[key] += 1
        limit, text = self.pool.settings.max_task_retries, f"{type(cause).__name__}: {_first_line(cause)}"
        _log.warning(
            "%s: shard %d attempt %s: hardware error on %s, replacing the worker (attempt %d of %d): %s",
            call.run.name,
            call.shard,
            call.attempt,
            member.label,
            self.deaths[key],
            limit + 1,
            text,
        )
        _delete_attempt(call)
        behind = list(member.calls)  # queued on the suspect worker: rerun elsewhere, uncharged
        for c in behind:
            self._forget(member, c)
            _delete_attempt(c)
        self.pool.remove(member, f"had a hardware error ({text})")
        if self.deaths[key] > limit:
            raise ShardFailedError(
                call.run.name,
                call.shard,
                f"a hardware error on each of {self.deaths[key]} attempts (ray.max_task_retries={limit}); last: {text}",
            )
        for c in reversed([call, *behind]):
            self._requeue(c)

    def _requeue(self, call: _Call) -> None:
        """Queue a shard again unless it is committed or another attempt at it is still running."""
        key = (call.run.name, call.shard)
        if key not in self.done and not self.live.get(key):
            self._push(call.run.name, call.shard)

    def _push(self, stage: str, shard: int) -> None:
        """Put a shard back at the head of its queue; its dependency is checked on the next pass."""
        self.queue[stage].appendleft(shard)
        self.scanned.pop(stage, None)

    def _died(self, member: _Member, err: BaseException) -> None:
        """A worker died: charge its running attempt, requeue the ones queued behind it, replace it."""
        calls = list(member.calls)
        for c in calls:
            self._forget(member, c)
        failed = []
        for c in calls:
            record = _result_if_done(c.ref)
            if record is None:
                failed.append(c)
            else:
                self._accept(c, record)
        reason = f"died ({_first_line(err)})"
        if failed:
            # The attempt the worker noted as started is the one it was running; without a note (it died
            # before starting one) the oldest: Ray runs a worker's calls in submission order. It is charged
            # only if its shard is not committed already (by a speculative twin); the others go back uncharged.
            running = running_attempt(member.info.get("worker", ""))
            blamed = next((c for c in failed if c.attempt == running), failed[0])
            if blamed.timed_out:
                reason = f"was killed after {self.pool.settings.shard_timeout_s:g} s on one shard (ray.shard_timeout_s)"
            key = (blamed.run.name, blamed.shard)
            if key not in self.done:
                self.deaths[key] += 1
                limit = self.pool.settings.max_task_retries
                _log.warning(
                    "%s: shard %d attempt %s: %s %s (attempt %d of %d)",
                    blamed.run.name,
                    blamed.shard,
                    blamed.attempt,
                    member.label,
                    reason,
                    self.deaths[key],
                    limit + 1,
                )
                if self.deaths[key] > limit:
                    self.pool.remove(member, reason)
                    raise ShardFailedError(
                        blamed.run.name,
                        blamed.shard,
                        f"its worker {reason} on each of "
                        f"{self.deaths[key]} attempts (ray.max_task_retries={limit})",
                    )
            for c in reversed(failed):
                self._requeue(c)
        for c in failed:  # none of these attempts will be committed: what they wrote is dead
            _delete_attempt(c)
        self.pool.remove(member, reason)

    def _check_timeouts(self, timeout: float) -> None:
        if timeout <= 0:
            return
        now = time.time()
        for member in list(self.pool.members):
            if not member.calls or member.calls[0].timed_out:
                continue
            head = member.calls[0]
            running = now - max(head.submitted, member.last_done)
            if running > timeout:
                head.timed_out = True
                _log.warning(
                    "%s: shard %d attempt %s has run %.0f s on %s (ray.shard_timeout_s=%g); killing the worker",
                    head.run.name,
                    head.shard,
                    head.attempt,
                    running,
                    member.label,
                    timeout,
                )
                ray.kill(member.actor, no_restart=True)


def run_stages(pool: WorkerPool, runs: Sequence[StageRun], cancel: threading.Event | None = None) -> None:
    """Run every pending shard of ``runs`` on ``pool``, committing each as it finishes (see the module docstring).

    Raises :class:`ShardFailedError` naming the shard when one fails for good, and :class:`Cancelled` soon
    after ``cancel`` is set; shards committed before stay committed, and a rerun runs only the pending
    ones. The caller stops the pool (its workers may still be running the shards in flight).
    """
    _Runner(pool, runs, cancel).run()


def _delete_attempt(call: _Call) -> None:
    """Delete what a dead attempt wrote (a call that finished as its worker died writes its files, but its
    record never arrives); best effort: a reopened stage deletes whatever is left (``Stage.open``)."""
    where = call.run.stage.attempt_location(call.shard, call.attempt)
    _delete_location(where, f"{call.run.name} shard {call.shard} attempt {call.attempt}")


def _delete_location(where: Any, what: str) -> None:
    try:
        where.delete_tree()
    except OSError as err:
        _log.warning("%s: could not delete its files: %s", what, err)


def _result_if_done(ref: Any) -> ShardRecord | None:
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


def _record_bytes(record: ShardRecord) -> int:
    """A record's size as JSON (what ``to_json`` gives), without ``dataclasses.asdict``'s deep copies: it runs
    once per shard on the driver."""

    def fields(obj: object) -> dict:  # slotted dataclasses: no __dict__, and asdict would deep-copy
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]

    return len(json.dumps({**fields(record), "objects": [fields(o) for o in record.objects]}))


def _cause_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
