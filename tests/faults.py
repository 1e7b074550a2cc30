"""Fault plans for the reliability tests, run inside the workers as their shard hook (test code only).

The tests' Ray is started with ``CONVA_WORKER_HOOK=<repo>/tests/faults.py:hook`` and ``CONVA_TEST_FAULTS=<plan
file>`` (see ``tests/conftest.py``); every worker then calls :func:`hook` before each shard, and the hook
reads the plan the current test wrote. Production workers run no hook at all (:mod:`conva.workers.hooks`).

A plan is a JSON object; every key is optional::

    {"kill_rate": 0.2, "seed": 3,             # die (os._exit) on a shard's first attempt, chosen by hash
     "crash_on_text": "POISON",               # die on every attempt at a shard holding this text
     "hang": {"stage": "steer", "shard": 2},  # sleep far past any timeout on that shard's first attempt
     "fail": {"stage": "steer", "shard": 1, "times": 1, "error": "OSError"},   # raise on the first attempts
                                              # (OSError, TimeoutError, ValueError, torch's OutOfMemoryError
                                              # or "CUDAError": a RuntimeError saying "CUDA error: ...");
                                              # or a list of such, one per shard
     "slow": {"stage": "steer", "shard": 4, "seconds": 30},  # a straggler: its first attempt sleeps this long
     "sleep_s": 0.2,                          # every shard takes at least this long
     "marker_dir": "/tmp/x"}                  # where first attempts are remembered across worker processes
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

__all__ = ["PLAN_ENV", "planned_kill", "hook"]

PLAN_ENV = "CONVA_TEST_FAULTS"


def planned_kill(seed: int, stage: str, shard: int, rate: float) -> bool:
    """Whether the plan kills ``stage``'s shard ``shard`` on its first attempt (deterministic in ``seed``)."""
    digest = hashlib.sha256(f"{seed}:{stage}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _plan() -> dict:
    path = os.environ.get(PLAN_ENV)
    if not path or not os.path.isfile(path):
        return {}
    return json.loads(Path(path).read_text() or "{}")


def _count(plan: dict, name: str) -> int:
    """How many times this marker was passed before (0 on the first attempt), across worker processes."""
    folder = Path(plan["marker_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob(f"{name}.*")))
    (folder / f"{name}.{n}").touch()
    return n


def _texts(task) -> list[str]:
    from conva.batch.inputs import read_slice, read_table_slice

    if task.slice is None:
        return []
    if task.params.get("input") == "records":
        return [str(r.fields) for r in read_slice(task.slice)]
    table = read_table_slice(task.slice)
    column = "text" if "text" in table.column_names else "prompt"
    return [t for t in table.column(column).to_pylist() if isinstance(t, str)]


def hook(task, worker) -> None:
    """Apply the current test's plan to the shard about to run (see the module docstring)."""
    plan = _plan()
    if not plan:
        return
    stage, shard = task.stage, task.ref.shard
    if plan.get("sleep_s"):
        time.sleep(float(plan["sleep_s"]))
    poison = plan.get("crash_on_text")
    if poison and any(poison in t for t in _texts(task)):
        os._exit(17)
    rate = float(plan.get("kill_rate", 0.0))
    if (
        rate
        and planned_kill(int(plan.get("seed", 0)), stage, shard, rate)
        and _count(plan, f"kill-{stage}-{shard:05d}") == 0
    ):
        os._exit(17)
    slow = plan.get("slow")
    if (
        slow
        and (slow["stage"], slow["shard"]) == (stage, shard)
        and _count(plan, f"slow-{stage}-{shard:05d}") == 0
    ):
        time.sleep(float(slow["seconds"]))
    hang = plan.get("hang")
    if (
        hang
        and (hang["stage"], hang["shard"]) == (stage, shard)
        and _count(plan, f"hang-{stage}-{shard:05d}") == 0
    ):
        time.sleep(3600)
    fails = plan.get("fail") or []
    for fail in [fails] if isinstance(fails, dict) else fails:
        if (fail["stage"], fail["shard"]) != (stage, shard):
            continue
        _count(plan, f"divisor-{stage}-{shard:05d}-{task.batch_divisor}")  # what batch size each attempt got
        if _count(plan, f"fail-{stage}-{shard:05d}") < int(fail.get("times", 1)):
            name = fail.get("error", "OSError")
            if name == "CUDAError":  # what torch raises when the device fails (a hardware-class error)
                raise RuntimeError(
                    f"CUDA error: an illegal memory access was encountered (injected at {stage} shard {shard})"
                )
            if name == "OutOfMemoryError":
                import torch  # only here: a fake worker's test imports no torch

                raise torch.OutOfMemoryError(f"injected OutOfMemoryError at {stage} shard {shard}")
            kind = {"OSError": OSError, "TimeoutError": TimeoutError, "ValueError": ValueError}[name]
            raise kind(f"injected {kind.__name__} at {stage} shard {shard}")
