"""An exclusive lease on an output folder: one driver writes a job's output at a time.

A commit log has a single writer. Two drivers on one output (a job started twice, a study and a rerun)
would append interleaved records, so a driver takes ``<out>/_lease.json`` before it writes anything
and renews it every few seconds. A second driver is refused with a message naming the holder (job,
host, pid, age). A lease whose heartbeat is older than ``output.lease_ttl_s`` is *stale* (its driver is
probably dead): it is broken only on request (``--break-lease``), except when the holder was a process
on this very host that no longer exists, which is certain to be dead.

Object stores have no atomic create-if-absent through ``pyarrow.fs``: the lease is written, then read
back after a short settle time, and a driver that does not read its own id back gives up. On a local or
mounted filesystem the same steps apply; the window in which two simultaneous starts could both win is
that settle time, and the lease is a guard against mistakes, not against an adversary.

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

from conva.batch.storage import Location

__all__ = ["LeaseError", "OutputLease", "LEASE_FILE"]

_log = logging.getLogger(__name__)
LEASE_FILE = "_lease.json"
_SETTLE_S = 0.2


class LeaseError(RuntimeError):
    """Another driver holds the output's lease (or held it and may be dead)."""


class OutputLease:
    """Hold ``<out>/_lease.json`` for the duration of a ``with`` block (renewed in a background thread)."""

    def __init__(self, out: Location, job: str, *, ttl_s: float = 60.0, break_stale: bool = False) -> None:
        self.where, self.job, self.ttl_s, self.break_stale = out.child(LEASE_FILE), job, ttl_s, break_stale
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict:
        return {
            "owner": self.owner,
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
        }

    def check(self, dry_run: bool = True) -> None:
        """Raise :class:`LeaseError` if :meth:`acquire` would be refused now; reads only (for ``validate``).

        A dry run says what :meth:`acquire` *would* do to a dead or stale holder's lease; it changes nothing.
        """
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            self._check_holder(held, dry_run)

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseError` naming the holder; writes nothing when refused."""
        self.check(dry_run=False)
        self.where.write_text(json.dumps(self._body()))
        time.sleep(_SETTLE_S)
        back = self._read()
        if back is None or back.get("owner") != self.owner:
            raise LeaseError(
                f"{self.where.parent()}: another driver took the lease at the same moment "
                f"({_describe(back) if back else 'now gone'}); run one job per output folder"
            )

    def _check_holder(self, held: dict, dry_run: bool = False) -> None:
        age = time.time() - float(held.get("heartbeat", 0))
        who = _describe(held)
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
            _log.warning(
                "%s: %s the lease of %s, which no longer runs on this host",
                self.where.parent(),
                "a run would take over" if dry_run else "taking over",
                who,
            )
            return
        if age < self.ttl_s and self.break_stale:
            raise LeaseError(
                f"{self.where.parent()}: --break-lease breaks only a stale lease, and this one is fresh: its "
                f"holder ({who}) renewed it {age:.0f} s ago, so it is alive (a lease goes stale after "
                f"output.lease_ttl_s={self.ttl_s:g} s without a heartbeat). Wait for it to finish, or stop it "
                "and rerun"
            )
        if age < self.ttl_s:
            raise LeaseError(
                f"{self.where.parent()} is being written by another driver ({who}, last heartbeat "
                f"{age:.0f} s ago). Wait for it to finish or stop it; two drivers must never write one "
                "output. If it is dead, rerun with --break-lease."
            )
        if not self.break_stale:
            raise LeaseError(
                f"{self.where.parent()} holds a stale lease ({who}; no heartbeat for {age:.0f} s, more "
                f"than output.lease_ttl_s={self.ttl_s:g}): its driver is probably dead. Make sure it is, "
                "then rerun with --break-lease."
            )
        _log.warning(
            "%s: %s the stale lease of %s (--break-lease)",
            self.where.parent(),
            "a run would break" if dry_run else "breaking",
            who,
        )

    def _read(self) -> dict | None:
        try:
            return json.loads(self.where.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"owner": "?", "job": "unreadable lease", "heartbeat": time.time()}

    def _renew(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 6)):
            try:
                held = self._read()
                if held is not None and held.get("owner") != self.owner:
                    _log.error(
                        "%s: the lease was taken over by %s; this driver should stop",
                        self.where.parent(),
                        _describe(held),
                    )
                    return
                self.where.write_text(json.dumps(self._body()))
            except OSError as err:  # a storage hiccup: try again at the next beat
                _log.warning("%s: could not renew the lease: %s", self.where.parent(), err)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
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
