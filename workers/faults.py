"""Fault injection for the reliability tests: a worker that dies on cue, off unless a test turns it on.

``CONVA_TEST_FAULTS`` names a JSON file the test writes (read on every call, so one Ray session serves
several plans)::

    {"kill_rate": 0.2, "seed": 3, "marker_dir": "/tmp/x", "crash_on_text": "POISON"}

* ``kill_rate``/``seed``/``marker_dir``: the worker process dies (``os._exit``, as an engine crash or the
  OOM killer would take it down) on a shard's **first** attempt with probability ``kill_rate``, decided by
  a hash of ``(seed, stage, shard)`` so the test knows in advance which shards die; the marker file it
  leaves in ``marker_dir`` is what makes the retry survive.
* ``crash_on_text``: the worker dies every time a shard holds a row whose text contains this string.

Without the variable (every real run) :func:`maybe_die` returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa

__all__ = ["FAULTS_ENV", "maybe_die", "planned_kill"]

FAULTS_ENV = "CONVA_TEST_FAULTS"


def planned_kill(seed: int, stage: str, shard: int, rate: float) -> bool:
    """Whether the plan kills ``stage``'s shard ``shard`` on its first attempt (deterministic in ``seed``)."""
    digest = hashlib.sha256(f"{seed}:{stage}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def maybe_die(stage: str, shard: int, rows: pa.Table, column: str) -> None:
    """Kill this process if the test's fault plan says so; a no-op when ``CONVA_TEST_FAULTS`` is unset."""
    path = os.environ.get(FAULTS_ENV)
    if not path or not os.path.isfile(path):
        return
    plan = json.loads(Path(path).read_text() or "{}")
    poison = plan.get("crash_on_text")
    if poison and any(isinstance(t, str) and poison in t for t in rows.column(column).to_pylist()):
        os._exit(17)
    rate = float(plan.get("kill_rate", 0.0))
    if rate > 0 and planned_kill(int(plan.get("seed", 0)), stage, shard, rate):
        marker = Path(plan["marker_dir"]) / f"{stage}-{shard:05d}"
        if not marker.exists():
            marker.touch()
            os._exit(17)
