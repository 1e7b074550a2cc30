"""Writing a local file atomically: the one routine every local write of the project goes through.

A reader sees the old file or the new one whole, never a torn one, and the new one is durable when
:func:`atomic_write` returns: the bytes go to a temporary sibling, are fsync'd, renamed over the target
and the folder is fsync'd. Object stores need none of this (a PUT is atomic): :mod:`conva.batch.storage`
writes there directly and uses this for local and mounted paths.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably, **replacing** any file of that name (mode 0644)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself, durable
    finally:
        os.close(fd)
