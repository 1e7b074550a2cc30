"""Value data: contrastive pairs for probes, prompts for steering, neutral prompts for gates.

Two on-disk formats are read:

* **The paper's CSV files** (``hr-jin/ConVA``, ``data/value/``): ``{value}_context_controlled.csv`` (also
  spelt ``{value}_hard.csv``) and ``{value}_non_context_controlled.csv`` (``{value}_easy.csv``) with
  columns ``question_1`` (promotes the value) and ``question_2`` (opposes it); ``test_{value}_new.csv``
  with a column ``text``. The value comes from the file name.
* **The project's own schema**, in JSONL, CSV or Parquet: pairs have ``value, positive, negative``;
  prompts have ``value, prompt`` (``value`` may be absent or null for neutral prompts).

A source is a local path or any URI ``pyarrow.fs`` understands (``s3://bucket/key``, ``gs://…``,
``hdfs://…``, ``file:///…``): files are listed and read through ``pyarrow.fs``, never copied.

Strict loaders (:func:`load_pairs`, :func:`load_prompts`) are for training data: the first malformed
row raises :class:`DataError` naming the file, the 1-based data row and the field.
:func:`read_records` is the lenient reader for bulk steering input: a bad row comes back with an
``error`` reason instead of stopping the job.

Example:
    >>> pairs = demo_pairs("power")
    >>> pairs[0].value, len(pairs) >= 40
    ('power', True)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.fs as pafs

from conva.values import VALUES, check_value

__all__ = [
    "DataError",
    "Pair",
    "Prompt",
    "Record",
    "load_pairs",
    "load_prompts",
    "read_records",
    "paper_pairs",
    "paper_prompts",
    "demo_dir",
    "demo_pairs",
    "demo_prompts",
    "demo_answers",
    "demo_neutral",
    "text_hash",
    "is_folder",
    "data_files",
    "folder_files",
    "raw_row",
    "jsonl_records",
    "csv_records",
    "DATA_SUFFIXES",
    "VALUE_SIDES",
]

# The answers of a yes/no prompt; a prompt's ``value_side`` is the one that takes the value's side.
VALUE_SIDES = ("yes", "no")

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
_PAPER_PAIR_FILES = {
    "context_controlled": ("{v}_context_controlled.csv", "{v}_hard.csv"),
    "non_context_controlled": ("{v}_non_context_controlled.csv", "{v}_easy.csv"),
}
_PAPER_NAME = re.compile(
    r"^(?:test_(?P<test>[a-z-]+)_new|(?P<value>[a-z-]+)_(?P<kind>context_controlled|non_context_controlled|hard|easy))\.csv$"
)


class DataError(ValueError):
    """A malformed data file or row; ``file``, ``row`` and ``field`` say where.

    ``row`` is the row's line in a JSON Lines or CSV file (the CSV header is line 1), its 1-based row in a
    Parquet file: the number an editor shows.
    """

    def __init__(self, file: str | Path, row: int | None, field: str | None, problem: str) -> None:
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = (
            f"{file}" + (f", row {row}" if row is not None else "") + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Pair:
    """Two texts sharing one scenario: ``positive`` promotes ``value``, ``negative`` opposes it."""

    value: str
    positive: str
    negative: str
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class Prompt:
    """A prompt to steer or to fit a gate on; ``value`` is None for value-neutral prompts."""

    value: str | None
    prompt: str
    source: str = ""
    row: int = 0
    value_side: str | None = None
    """For a yes/no prompt, the answer that takes the value's side (``yes`` or ``no``); None where unknown."""


@dataclass(frozen=True)
class Record:
    """One row of bulk input as read, valid or not: ``error`` is a reason, or None for a usable row."""

    row: int
    fields: dict[str, Any]
    error: str | None = None
    raw: str = (
        ""  # the row as read (its line, its CSV record, its Parquet row as JSON): what an error row keeps
    )


def text_hash(text: str) -> str:
    """A short stable hash of a text (sha256, 16 hex digits), stored beside activations."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _locate(source: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a ``pyarrow.fs`` URI."""
    text = str(source)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:  # pyarrow.lib.ArrowInvalid is a ValueError
            raise DataError(text, None, None, f"cannot open this URI: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(text).resolve())


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_folder(source: str | Path) -> bool:
    """Whether ``source`` (path or URI) is a folder."""
    fs, path = _locate(source)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield every data row of a JSONL, CSV or Parquet file, with a reason for rows that cannot be used.

    ``path`` is a local path or a ``pyarrow.fs`` URI. Rows are numbered by their line (JSON Lines, CSV: the
    header is line 1 and no row) or row (Parquet); blank lines are no rows. Undecodable bytes, broken JSON
    and lines that are not objects become error records; the file
    as a whole must exist and have a known suffix.
    """
    fs, where = _locate(path)
    suffix = posixpath.splitext(where)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(path, None, None, f"unknown file type {suffix!r} (expected .jsonl, .csv or .parquet)")
    if fs.get_file_info(where).type != pafs.FileType.File:
        raise DataError(path, None, None, "no such file")
    if suffix == ".parquet":
        yield from _parquet_records(fs, where, path)
        return
    with fs.open_input_stream(where) as stream:
        data = stream.read()
    yield from (jsonl_records(data) if suffix in (".jsonl", ".json") else csv_records(data, path))


def jsonl_records(data: bytes, first_row: int = 1) -> Iterator[Record]:
    """The records of JSON Lines bytes, each numbered by its line (``first_row`` is the first line's number).

    Lines end with ``\n``; blank lines are not rows (the planner counts them, :mod:`conva.batch.inputs`), so
    a row's number is its line in the file, and a slice of a file (whole lines) gives the same records.
    """
    for line, raw in enumerate(data.split(b"\n"), start=first_row):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", "replace").rstrip("\r")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield Record(line, {}, f"invalid UTF-8 at byte {exc.start} of the line", text)
            continue
        except json.JSONDecodeError as exc:
            yield Record(line, {}, f"invalid JSON: {exc.msg}", text)
            continue
        if not isinstance(obj, dict):
            yield Record(line, {}, f"expected a JSON object, got {type(obj).__name__}", text)
            continue
        yield Record(line, obj, None, text)


def csv_records(
    data: bytes, path: str | Path, header: Sequence[str] | None = None, first_row: int = 1
) -> Iterator[Record]:
    """The records of CSV bytes, each numbered by the line it starts on (``first_row``: the first line's number).

    Without ``header`` the first record is the header (line ``first_row``, not a row); with it the bytes
    hold data rows only (a slice of a file, see :mod:`conva.batch.inputs`). Blank lines are not rows. A
    quoted field may span lines: the record keeps the number of its first line.
    """
    lines = data.splitlines(keepends=True)
    bad_lines: dict[int, str] = {}
    text_lines = []
    for i, raw in enumerate(lines):
        try:
            text_lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad_lines[i] = f"invalid UTF-8 at byte {exc.start} of the line"
            text_lines.append(raw.decode("utf-8", "replace"))
    reader = csv.reader(io.StringIO("".join(text_lines).lstrip("\ufeff"), newline=""))
    if header is None:
        header = next(reader, None)
        if header is None:
            raise DataError(path, None, None, "empty file (no header)")
    header = [h.strip() for h in header]
    before = reader.line_num  # physical lines consumed before the next record
    for values in reader:
        start, before = before, reader.line_num
        if not values:  # a blank line
            continue
        error = _csv_row_error(header, values, bad_lines, reader.line_num)
        record = "".join(text_lines[start : reader.line_num]).rstrip("\r\n")
        yield Record(first_row + start, dict(zip(header, values)) if error is None else {}, error, record)


def _csv_row_error(header: list[str], values: list[str], bad: dict[int, str], end_line: int) -> str | None:
    # reader.line_num is the 1-based physical line where this record ended; a quoted field may span
    # several lines, so any undecodable line up to that point that is not yet claimed belongs to it.
    for line in sorted(bad):
        if line < end_line:
            return bad.pop(line)
    if len(values) != len(header):
        return f"expected {len(header)} fields, got {len(values)}"
    return None


def _parquet_records(fs: pafs.FileSystem, where: str, path: str | Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(where, filesystem=fs)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(path, None, None, f"unreadable Parquet file: {exc}") from exc
    for row, obj in enumerate(table.to_pylist(), start=1):
        yield Record(row, obj, None, raw_row(obj))


def raw_row(obj: dict) -> str:
    """A Parquet row as the text an error row keeps (JSON; what JSON cannot say, as its ``str``)."""
    return json.dumps(obj, ensure_ascii=False, default=str)


def _require_text(path: str | Path, rec: Record, field: str) -> str:
    value = rec.fields.get(field)
    if field not in rec.fields:
        raise DataError(path, rec.row, field, "missing field")
    if not isinstance(value, str):
        raise DataError(path, rec.row, field, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, rec.row, field, "empty text")
    return value


def _strict(path: str | Path) -> Iterator[Record]:
    for rec in read_records(path):
        if rec.error is not None:
            raise DataError(path, rec.row, None, rec.error)
        yield rec


_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".snappy", ".br")


def data_files(path: str | Path) -> list[str]:
    """The data files of a file or folder (path or URI), sorted; see :func:`folder_files` for a folder's rule."""
    return folder_files(path)[0]


def folder_files(path: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The data files a file or folder holds, and what it holds but is not read, with why.

    The rule for a folder (path or URI): its subfolders are searched too; a file or subfolder whose name
    starts with ``_`` or ``.`` is hidden (bookkeeping, as pyarrow and pandas treat it) and skipped;
    ``.jsonl``, ``.json`` (read as JSON Lines), ``.csv`` and ``.parquet`` files are read, in the order of
    their paths; compressed files (``.gz``, ``.zst``, …) are skipped (a shard is a byte range of a file,
    which a compressed stream has not: decompress them first), and so is any other file. Skipped entries
    come back as ``(path relative to the folder, why)``. A file named directly is read whatever its place.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> for name in ("a.jsonl", "_b.jsonl", "c.txt", "d.jsonl.gz", "sub/e.csv"):
        ...     os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
        ...     _ = open(os.path.join(d, name), "w").write("")
        >>> files, skipped = folder_files(d)
        >>> [f[len(d) + 1 :] for f in files], [s for s, _ in skipped]
        (['a.jsonl', 'sub/e.csv'], ['_b.jsonl', 'c.txt', 'd.jsonl.gz'])
    """
    fs, where = _locate(path)
    kind = fs.get_file_info(where).type
    if kind == pafs.FileType.NotFound:
        raise DataError(path, None, None, "no such file")
    if kind == pafs.FileType.File:
        return [str(path)], []
    root = where.rstrip("/")
    found, skipped, hidden = [], [], set()
    for info in sorted(fs.get_file_info(pafs.FileSelector(root, recursive=True)), key=lambda i: i.path):
        rel = info.path[len(root) + 1 :]
        parts = rel.split("/")
        dot = next((i for i, part in enumerate(parts) if part.startswith(("_", "."))), None)
        if dot is not None:
            name = "/".join(parts[: dot + 1]) + (
                "/" if dot < len(parts) - 1 or info.type != pafs.FileType.File else ""
            )
            if name not in hidden:
                hidden.add(name)
                skipped.append((name, "hidden: its name starts with '_' or '.'"))
            continue
        if info.type != pafs.FileType.File:
            continue
        suffix = posixpath.splitext(rel)[1].lower()
        if suffix in DATA_SUFFIXES:
            found.append(rel)
        elif suffix in _COMPRESSED:
            skipped.append((rel, "compressed: decompress it first (shards are byte ranges of a file)"))
        else:
            skipped.append((rel, "not a .jsonl, .json, .csv or .parquet file"))
    if not found:
        listed = "; ".join(f"{name}: {why}" for name, why in skipped[:5])
        raise DataError(
            path,
            None,
            None,
            "folder holds no .jsonl, .json, .csv or .parquet file" + (f" ({listed})" if listed else ""),
        )
    return [f"{str(path).rstrip('/')}/{rel}" for rel in found], skipped


def _paper_value(path: str) -> str | None:
    match = _PAPER_NAME.match(posixpath.basename(path))
    if not match:
        return None
    return match.group("test") or match.group("value")


def load_pairs(path: str | Path, value: str | None = None) -> list[Pair]:
    """Read contrastive pairs from a file or a folder of files, strictly.

    Paper files (``question_1``/``question_2``) take their value from the file name; project files carry
    a ``value`` column. ``value`` keeps only that value's pairs.
    """
    pairs: list[Pair] = []
    for file in data_files(path):
        file_value = _paper_value(file)
        for rec in _strict(file):
            if "question_1" in rec.fields or "question_2" in rec.fields:
                if file_value is None:
                    raise DataError(file, rec.row, "value", "paper-format file name does not name a value")
                v, pos, neg = (
                    file_value,
                    _require_text(file, rec, "question_1"),
                    _require_text(file, rec, "question_2"),
                )
            else:
                v = _require_text(file, rec, "value")
                pos, neg = _require_text(file, rec, "positive"), _require_text(file, rec, "negative")
            if v not in VALUES:
                raise DataError(file, rec.row, "value", f"unknown value {v!r}")
            if value is None or v == value:
                pairs.append(Pair(v, pos, neg, str(file), rec.row))
    return pairs


def load_prompts(path: str | Path, value: str | None = None) -> list[Prompt]:
    """Read prompts (``prompt`` or the paper's ``text`` column) from a file or folder, strictly."""
    prompts: list[Prompt] = []
    for file in data_files(path):
        file_value = _paper_value(file)
        for rec in _strict(file):
            field = "text" if "text" in rec.fields and "prompt" not in rec.fields else "prompt"
            text = _require_text(file, rec, field)
            v = rec.fields.get("value", file_value)
            if v is not None and v not in VALUES:
                raise DataError(file, rec.row, "value", f"unknown value {v!r}")
            side = rec.fields.get("value_side")
            if side is not None and side not in VALUE_SIDES:
                raise DataError(file, rec.row, "value_side", f"expected 'yes' or 'no', got {side!r}")
            if value is None or v == value:
                prompts.append(Prompt(v, text, str(file), rec.row, side))
    return prompts


def _paper_file(root: str | Path, value: str, names: tuple[str, ...]) -> str:
    base = str(root).rstrip("/")
    for name in names:
        candidate = f"{base}/{name.format(v=value)}"
        fs, where = _locate(candidate)
        if fs.get_file_info(where).type == pafs.FileType.File:
            return candidate
    raise DataError(f"{base}/{names[0].format(v=value)}", None, None, "no such file (nor its other spelling)")


def paper_pairs(root: str | Path, value: str, kind: str = "context_controlled") -> list[Pair]:
    """The paper's pairs for one value; ``kind`` is ``context_controlled`` or ``non_context_controlled``."""
    if kind not in _PAPER_PAIR_FILES:
        raise ValueError(f"unknown pair kind {kind!r}; expected one of {sorted(_PAPER_PAIR_FILES)}")
    return load_pairs(_paper_file(root, check_value(value), _PAPER_PAIR_FILES[kind]))


def paper_prompts(root: str | Path, value: str) -> list[Prompt]:
    """The paper's dilemma test prompts for one value (``test_{value}_new.csv``)."""
    return load_prompts(_paper_file(root, check_value(value), ("test_{v}_new.csv",)))


def demo_dir() -> Path:
    """The folder of the project's own demo data (written for the project; see its README)."""
    return DEMO_DIR


def demo_pairs(value: str | None = None) -> list[Pair]:
    """The demo's context-controlled pairs (all values, or one)."""
    return load_pairs(DEMO_DIR / "pairs", value)


def demo_prompts(value: str | None = None) -> list[Prompt]:
    """The demo's dilemma prompts (all values, or one)."""
    return load_prompts(DEMO_DIR / "prompts", value)


def demo_answers(value: str | None = None) -> list[Pair]:
    """Answer-style labelled pairs for training and checking offline judges (never seen by probes)."""
    return load_pairs(DEMO_DIR / "answers", value)


def demo_neutral() -> list[Prompt]:
    """Value-neutral prompts (instructions, factual questions) for fitting and calibrating gates."""
    return load_prompts(DEMO_DIR / "neutral.jsonl")
