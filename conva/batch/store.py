"""The output store every job writes through: per stage, shards committed through an append-only log.

Layout of a stage folder ``<out>/<stage>/`` (a local folder, a shared mount or ``s3://…``)::

    part-00000.parquet, power/meta.json, …     published objects of the current generation: what readers see
    _log/000000000001.json, …                  the commit log: one small object per record, created only if absent
    _log/000000001000.segment.json             records 1–1000 in one object (their single objects deleted)
    _attempts/g2/00007-<attempt>/…             objects one worker wrote for one attempt at one shard
    _input/<sha256>.parquet                    a generated input table the workers read their slices from

How a shard is committed:

1. The driver hands shard ``i`` to a worker with a fresh attempt id. The worker writes the shard's
   objects under ``_attempts/g<gen>/<i>-<attempt>/``, a name no other attempt uses, and returns a
   :class:`ShardRecord` (object names, bytes, sha256, rows, schema): no shard data reaches the driver.
2. The driver appends a ``commit`` record to the log: one small object, O(1) whatever the number of
   shards. That record *is* the commit. The first attempt of a shard to be logged counts; a later one (a
   retry that raced, a zombie worker that woke up) is ignored and its objects deleted.
3. The driver publishes the committed objects under their final names (in a background thread when
   opened with ``background``): a rename on a filesystem, a server-side copy on an object store (in parts
   over 5 GiB). A reader listing the folder (pandas, DuckDB's ``part-*.parquet`` glob) sees committed
   objects only, never an attempt: ``_``-prefixed names are skipped by pyarrow. A committed object whose
   source is missing at publish is an error (:class:`StoreError`), never skipped.

**Single writer, fenced.** Record ``n`` is created only if no object of that name exists
(:meth:`~conva.batch.storage.Location.create_bytes`: ``link`` locally, a conditional PUT with
``If-None-Match: *`` on S3), so two drivers can never both log sequence number ``n``: the one that finds
it taken raises :class:`FencedError` and stops, before publishing anything. Opening a stage appends an
``open`` record first: a driver that opened the stage earlier fails at its next append, and an opener
whose replay went stale fails before deleting anything. Before every append the driver also checks that
it still holds the output's lease (``fence``, :meth:`conva.batch.lease.OutputLease.ensure_held`).

**O(1) per shard.** Every :data:`COMPACT_EVERY` records the driver writes those records as one segment
object and deletes their single objects in one batch (S3 ``DeleteObjects``); nothing rewrites the whole
state. The committed set is kept as commits arrive (:meth:`Stage.is_committed` is O(1)). Opening reads
the segments and the records after them (logs of older versions, with a ``.checkpoint.json`` holding
the whole state, are read too).

**Generations.** A ``begin`` record holds the stage's config. A rerun with the same config resumes (only
pending shards run); a different config is refused naming the keys, unless ``overwrite``: then a new
generation begins whose objects stay under ``_attempts/`` while the old generation stays published and
readable. :meth:`Stage.finish` switches to the new one once all its shards are committed (a ``switch``
record, then publishing), so an interrupted overwrite leaves the old output whole, and a rerun resumes
the new generation where it stopped.

On open the log is replayed and checked against the objects (one listing): a committed object that is
missing or of the wrong size is dropped, so its shard is computed again; objects of dead attempts are
deleted (in batches).

Example:
    >>> import tempfile, pyarrow as pa
    >>> from conva.batch.storage import location
    >>> stage = Stage.open(location(tempfile.mkdtemp()), "generations", {"steer": {"p0": 0.9}}, 1, n_shards=2)
    >>> stage.pending()
    [0, 1]
    >>> stage.commit(write_table_shard(stage.ref(0, "a1"), pa.table({"x": [1, 2]})))
    True
    >>> stage.pending(), stage.row_count(), [f.name for f in stage.location.list() if not f.name.startswith("_")]
    ([1], 2, ['part-00000.parquet'])
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from conva.batch.storage import Location

__all__ = [
    "StoredObject",
    "ShardRef",
    "ShardRecord",
    "Stage",
    "StageStatus",
    "StoreError",
    "ConfigMismatchError",
    "FencedError",
    "write_table_shard",
    "write_files_shard",
    "schema_hash",
    "stage_mismatch",
    "stage_status",
    "check_name",
    "config_hash",
    "diff_keys",
    "shard_ranges",
    "COMPACT_EVERY",
]

_log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RECORD = re.compile(r"^(\d{12})(\.checkpoint|\.segment)?\.json$")
_LOG, _ATTEMPTS, _INPUT = "_log", "_attempts", "_input"
_LEGACY_MANIFEST = "_manifest.json"
_MISSING = object()
# Records per log segment: every COMPACT_EVERY records the driver writes them as one segment object and
# deletes the single-record objects in one batch; a segment costs O(COMPACT_EVERY), so O(1) per commit.
COMPACT_EVERY = 1000


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


def schema_hash(schema: pa.Schema) -> str:
    """A short hash of an Arrow schema without its metadata: shards of one stage must agree on it."""
    return hashlib.sha256(schema.remove_metadata().serialize().to_pybytes()).hexdigest()[:16]


# --- the worker's side: write one attempt's objects --------------------------------------------------------


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


# --- the driver's side: the log, generations, commits --------------------------------------------------------


class _Shards:
    """Shard index → :class:`ShardRecord`, each kept as its compact JSON (bytes) and decoded when read.

    A driver tracks every committed shard of a stage; as Python objects a record takes about 1 KB, as
    bytes about 0.4 KB, so 10⁵ shards stay within tens of MB. Membership, count, total rows and the
    stage's schema are O(1); reading a record decodes it (readers go through them once per run).
    """

    __slots__ = ("_raw", "rows", "schema")

    def __init__(self) -> None:
        self._raw: dict[int, bytes] = {}
        self.rows = 0
        self.schema: str | None = None  # the first committed shard's (every shard must agree)

    def put_json(self, data: dict) -> None:
        """Add (or replace) a record given as its JSON form (as read from the log: no object built)."""
        shard = int(data["shard"])
        self.pop(shard)
        self._raw[shard] = json.dumps(data, separators=(",", ":")).encode()
        self.rows += int(data["rows"])
        if self.schema is None:
            self.schema = data.get("schema", "")

    def __setitem__(self, shard: int, record: ShardRecord) -> None:
        if shard != record.shard:
            raise ValueError(f"record of shard {record.shard} filed under {shard}")
        self.put_json(record.to_json())

    def __contains__(self, shard: object) -> bool:
        return shard in self._raw

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self) -> Iterator[int]:
        return iter(self._raw)

    def __getitem__(self, shard: int) -> ShardRecord:
        return ShardRecord.from_json(json.loads(self._raw[shard]))

    def get(self, shard: int) -> ShardRecord | None:
        return self[shard] if shard in self._raw else None

    def pop(self, shard: int) -> ShardRecord | None:
        raw = self._raw.pop(shard, None)
        if raw is None:
            return None
        record = ShardRecord.from_json(json.loads(raw))
        self.rows -= record.rows
        if not self._raw:
            self.schema = None
        return record

    def items(self) -> Iterator[tuple[int, ShardRecord]]:
        for shard in list(self._raw):
            yield shard, self[shard]

    def values(self) -> Iterator[ShardRecord]:
        for _, record in self.items():
            yield record


@dataclass
class _Gen:
    """One generation of a stage: its config and the shards committed to it."""

    gen: int
    config: dict
    config_hash: str
    schema_version: int
    ignore_keys: tuple[str, ...]
    n_shards: int
    shards: _Shards = field(default_factory=_Shards)

    def to_json(self) -> dict:
        return {
            "gen": self.gen,
            "config": self.config,
            "config_hash": self.config_hash,
            "schema_version": self.schema_version,
            "ignore_keys": list(self.ignore_keys),
            "n_shards": self.n_shards,
            "shards": [r.to_json() for _, r in sorted(self.shards.items())],
        }

    @classmethod
    def from_json(cls, data: dict) -> _Gen:
        shards = _Shards()
        for r in data["shards"]:
            shards.put_json(r)
        return cls(
            data["gen"],
            data["config"],
            data["config_hash"],
            data["schema_version"],
            tuple(data["ignore_keys"]),
            data["n_shards"],
            shards,
        )


@dataclass
class _State:
    """A stage's log replayed: its generations, which one is published (current), the next sequence number."""

    gens: dict[int, _Gen] = field(default_factory=dict)
    current: int | None = None
    last_gen: int = 0  # the highest generation number ever begun: never reused
    next_seq: int = 1
    covered: int = 0  # the last sequence number held by a segment (or a legacy checkpoint)
    tail: list[dict] = field(default_factory=list)  # the records after ``covered``: the next segment's
    leftover: list[int] = field(default_factory=list)  # single records a segment holds, still to delete

    def apply(self, rec: dict) -> None:
        op = rec["op"]
        if op == "begin":
            g = rec["gen"]
            self.gens[g] = _Gen(
                g,
                rec["config"],
                rec["config_hash"],
                rec["schema_version"],
                tuple(rec["ignore_keys"]),
                rec["n_shards"],
            )
            self.last_gen = max(self.last_gen, g)
            if rec.get("current"):
                self.current = g
        elif op == "commit":
            self.gens[rec["record"]["gen"]].shards.put_json(rec["record"])
        elif op == "drop":
            self.gens[rec["gen"]].shards.pop(rec["shard"])
        elif op == "switch":
            old, self.current = self.current, rec["gen"]
            if old is not None and old != rec["gen"]:
                self.gens.pop(old, None)
        elif op == "abandon":
            self.gens.pop(rec["gen"], None)
        elif op == "open":
            pass  # a driver opened the stage: its claim on the next sequence number (the fence)
        else:
            raise StoreError(f"unknown log record {op!r}")

    def to_json(self) -> dict:
        return {
            "current": self.current,
            "last_gen": self.last_gen,
            "gens": [g.to_json() for _, g in sorted(self.gens.items())],
        }

    @classmethod
    def from_json(cls, data: dict) -> _State:
        gens = {g["gen"]: _Gen.from_json(g) for g in data["gens"]}
        return cls(gens, data["current"], data["last_gen"])


def _replay(folder: Location) -> _State:
    """The stage's state from its log: a legacy checkpoint if any, the segments, then the single records."""
    kinds: dict[int, set[str]] = {}
    for f in folder.child(_LOG).list():
        match = _RECORD.match(f.name)
        if match:
            kinds.setdefault(int(match.group(1)), set()).add(match.group(2) or "")
    state, pos = _State(), 0
    checkpoints = [seq for seq, k in kinds.items() if ".checkpoint" in k]
    if checkpoints:  # written by versions before segments: the whole state up to that record
        pos = max(checkpoints)
        state = _State.from_json(_read_json(folder.child(_LOG, f"{pos:012d}.checkpoint.json"))["state"])
    for last in sorted(seq for seq, k in kinds.items() if ".segment" in k and seq > pos):
        for rec in _read_json(folder.child(_LOG, f"{last:012d}.segment.json"))["records"]:
            if rec["seq"] > pos:
                state.apply(rec)
                pos = rec["seq"]
        pos = last
    state.covered = pos
    for seq in sorted(seq for seq, k in kinds.items() if "" in k):
        if seq <= pos:  # a segment holds it; the driver died before deleting the single record
            state.leftover.append(seq)
            continue
        rec = _read_json(folder.child(_LOG, f"{seq:012d}.json"))
        state.apply(rec)
        state.tail.append(rec)
    state.next_seq = max(kinds, default=0) + 1
    return state


def _read_json(where: Location) -> dict:
    try:
        return json.loads(where.read_bytes())
    except (OSError, ValueError) as err:
        raise StoreError(f"unreadable commit-log object {where}: {err}") from err


@dataclass(frozen=True)
class StageStatus:
    """What a stage holds, read without writing anything: for ``validate`` and reports.

    ``committed``/``n_shards``/``mismatch`` describe the published generation; ``resumable`` counts the
    committed shards of an unfinished generation (an interrupted ``--overwrite``) whose config is the one
    asked about: a rerun with ``--overwrite`` resumes it.
    """

    exists: bool
    committed: int = 0
    n_shards: int = 0
    mismatch: tuple[str, ...] = ()
    pending_generation: bool = False
    resumable: int = 0


def stage_status(
    out: Location,
    stage: str,
    config: dict | None = None,
    schema_version: int = 0,
    *,
    ignore_keys: Iterable[str] = (),
) -> StageStatus:
    """The stage's published generation: committed shards, and the keys in which ``config`` differs from it."""
    folder = out.child(check_name(stage, "stage name"))
    if folder.child(_LEGACY_MANIFEST).exists() and not folder.child(_LOG).exists():
        return StageStatus(True, mismatch=("schema_version",))
    state = _replay(folder)
    cur = state.gens.get(state.current) if state.current is not None else None
    if cur is None:
        return StageStatus(False)
    keys: tuple[str, ...] = ()
    resumable = 0
    if config is not None:
        probe = _Gen(
            0, _normalize(config), "", schema_version, tuple(sorted({*ignore_keys, *cur.ignore_keys})), 0
        )
        keys = tuple(_mismatch(cur, probe))
        unfinished = [g for n, g in state.gens.items() if n != state.current and not _mismatch(g, probe)]
        resumable = max((len(g.shards) for g in unfinished), default=0)
    pending = any(g != state.current for g in state.gens)
    return StageStatus(True, len(cur.shards), cur.n_shards, keys, pending, resumable)


def stage_mismatch(
    out: Location, stage: str, config: dict, schema_version: int, *, ignore_keys: Iterable[str] = ()
) -> list[str]:
    """The keys that would make :meth:`Stage.open` refuse ``<out>/<stage>`` (empty if none); writes nothing."""
    return list(stage_status(out, stage, config, schema_version, ignore_keys=ignore_keys).mismatch)


class Stage:
    """A stage's folder, open for committing. Single writer: only the driver holding the lease commits.

    ``active`` is the generation this run writes: the published one, or (during an overwrite) a new one
    that :meth:`finish` publishes once complete.
    """

    def __init__(
        self,
        folder: Location,
        name: str,
        state: _State,
        active: int,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.location, self.name, self._state, self.active = folder, name, state, active
        self._fence = fence
        self._lost: BaseException | None = None  # why this driver may no longer append (it stops)
        self._background = False
        self._publisher: _Publisher | None = None  # started at the first commit when ``background``

    # --- opening -----------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        out: Location,
        name: str,
        config: dict,
        schema_version: int,
        *,
        n_shards: int,
        overwrite: bool = False,
        ignore_keys: Iterable[str] = (),
        fence: Callable[[], None] | None = None,
        background: bool = False,
    ) -> Stage:
        """Open (creating if needed) ``<out>/<name>``, resuming what its log holds.

        Side effects, loudly: appends an ``open`` record (the claim that fences out any other driver
        that opened the stage earlier: its next append fails); then deletes objects of attempts that were
        never committed; drops committed shards whose objects are missing or truncated (they run again);
        with ``overwrite`` and a different config, **begins a new generation** that replaces the
        published one when complete. Without ``overwrite`` a different config raises
        :class:`ConfigMismatchError`.

        ``fence`` is called before every append and raises if this driver no longer holds the output's
        lease (:meth:`conva.batch.lease.OutputLease.ensure_held`). ``background``: publish committed
        shards in a background thread (the scheduling loop only appends the record);
        :meth:`finish` waits for it.
        """
        folder = out.child(check_name(name, "stage name"))
        legacy = folder.child(_LEGACY_MANIFEST).exists() and not folder.child(_LOG).exists()
        if legacy and not overwrite:
            raise StoreError(
                f"{folder} was written by an older version of conva (a _manifest.json, no commit log); "
                "rerun with --overwrite to replace it"
            )
        state = _replay(folder)
        listing = {f.name: f.size for f in folder.list()}
        stage = cls(folder, name, state, 0, fence)
        if state.current is None and not overwrite:
            stage._refuse_strays(listing)  # before anything is written
        cur = state.gens.get(state.current) if state.current is not None else None
        if cur is not None and not overwrite:  # refused before anything is written
            ignore = tuple(sorted({*ignore_keys, *cur.ignore_keys}))
            keys = _mismatch(cur, _Gen(0, _normalize(config), "", schema_version, ignore, n_shards))
            if keys:
                raise ConfigMismatchError(folder, keys)
        # The claim: a driver that opened this stage before us fails at its next append, and if one
        # appended since our replay, this append fails and we stop before deleting anything.
        stage._append({"op": "open", "host": socket.gethostname(), "pid": os.getpid()})
        stage.active = stage._choose_generation(
            _normalize(config), schema_version, n_shards, overwrite, tuple(ignore_keys)
        )
        stage._reconcile(listing)
        stage._background = background
        return stage

    def _choose_generation(
        self, config: dict, schema_version: int, n_shards: int, overwrite: bool, ignore_keys: tuple[str, ...]
    ) -> int:
        state = self._state
        cur = state.gens.get(state.current) if state.current is not None else None
        ignore = tuple(sorted({*ignore_keys, *(cur.ignore_keys if cur else ())}))
        fresh = _Gen(0, config, config_hash(config, ignore), schema_version, ignore, n_shards)
        if cur is not None:
            keys = _mismatch(cur, fresh)
            if not keys:
                return cur.gen
            if not overwrite:
                raise ConfigMismatchError(self.location, keys)
        for g in sorted(g for g in state.gens if g != state.current):
            if not _mismatch(state.gens[g], fresh):
                _log.info("%s: resuming the unfinished overwrite (generation %d)", self.location, g)
                return g
            self._append({"op": "abandon", "gen": g})
        gen = state.last_gen + 1
        self._append(
            {
                "op": "begin",
                "gen": gen,
                "config": config,
                "config_hash": fresh.config_hash,
                "schema_version": schema_version,
                "ignore_keys": list(ignore),
                "n_shards": n_shards,
                "current": cur is None,
            }
        )
        if cur is not None:
            _log.info(
                "%s: overwrite begins generation %d; generation %d stays published until it is complete",
                self.location,
                gen,
                cur.gen,
            )
        return gen

    def _reconcile(self, listing: dict[str, int]) -> None:
        """Check the log against the objects; publish what a crash left unpublished; delete the dead."""
        live: set[str] = set()  # attempt folders that hold committed, unpublished objects
        for gen in list(self._state.gens.values()):
            current = gen.gen == self._state.current
            for shard, record in sorted(gen.shards.items()):
                problem = self._check_shard(gen, record, listing)
                if problem:
                    _log.warning(
                        "%s: dropping committed shard %d (generation %d): %s; it will run again",
                        self.location,
                        shard,
                        gen.gen,
                        problem,
                    )
                    self._append({"op": "drop", "gen": gen.gen, "shard": shard, "reason": problem})
                    if current:  # a truncated or edited published object must not stay visible
                        for obj in record.objects:
                            self.location.child(obj.name).delete()
                elif current and any(self._attempt_name(record, o.name) in listing for o in record.objects):
                    self._publish(record)  # committed, but the driver died before publishing it
                elif not current:
                    live.add(self._attempt_folder(record))
        self._delete_dead_attempts(listing, live)
        self._delete_strays(listing)

    def _check_shard(self, gen: _Gen, record: ShardRecord, listing: dict[str, int]) -> str | None:
        for obj in record.objects:
            attempt = self._attempt_name(record, obj.name)
            if gen.gen == self._state.current and attempt not in listing:
                where, size = obj.name, listing.get(obj.name)
            else:
                where, size = attempt, listing.get(attempt)
            if size is None:
                return f"{where} is missing"
            if size != obj.bytes:
                return f"{where} has {size} bytes, the commit recorded {obj.bytes}"
        return None

    def _delete_dead_attempts(self, listing: dict[str, int], live: set[str]) -> None:
        """Delete attempt folders no committed shard needs (failed, raced or zombie attempts), in batches."""
        dead: dict[str, list[str]] = {}
        for name in listing:
            if name.startswith(_ATTEMPTS + "/"):
                folder = "/".join(name.split("/")[:3])
                if folder not in live:
                    dead.setdefault(folder, []).append(name)
        if dead:
            _log.info(
                "%s: deleting the objects of %d uncommitted attempts (%s%s)",
                self.location,
                len(dead),
                ", ".join(sorted(dead)[:3]),
                ", …" if len(dead) > 3 else "",
            )
        if self.location.is_local:
            for folder in sorted(dead):
                self.location.child(folder).delete_tree()
        else:
            self.location.delete_many([n for names in dead.values() for n in names])

    def _strays(self, listing: dict[str, int]) -> list[str]:
        """Published-looking files the current generation does not list."""
        cur = self._state.gens.get(self._state.current) if self._state.current is not None else None
        named = {o.name for r in cur.shards.values() for o in r.objects} if cur else set()
        return sorted(n for n in listing if not n.startswith(("_", ".")) and n not in named)

    def _refuse_strays(self, listing: dict[str, int]) -> None:
        strays = self._strays(listing)
        if strays:
            raise StoreError(
                f"{self.location} holds files no commit log lists ({', '.join(strays[:3])}"
                f"{', …' if len(strays) > 3 else ''}); cannot tell which config wrote them. "
                "Rerun with --overwrite to replace them."
            )

    def _delete_strays(self, listing: dict[str, int]) -> None:
        """Delete published-looking files the current generation does not list (an interrupted switch, an overwrite)."""
        strays = self._strays(listing)
        for name in strays:
            _log.warning("%s: deleting %s, which no committed shard lists", self.location, name)
        self.location.delete_many(strays)

    # --- what a run needs ----------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.active

    @property
    def n_shards(self) -> int:
        return self._gen.n_shards

    @property
    def config(self) -> dict:
        return self._gen.config

    @property
    def _gen(self) -> _Gen:
        return self._state.gens[self.active]

    @property
    def publishing(self) -> bool:
        """Whether commits are published at once (False while an overwrite's new generation is pending)."""
        return self.active == self._state.current

    def records(self) -> list[ShardRecord]:
        """The committed shards of the active generation, in shard order (published, when publishing)."""
        self._wait_published()
        return [r for _, r in sorted(self._gen.shards.items())]

    def committed(self) -> set[int]:
        """A copy of the committed shard indices: O(shards); per shard use :meth:`is_committed`."""
        return set(self._gen.shards)

    def is_committed(self, shard: int) -> bool:
        """Whether ``shard`` is committed in the active generation: O(1) (the set is kept as commits come)."""
        return shard in self._gen.shards

    @property
    def n_committed(self) -> int:
        return len(self._gen.shards)

    def pending(self) -> list[int]:
        """Shard indices not yet committed, ascending."""
        return [s for s in range(self._gen.n_shards) if s not in self._gen.shards]

    def is_complete(self) -> bool:
        return not self.pending()

    def row_count(self) -> int:
        return self._gen.shards.rows

    def ref(self, shard: int, attempt: str) -> ShardRef:
        """Where attempt ``attempt`` at ``shard`` writes its objects, and the ids its record carries."""
        check_name(attempt, "attempt id")
        folder = self.location.child(_ATTEMPTS, f"g{self.active}", f"{shard:05d}-{attempt}")
        return ShardRef(self.name, self.active, shard, attempt, folder)

    def attempt_location(self, shard: int, attempt: str) -> Location:
        return self.ref(shard, attempt).folder

    def object(self, shard: int, name: str) -> Location:
        """Where a committed object of ``shard`` can be read now (published, or under its attempt)."""
        record = self._gen.shards[shard]
        if self.publishing:
            self._wait_published(shard)
            return self.location.child(name)
        return self.location.child(self._attempt_name(record, name))

    def parquet_files(self) -> list[Location]:
        """The committed shards' Parquet objects, in shard order."""
        self._wait_published()
        return [
            self.object(r.shard, o.name)
            for r in self.records()
            for o in r.objects
            if o.name.endswith(".parquet")
        ]

    def dataset(self) -> ds.Dataset:
        """A pyarrow dataset over the committed shards only, in shard order."""
        files = self.parquet_files()
        if not files:
            return ds.dataset([], format="parquet", schema=pa.schema([]))
        return ds.dataset([f.path for f in files], format="parquet", filesystem=files[0].fs)

    def input_location(self, digest: str) -> Location:
        """Where a generated input table of this stage (named by its sha256) is kept for the workers."""
        return self.location.child(_INPUT, f"{digest}.parquet")

    # --- committing ----------------------------------------------------------------------------------------

    def commit(self, record: ShardRecord) -> bool:
        """Commit ``record`` if it is the first for its shard; return whether it was committed.

        A record of another generation, or for a shard already committed, is ignored (logged) and its
        objects deleted: the shard's committed objects are never replaced. A shard whose schema differs
        from the committed shards' raises :class:`StoreError`.
        """
        gen = self._gen
        if record.stage != self.name or not 0 <= record.shard < gen.n_shards:
            raise StoreError(
                f"{self.location}: record for {record.stage!r} shard {record.shard} does not belong here"
            )
        if self._publisher is not None:
            self._publisher.raise_error()
        if record.gen != self.active or record.shard in gen.shards:
            why = "a later attempt" if record.gen == self.active else f"an attempt of generation {record.gen}"
            _log.warning(
                "%s: ignoring %s at shard %d (attempt %s); shard %s",
                self.location,
                why,
                record.shard,
                record.attempt,
                "already committed" if record.shard in gen.shards else "not of this run",
            )
            self._discard(record)
            return False
        if gen.shards.schema is not None and gen.shards.schema != record.schema:
            self._discard(record)
            raise StoreError(
                f"{self.location}: shard {record.shard}'s schema differs from the committed shards'"
            )
        data = record.to_json()
        self._append({"op": "commit", "record": data})
        gen.shards.put_json(data)
        if self.publishing:
            if self._background and self._publisher is None:
                self._publisher = _Publisher(self)
            if self._publisher is not None:
                self._publisher.put(record)
            else:
                self._publish(record)
        return True

    def finish(self) -> bool:
        """Publish the active generation if it is a pending overwrite and complete; returns whether it switched.

        Waits for the background publisher (raising its error, if any) and writes the log's last segment.
        Side effect: **replaces the previously published output** (the old generation's objects are
        deleted once the new ones are in place).
        """
        self.close()
        if self.publishing or not self.is_complete():
            self._maybe_compact(force=True)
            return False
        old = self._state.gens.get(self._state.current) if self._state.current is not None else None
        self._append({"op": "switch", "gen": self.active})
        self._state.apply({"op": "switch", "gen": self.active})
        for record in self.records():
            self._publish(record)
        keep = {o.name for r in self.records() for o in r.objects}
        self.location.delete_many(
            sorted({o.name for r in (old.shards.values() if old else ()) for o in r.objects} - keep)
        )
        used = self.config.get("shards", {}).get("input_sha256")
        self.location.child(_INPUT).delete_many(
            [f.name for f in self.location.child(_INPUT).list() if f.name != f"{used}.parquet"]
        )
        _log.info(
            "%s: generation %d is published (replacing generation %s)",
            self.location,
            self.active,
            old.gen if old else "-",
        )
        self._maybe_compact(force=True)
        return True

    def close(self, raise_error: bool = True) -> None:
        """Stop the background publisher once it has published everything queued (idempotent); a later
        commit starts a new one. :meth:`finish` calls it. ``raise_error=False``: log a publishing error
        instead of raising it (a caller already unwinding another error; a reopen publishes what is left)."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.stop()
            if publisher.error is not None and not raise_error:
                _log.error("%s: publishing failed: %s", self.location, publisher.error)
                return
            publisher.raise_error()

    def _wait_published(self, shard: int | None = None) -> None:
        if self._publisher is not None:
            self._publisher.wait(shard)

    def _publish(self, record: ShardRecord) -> None:
        """Move a committed shard's objects from its attempt folder to their published names.

        An object whose source is gone counts as published only if the published object is there with
        the committed size (a publish interrupted by a crash, resumed); otherwise :class:`StoreError`:
        committed data is missing, and that is never skipped.
        """
        moved: list[str] = []
        for obj in record.objects:
            src = self.location.child(self._attempt_name(record, obj.name))
            dest = self.location.child(obj.name)
            try:
                if self.location.is_local:
                    src.move_to(dest)
                else:
                    src.copy_to(dest, obj.bytes)
                    moved.append(self._attempt_name(record, obj.name))
            except FileNotFoundError as err:
                info = dest.info()
                if info.type == pafs.FileType.File and info.size == obj.bytes:
                    continue
                raise StoreError(
                    f"{self.location}: cannot publish committed shard {record.shard} (attempt "
                    f"{record.attempt}): {src} is missing and {dest} is not there with {obj.bytes} bytes; "
                    "another driver may have deleted it. Reopen the stage: the shard will run again"
                ) from err
        if self.location.is_local:
            _remove_empty_tree(self.location.child(self._attempt_folder(record)).path)
        else:
            self.location.delete_many(moved)  # one request for all of the shard's sources

    def _discard(self, record: ShardRecord) -> None:
        committed = self._state.gens.get(record.gen)
        if committed is not None and committed.shards.get(record.shard) == record:
            return  # never delete what is committed (e.g. the same record handed in twice)
        self.location.child(self._attempt_folder(record)).delete_tree()

    @staticmethod
    def _attempt_folder(record: ShardRecord) -> str:
        return f"{_ATTEMPTS}/g{record.gen}/{record.shard:05d}-{record.attempt}"

    def _attempt_name(self, record: ShardRecord, name: str) -> str:
        return f"{self._attempt_folder(record)}/{name}"

    # --- the log -------------------------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        """Append one record to the log and apply it: a new object, created only if its name is free.

        The fence: the lease is checked first (no I/O), then the record is created if absent. If its
        sequence number is taken, another driver appended to this log since this one read it:
        :class:`FencedError`, and every later append of this stage raises it too (the driver stops).
        """
        if self._lost is not None:
            raise self._lost
        if self._fence is not None:
            try:
                self._fence()
            except BaseException as err:
                self._lost = err
                raise
        seq = self._state.next_seq
        body = {"seq": seq, "time": _now(), **record}
        try:
            self.location.child(_LOG, f"{seq:012d}.json").create_bytes(
                json.dumps(body, sort_keys=True).encode()
            )
        except FileExistsError as err:
            self._lost = FencedError(
                f"{self.location}: log record {seq} was written by another driver: two drivers are writing "
                "this output, and this one stops now (its commits so far are kept; the other driver's run "
                "continues). Run one job per output folder"
            )
            raise self._lost from err
        self._state.next_seq += 1
        self._state.tail.append(body)
        if record["op"] in ("begin", "abandon", "drop"):
            self._state.apply(body)

    def _maybe_compact(self, force: bool = False) -> None:
        """Every COMPACT_EVERY records: write them as one segment, then delete their single objects in a batch.

        O(COMPACT_EVERY) work, so O(1) per commit however many shards the stage has; the state is never
        rewritten. The segment is created only if absent (fenced like a record).
        """
        state = self._state
        if state.tail and (force or len(state.tail) >= COMPACT_EVERY):
            if self._lost is not None:
                raise self._lost
            last = state.tail[-1]["seq"]
            body = {"first": state.tail[0]["seq"], "last": last, "records": state.tail}
            try:
                self.location.child(_LOG, f"{last:012d}.segment.json").create_bytes(
                    json.dumps(body, sort_keys=True).encode()
                )
            except FileExistsError as err:
                self._lost = FencedError(f"{self.location}: log segment {last} was written by another driver")
                raise self._lost from err
            state.leftover += [r["seq"] for r in state.tail]
            state.covered, state.tail = last, []
        if state.leftover and (force or state.covered == state.next_seq - 1):
            self.location.child(_LOG).delete_many([f"{seq:012d}.json" for seq in state.leftover])
            state.leftover = []

    def compact_if_due(self) -> None:
        """Write a log segment if enough records accumulated (the runner calls this after commits)."""
        self._maybe_compact()


class _Publisher:
    """Publishes committed shards in a background thread, in commit order, so that the driver's scheduling
    loop only appends records. The first error is kept and raised at the next commit or wait."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.queue: queue.Queue[ShardRecord | None] = queue.Queue()
        self.pending: set[int] = set()
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"conva-publish-{stage.name}", daemon=True)
        self.thread.start()

    def put(self, record: ShardRecord) -> None:
        with self.cond:
            self.pending.add(record.shard)
        self.queue.put(record)

    def _run(self) -> None:
        while (record := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self.stage._publish(record)
            except BaseException as err:  # kept for the driver's thread, which raises it
                self.error = err
            with self.cond:
                self.pending.discard(record.shard)
                self.cond.notify_all()

    def wait(self, shard: int | None = None) -> None:
        """Until ``shard`` (or every queued shard) is published; raises the publisher's error if any."""
        with self.cond:
            self.cond.wait_for(lambda: not self.pending if shard is None else shard not in self.pending)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise StoreError(f"publishing failed: {self.error}") from self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def _remove_empty_tree(path: str) -> None:
    """Remove the now empty folders of a published attempt (bundles have subfolders), deepest first."""
    for folder, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


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
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _diff(a: object, b: object, prefix: str) -> list[str]:
    """Dotted paths under ``prefix`` where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            k
            for key in a.keys() | b.keys()
            for k in _diff(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")
        ]
    same = a is not _MISSING and b is not _MISSING and _canonical(a) == _canonical(b)
    return [] if same else [prefix.rstrip(".")]


def _mismatch(old: _Gen, new: _Gen) -> list[str]:
    """Keys that make ``old`` a different job's output (``new.ignore_keys`` left out)."""
    keys = diff_keys(_drop(old.config, new.ignore_keys), _drop(new.config, new.ignore_keys))
    return keys + (["schema_version"] if old.schema_version != new.schema_version else [])


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
