"""The commit log of a stage: its records, segments and replay into the state a driver resumes from.

``<stage>/_log/`` holds one small object per record (``000000000042.json``), each created only if absent
(the fence: two drivers can never both write record 42), and every :data:`COMPACT_EVERY` records one
segment object holding them. :func:`replay` folds segments and records, in order, into a :class:`LogState`:
per generation (:class:`Generation`: config, hash, shard count) the committed :class:`ShardRecord` s.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from conva.batch.storage import Location
from conva.batch.store.keys import diff_keys, drop_keys
from conva.batch.store.records import FencedError, ShardRecord, StoreError

_log = logging.getLogger("conva.batch.store")

_RECORD = re.compile(r"^(\d{12})(\.checkpoint|\.segment)?\.json$")


LOG_DIR, ATTEMPTS_DIR, INPUT_DIR = "_log", "_attempts", "_input"


LEGACY_MANIFEST = "_manifest.json"


# Records per log segment: every COMPACT_EVERY records the driver writes them as one segment object and
# deletes the single-record objects in one batch; a segment costs O(COMPACT_EVERY), so O(1) per commit.
COMPACT_EVERY = 1000


class ShardTable:
    """Shard index → :class:`ShardRecord`, each kept as its compact JSON, zlib-compressed, decoded when read.

    A driver tracks every committed shard of a stage: as Python objects a record takes about 1 KB, as JSON
    bytes about 0.5 KB. Records of one stage are nearly alike (same stage, schema, model, keys), so each is
    compressed against the table's first record as a preset dictionary (zlib's ``zdict``), to about a
    third of that: 10⁵ shards take well under 50 MB. Membership, count, total rows and the stage's schema
    are O(1); reading a record decodes it (readers go through them once per run).
    """

    __slots__ = ("_raw", "_zdict", "rows", "schema")

    def __init__(self) -> None:
        self._raw: dict[int, bytes] = {}
        self._zdict: bytes | None = None  # the first record's JSON, the preset dictionary of every other
        self.rows = 0
        self.schema: str | None = None  # the first committed shard's (every shard must agree)

    def put_json(self, data: dict) -> None:
        """Add (or replace) a record given as its JSON form (as read from the log: no object built)."""
        shard = int(data["shard"])
        self.pop(shard)
        raw = json.dumps(data, separators=(",", ":")).encode()
        if self._zdict is None:
            self._zdict = raw
        packer = zlib.compressobj(zdict=self._zdict)
        self._raw[shard] = packer.compress(raw) + packer.flush()
        self.rows += int(data["rows"])
        if self.schema is None:
            self.schema = data.get("schema", "")

    def _json(self, shard: int) -> dict:
        unpacker = zlib.decompressobj(zdict=self._zdict or b"")
        return json.loads(unpacker.decompress(self._raw[shard]) + unpacker.flush())

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
        return ShardRecord.from_json(self._json(shard))

    def get(self, shard: int) -> ShardRecord | None:
        return self[shard] if shard in self._raw else None

    def pop(self, shard: int) -> ShardRecord | None:
        if shard not in self._raw:
            return None
        record = self[shard]
        del self._raw[shard]
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
class Generation:
    """One generation of a stage: its config and the shards committed to it."""

    gen: int
    config: dict
    config_hash: str
    schema_version: int
    ignore_keys: tuple[str, ...]
    n_shards: int
    shards: ShardTable = field(default_factory=ShardTable)

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
    def from_json(cls, data: dict) -> Generation:
        shards = ShardTable()
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
class LogState:
    """A stage's log replayed: its generations, which one is published (current), the next sequence number."""

    gens: dict[int, Generation] = field(default_factory=dict)
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
            self.gens[g] = Generation(
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
        elif op == "commit":  # a group commit's records (a single ``record`` in logs before group commits)
            for record in rec["records"] if "records" in rec else [rec["record"]]:
                self.gens[record["gen"]].shards.put_json(record)
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
    def from_json(cls, data: dict) -> LogState:
        gens = {g["gen"]: Generation.from_json(g) for g in data["gens"]}
        return cls(gens, data["current"], data["last_gen"])


def replay(folder: Location) -> LogState:
    """The stage's state from its log: a legacy checkpoint if any, the segments, then the single records."""
    kinds: dict[int, set[str]] = {}
    for f in folder.child(LOG_DIR).list():
        match = _RECORD.match(f.name)
        if match:
            kinds.setdefault(int(match.group(1)), set()).add(match.group(2) or "")
    state, pos = LogState(), 0
    checkpoints = [seq for seq, k in kinds.items() if ".checkpoint" in k]
    if checkpoints:  # written by versions before segments: the whole state up to that record
        pos = max(checkpoints)
        state = LogState.from_json(read_json(folder.child(LOG_DIR, f"{pos:012d}.checkpoint.json"))["state"])
    for last in sorted(seq for seq, k in kinds.items() if ".segment" in k and seq > pos):
        for rec in read_json(folder.child(LOG_DIR, f"{last:012d}.segment.json"))["records"]:
            if rec["seq"] > pos:
                state.apply(rec)
                pos = rec["seq"]
        pos = last
    state.covered = pos
    for seq in sorted(seq for seq, k in kinds.items() if "" in k):
        if seq <= pos:  # a segment holds it; the driver died before deleting the single record
            state.leftover.append(seq)
            continue
        rec = read_json(folder.child(LOG_DIR, f"{seq:012d}.json"))
        state.apply(rec)
        state.tail.append(rec)
    state.next_seq = max(kinds, default=0) + 1
    return state


def read_json(where: Location) -> dict:
    try:
        return json.loads(where.read_bytes())
    except (OSError, ValueError) as err:
        raise StoreError(f"unreadable commit-log object {where}: {err}") from err


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def mismatch(old: Generation, new: Generation) -> list[str]:
    """Keys that make ``old`` a different job's output (``new.ignore_keys`` left out)."""
    keys = diff_keys(drop_keys(old.config, new.ignore_keys), drop_keys(new.config, new.ignore_keys))
    return keys + (["schema_version"] if old.schema_version != new.schema_version else [])


class CommitLog:
    """One stage's log as this driver writes it: each record an object created only if absent, and segments.

    ``fence`` (the output lease's check) runs before every append; once an append finds its sequence number
    taken, or the fence raises, ``lost`` holds why and every later append raises it: the driver stops.
    """

    def __init__(self, folder: Location, state: LogState, fence: Callable[[], None] | None = None) -> None:
        self.folder, self.state, self.fence = folder, state, fence
        self.lost: BaseException | None = None  # why this driver may no longer append (it stops)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record to the log and apply it: a new object, created only if its name is free.

        The fence: the lease is checked first (no I/O), then the record is created if absent. If its
        sequence number is taken, another driver appended to this log since this one read it:
        :class:`FencedError`, and every later append of this stage raises it too (the driver stops).
        """
        if self.lost is not None:
            raise self.lost
        if self.fence is not None:
            try:
                self.fence()
            except BaseException as err:
                self.lost = err
                raise
        seq = self.state.next_seq
        body = {"seq": seq, "time": now(), **record}
        try:
            self.folder.child(LOG_DIR, f"{seq:012d}.json").create_bytes(
                json.dumps(body, sort_keys=True).encode()
            )
        except FileExistsError as err:
            self.lost = FencedError(
                f"{self.folder}: log record {seq} was written by another driver: two drivers are writing "
                "this output, and this one stops now (its commits so far are kept; the other driver's run "
                "continues). Run one job per output folder"
            )
            raise self.lost from err
        self.state.next_seq += 1
        self.state.tail.append(body)
        if record["op"] in ("begin", "abandon", "drop"):
            self.state.apply(body)

    def compact(self, force: bool = False) -> None:
        """Every COMPACT_EVERY records: write them as one segment, then delete their single objects in a batch.

        O(COMPACT_EVERY) work, so O(1) per commit however many shards the stage has; the state is never
        rewritten. The segment is created only if absent (fenced like a record).
        """
        state = self.state
        if state.tail and (force or len(state.tail) >= COMPACT_EVERY):
            if self.lost is not None:
                raise self.lost
            last = state.tail[-1]["seq"]
            body = {"first": state.tail[0]["seq"], "last": last, "records": state.tail}
            try:
                self.folder.child(LOG_DIR, f"{last:012d}.segment.json").create_bytes(
                    json.dumps(body, sort_keys=True).encode()
                )
            except FileExistsError as err:
                self.lost = FencedError(f"{self.folder}: log segment {last} was written by another driver")
                raise self.lost from err
            state.leftover += [r["seq"] for r in state.tail]
            state.covered, state.tail = last, []
        if state.leftover and (force or state.covered == state.next_seq - 1):
            self.folder.child(LOG_DIR).delete_many([f"{seq:012d}.json" for seq in state.leftover])
            state.leftover = []
