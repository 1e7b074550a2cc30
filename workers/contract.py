"""The row contract every worker call keeps: each input row id comes back, the expected number of times.

A stage may never drop, duplicate or invent a row: a row that cannot be processed comes back as an
error row with a reason. Checking this in the worker, before the result leaves the actor, turns a
silent data loss into a loud failure that names the shard.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

__all__ = ["RowContractError", "check_rows"]


class RowContractError(RuntimeError):
    """A worker returned rows that do not match its input row for row."""


def check_rows(stage: str, shard: int, rows: pa.Table, out: pa.Table, per_row: int = 1) -> pa.Table:
    """Return ``out`` if it holds every ``row_id`` of ``rows`` exactly ``per_row`` times and nothing else.

    >>> t = pa.table({"row_id": ["a", "b"]})
    >>> check_rows("steer", 0, t, t).num_rows
    2
    >>> check_rows("extract", 0, t, pa.table({"row_id": ["a", "b", "a"]}), per_row=2)
    Traceback (most recent call last):
    ...
    conva.workers.contract.RowContractError: extract shard 0: 2 input rows should give 4 output rows, got 3 (missing: b)
    """
    ids = rows.column("row_id").to_pylist()
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
        raise RowContractError(f"{stage} shard {shard}: duplicate input row ids {dupes[:5]}")
    got = Counter(out.column("row_id").to_pylist())
    expected = dict.fromkeys(ids, per_row)
    if got != expected:
        missing = sorted(k for k in expected if got.get(k, 0) < per_row)
        extra = sorted(k for k in got if got[k] > expected.get(k, 0))
        detail = ", ".join(
            f"{name}: {', '.join(map(str, keys[:5]))}"
            for name, keys in (("missing", missing), ("unexpected", extra))
            if keys
        )
        raise RowContractError(
            f"{stage} shard {shard}: {len(ids)} input rows should give {len(ids) * per_row} "
            f"output rows, got {out.num_rows} ({detail})"
        )
    return out
