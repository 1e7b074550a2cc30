"""Inputs as slices each worker reads for itself: planned on the driver in one streaming pass, read on the workers.

The driver never holds an input. :func:`plan_input` streams each file once, in constant memory, to
hash it (so a resumed job refuses an input that changed under its committed shards) and to find where
every shard of ``rows_per_shard`` rows starts:

* **Parquet**: shard boundaries come from the footer (row counts per row group); the bytes are streamed
  only for the hash. A worker reads just the row groups that overlap its rows.
* **JSON Lines**: rows are non-blank lines; a shard is a byte range of whole lines.
* **CSV**: rows are CSV records (a quoted field may span lines); a shard is a byte range of whole
  records, and carries the header.

A slice is read by :func:`read_slice` into the same :class:`conva.data.Record` rows, numbered as in the
whole file, that :func:`conva.data.read_records` gives, so error rows name the file and row either way.

With a ``screen``, the same pass also hands every row, as the :class:`~conva.data.Record` a worker will
read, to a callback, a shard at a time (one shard's bytes are held, never the file): the driver counts
bad rows this way before any model loads (:mod:`conva.batch.badrows`).

Tables a job builds itself (the extraction texts, a study's cells × prompts) are written once as a
Parquet file beside the stage (:func:`write_input_table`) and planned like any Parquet input.

Example:
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp(); path = os.path.join(folder, "p.jsonl")
    >>> _ = open(path, "w").write('{"prompt": "a"}\\n\\n{"prompt": "b"}\\n{"prompt": "c"}\\n')
    >>> plan = plan_input(path, rows_per_shard=2)
    >>> plan.rows, [(s.first_row, s.rows) for s in plan.slices]
    (3, [(1, 2), (3, 1)])
    >>> [r.fields["prompt"] for r in read_slice(plan.slices[1])]
    ['c']
"""

from __future__ import annotations

import csv
import hashlib
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from conva.batch.storage import Location, location
from conva.data import DATA_SUFFIXES, DataError, Record, csv_records, data_files, jsonl_records

__all__ = [
    "InputSlice",
    "InputPlan",
    "Screen",
    "plan_input",
    "plan_table_file",
    "read_slice",
    "read_table_slice",
    "table_sha256",
    "write_input_table",
]

_CHUNK = 1 << 24
# Called with a file's base name and some of its rows, in file order (every row exactly once).
Screen = Callable[[str, list[Record]], None]


@dataclass(frozen=True)
class InputSlice:
    """The rows one shard reads: ``rows`` rows of ``file`` from data row ``first_row`` (1-based).

    ``start``/``stop`` are the byte range of those rows (JSON Lines, CSV); ``header`` is the CSV header.
    """

    file: str
    format: str
    first_row: int
    rows: int
    start: int = 0
    stop: int = 0
    header: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The file's base name: row ids are ``<name>/<row>``."""
        return posixpath.basename(self.file.rstrip("/"))


@dataclass(frozen=True)
class InputPlan:
    """Every shard's slice, the rows in all and a sha256 of the input's files (names and bytes)."""

    slices: tuple[InputSlice, ...]
    rows: int
    sha256: str


def _format(path: str) -> str:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(path, None, None, f"unknown file type {suffix!r} (expected .jsonl, .csv or .parquet)")
    return {".json": "jsonl"}.get(suffix, suffix[1:])


def plan_input(source: str, rows_per_shard: int, screen: Screen | None = None) -> InputPlan:
    """Plan the shards of a file or a folder of files (path or URI); one streaming pass per file.

    Shards never span two files. ``screen``, if given, sees every row as the workers will read it
    (see the module docstring). Raises :class:`DataError` naming the file if it cannot be read.
    """
    slices: list[InputSlice] = []
    digest, rows = hashlib.sha256(), 0
    for file in data_files(source):
        try:
            file_slices, file_sha = _plan_file(location(file), _format(file), rows_per_shard, screen)
        except DataError:
            raise
        except (OSError, ValueError, pa.ArrowException) as err:
            raise DataError(file, None, None, f"cannot read: {type(err).__name__}: {err}") from err
        slices += file_slices
        rows += sum(s.rows for s in file_slices)
        digest.update(f"{posixpath.basename(file)}\0{file_sha}\0".encode())
    return InputPlan(tuple(slices), rows, digest.hexdigest())


def _plan_file(
    where: Location, fmt: str, rows_per_shard: int, screen: Screen | None
) -> tuple[list[InputSlice], str]:
    if fmt == "parquet":
        return _plan_parquet(where, rows_per_shard, screen)
    hasher = hashlib.sha256()
    lines = _Lines(where, hasher)
    shards = _ShardBytes(where, fmt, screen)
    if fmt == "jsonl":
        header: tuple[str, ...] = ()
        starts = _jsonl_starts(lines, rows_per_shard, shards)
    else:
        starts, header = _csv_starts(where, lines, rows_per_shard, shards)
    for _ in lines:  # whatever the planner did not read still goes into the hash
        pass
    bounds = [*starts, (lines.bytes, lines.rows + 1)]
    slices = [
        InputSlice(where.uri, fmt, first, following - first, offset, stop, header)
        for (offset, first), (stop, following) in zip(bounds, bounds[1:])
    ]
    shards.close(slices)
    return slices, hasher.hexdigest()


class _ShardBytes:
    """The bytes of the shard being planned, handed to ``screen`` as a worker's records when the shard is done.

    Only the current shard is held. Without a screen it keeps nothing.
    """

    def __init__(self, where: Location, fmt: str, screen: Screen | None) -> None:
        self.where, self.fmt, self.screen = where, fmt, screen
        self.data, self.start, self.first_row = bytearray(), 0, 1
        self.header: tuple[str, ...] = ()

    def feed(self, line: bytes) -> None:
        if self.screen is not None:
            self.data += line

    def boundary(self, offset: int, first_row: int) -> None:
        """A shard starts at byte ``offset`` (row ``first_row``): screen the one before it, keep what follows."""
        if self.screen is None:
            return
        cut = offset - self.start
        done, self.data = bytes(self.data[:cut]), self.data[cut:]
        if self.first_row < first_row:  # the bytes before the first shard (a CSV header) are no shard
            self._screen(done, self.first_row)
        self.start, self.first_row = offset, first_row

    def close(self, slices: list[InputSlice]) -> None:
        """The file is read: screen its last shard."""
        if self.screen is not None and slices:
            self._screen(bytes(self.data), self.first_row)

    def _screen(self, data: bytes, first_row: int) -> None:
        assert self.screen is not None  # only called when there is a screen
        name = posixpath.basename(self.where.uri.rstrip("/"))
        if self.fmt == "jsonl":
            records = list(jsonl_records(data, first_row))
        else:
            records = list(csv_records(data, self.where.uri, header=self.header, first_row=first_row))
        self.screen(name, records)


class _Lines:
    """The lines (``\\n``-terminated bytes) of a stored file, read in chunks; every chunk feeds the hasher."""

    def __init__(self, where: Location, hasher) -> None:
        self.where, self.hasher = where, hasher
        self.rows = 0  # data rows, as the planner counts them
        self.bytes = 0  # bytes read so far
        self._iter = self._read()

    def _read(self) -> Iterator[bytes]:
        rest = b""
        with self.where.fs.open_input_stream(self.where.path) as stream:
            while chunk := stream.read(_CHUNK):
                self.hasher.update(chunk)
                self.bytes += len(chunk)
                parts = (rest + chunk).split(b"\n")
                rest = parts.pop()
                for part in parts:
                    yield part + b"\n"
        if rest:
            yield rest

    def __iter__(self) -> Iterator[bytes]:
        return self._iter

    def __next__(self) -> bytes:
        return next(self._iter)


def _jsonl_starts(lines: _Lines, rows_per_shard: int, shards: _ShardBytes) -> list[tuple[int, int]]:
    """``(byte offset, first row)`` of every shard; non-blank lines are rows, as :func:`jsonl_records` counts."""
    starts, offset, rows = [], 0, 0
    for line in lines:
        if line.strip():
            if rows % rows_per_shard == 0:
                starts.append((offset, rows + 1))
                shards.boundary(offset, rows + 1)
            rows += 1
        shards.feed(line)
        offset += len(line)
    lines.rows = rows
    return starts


def _csv_starts(
    where: Location, lines: _Lines, rows_per_shard: int, shards: _ShardBytes
) -> tuple[list[tuple[int, int]], tuple[str, ...]]:
    """``(byte offset, first row)`` of every shard, by CSV record, and the header."""
    consumed = 0

    def text() -> Iterator[str]:
        nonlocal consumed
        for raw in lines:
            consumed += len(raw)
            shards.feed(raw)
            yield raw.decode("utf-8", "replace")

    reader = csv.reader(text())
    first = next(reader, None)
    if first is None:
        raise DataError(where.uri, None, None, "empty file (no header)")
    header = tuple(h.strip().lstrip("\ufeff") for h in first)
    shards.header = header
    starts, rows, previous = [], 0, consumed
    for _ in reader:  # the C reader pulls exactly the lines of one record per step
        if rows % rows_per_shard == 0:
            starts.append((previous, rows + 1))
            shards.boundary(previous, rows + 1)
        rows += 1
        previous = consumed
    lines.rows = rows
    return starts, header


def _plan_parquet(
    where: Location, rows_per_shard: int, screen: Screen | None
) -> tuple[list[InputSlice], str]:
    with where.fs.open_input_file(where.path) as handle:
        pf = pq.ParquetFile(handle)
        rows = pf.metadata.num_rows
        if screen is not None:  # rows as read_slice gives them, one batch (at most a shard) at a time
            name, row = posixpath.basename(where.uri.rstrip("/")), 1
            for batch in pf.iter_batches(batch_size=rows_per_shard):
                records = [Record(row + i, obj) for i, obj in enumerate(batch.to_pylist())]
                screen(name, records)
                row += len(records)
    hasher = hashlib.sha256()
    with where.fs.open_input_stream(where.path) as stream:
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
    slices = [
        InputSlice(where.uri, "parquet", start + 1, min(rows_per_shard, rows - start))
        for start in range(0, rows, rows_per_shard)
    ]
    return slices, hasher.hexdigest()


def plan_table_file(where: Location, rows_per_shard: int, sha256: str) -> InputPlan:
    """The plan of a Parquet input this job wrote itself (its hash is already known: no second read)."""
    with where.fs.open_input_file(where.path) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    slices = tuple(
        InputSlice(where.uri, "parquet", start + 1, min(rows_per_shard, rows - start))
        for start in range(0, rows, rows_per_shard)
    )
    return InputPlan(slices, rows, sha256)


def read_table_slice(s: InputSlice) -> pa.Table:
    """The rows of a Parquet slice as a table, reading only the row groups that hold them."""
    where = location(s.file)
    with where.fs.open_input_file(where.path) as handle:
        pf = pq.ParquetFile(handle)
        lo, hi = s.first_row - 1, s.first_row - 1 + s.rows
        groups, start, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start + n > lo and start < hi:
                groups.append(g)
                first = start if first is None else first
            start += n
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    return table.slice(lo - (first or 0), s.rows)


def read_slice(s: InputSlice) -> list[Record]:
    """The slice's rows as :class:`~conva.data.Record` s, numbered as in the whole file (bad rows carry an error)."""
    if s.format == "parquet":
        try:
            table = read_table_slice(s)
        except (OSError, pa.ArrowException) as err:
            raise DataError(s.file, None, None, f"unreadable Parquet file: {err}") from err
        return [Record(s.first_row + i, obj) for i, obj in enumerate(table.to_pylist())]
    where = location(s.file)
    with where.fs.open_input_file(where.path) as handle:
        handle.seek(s.start)
        data = handle.read(s.stop - s.start)
    if s.format == "jsonl":
        return list(jsonl_records(data, s.first_row))
    return list(csv_records(data, s.file, header=s.header, first_row=s.first_row))


def table_sha256(table: pa.Table) -> str:
    """sha256 of a table's content (Arrow IPC of its rows in fixed-size batches): equal tables, equal hashes."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema.remove_metadata()) as writer:
        for batch in table.combine_chunks().to_batches(max_chunksize=4096):
            writer.write_batch(batch)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def write_input_table(where: Location, table: pa.Table, rows_per_shard: int, sha256: str) -> InputPlan:
    """Write a job-built input table (once: it is named by its hash) and plan it, one row group per shard."""
    if not where.exists():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=rows_per_shard)
        where.write_bytes(sink.getvalue().to_pybytes())
    return plan_table_file(where, rows_per_shard, sha256)
