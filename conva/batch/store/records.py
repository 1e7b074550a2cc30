"""What a worker writes for one attempt at one shard, and the record the driver commits for it.

A worker writes a shard's objects under the attempt's own folder (:class:`ShardRef`) with
:func:`write_table_shard` or :func:`write_files_shard` and returns a :class:`ShardRecord` (object names,
bytes, sha256, rows, schema): no shard data reaches the driver. Also the store's errors.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from conva.batch.storage import Location

_log = logging.getLogger("conva.batch.store")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StoreError(RuntimeError):
    """A stage's folder is in a state the store refuses to write over."""


class FencedError(StoreError):
    """Another driver appended to this stage's log: this driver lost the log and must stop at once."""


class ConfigMismatchError(StoreError):
    """The stage was written by a job with a different config; ``keys`` are the differing dotted paths."""

    def __init__(self, stage_dir: Location | str, keys: list[str]) -> None:
        super().__init__(
            f"{stage_dir} was written with a different config; differing keys: {', '.join(keys)}. "
            "Rerun with --overwrite to replace it (the old output stays readable until the new "
            "run has committed every shard)."
        )
        self.keys = keys


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object of a committed shard: its name below the stage folder, its size and sha256."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardRef:
    """What a worker needs to write one attempt at one shard: where, and the ids its record must carry."""

    stage: str
    gen: int
    shard: int
    attempt: str
    folder: Location


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """What a worker returns for one shard instead of its data: the objects it wrote and a few facts.

    ``schema`` is the hash of the shard table's Arrow schema (every shard of a stage must agree);
    ``extra`` carries small stage-specific facts (e.g. the model activations were recorded with);
    ``worker`` says who ran it and when (node, pid, worker id, start and end times).
    """

    stage: str
    gen: int
    shard: int
    attempt: str
    objects: tuple[StoredObject, ...]
    rows: int
    schema: str = ""
    extra: dict = field(default_factory=dict)
    worker: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ShardRecord:
        objects = tuple(StoredObject(**o) for o in data["objects"])
        return cls(**{**data, "objects": objects})


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as a single path component, else raise ``ValueError`` naming it."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"invalid {what} {name!r}: must match {_NAME.pattern} and not contain '..'")
    return name


def shard_ranges(n_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` row ranges; shard ``i`` is always the ``i``-th range.

    >>> shard_ranges(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    if n_rows < 0 or rows_per_shard < 1:
        raise ValueError(f"need n_rows >= 0 and rows_per_shard >= 1, got {n_rows}, {rows_per_shard}")
    return [(start, min(start + rows_per_shard, n_rows)) for start in range(0, n_rows, rows_per_shard)]


def schema_hash(schema: pa.Schema) -> str:
    """A short hash of an Arrow schema without its metadata: shards of one stage must agree on it."""
    return hashlib.sha256(schema.remove_metadata().serialize().to_pybytes()).hexdigest()[:16]


def _store(ref: ShardRef, name: str, data: bytes) -> StoredObject:
    ref.folder.child(name).write_bytes(data)
    return StoredObject(name, len(data), hashlib.sha256(data).hexdigest())


def _parquet_bytes(table: pa.Table, row_group_size: int | None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, **_write_options(table.schema))
    return sink.getvalue().to_pybytes()


def write_table_shard(
    ref: ShardRef,
    table: pa.Table,
    *,
    row_group_size: int | None = None,
    extra: dict | None = None,
    worker: dict | None = None,
) -> ShardRecord:
    """Write ``table`` as the attempt's ``part-<shard>.parquet`` and return the shard's record (worker side).

    ``row_group_size`` (rows) lets readers skip row groups by their statistics, e.g. one per layer.
    """
    obj = _store(ref, f"part-{ref.shard:05d}.parquet", _parquet_bytes(table, row_group_size))
    return ShardRecord(
        ref.stage,
        ref.gen,
        ref.shard,
        ref.attempt,
        (obj,),
        table.num_rows,
        schema_hash(table.schema),
        extra or {},
        worker or {},
    )


def write_files_shard(
    ref: ShardRef,
    files: dict[str, bytes],
    table: pa.Table,
    *,
    extra: dict | None = None,
    worker: dict | None = None,
) -> ShardRecord:
    """Write named files (e.g. a bundle's) plus a row table as one shard and return its record (worker side)."""
    objects = [_store(ref, name, data) for name, data in sorted(files.items())]
    objects.append(_store(ref, f"part-{ref.shard:05d}.parquet", _parquet_bytes(table, None)))
    return ShardRecord(
        ref.stage,
        ref.gen,
        ref.shard,
        ref.attempt,
        tuple(objects),
        table.num_rows,
        schema_hash(table.schema),
        extra or {},
        worker or {},
    )


def _is_float_data(kind: pa.DataType) -> bool:
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return pa.types.is_floating(kind)


def _write_options(schema: pa.Schema) -> dict:
    """Parquet options per column: float data (activations) plain, everything else dictionary-encoded with stats.

    Dictionary encoding of activation floats never pays (every value differs) yet made writes ~9x slower
    and files ~1.5x larger. Statistics stay on the columns readers filter on (layer, value, dataset...).
    """
    other = [f.name for f in schema if not _is_float_data(f.type)]
    return {"use_dictionary": other, "write_statistics": other}
