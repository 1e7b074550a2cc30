"""A stage's folder open for committing: :class:`Stage` (resume, commit, publish, finish) and its status.

The protocol is described in :mod:`conva.batch.store`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from conva.batch.storage import Location
from conva.batch.store.collect import delete_dead_attempts, strays
from conva.batch.store.keys import config_hash, normalize
from conva.batch.store.log import (
    ATTEMPTS_DIR,
    INPUT_DIR,
    LEGACY_MANIFEST,
    LOG_DIR,
    CommitLog,
    Generation,
    LogState,
    mismatch,
    replay,
)
from conva.batch.store.publish import Publisher, remove_empty_tree
from conva.batch.store.records import (
    ConfigMismatchError,
    ShardRecord,
    ShardRef,
    StoreError,
    check_name,
)

_log = logging.getLogger(__name__)
# Shards published at once on an object store (a copy each; their sources are deleted in batches): enough to
# keep up with 64 workers' commits over round trips of 10-20 ms (RESULTS.md, the orchestration on S3).
PUBLISH_THREADS = 8


class Stage:
    """A stage's folder, open for committing. Single writer: only the driver holding the lease commits.

    ``active`` is the generation this run writes: the published one, or (during an overwrite) a new one
    that :meth:`finish` publishes once complete.
    """

    def __init__(
        self,
        folder: Location,
        name: str,
        state: LogState,
        active: int,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.location, self.name, self._state, self.active = folder, name, state, active
        self.log = CommitLog(folder, state, fence)  # the only writer of the log: fenced appends, segments
        self._background = False
        self._publisher: Publisher | None = None  # started at the first commit when ``background``

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
        legacy = folder.child(LEGACY_MANIFEST).exists() and not folder.child(LOG_DIR).exists()
        if legacy and not overwrite:
            raise StoreError(
                f"{folder} was written by an older version of conva (a _manifest.json, no commit log); "
                "rerun with --overwrite to replace it"
            )
        state = replay(folder)
        listing = {f.name: f.size for f in folder.list()}
        stage = cls(folder, name, state, 0, fence)
        if state.current is None and not overwrite:
            stage._refuse_strays(listing)  # before anything is written
        cur = state.gens.get(state.current) if state.current is not None else None
        if cur is not None and not overwrite:  # refused before anything is written
            ignore = tuple(sorted({*ignore_keys, *cur.ignore_keys}))
            keys = mismatch(cur, Generation(0, normalize(config), "", schema_version, ignore, n_shards))
            if keys:
                raise ConfigMismatchError(folder, keys)
        # The claim: a driver that opened this stage before us fails at its next append, and if one
        # appended since our replay, this append fails and we stop before deleting anything.
        stage.log.append({"op": "open", "host": socket.gethostname(), "pid": os.getpid()})
        stage.active = stage._choose_generation(
            normalize(config), schema_version, n_shards, overwrite, tuple(ignore_keys)
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
        fresh = Generation(0, config, config_hash(config, ignore), schema_version, ignore, n_shards)
        if cur is not None:
            keys = mismatch(cur, fresh)
            if not keys:
                return cur.gen
            if not overwrite:
                raise ConfigMismatchError(self.location, keys)
        for g in sorted(g for g in state.gens if g != state.current):
            if not mismatch(state.gens[g], fresh):
                _log.info("%s: resuming the unfinished overwrite (generation %d)", self.location, g)
                return g
            self.log.append({"op": "abandon", "gen": g})
        gen = state.last_gen + 1
        self.log.append(
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
                    self.log.append({"op": "drop", "gen": gen.gen, "shard": shard, "reason": problem})
                    if current:  # a truncated or edited published object must not stay visible
                        for obj in record.objects:
                            self.location.child(obj.name).delete()
                elif current and any(self._attempt_name(record, o.name) in listing for o in record.objects):
                    self._publish(record)  # committed, but the driver died before publishing it
                elif not current:
                    live.add(self._attempt_folder(record))
        delete_dead_attempts(self.location, listing, live)
        self._delete_strays(listing)

    def _check_shard(self, gen: Generation, record: ShardRecord, listing: dict[str, int]) -> str | None:
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

    def _strays(self, listing: dict[str, int]) -> list[str]:
        """Published-looking files the current generation does not list."""
        cur = self._state.gens.get(self._state.current) if self._state.current is not None else None
        return strays(listing, {o.name for r in cur.shards.values() for o in r.objects} if cur else set())

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
    def _gen(self) -> Generation:
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
        """Every shard committed: O(1), since a commit outside ``0 .. n_shards - 1`` is refused."""
        return self.n_committed >= self._gen.n_shards

    def row_count(self) -> int:
        return self._gen.shards.rows

    def ref(self, shard: int, attempt: str) -> ShardRef:
        """Where attempt ``attempt`` at ``shard`` writes its objects, and the ids its record carries."""
        check_name(attempt, "attempt id")
        folder = self.location.child(ATTEMPTS_DIR, f"g{self.active}", f"{shard:05d}-{attempt}")
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
        return self.location.child(INPUT_DIR, f"{digest}.parquet")

    # --- committing ----------------------------------------------------------------------------------------

    def commit(self, record: ShardRecord) -> bool:
        """Commit ``record`` if it is the first for its shard; return whether it was committed."""
        return self.commit_many([record])[0]

    def commit_many(self, records: Sequence[ShardRecord]) -> list[bool]:
        """Commit, in one log record (a group commit), each of ``records`` that is the first for its shard.

        Returns, per record, whether it was committed. A record of another generation, or for a shard
        already committed (before, or earlier in ``records``), is ignored (logged) and its objects
        deleted: the shard's committed objects are never replaced. A shard whose schema differs from the
        committed shards' raises :class:`StoreError` after the records before it are committed.

        One append for many records is what keeps the driver's work per shard O(1) in round trips when
        shards finish faster than a log write takes (an object store): the scheduler hands in every
        record that is ready at once.
        """
        gen = self._gen
        if self._publisher is not None:
            self._publisher.raise_error()
        accepted: list[ShardRecord] = []
        try:
            return [self._admit(gen, record, accepted) for record in records]
        finally:
            if accepted:
                self._append_commits(gen, accepted)

    def _admit(self, gen: Generation, record: ShardRecord, accepted: list[ShardRecord]) -> bool:
        """Whether ``record`` joins this group commit (appended to ``accepted``); a loser's objects are deleted."""
        if record.stage != self.name or not 0 <= record.shard < gen.n_shards:
            raise StoreError(
                f"{self.location}: record for {record.stage!r} shard {record.shard} does not belong here"
            )
        taken = record.shard in gen.shards or any(r.shard == record.shard for r in accepted)
        if record.gen != self.active or taken:
            why = "a later attempt" if record.gen == self.active else f"an attempt of generation {record.gen}"
            _log.warning(
                "%s: ignoring %s at shard %d (attempt %s); shard %s",
                self.location,
                why,
                record.shard,
                record.attempt,
                "already committed" if taken else "not of this run",
            )
            self._discard(record)
            return False
        schema = (
            gen.shards.schema if gen.shards.schema is not None else (accepted[0].schema if accepted else None)
        )
        if schema is not None and schema != record.schema:
            self._discard(record)
            raise StoreError(
                f"{self.location}: shard {record.shard}'s schema differs from the committed shards'"
            )
        accepted.append(record)
        return True

    def _append_commits(self, gen: Generation, records: list[ShardRecord]) -> None:
        data = [r.to_json() for r in records]
        self.log.append({"op": "commit", "records": data})
        for d in data:
            gen.shards.put_json(d)
        if not self.publishing:
            return
        if self._background and self._publisher is None:
            threads = 1 if self.location.is_local else PUBLISH_THREADS
            self._publisher = Publisher(self.name, self._put_in_place, self.location.delete_many, threads)
        for record in records:
            if self._publisher is not None:
                self._publisher.put(record)
            else:
                self._publish(record)

    def finish(self) -> bool:
        """Publish the active generation if it is a pending overwrite and complete; returns whether it switched.

        Waits for the background publisher (raising its error, if any) and writes the log's last segment.
        Side effect: **replaces the previously published output** (the old generation's objects are
        deleted once the new ones are in place).
        """
        self.close()
        if self.publishing or not self.is_complete():
            self.log.compact(force=True)
            return False
        old = self._state.gens.get(self._state.current) if self._state.current is not None else None
        self.log.append({"op": "switch", "gen": self.active})
        self._state.apply({"op": "switch", "gen": self.active})
        for record in self.records():
            self._publish(record)
        keep = {o.name for r in self.records() for o in r.objects}
        self.location.delete_many(
            sorted({o.name for r in (old.shards.values() if old else ()) for o in r.objects} - keep)
        )
        used = self.config.get("shards", {}).get("input_sha256")
        self.location.child(INPUT_DIR).delete_many(
            [f.name for f in self.location.child(INPUT_DIR).list() if f.name != f"{used}.parquet"]
        )
        _log.info(
            "%s: generation %d is published (replacing generation %s)",
            self.location,
            self.active,
            old.gen if old else "-",
        )
        self.log.compact(force=True)
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
        """Put a committed shard's objects in place (:meth:`_put_in_place`) and delete their sources now."""
        self.location.delete_many(self._put_in_place(record))

    def _put_in_place(self, record: ShardRecord) -> list[str]:
        """Move a committed shard's objects from its attempt folder to their published names. Returns the
        sources left to delete: on an object store the copied attempt objects (the background publisher
        deletes them in batches), on a filesystem none (a rename leaves none).

        An object whose source is gone counts as published only if the published object is there with
        the committed size (a publish interrupted by a crash, resumed); otherwise :class:`StoreError`:
        committed data is missing, and that is never skipped.
        """
        copied: list[str] = []
        for obj in record.objects:
            src = self.location.child(self._attempt_name(record, obj.name))
            dest = self.location.child(obj.name)
            try:
                if self.location.is_local:
                    src.move_to(dest)
                else:
                    src.copy_to(dest, obj.bytes)
                    copied.append(self._attempt_name(record, obj.name))
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
            remove_empty_tree(self.location.child(self._attempt_folder(record)).path)
        return copied

    def _discard(self, record: ShardRecord) -> None:
        committed = self._state.gens.get(record.gen)
        if committed is not None and committed.shards.get(record.shard) == record:
            return  # never delete what is committed (e.g. the same record handed in twice)
        self.location.child(self._attempt_folder(record)).delete_tree()

    @staticmethod
    def _attempt_folder(record: ShardRecord) -> str:
        return f"{ATTEMPTS_DIR}/g{record.gen}/{record.shard:05d}-{record.attempt}"

    def _attempt_name(self, record: ShardRecord, name: str) -> str:
        return f"{self._attempt_folder(record)}/{name}"

    # --- the log -------------------------------------------------------------------------------------------

    def compact_if_due(self) -> None:
        """Write a log segment if enough records accumulated (the runner calls this after commits)."""
        self.log.compact()
