"""Where a JSON Lines file's shards start, found range by range so that many cores (or nodes) share the pass.

A JSON Lines row is numbered by its line, so shard boundaries and row numbers need the newlines of the whole
file; the driver cannot take them from metadata as it does a Parquet footer. The file is cut into fixed
byte ranges of ``range_bytes``, and each range is indexed on its own (:func:`index_range`, a pure function:
a thread here, a Ray task elsewhere):

* a range **owns the lines that start in it** (the first owned line starts after the first newline at or
  after the range's first byte's predecessor; the last owned line may run past the range's end);
* it counts its lines (blank ones too), its rows (lines holding something besides ASCII whitespace, as
  :func:`conva.data.jsonl_records` reads them) and records where every ``rows_per_shard``-th of its rows
  starts, counting from its own first row;
* it hashes exactly its bytes.

:func:`combine` then numbers the lines across ranges by a prefix sum, so a shard never spans two ranges
(each range's last shard may be short, as each file's is). A file no larger than one range is planned
exactly as by a single pass: the same shards, and its identity is the sha256 of its bytes. A larger file's
identity is the sha256 of its ranges' hashes, so a changed byte anywhere changes it.

Scanning is vectorised (numpy finds the newlines of 8 MiB chunks; only lines that begin with whitespace are
looked at whole) and the hash, reads and numpy release the GIL, so a thread
pool on a driver with ``n`` cores indexes about ``n`` ranges at once.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "p.jsonl")
    >>> _ = open(path, "wb").write(b'{"a": 1}\\n\\n{"a": 2}\\n{"a": 3}\\n')
    >>> parts = index_ranges(path, 28, rows_per_shard=2, range_bytes=12)  # ranges [0, 12), [12, 24), [24, 28)
    >>> [(p.first, p.end, p.lines, p.rows, p.shard_starts.tolist()) for p in parts]
    [(0, 19, 3, 2, [[0, 0, 0]]), (19, 28, 1, 1, [[19, 0, 0]]), (28, 28, 0, 0, [])]
    >>> combine(parts)[0].tolist()  # (start, stop, first line, rows) of each shard
    [[0, 19, 1, 2], [19, 28, 4, 1]]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from conva.batch.storage import location

__all__ = ["RANGE_BYTES", "RangeIndex", "index_range", "index_ranges", "combine", "thread_map", "Map"]

T = TypeVar("T")
R = TypeVar("R")
RANGE_BYTES = 256 << 20  # a file up to this size is one range: indexed exactly as by one sequential pass
_CHUNK = 8 << 20
_TEXT = np.ones(256, dtype=bool)  # bytes that make a line a row: all but ASCII whitespace (bytes.strip's set)
_TEXT[list(b" \t\n\r\x0b\x0c")] = False

# Applies a function to each item, in order (the built-in ``map``, a thread pool's, Ray tasks').
Map = Callable[[Callable[[tuple[int, int]], "RangeIndex"], Iterable[tuple[int, int]]], Iterable["RangeIndex"]]


@dataclass
class RangeIndex:
    """The lines that start in bytes ``[start, stop)`` of a file: they span ``[first, end)``.

    ``shard_starts``: one row ``(byte offset, line index, row index)`` for every ``rows_per_shard``-th row,
    counted from 0 at the range's first owned line and first row. ``sha256``: of bytes ``[start, stop)`` exactly.
    """

    start: int
    stop: int
    first: int = 0
    end: int = 0
    lines: int = 0
    blank: int = 0
    rows: int = 0
    shard_starts: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    sha256: str = ""


def index_range(uri: str, start: int, stop: int, rows_per_shard: int) -> RangeIndex:
    """Index the lines that start in bytes ``[start, stop)`` of the JSON Lines file at ``uri``."""
    where = location(uri)
    out, hasher = RangeIndex(start, stop), hashlib.sha256()
    with where.fs.open_input_file(where.path) as handle:
        size = handle.size()
        # A line starts at `start` only if the byte before it ends a line (or it is the file's first byte).
        at_line_start = start == 0 or handle.read_at(1, start - 1) == b"\n"
        scan = _Scan(out, rows_per_shard, start if at_line_start else None)
        offset = start
        while offset < size and not (offset >= stop and scan.done(stop)):
            data = handle.read_at(min(_CHUNK, size - offset), offset)
            if offset < stop:
                hasher.update(data[: stop - offset])
            scan.feed(data, offset, stop)
            offset += len(data)
        scan.finish(offset, stop)
    out.sha256 = hasher.hexdigest()
    return out


class _Scan:
    """Lines found chunk by chunk; ``open_start`` is where the line not yet ended starts (None: not found yet)."""

    def __init__(self, out: RangeIndex, rows_per_shard: int, open_start: int | None) -> None:
        self.out, self.rows_per_shard = out, rows_per_shard
        self.open_start, self.open_text = open_start, False
        if open_start is not None:
            out.first = open_start

    def done(self, stop: int) -> bool:
        """Every line starting before ``stop`` has ended."""
        return self.open_start is not None and self.open_start >= stop

    def feed(self, data: bytes, offset: int, stop: int) -> None:
        arr = np.frombuffer(data, dtype=np.uint8)
        newlines = np.flatnonzero(arr == 10)
        if self.open_start is None:  # still looking for the first line that starts in the range
            if not len(newlines):
                return
            skip = int(newlines[0]) + 1
            self.open_start = self.out.first = offset + skip
            data, arr, newlines, offset = data[skip:], arr[skip:], newlines[1:] - skip, offset + skip
        if not len(newlines):
            self.open_text = self.open_text or bool(data.strip())
            return
        # Lines ending in this chunk: the open one, then one after each newline but the last. A line whose
        # first byte is not whitespace is a row; the few others are looked at whole.
        has_text = np.zeros(len(newlines), dtype=bool)
        has_text[0] = self.open_text or bool(data[: newlines[0]].strip())
        if len(newlines) > 1:
            firsts = newlines[:-1] + 1
            has_text[1:] = _TEXT[arr[firsts]]
            for k in np.flatnonzero(~has_text[1:]) + 1:
                has_text[k] = bool(data[newlines[k - 1] + 1 : newlines[k]].strip())
        starts = np.concatenate(([self.open_start], offset + newlines[:-1] + 1))
        owned = starts < stop
        self._add(starts[owned], has_text[owned])
        ends = offset + newlines + 1
        if owned.any():
            self.out.end = int(ends[np.flatnonzero(owned)[-1]])
        self.open_start = int(ends[-1])
        self.open_text = bool(data[newlines[-1] + 1 :].strip())

    def finish(self, offset: int, stop: int) -> None:
        """The file's end at ``offset``: a last line without a newline is a line too."""
        if self.open_start is None:  # no line starts in the range
            self.out.first = self.out.end = offset
            return
        if self.open_start < min(offset, stop):
            self._add(np.array([self.open_start]), np.array([self.open_text]))
            self.out.end = offset
        elif self.out.lines == 0:
            self.out.end = self.out.first

    def _add(self, starts: np.ndarray, has_text: np.ndarray) -> None:
        out = self.out
        row_lines = np.flatnonzero(has_text)  # indices (into starts) of the lines that are rows
        firsts = np.flatnonzero((out.rows + np.arange(len(row_lines))) % self.rows_per_shard == 0)
        found = np.stack(
            [starts[row_lines[firsts]], out.lines + row_lines[firsts], out.rows + firsts], axis=1
        )
        out.shard_starts = np.concatenate([out.shard_starts, found.astype(np.int64)])
        out.lines += len(starts)
        out.blank += len(starts) - len(row_lines)
        out.rows += len(row_lines)


def index_ranges(
    uri: str, size: int, rows_per_shard: int, range_bytes: int | None = None, map_ranges: Map | None = None
) -> list[RangeIndex]:
    """Every range of a ``size``-byte file, indexed by ``map_ranges`` (default: a thread per core here).

    A file of one range (``range_bytes``, default :data:`RANGE_BYTES`) is indexed here, in this thread,
    whatever ``map_ranges`` is.
    """
    range_bytes = range_bytes or RANGE_BYTES
    bounds = [(s, min(s + range_bytes, size)) for s in range(0, size, range_bytes)] or [(0, 0)]

    def one(bound: tuple[int, int]) -> RangeIndex:
        return index_range(uri, bound[0], bound[1], rows_per_shard)

    if len(bounds) == 1:  # a small file: here, whatever the map
        return [one(bounds[0])]
    return list((map_ranges or thread_map)(one, bounds))


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]`` on a thread per core of this machine (the scan releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), _cores()))) as pool:
        return list(pool.map(fn, items))


def combine(parts: Sequence[RangeIndex]) -> tuple[np.ndarray, int, int, str]:
    """The file's shards (rows ``start, stop, first line, rows``), its rows, its blank lines and its identity."""
    shards, line0 = [], 1  # line0: the line number of the range's first owned line
    for part in parts:
        if not len(part.shard_starts):  # no row starts in the range
            line0 += part.lines
            continue
        offsets, lines, rows = part.shard_starts.T
        stops = np.append(offsets[1:], part.end)
        counts = np.diff(np.append(rows, part.rows))
        shards.append(np.stack([offsets, stops, line0 + lines, counts], axis=1))
        line0 += part.lines
    if len(parts) == 1:
        sha = parts[0].sha256
    else:
        joined = "\0".join(p.sha256 for p in parts)
        sha = hashlib.sha256(f"jsonl-ranges\0{parts[-1].stop}\0{joined}".encode()).hexdigest()
    table = np.concatenate(shards) if shards else np.zeros((0, 4), dtype=np.int64)
    return table, sum(p.rows for p in parts), sum(p.blank for p in parts), sha


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
