"""The one stage runner: :func:`run_stages` runs the pending shards of several stages on the pool at once:

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

Progress lines and bars: :mod:`conva.workers.progress`.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from conva.batch.store import ShardRecord
from conva.workers.calls import Cancelled, ShardCall, ShardFailedError
from conva.workers.pool import (
    PoolMember,
    WorkerPool,
    WorkerStartError,
    delete_location,
    first_line,
    record_bytes,
    result_if_done,
)
from conva.workers.progress import StageProgress
from conva.workers.tasks import StageRun
from conva.workers.worker import running_attempt

__all__ = ["run_stages"]

_log = logging.getLogger("conva.jobs")

_TICK_S = 0.5
_DURATION_SAMPLES = 256  # recent shard times per stage, for the median a straggler is measured against
_MIN_SAMPLES = 3  # no speculation before this many shards of the stage finished


class _Runner:
    def __init__(
        self, pool: WorkerPool, runs: Sequence[StageRun], cancel: threading.Event | None = None
    ) -> None:
        self.pool, self.runs, self.cancel = pool, list(runs), cancel
        self.queue: dict[str, deque[int]] = {r.name: deque(r.stage.pending()) for r in runs}
        self.delayed: list[tuple[float, StageRun, int]] = []
        self.calls: dict[Any, tuple[PoolMember, ShardCall]] = {}
        # Calls whose shard another attempt committed first (speculation): collected as they finish.
        self.losers: dict[Any, tuple[PoolMember, ShardCall]] = {}
        self.live: defaultdict[tuple[str, int], list[ShardCall]] = defaultdict(
            list
        )  # attempts in flight per shard
        self.done: set[tuple[str, int]] = set()  # shards committed in this run
        # Records returned in this scheduling pass, awaiting their group commit.
        self.returned: list[tuple[ShardCall, ShardRecord]] = []
        self.speculated: set[tuple[str, int]] = set()
        self.durations: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=_DURATION_SAMPLES))
        self.commits = 0
        self.scanned: dict[str, int] = {}  # per stage: the commit count at its last scan that found nothing
        self.deaths: Counter[tuple[str, int]] = Counter()
        self.transient: Counter[tuple[str, int]] = Counter()
        self.divisor: defaultdict[tuple[str, int], int] = defaultdict(lambda: 1)
        self.progress: dict[str, StageProgress] = {}

    def run(self) -> None:
        for r in self.runs:
            if self.queue[r.name]:
                _log.info("%s: %d of %d shards pending", r.name, len(self.queue[r.name]), r.stage.n_shards)
        self.progress = {r.name: StageProgress(r, f"{self.pool.label}: ") for r in self.runs}
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
            try:
                for ref in ready:
                    if ref in self.pool.starting:
                        self.pool._joined(ref)
                    elif ref in self.calls or ref in self.losers:  # not taken by a death handled just before
                        self._finished(ref)
            finally:
                self._commit_returned()  # one log append per stage for every record of this pass
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

    def _submit(self, member: PoolMember, run: StageRun, shard: int, speculative: bool = False) -> None:
        attempt = uuid.uuid4().hex[:12]
        task = run.make_task(run.stage.ref(shard, attempt))
        divisor = self.divisor[(run.name, shard)]
        if divisor > 1:
            task = replace(task, batch_divisor=divisor)
        call = ShardCall(
            member.actor.run.remote(task), run, shard, attempt, time.time(), speculative=speculative
        )
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
        for member, head, running in self._running_heads():
            times = self.durations.get(head.run.name)
            if not times or len(times) < _MIN_SAMPLES:
                continue
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
        except RayError as err:
            self._commit_returned()  # what succeeded before this failure is committed before it is handled
            if isinstance(err, RayActorError) or not isinstance(err, RayTaskError):
                self._died(member, err)  # e.g. Ray's own out-of-memory kill: the worker process is gone
                return
            self._forget(member, call)
            cause = getattr(err, "cause", None) or err
            if getattr(cause, "kind", "") == "hardware" and (call.run.name, call.shard) not in self.done:
                self._hardware(member, call, cause)
            else:
                self._failed(call, cause)
            return
        self._forget(member, call)
        self._accept(call, record)

    def _forget(self, member: PoolMember, call: ShardCall) -> None:
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

    def _accept(self, call: ShardCall, record: Any) -> None:
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
        self.pool.returned_bytes += record_bytes(record)  # what a worker sent back: this record
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
        self.returned.append((call, record))

    def _commit_returned(self) -> None:
        """Commit the records returned in this pass: one group commit (one log append) per stage.

        A later record of a shard (the loser of a speculative pair) is ignored and its objects deleted.
        """
        returned, self.returned = self.returned, []
        for run in self.runs:
            mine = [(call, record) for call, record in returned if call.run is run]
            if not mine:
                continue
            committed = run.stage.commit_many([record for _, record in mine])
            for (call, record), ok in zip(mine, committed):
                if ok:
                    self._committed(call, record)
            run.stage.compact_if_due()

    def _committed(self, call: ShardCall, record: ShardRecord) -> None:
        key = (call.run.name, call.shard)
        self.done.add(key)
        self.commits += 1
        for other in self.live.get(key, []):  # a speculative twin still running: collect it when it ends
            if other.ref in self.calls:
                self.losers[other.ref] = self.calls.pop(other.ref)
        if call.speculative:
            _log.info("%s: shard %d: the speculative attempt finished first", call.run.name, call.shard)
        self.progress[call.run.name].committed(record)
        if call.run.on_commit is not None:
            call.run.on_commit(record)

    def _failed(self, call: ShardCall, cause: BaseException) -> None:
        kind, key = getattr(cause, "kind", "fatal"), (call.run.name, call.shard)
        text = f"{type(cause).__name__}: {first_line(cause)}"
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

    def _hardware(self, member: PoolMember, call: ShardCall, cause: BaseException) -> None:
        """A hardware-class error (CUDA, ECC, NCCL): the worker's accelerator is suspect, so the worker is
        replaced and the shard retried elsewhere, counted like a death (``ray.max_task_retries``)."""
        key = (call.run.name, call.shard)
        self.deaths[key] += 1
        limit, text = self.pool.settings.max_task_retries, f"{type(cause).__name__}: {first_line(cause)}"
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

    def _requeue(self, call: ShardCall) -> None:
        """Queue a shard again unless it is committed or another attempt at it is still running."""
        key = (call.run.name, call.shard)
        if key not in self.done and not self.live.get(key):
            self._push(call.run.name, call.shard)

    def _push(self, stage: str, shard: int) -> None:
        """Put a shard back at the head of its queue; its dependency is checked on the next pass."""
        self.queue[stage].appendleft(shard)
        self.scanned.pop(stage, None)

    def _died(self, member: PoolMember, err: BaseException) -> None:
        """A worker died: charge its running attempt, requeue the ones queued behind it, replace it."""
        calls = list(member.calls)
        for c in calls:
            self._forget(member, c)
        failed = []
        for c in calls:
            record = result_if_done(c.ref)
            if record is None:
                failed.append(c)
            else:
                self._accept(c, record)
        reason = f"died ({first_line(err)})"
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

    def _running_heads(self) -> list[tuple[PoolMember, ShardCall, float]]:
        """Each worker's running call (the head of its calls; none already timed out) and its seconds so far:
        a worker runs its calls in order, so the head started when it was submitted or the one before ended."""
        now = time.time()
        return [
            (member, member.calls[0], now - max(member.calls[0].submitted, member.last_done))
            for member in list(self.pool.members)
            if member.calls and not member.calls[0].timed_out
        ]

    def _check_timeouts(self, timeout: float) -> None:
        if timeout <= 0:
            return
        for member, head, running in self._running_heads():
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


def _delete_attempt(call: ShardCall) -> None:
    """Delete what a dead attempt wrote (a call that finished as its worker died writes its files, but its
    record never arrives); best effort: a reopened stage deletes whatever is left (``Stage.open``)."""
    where = call.run.stage.attempt_location(call.shard, call.attempt)
    delete_location(where, f"{call.run.name} shard {call.shard} attempt {call.attempt}")
