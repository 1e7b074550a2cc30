"""The output store every job writes through: one Parquet dataset per stage, committed shard by shard.

Layout of a job's output folder::

    <out>/<stage>/part-00000.parquet    committed shards; the index comes from `shard_ranges`
    <out>/<stage>/_manifest.json        shards with rows, bytes, sha256; schema version; the job's config
    <out>/<stage>/_staging/             in-flight writes, emptied whenever the stage is opened

A shard is written under ``_staging/``, fsync'd and ``os.replace``d into place, so the visible folder
only ever holds complete files. Readers skip ``_staging`` and the manifest: pyarrow and pandas ignore
names starting with ``_`` or ``.``; for DuckDB read the glob ``<out>/<stage>/part-*.parquet``.

The committed Parquet files are the truth; the manifest is reconciled with them on every open.
**The manifest has a single writer**: only the driver commits (workers return tables to it), and two
processes must never hold the same stage open for writing.

Example:
    >>> import tempfile, pyarrow as pa
    >>> out = tempfile.mkdtemp()
    >>> stage = open_stage(out, "generations", {"steer": {"p0": 0.9}}, schema_version=1)
    >>> stage.pending(2)
    [0, 1]
    >>> stage.commit(0, pa.table({"text": ["a", "b"]}))
    >>> stage.pending(2), stage.row_count()
    ([1], 2)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

__all__ = ["ShardRecord", "Manifest", "Stage", "StoreError", "ConfigMismatchError", "OutputNotWritableError",
           "open_stage", "stage_mismatch", "check_writable", "check_name", "config_hash", "diff_keys", "shard_ranges"]

_log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHARD_FILE = re.compile(r"^part-(\d{5,})\.parquet$")
_MANIFEST, _STAGING = "_manifest.json", "_staging"
_MISSING = object()


class StoreError(RuntimeError):
    """A stage's folder is in a state the store refuses to write over."""


class ConfigMismatchError(StoreError):
    """The stage was written by a job with a different config; ``keys`` are the differing dotted paths."""

    def __init__(self, stage_dir: Path, keys: list[str]) -> None:
        super().__init__(f"{stage_dir} was written with a different config; differing keys: "
                         f"{', '.join(keys)}. Pass overwrite=True to replace it.")
        self.keys = keys


class OutputNotWritableError(PermissionError):
    """The output folder cannot be created or written to."""


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard as the manifest lists it."""

    shard: int
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The content of ``_manifest.json``; ``shards`` sorted by index."""

    stage: str
    schema_version: int
    config_hash: str
    config: dict
    ignore_keys: tuple[str, ...]
    shards: tuple[ShardRecord, ...] = ()


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


def config_hash(config: dict, ignore_keys: Iterable[str] = ()) -> str:
    """sha256 of the config's canonical JSON (sorted keys), leaving out ``ignore_keys`` (dotted paths).

    >>> config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    True
    """
    return hashlib.sha256(_canonical(_drop(_normalize(config), ignore_keys)).encode()).hexdigest()


def diff_keys(a: dict, b: dict) -> list[str]:
    """Sorted dotted paths whose values differ (or exist on one side only), compared as canonical JSON.

    >>> diff_keys({"steer": {"p0": 0.9, "layer": 12}}, {"steer": {"p0": 0.8, "layer": 12}, "seed": 0})
    ['seed', 'steer.p0']
    """
    return sorted(_diff(_normalize(a), _normalize(b), ""))


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Raise ``OutputNotWritableError`` naming ``out_dir`` unless it is (or can be made) writable.

    Cheap enough to call before any worker starts; it creates nothing that outlives the call.
    """
    path = Path(out_dir).expanduser().resolve()
    probe = path
    while not probe.exists():  # the nearest existing ancestor is where out_dir would be created
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a folder")
        if probe == path:
            fd, name = tempfile.mkstemp(prefix=".write-check-", dir=path)
            os.close(fd)
            os.remove(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=probe))
    except OSError as err:
        raise OutputNotWritableError(f"output folder {path} is not writable: {err}") from err
    return path


def stage_mismatch(out_dir: str | os.PathLike, stage: str, config: dict, schema_version: int, *,
                   ignore_keys: Iterable[str] = ()) -> list[str]:
    """The keys that would make :func:`open_stage` refuse ``<out_dir>/<stage>`` (empty if none); writes nothing.

    Lets a job check every stage it will write before it touches any of them.
    """
    stage_dir = Path(out_dir).expanduser().resolve() / check_name(stage, "stage name")
    old = _load_manifest(stage_dir) if stage_dir.is_dir() else None
    if old is None:
        return []
    ignore = tuple(sorted({*ignore_keys, *old.ignore_keys}))
    return _mismatch(old, Manifest(stage, schema_version, "", _normalize(config), ignore))


def open_stage(out_dir: str | os.PathLike, stage: str, config: dict, schema_version: int, *,
               overwrite: bool = False, ignore_keys: Iterable[str] = ()) -> Stage:
    """Open (creating if needed) ``<out_dir>/<stage>`` for committing shards, resuming what is there.

    Side effects, loudly: empties ``_staging/``; adopts shard files missing from the manifest and drops
    entries whose file is gone; with ``overwrite=True`` and a differing config or schema version, **deletes
    the stage's shards and manifest**. Otherwise a differing config raises ``ConfigMismatchError``.
    ``ignore_keys`` (dotted paths, e.g. ``"workers"``) are keys that do not change results.
    """
    root = check_writable(out_dir)
    stage_dir = _inside(root, root / check_name(stage, "stage name"))
    if (stage_dir / _STAGING).exists():
        shutil.rmtree(stage_dir / _STAGING)  # leftovers of crashed writes; refuses a symlink
    (stage_dir / _STAGING).mkdir(parents=True)
    old = _load_manifest(stage_dir)
    # a key the stage was written ignoring stays ignored, so the stored hash never drifts between runs
    ignore = tuple(sorted({*ignore_keys, *(old.ignore_keys if old else ())}))
    fresh = Manifest(stage, schema_version, config_hash(config, ignore), _normalize(config), ignore)
    keys = _mismatch(old, fresh) if old else []
    if old is None and _shard_files(stage_dir) and not overwrite:
        # open_stage writes the manifest before any commit, so these files come from outside the store
        raise StoreError(f"{stage_dir} holds shard files but no {_MANIFEST}; cannot tell which config "
                         "wrote them. Pass overwrite=True to replace them.")
    if keys and not overwrite:
        raise ConfigMismatchError(stage_dir, keys)
    if overwrite and (keys or old is None):
        for path in [*_shard_files(stage_dir).values(), stage_dir / _MANIFEST]:
            path.unlink(missing_ok=True)
        old = None
    manifest = _reconcile(stage_dir, replace(fresh, shards=old.shards if old else ()))
    if manifest != _load_manifest(stage_dir):  # a finished stage reopened stays byte- and mtime-identical
        _save_manifest(stage_dir, manifest)
    return Stage(stage_dir, manifest)


class Stage:
    """A stage's output folder, open for committing. Single writer: only the driver may commit."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self._manifest = manifest

    @property
    def manifest(self) -> Manifest:
        """The manifest as last written (a frozen snapshot)."""
        return self._manifest

    def committed(self) -> set[int]:
        """Indices of the committed shards."""
        return {record.shard for record in self._manifest.shards}

    def pending(self, n_shards: int) -> list[int]:
        """Shard indices in ``range(n_shards)`` not yet committed, ascending."""
        done = self.committed()
        return [shard for shard in range(n_shards) if shard not in done]

    def is_complete(self, n_shards: int) -> bool:
        """Whether every shard in ``range(n_shards)`` is committed."""
        return not self.pending(n_shards)

    def row_count(self) -> int:
        """Rows in the committed shards, from the manifest."""
        return sum(record.rows for record in self._manifest.shards)

    def dataset(self) -> ds.Dataset:
        """A pyarrow dataset over the committed shards only, in shard order."""
        files = [str(self.path / record.file) for record in self._manifest.shards]
        return ds.dataset(files, format="parquet", schema=None if files else pa.schema([]))

    def commit(self, shard: int, table: pa.Table, *, overwrite: bool = False,
               row_group_size: int | None = None) -> None:
        """Write ``table`` as shard ``shard`` atomically, then record it in the manifest.

        Refuses (``StoreError``) to replace a committed shard unless ``overwrite=True``, and a table
        whose schema differs from the committed shards'. Driver only: the manifest has a single writer.
        ``row_group_size`` (rows) lets readers skip row groups by their statistics, e.g. one per layer.
        """
        if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
            raise ValueError(f"shard must be a non-negative int, got {shard!r}")
        if shard in self.committed() and not overwrite:
            raise StoreError(f"shard {shard} of {self.path} is already committed")
        self._check_schema(shard, table.schema)
        final = self.path / f"part-{shard:05d}.parquet"
        tmp = self.path / _STAGING / f"{final.stem}.{uuid.uuid4().hex}.tmp"  # no .parquet: no reader globs it
        try:
            pq.write_table(table, tmp, row_group_size=row_group_size, **_write_options(table.schema))
            size, digest = _fsync_and_hash(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path)
        record = ShardRecord(shard, final.name, table.num_rows, size, digest)
        others = [r for r in self._manifest.shards if r.shard != shard]
        manifest = replace(self._manifest, shards=tuple(sorted([*others, record], key=lambda r: r.shard)))
        _save_manifest(self.path, manifest)
        self._manifest = manifest

    def _check_schema(self, shard: int, schema: pa.Schema) -> None:
        """Raise ``StoreError`` if ``schema`` differs from another committed shard's."""
        other = next((r for r in self._manifest.shards if r.shard != shard), None)
        if other is not None:
            expected = pq.read_schema(self.path / other.file).remove_metadata()
            if not expected.equals(schema.remove_metadata()):
                raise StoreError(f"shard {shard} schema differs from committed shards of {self.path}:\n"
                                 f"got {schema.remove_metadata()}\nexpected {expected}")


def _normalize(config: dict) -> dict:
    """The config as it reads back from JSON (tuples become lists, paths strings); also a deep copy."""
    return json.loads(_canonical(config))


def _canonical(obj: object) -> str:
    """Canonical JSON: sorted keys, no whitespace; ``os.PathLike`` as str; other non-JSON types refused."""
    def default(value: object) -> str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-serializable")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def _drop(config: dict, ignore_keys: Iterable[str]) -> dict:
    """A copy of a normalized config without the dotted ``ignore_keys``."""
    out = _normalize(config)
    for key in ignore_keys:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _diff(a: object, b: object, prefix: str) -> list[str]:
    """Dotted paths under ``prefix`` where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in a.keys() | b.keys()
                for k in _diff(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")]
    same = a is not _MISSING and b is not _MISSING and _canonical(a) == _canonical(b)
    return [] if same else [prefix.rstrip(".")]


def _mismatch(old: Manifest, new: Manifest) -> list[str]:
    """Keys that make ``old`` a different job's output (``new.ignore_keys`` left out)."""
    keys = diff_keys(_drop(old.config, new.ignore_keys), _drop(new.config, new.ignore_keys))
    return keys + (["schema_version"] if old.schema_version != new.schema_version else [])


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved, if it lies inside ``root``; else ``ValueError`` (e.g. a symlink out)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{path} resolves to {resolved}, outside the output folder {root}")
    return resolved


def _is_float_data(kind: pa.DataType) -> bool:
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return pa.types.is_floating(kind)


def _write_options(schema: pa.Schema) -> dict:
    """Parquet options per column: float data (activations) plain, everything else dictionary-encoded with stats.

    Dictionary encoding of activation floats never pays (every value differs) yet made writes ~9x slower
    and files ~1.5x larger: the driver's commit rate is the ceiling of extraction throughput. Statistics
    stay on the columns readers filter on (layer, value, dataset...), not on the floats.
    """
    other = [f.name for f in schema if not _is_float_data(f.type)]
    return {"use_dictionary": other, "write_statistics": other}


def _shard_files(stage_dir: Path) -> dict[int, Path]:
    """Committed-looking shard files on disk, by index."""
    found = (_SHARD_FILE.match(p.name) for p in stage_dir.iterdir())
    return {int(m.group(1)): stage_dir / m.group(0) for m in found if m}


def _reconcile(stage_dir: Path, manifest: Manifest) -> Manifest:
    """The manifest made to agree with the files: gone files dropped, unlisted or resized ones adopted."""
    listed = {record.shard: record for record in manifest.shards}
    records = []
    for shard, path in sorted(_shard_files(stage_dir).items()):
        record = listed.get(shard)
        if record is None or record.bytes != path.stat().st_size:
            record = _adopt(shard, path)
        if record is not None:
            records.append(record)
    dropped = sorted(listed.keys() - {record.shard for record in records})
    if dropped:
        _log.warning("%s: dropping shards %s: listed in the manifest, files missing", stage_dir, dropped)
    return replace(manifest, shards=tuple(records))


def _adopt(shard: int, path: Path) -> ShardRecord | None:
    """A record for a shard file not (correctly) in the manifest; an unreadable file is deleted."""
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        _log.warning("deleting unreadable shard file %s: %s", path, err)
        path.unlink()
        return None
    size, digest = _fsync_and_hash(path)
    _log.info("adopting shard file %s (%d rows) missing from the manifest", path, rows)
    return ShardRecord(shard, path.name, rows, size, digest)


def _fsync_and_hash(path: Path) -> tuple[int, str]:
    """fsync ``path`` and return its byte size and sha256."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(file.fileno())
    return size, digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_manifest(stage_dir: Path) -> Manifest | None:
    """The stage's manifest, or ``None`` if it has none yet."""
    path = stage_dir / _MANIFEST
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        shards = tuple(ShardRecord(**record) for record in raw.pop("shards"))
        return Manifest(**{**raw, "ignore_keys": tuple(raw["ignore_keys"]), "shards": shards})
    except (ValueError, TypeError, KeyError) as err:
        raise StoreError(f"unreadable manifest {path}: {err}") from err


def _save_manifest(stage_dir: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (temp file in ``_staging``, fsync, rename)."""
    tmp = stage_dir / _STAGING / f"manifest.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(asdict(manifest), indent=1, sort_keys=True))
    _fsync_and_hash(tmp)
    os.replace(tmp, stage_dir / _MANIFEST)
    _fsync_dir(stage_dir)
