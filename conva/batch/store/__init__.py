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
   shards. That record *is* the commit. It holds every shard record the scheduler received in one pass
   (:meth:`Stage.commit_many`, a group commit), so when shards finish faster than one log write takes
   (64 workers on an object store) the driver still keeps up. The first attempt of a shard to be logged
   counts; a later one (a retry that raced, a zombie worker that woke up) is ignored and its objects deleted.
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

from conva.batch.store.keys import config_hash, diff_keys
from conva.batch.store.log import COMPACT_EVERY
from conva.batch.store.records import (
    ConfigMismatchError,
    FencedError,
    ShardRecord,
    ShardRef,
    StoredObject,
    StoreError,
    check_name,
    schema_hash,
    shard_ranges,
    write_files_shard,
    write_table_shard,
)
from conva.batch.store.stage import Stage
from conva.batch.store.status import StageStatus, stage_mismatch, stage_status

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
