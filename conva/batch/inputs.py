"""Inputs as slices each worker reads for itself: planned before the run, read on the workers.

The driver never holds an input. :func:`plan_input` hashes each file (so a resumed job refuses an input
that changed under its committed shards) and finds where every shard of ``rows_per_shard`` rows starts:

* **Parquet**: shard boundaries come from the footer (row counts per row group); the bytes are streamed
  only for the hash. A worker reads just the row groups that overlap its rows. With ``metadata_only``
  (what a job's pre-flight asks) nothing is streamed: the file's identity is a hash of its size, its
  modification time and its footer (which holds every column chunk's offsets, sizes and statistics).
  Pre-flight time is then constant in the file's size.
* **JSON Lines**: rows are non-blank lines, numbered by their line in the file; a shard is a byte range of
  whole lines, found by :mod:`conva.batch.line_index` range by range (threads here, or Ray tasks).
* **CSV**: rows are CSV records, numbered by the line each starts on (the header is line 1; a quoted
  field may span lines); a shard is a byte range of whole records, and carries the header. The file is
  read once, on the driver, in constant memory: a quoted newline makes its records unsplittable by bytes.

Blank lines are no rows; the plan counts them per file, and the records that span several lines
(:class:`FileReport`), so that ``validate`` and the job's last line account for every line.

A slice is read by :func:`read_slice` into the same :class:`conva.data.Record` rows, numbered as in the
whole file, that :func:`conva.data.read_records` gives, so error rows name the file and row either way.

With a ``screen``, every shard's rows (with ``metadata_only``, the first ``SCREEN_ROWS`` or so: whole shards,
each file's first at least), as the :class:`~conva.data.Record` s a worker will read, are handed to a
callback, a shard at a time (one shard's bytes are held, never the file): the driver counts bad rows this
way before any model loads (:mod:`conva.batch.badrows`); the workers count every row in their shard records.

Tables a job builds itself (the extraction texts, a study's cells × prompts) are written once as a
Parquet file beside the stage (:func:`write_input_table`) and planned like any Parquet input.

Example:
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp(); path = os.path.join(folder, "p.jsonl")
    >>> _ = open(path, "w").write('{"prompt": "a"}\\n\\n{"prompt": "b"}\\n{"prompt": "c"}\\n')
    >>> plan = plan_input(path, rows_per_shard=2)
    >>> plan.rows, [(s.first_row, s.rows) for s in plan.slices], plan.files[0].blank_lines
    (3, [(1, 2), (4, 1)], 1)
    >>> [r.fields["prompt"] for r in read_slice(plan.slices[1])]
    ['c']
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import itertools
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from conva.batch.line_index import Map, combine, index_ranges
from conva.batch.storage import Location, location
from conva.data import DATA_SUFFIXES, DataError, Record, csv_records, folder_files, jsonl_records, raw_row

__all__ = [
    "InputSlice",
    "EvenSlices",
    "Slices",
    "InputPlan",
    "FileReport",
    "files_line",
    "layout_lines",
    "Screen",
    "SCREEN_ROWS",
    "plan_input",
    "plan_table_file",
    "read_slice",
    "read_table_slice",
    "table_sha256",
    "write_input_table",
]

_CHUNK = 1 << 24
SCREEN_ROWS = 10_000  # rows a job's pre-flight screens on the driver (whole shards); the workers screen all
# Called with a file's base name and some of its rows, in file order (every row exactly once).
Screen = Callable[[str, list[Record]], None]


@dataclass(frozen=True)
class InputSlice:
    """The rows one shard reads: ``rows`` rows of ``file``, the first numbered ``first_row`` (1-based).

    A row's number is its line (JSON Lines, CSV) or its row (Parquet) in the file. ``start``/``stop``
    are the byte range of those rows (JSON Lines, CSV); ``header`` is the CSV header; ``label`` the
    file's path inside the folder named as the input (its base name when a file was named).
    """

    file: str
    format: str
    first_row: int
    rows: int
    start: int = 0
    stop: int = 0
    header: tuple[str, ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        """The file's name inside the input: row ids are ``<name>/<row>``."""
        return self.label or posixpath.basename(self.file.rstrip("/"))


class _ShardSequence(Sequence[InputSlice]):
    """A sequence of shard slices made when indexed: subclasses give ``__len__`` and ``_at(i)``, 0 <= i < len."""

    def _at(self, i: int) -> InputSlice:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> InputSlice: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[InputSlice]: ...
    def __getitem__(self, i: int | slice) -> InputSlice | Sequence[InputSlice]:
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"shard {i} of {n}")
        return self._at(i % n)


class EvenSlices(_ShardSequence):
    """A Parquet file's shards of ``rows_per_shard`` rows (the last may be short), made when indexed.

    Shard ``i`` is rows ``i * rows_per_shard + 1`` on, so the plan of a file of any size costs O(1) time and
    memory on the driver (a 10 GB prompts file is ~1.7 million shards at 32 rows each).
    """

    def __init__(self, file: str, rows: int, rows_per_shard: int, label: str = "") -> None:
        self.file, self.rows, self.rows_per_shard, self.label = file, rows, rows_per_shard, label

    def __len__(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def _at(self, i: int) -> InputSlice:
        start = i * self.rows_per_shard
        return InputSlice(
            self.file, "parquet", start + 1, min(self.rows_per_shard, self.rows - start), label=self.label
        )


class Slices(_ShardSequence):
    """The shards of several files, in order: each file's own sequence (a list, or :class:`EvenSlices`)."""

    def __init__(self, parts: Sequence[Sequence[InputSlice]]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.ends = list(itertools.accumulate(len(p) for p in self.parts))  # shards up to each part's end

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _at(self, i: int) -> InputSlice:
        part = bisect.bisect_right(self.ends, i)
        return self.parts[part][i - (self.ends[part - 1] if part else 0)]


@dataclass(frozen=True)
class FileReport:
    """One input file as planned: its rows, its blank lines, and its rows that span several lines (CSV)."""

    name: str
    rows: int
    blank_lines: int = 0
    multiline_rows: int = 0
    first_multiline: tuple[int, ...] = ()  # the first few such rows' line numbers


@dataclass(frozen=True)
class InputPlan:
    """Every shard's slice, the rows in all and a sha256 of the input's files (names and bytes).

    ``files``: each file read; ``skipped``: what a folder held but is not read, ``(name, why)``.
    """

    slices: Sequence[InputSlice]  # indexed by shard; computed on demand for Parquet (EvenSlices)
    rows: int
    sha256: str
    files: tuple[FileReport, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()


def files_line(plan: InputPlan) -> str:
    """``files: 2 read (a.jsonl, sub/b.csv); 2 skipped (c.txt: not a …; _x.jsonl: hidden: …)``."""
    read = ", ".join(f.name for f in plan.files)
    line = f"files: {len(plan.files)} read ({read}); {len(plan.skipped)} skipped"
    if plan.skipped:
        line += " (" + "; ".join(f"{name}: {why}" for name, why in plan.skipped) + ")"
    return line


def layout_lines(plan: InputPlan) -> list[str]:
    """What a reader of the input should know besides its rows: blank lines, records spanning lines."""
    lines = []
    blank = [f for f in plan.files if f.blank_lines]
    if blank:
        total = sum(f.blank_lines for f in blank)
        lines.append(
            f"blank lines: {total} ({', '.join(f'{f.name} {f.blank_lines}' for f in blank)}): no rows, "
            "but rows keep their line numbers"
        )
    multi = [f for f in plan.files if f.multiline_rows]
    if multi:
        total = sum(f.multiline_rows for f in multi)
        where = "; ".join(
            f"{f.name} line{'s' if len(f.first_multiline) > 1 else ''} {', '.join(map(str, f.first_multiline))}"
            + (", …" if f.multiline_rows > len(f.first_multiline) else "")
            for f in multi
        )
        lines.append(
            f"warning: {total} CSV row{'s' if total != 1 else ''} span{'s' if total == 1 else ''} several lines "
            f"(a quoted field holds a newline) starting at {where}: if that is not meant, a quote is unclosed"
        )
    return lines


def _format(path: str) -> str:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(path, None, None, f"unknown file type {suffix!r} (expected .jsonl, .csv or .parquet)")
    return {".json": "jsonl"}.get(suffix, suffix[1:])


def plan_input(
    source: str,
    rows_per_shard: int,
    screen: Screen | None = None,
    metadata_only: bool = False,
    map_ranges: Map | None = None,
    range_bytes: int | None = None,
    screen_rows: int | None = None,
) -> InputPlan:
    """Plan the shards of a file or a folder of files (path or URI); one pass per file, none for Parquet's rows.

    Shards never span two files. ``screen``, if given, sees every row as the workers will read it
    (see the module docstring). ``metadata_only``: a Parquet file is planned from its metadata alone, and
    the screen sees each file's first shard and whole shards after it while fewer than ``screen_rows``
    (default :data:`SCREEN_ROWS`) rows of the input have been screened: a small input whole, a large one
    in constant time. JSON Lines and CSV still take one pass to find their rows; ``map_ranges`` runs the
    JSON Lines range index (:mod:`conva.batch.line_index`; default: a thread per core). Raises
    :class:`DataError` naming the file if it cannot be read.
    """
    parts: list[Sequence[InputSlice]] = []
    digest, rows, reports, screened = hashlib.sha256(), 0, [], 0
    files, skipped = folder_files(source)
    root = str(source).rstrip("/")
    for file in files:
        label = file[len(root) + 1 :] if file != str(source) else posixpath.basename(file.rstrip("/"))
        try:
            where, fmt = location(file), _format(file)
            file_slices, file_sha, report = _plan_file(
                where, fmt, rows_per_shard, label, metadata_only, map_ranges, range_bytes
            )
            if screen is not None:
                budget = SCREEN_ROWS if screen_rows is None else screen_rows
                limit = budget - screened if metadata_only else None
                screened += _screen(where, fmt, file_slices, screen, label, limit)
        except DataError:
            raise
        except (OSError, ValueError, pa.ArrowException) as err:
            raise DataError(file, None, None, f"cannot read: {type(err).__name__}: {err}") from err
        parts.append(file_slices)
        rows += report.rows
        reports.append(report)
        digest.update(f"{label}\0{file_sha}\0".encode())
    return InputPlan(Slices(parts), rows, digest.hexdigest(), tuple(reports), tuple(skipped))


def _plan_file(
    where: Location,
    fmt: str,
    rows_per_shard: int,
    label: str,
    metadata_only: bool,
    map_ranges: Map | None,
    range_bytes: int | None,
) -> tuple[Sequence[InputSlice], str, FileReport]:
    if fmt == "parquet":
        even, sha = _plan_parquet(where, rows_per_shard, label, metadata_only)
        return even, sha, FileReport(label, even.rows)
    if fmt == "jsonl":
        size = where.fs.get_file_info(where.path).size
        table, rows, blank, sha = combine(
            index_ranges(where.uri, size, rows_per_shard, range_bytes, map_ranges)
        )
        return _ByteSlices(where.uri, table, label), sha, FileReport(label, rows, blank)
    hasher = hashlib.sha256()
    lines = _Lines(where, hasher)
    starts, header = _csv_starts(where, lines, rows_per_shard)
    for _ in lines:  # whatever the planner did not read still goes into the hash
        pass
    bounds = [*starts, (lines.bytes, 0, lines.rows)]
    slices = [
        InputSlice(where.uri, fmt, line, following - row, offset, stop, header, label)
        for (offset, line, row), (stop, _, following) in zip(bounds, bounds[1:])
    ]
    report = FileReport(label, lines.rows, lines.blank, lines.multiline, tuple(lines.first_multiline))
    return slices, hasher.hexdigest(), report


class _ByteSlices(_ShardSequence):
    """A JSON Lines file's shards, made when indexed from a table of ``(start, stop, first line, rows)``:
    32 bytes a shard on the driver (a 10 GB file of 230-byte rows at 32 rows a shard: 44 MB)."""

    def __init__(self, file: str, table, label: str) -> None:
        self.file, self.table, self.label = file, table, label

    def __len__(self) -> int:
        return len(self.table)

    def _at(self, i: int) -> InputSlice:
        start, stop, line, rows = (int(x) for x in self.table[i])
        return InputSlice(self.file, "jsonl", line, rows, start, stop, label=self.label)


def _screen(
    where: Location, fmt: str, slices: Sequence[InputSlice], screen: Screen, label: str, limit: int | None
) -> int:
    """Hand the file's rows, read as a worker reads them, to ``screen``, a shard (at most) at a time: the first
    batch, then the next while fewer than ``limit`` rows have been (all if ``limit`` is None); returns the
    rows screened."""
    done = 0
    for batch in _parquet_shards(where, slices) if fmt == "parquet" else map(read_slice, slices):
        if done and limit is not None and done >= limit:
            break
        screen(label, batch)
        done += len(batch)
    return done


def _parquet_shards(where: Location, slices: Sequence[InputSlice]) -> Iterator[list[Record]]:
    """A Parquet file's rows in batches of at most a shard, streamed in one pass (not a read per shard: a
    row group may hold many shards)."""
    rows_per_shard = slices[0].rows if len(slices) else 1
    with where.fs.open_input_file(where.path) as handle:
        row = 1
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows_per_shard):
            yield [Record(row + i, obj, None, raw_row(obj)) for i, obj in enumerate(batch.to_pylist())]
            row += batch.num_rows


class _Lines:
    """The lines (``\\n``-terminated bytes) of a stored file, read in chunks; every chunk feeds the hasher."""

    def __init__(self, where: Location, hasher) -> None:
        self.where, self.hasher = where, hasher
        self.rows = 0  # data rows, as the planner counts them
        self.bytes = 0  # bytes read so far
        self.blank = 0  # blank lines (no rows)
        self.multiline = 0  # rows that span several lines (CSV quoted newlines)
        self.first_multiline: list[int] = []
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


def _csv_starts(
    where: Location, lines: _Lines, rows_per_shard: int
) -> tuple[list[tuple[int, int, int]], tuple[str, ...]]:
    """``(byte offset, first line, rows before)`` of every shard, by CSV record, and the header."""
    consumed, line_no = 0, 0

    def text() -> Iterator[str]:
        nonlocal consumed, line_no
        for raw in lines:
            consumed += len(raw)
            line_no += 1
            yield raw.decode("utf-8", "replace")

    reader = csv.reader(text())
    first = next(reader, None)
    if first is None:
        raise DataError(where.uri, None, None, "empty file (no header)")
    header = tuple(h.strip().lstrip("\ufeff") for h in first)
    starts, rows, previous, previous_line = [], 0, consumed, line_no
    for values in reader:  # the C reader pulls exactly the lines of one record per step
        if not values:  # a blank line: no row, as csv_records reads it
            lines.blank += 1
        else:
            if rows % rows_per_shard == 0:
                starts.append((previous, previous_line + 1, rows))
            rows += 1
            if line_no - previous_line > 1:
                lines.multiline += 1
                if len(lines.first_multiline) < 5:
                    lines.first_multiline.append(previous_line + 1)
        previous, previous_line = consumed, line_no
    lines.rows = rows
    return starts, header


def _plan_parquet(
    where: Location, rows_per_shard: int, label: str = "", metadata_only: bool = False
) -> tuple[EvenSlices, str]:
    with where.fs.open_input_file(where.path) as handle:
        pf = pq.ParquetFile(handle)
        rows = pf.metadata.num_rows
        slices = EvenSlices(where.uri, rows, rows_per_shard, label)
        if metadata_only:
            return slices, _parquet_identity(where, handle)
    hasher = hashlib.sha256()
    with where.fs.open_input_stream(where.path) as stream:
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
    return slices, hasher.hexdigest()


def _parquet_identity(where: Location, handle: pa.NativeFile) -> str:
    """A Parquet file's identity from its metadata: sha256 of its size, modification time and footer bytes.

    The footer lists every column chunk's offset, compressed size and statistics, so a rewrite that changes
    any data almost surely changes it; the modification time (on S3: the upload's) catches the rest.
    """
    info = where.fs.get_file_info(where.path)
    size = handle.size()
    handle.seek(size - 8)
    tail = handle.read(8)
    footer_len = int.from_bytes(tail[:4], "little")
    handle.seek(size - 8 - footer_len)
    footer = handle.read(footer_len)
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return hashlib.sha256(f"parquet-metadata\0{size}\0{mtime}\0".encode() + footer).hexdigest()


def plan_table_file(where: Location, rows_per_shard: int, sha256: str) -> InputPlan:
    """The plan of a Parquet input this job wrote itself (its hash is already known: no second read)."""
    with where.fs.open_input_file(where.path) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    return InputPlan(EvenSlices(where.uri, rows, rows_per_shard), rows, sha256)


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
        return [Record(s.first_row + i, obj, None, raw_row(obj)) for i, obj in enumerate(table.to_pylist())]
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
