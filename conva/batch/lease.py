"""An exclusive lease on an output folder: one driver writes a job's output at a time.

A commit log has a single writer. A driver takes the lease on ``<out>`` before it writes anything and
renews it every ``ttl/6`` seconds; a second driver is refused with a message naming the holder (job,
host, pid, age).

**Taking it, atomically.** Each holder has an *epoch*. To take the lease a driver creates
``<out>/_lease.claims/<epoch>.json`` for the next epoch *only if absent* (``O_EXCL``-like ``link``
locally, a conditional PUT on S3: :meth:`~conva.batch.storage.Location.create_bytes`), so of two
simultaneous starts exactly one wins. The winner then writes ``<out>/_lease.json`` (holder, epoch,
heartbeat), which the renewals rewrite.

**Losing it.** A renewal that finds a newer epoch (or the file gone) marks the lease *lost*; so does a
renewal that has not succeeded for ``ttl/2`` seconds. :meth:`OutputLease.ensure_held`, called by the
store before every log append, raises :class:`LeaseLostError` then, without I/O, so the driver stops
before its next commit. The commit log is fenced by itself as well (:mod:`conva.batch.store`): a
driver whose view of the log is stale fails its next append. Together these hold as long as a driver is
not paused for more than ``ttl/2`` between the check and the write (S3 requests time out well before).

**Who may take over.** A lease whose heartbeat is older than ``output.lease_ttl_s`` is *stale*. The
lease records the holder's host and pid and, when the driver is connected to Ray, its cluster (GCS
address, cluster id) and job id. A new driver takes over without being asked when the holder is
certainly dead:

- a process on this very host that no longer exists (at once);
- a Ray job that its cluster reports finished (at once);
- a holder whose Ray cluster is gone (its GCS answers no more, or a new cluster with another id
  answers at that address, as after a head pod restart): the new driver waits until the heartbeat is
  stale, then takes over. So a KubeRay ``RayJob`` retry after the head pod died resumes with no flag.

A live holder (fresh heartbeat, cluster up) is refused; a stale one whose death cannot be shown is
broken only on request (``--break-lease``).

Example:
    >>> import tempfile
    >>> from conva.batch.storage import location
    >>> out = location(tempfile.mkdtemp())
    >>> with OutputLease(out, "conva run"):
    ...     OutputLease(out, "conva run").acquire()  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    conva.batch.lease.LeaseError: /tmp/... is being written by another driver (conva run, pid ...)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from conva.batch.storage import Location

__all__ = [
    "LeaseError",
    "LeaseLostError",
    "OutputLease",
    "ClusterProbe",
    "LEASE_FILE",
    "CLAIMS",
    "held_fence",
    "renew_held",
]

_log = logging.getLogger(__name__)
LEASE_FILE = "_lease.json"
CLAIMS = "_lease.claims"
_HELD: dict[str, OutputLease] = {}  # the leases this process holds, by output URI (for held_fence)


class ClusterProbe(Protocol):
    """What the lease asks of the cluster layer; ``jobs/`` gives Ray's (:data:`conva.jobs.common.RAY_PROBE`), so
    that this module needs no Ray."""

    def identity(self) -> dict:
        """This driver's cluster and job: ``gcs_address``, ``cluster_id``, ``job_id`` (empty if not connected)."""
        ...

    def jobs(self, address: str, cluster_id: str | None) -> dict[str, bool] | None:
        """Job id → finished, from the cluster at ``address``; None if another cluster than ``cluster_id``
        answers there. Raises if it cannot ask."""
        ...


class LeaseError(RuntimeError):
    """Another driver holds the output's lease (or held it and may be dead)."""


class LeaseLostError(LeaseError):
    """This driver's lease was taken over (or could not be renewed in time): it must stop writing now."""


def held_fence(out: Location) -> Callable[[], None] | None:
    """The :meth:`OutputLease.ensure_held` of the lease this process holds on ``out`` or a folder above it (a
    study's lease covers its models' outputs); None if none."""
    for uri, lease in list(_HELD.items()):
        if out.uri == uri or out.uri.startswith(uri.rstrip("/") + "/"):
            return lease.ensure_held
    return None


def renew_held() -> None:
    """Rewrite every lease this process holds now, with a fresh heartbeat and this driver's Ray identity.

    The CLI takes the lease before it connects to Ray (a refused job starts nothing), so the first lease
    names no cluster or job; :func:`conva.jobs.common.connect_ray` calls this once connected, so that a
    head lost right after start-up is already recognisable as gone (:meth:`OutputLease.acquire` of the
    retry takes over without ``--break-lease``) instead of only from the next heartbeat, ttl/6 later.
    """
    for lease in list(_HELD.values()):
        lease._beat()


class OutputLease:
    """Hold the lease on ``out`` for the duration of a ``with`` block (renewed in a background thread)."""

    def __init__(
        self,
        out: Location,
        job: str,
        *,
        ttl_s: float = 60.0,
        break_stale: bool = False,
        probe: ClusterProbe | None = None,
    ) -> None:
        self.out, self.job, self.ttl_s, self.break_stale, self.probe = out, job, ttl_s, break_stale, probe
        self.where = out.child(LEASE_FILE)
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self.epoch = 0
        self._confirmed = 0.0  # time.monotonic() of the last write of the lease that we know was ours
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict:
        return {
            "owner": self.owner,
            "epoch": self.epoch,
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "ray": self._identity(),
        }

    def _identity(self) -> dict:
        try:
            return self.probe.identity() if self.probe is not None else {}
        except Exception as err:  # the lease works without it (a takeover then needs --break-lease)
            _log.info("could not read this driver's Ray identity: %s", err)
            return {}

    def check(self, dry_run: bool = True) -> None:
        """Raise :class:`LeaseError` if :meth:`acquire` would be refused now; reads only (for ``validate``).

        A dry run says what :meth:`acquire` *would* do to a dead or stale holder's lease; it changes nothing.
        """
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            self._check_holder(held, dry_run)

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseError` naming the holder; writes nothing when refused.

        The new epoch is the one after the holder's that was checked (or after the newest claim when
        nobody holds it), so of two drivers that checked the same holder only one can claim it.
        """
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            self._check_holder(held)
        claims = self.out.child(CLAIMS)
        epochs = sorted(int(f.name.split(".")[0]) for f in claims.list() if f.name.split(".")[0].isdigit())
        known = held is not None and "epoch" in held
        self.epoch = (int(held["epoch"]) if known and held else max(epochs, default=0)) + 1
        try:
            self._claim(claims)
        except FileExistsError as err:
            other = self._read_claim(claims, self.epoch)
            if time.time() - float(other.get("heartbeat", 0)) <= self.ttl_s:
                raise LeaseError(
                    f"{self.out}: another driver took the lease at the same moment ({_describe(other)}); "
                    "run one job per output folder"
                ) from err
            # a claimer that died before writing the lease (its claim is stale): claim past every claim
            self.epoch = max(epochs, default=0) + 1
            try:
                self._claim(claims)
            except FileExistsError as again:
                raise LeaseError(f"{self.out}: another driver took the lease at the same moment") from again
        self.where.write_text(json.dumps(self._body()))
        self._confirmed = time.monotonic()
        claims.delete_many([f"{e:010d}.json" for e in epochs if e < self.epoch])
        _HELD[self.out.uri] = self

    def _claim(self, claims: Location) -> None:
        claims.child(f"{self.epoch:010d}.json").create_bytes(json.dumps(self._body()).encode())

    @staticmethod
    def _read_claim(claims: Location, epoch: int) -> dict:
        try:
            return json.loads(claims.child(f"{epoch:010d}.json").read_bytes())
        except (OSError, ValueError):
            return {"heartbeat": time.time()}

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLostError` unless this driver surely still holds the lease (no I/O: O(1)).

        The store calls it before every append to the commit log.
        """
        if self._lost is not None:
            raise self._lost
        quiet = time.monotonic() - self._confirmed
        if quiet > self.ttl_s / 2:
            self._lost = LeaseLostError(
                f"{self.out}: this driver could not renew its lease for {quiet:.0f} s (more than half of "
                f"output.lease_ttl_s={self.ttl_s:g}), so another driver may take it over: it stops before its "
                "next commit. Rerun the same command to resume"
            )
            raise self._lost

    def _check_holder(self, held: dict, dry_run: bool = False) -> None:
        age = time.time() - float(held.get("heartbeat", 0))
        who = _describe(held)
        dead = _holder_dead(held, self.probe)
        if dead:
            _log.warning(
                "%s: %s the lease of %s: %s",
                self.out,
                "a run would take over" if dry_run else "taking over",
                who,
                dead,
            )
            return
        gone = _cluster_gone(held, self.probe)
        if gone and age < self.ttl_s and not dry_run:
            held, age = self._wait_stale(held, gone)
        if gone and age >= self.ttl_s:
            _log.warning(
                "%s: %s the stale lease of %s: %s",
                self.out,
                "a run would take over" if dry_run else "taking over",
                who,
                gone,
            )
            return
        if gone and dry_run:
            _log.warning(
                "%s: %s; a run would wait %.0f s for its lease to go stale, then take it over",
                self.out,
                gone,
                self.ttl_s - age,
            )
            return
        if age < self.ttl_s and self.break_stale:
            raise LeaseError(
                f"{self.out}: --break-lease breaks only a stale lease, and this one is fresh: its "
                f"holder ({who}) renewed it {age:.0f} s ago, so it is alive (a lease goes stale after "
                f"output.lease_ttl_s={self.ttl_s:g} s without a heartbeat). Wait for it to finish, or stop it "
                "and rerun"
            )
        if age < self.ttl_s:
            raise LeaseError(
                f"{self.out} is being written by another driver ({who}, last heartbeat "
                f"{age:.0f} s ago). Wait for it to finish or stop it; two drivers must never write one "
                "output. If it is dead, rerun with --break-lease."
            )
        if not self.break_stale:
            raise LeaseError(
                f"{self.out} holds a stale lease ({who}; no heartbeat for {age:.0f} s, more "
                f"than output.lease_ttl_s={self.ttl_s:g}): its driver is probably dead. Make sure it is, "
                "then rerun with --break-lease."
            )
        _log.warning(
            "%s: %s the stale lease of %s (--break-lease)",
            self.out,
            "a run would break" if dry_run else "breaking",
            who,
        )

    def _wait_stale(self, held: dict, gone: str) -> tuple[dict, float]:
        """Wait until the lease of a holder whose cluster is gone goes stale; raise if it is renewed meanwhile."""
        age = time.time() - float(held.get("heartbeat", 0))
        _log.warning(
            "%s: %s; waiting %.0f s for its lease to go stale (output.lease_ttl_s=%g)",
            self.out,
            gone,
            self.ttl_s - age,
            self.ttl_s,
        )
        while age < self.ttl_s:
            time.sleep(min(1.0, self.ttl_s - age + 0.05))
            now = self._read()
            if now is None or now.get("owner") != held.get("owner"):
                raise LeaseError(
                    f"{self.out}: the lease changed hands while waiting ({_describe(now or {})})"
                )
            if float(now.get("heartbeat", 0)) != float(held.get("heartbeat", 0)):
                raise LeaseError(
                    f"{self.out} is being written by another driver ({_describe(now)}), which renewed its lease "
                    "although its Ray cluster seemed gone: it is alive"
                )
            age = time.time() - float(held.get("heartbeat", 0))
        return held, age

    def _read(self) -> dict | None:
        try:
            return json.loads(self.where.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"owner": "?", "job": "unreadable lease", "heartbeat": time.time()}

    def _renew(self) -> None:
        while not self._stop.wait(max(0.1, self.ttl_s / 6)):
            self._beat()
            if self._lost is not None:
                _log.error("%s", self._lost)
                return

    def _beat(self) -> None:
        """Renew once; a storage hiccup is logged and left to the next beat (:meth:`ensure_held` counts)."""
        try:
            self._renew_once()
        except OSError as err:
            _log.warning("%s: could not renew the lease: %s", self.out, err)

    def _renew_once(self) -> None:
        held = self._read()
        mine = held is not None and held.get("owner") == self.owner
        older = held is not None and int(held.get("epoch", 0)) < self.epoch  # a zombie's late write
        if not (mine or older):
            self._lost = LeaseLostError(
                f"{self.out}: the lease was taken over by "
                f"{_describe(held) if held else 'another driver, which has released it since'}; this driver "
                "stops before its next commit"
            )
            return
        self.where.write_text(json.dumps(self._body()))
        self._confirmed = time.monotonic()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (the newest claim stays: epochs only grow)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.pop(self.out.uri, None)
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.where.delete()

    def __enter__(self) -> OutputLease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew, name="conva-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(held: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
    return f"{held.get('job', '?')}, pid {held.get('pid', '?')} on {held.get('host', '?')}, started {started}"


_UNKNOWN: dict[str, bool] = {}  # the cluster could not be asked (no probe, no answer in time)


def _holder_dead(held: dict, probe: ClusterProbe | None) -> str | None:
    """Why the holder's driver is certainly dead (its process is gone from this host, its Ray job finished)."""
    if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
        return "its process no longer runs on this host"
    ray_info = held.get("ray") or {}
    if ray_info.get("gcs_address") and ray_info.get("job_id") and _reachable(ray_info["gcs_address"]):
        jobs = _ask(probe, ray_info["gcs_address"], ray_info.get("cluster_id"))
        if jobs is not None and jobs is not _UNKNOWN and jobs.get(ray_info["job_id"]) is True:
            return f"its Ray job {ray_info['job_id']} has finished"
    return None


def _cluster_gone(held: dict, probe: ClusterProbe | None) -> str | None:
    """Why the holder's Ray cluster is gone (nothing answers at its GCS address, or another cluster does)."""
    ray_info = held.get("ray") or {}
    address = ray_info.get("gcs_address")
    if not address:
        return None
    if not _reachable(address):
        return f"its Ray cluster (GCS {address}) is gone"
    if ray_info.get("cluster_id") and _ask(probe, address, ray_info["cluster_id"]) is None:
        return f"the Ray cluster at {address} is a new one (not cluster {ray_info['cluster_id'][:12]}…)"
    return None


def _reachable(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (a GCS that is up)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        return False
    return True


def _ask(probe: ClusterProbe | None, address: str, cluster_id: str | None, timeout_s: float = 8.0):
    """``probe.jobs(address, cluster_id)``, or :data:`_UNKNOWN` without a probe, on an error or after
    ``timeout_s`` (Ray's client waits a minute for a dying GCS)."""
    if probe is None:
        return _UNKNOWN
    answer: list = [_UNKNOWN]

    def ask() -> None:
        try:
            answer[0] = probe.jobs(address, cluster_id)
        except Exception as err:  # cannot show anything: the caller refuses or waits
            _log.info("could not ask the Ray cluster at %s about the lease holder: %s", address, err)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answer[0]


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
