"""The output store on a local folder and on a real S3 endpoint: commits through a log, exactly once, generations.

Every store test runs twice, on a temporary folder and on a bucket of a ``moto_server`` on loopback, so
the commit protocol is shown not to depend on rename. Workers are played by plain calls here (the Ray
path is in test_ray_jobs / test_reliability / test_s3_jobs).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conva.batch.lease import LeaseError, OutputLease
from conva.batch.storage import Location, location
from conva.batch.store import (
    COMPACT_EVERY,
    ConfigMismatchError,
    ShardRecord,
    Stage,
    StoreError,
    check_name,
    config_hash,
    diff_keys,
    shard_ranges,
    stage_mismatch,
    write_files_shard,
    write_table_shard,
)
from conva.batch.store import log as store_log

CONFIG = {"model": {"name": "tiny"}, "steer": {"p0": 0.9, "layer": 12}, "workers": 4, "seed": 0}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return location(tmp_path / "out")
    s3 = request.getfixturevalue("s3_env")
    return location(f"{s3.bucket()}/out")


def _table(shard: int, rows: int = 3) -> pa.Table:
    """A shard's rows: ids continue across shards so a read-back can be checked exactly."""
    ids = list(range(shard * 100, shard * 100 + rows))
    return pa.table({"id": pa.array(ids, pa.int64()), "text": [f"row {i}" for i in ids]})


def _commit(stage: Stage, shard: int, attempt: str = "a", rows: int = 3) -> ShardRecord:
    record = write_table_shard(stage.ref(shard, f"{attempt}{shard}"), _table(shard, rows))
    assert stage.commit(record)
    return record


def _names(stage_dir: Location) -> list[str]:
    return [f.name for f in stage_dir.list()]


def _visible(stage_dir: Location) -> list[str]:
    return [n for n in _names(stage_dir) if not n.startswith("_")]


def _read(stage: Stage) -> list[int]:
    table = stage.dataset().to_table()
    return sorted(table.column("id").to_pylist()) if table.num_columns else []


def _open(root: Location, config: dict = CONFIG, n: int = 3, **kw) -> Stage:
    return Stage.open(root, "gen", config, 1, n_shards=n, ignore_keys=("workers",), **kw)


# --- sharding, hashing, names --------------------------------------------------------------------


def test_shard_ranges_cover_rows_exactly_once() -> None:
    for n_rows, size in ((10, 4), (8, 4), (1, 5), (0, 4), (1000, 7)):
        ranges = shard_ranges(n_rows, size)
        covered = [i for start, stop in ranges for i in range(start, stop)]
        assert covered == list(range(n_rows))  # every row once, in order
        assert all(0 < stop - start <= size for start, stop in ranges)
        assert all(stop - start == size for start, stop in ranges[:-1])  # only the last may be short
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError):
        shard_ranges(10, 0)
    with pytest.raises(ValueError):
        shard_ranges(-1, 4)


def test_config_hash_is_canonical_sha256() -> None:
    # The canonical form written out by hand (keys sorted at every level, no spaces), as provenance documents it:
    # a reader recomputes the hash from config.json with any JSON library.
    canonical = b'{"model":{"name":"tiny"},"seed":0,"steer":{"layer":12,"p0":0.9},"workers":4}'
    assert config_hash(CONFIG) == hashlib.sha256(canonical).hexdigest()
    assert config_hash(dict(reversed(CONFIG.items()))) == config_hash(CONFIG)
    assert config_hash({"a": (1, 2)}) == config_hash({"a": [1, 2]})
    assert config_hash({"a": Path("/x")}) == config_hash({"a": "/x"})
    without_workers = {k: v for k, v in CONFIG.items() if k != "workers"}
    assert config_hash(CONFIG, ignore_keys=["workers"]) == config_hash(without_workers)
    with pytest.raises(TypeError, match="not JSON-serializable"):
        config_hash({"a": object()})


def test_diff_keys_dotted_and_sorted() -> None:
    assert diff_keys(CONFIG, CONFIG) == []
    changed = {**CONFIG, "steer": {"p0": 0.8, "layer": 12}, "extra": 1}
    assert diff_keys(CONFIG, changed) == ["extra", "steer.p0"]


@pytest.mark.parametrize("name", ["", "..", "a/b", "../x", ".hidden", "a" * 65, "x\x00y"])
def test_unsafe_names_refused_naming_them(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid stage name"):
        Stage.open(location(tmp_path), name, CONFIG, 1, n_shards=1)
    with pytest.raises(ValueError):
        check_name(name)
    with pytest.raises(ValueError, match="would leave"):
        location(tmp_path).child("../escape")


# --- committing ---------------------------------------------------------------------------------------


def test_commit_round_trip_shows_committed_objects_only(root: Location) -> None:
    stage = _open(root)
    assert stage.pending() == [0, 1, 2] and stage.publishing
    pending = write_table_shard(stage.ref(1, "w1"), _table(1))  # written by a worker, not yet committed
    assert (
        _visible(stage.location) == [] and _read(stage) == []
    )  # an attempt's objects are out of readers' sight
    _commit(stage, 0)
    assert stage.commit(pending)
    assert _visible(stage.location) == ["part-00000.parquet", "part-00001.parquet"]
    assert stage.pending() == [2] and stage.row_count() == 6
    assert _read(stage) == [0, 1, 2, 100, 101, 102]
    record = stage.records()[1]
    data = stage.location.child("part-00001.parquet").read_bytes()
    assert (record.objects[0].bytes, record.objects[0].sha256) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert not any(n.startswith("_attempts/") and n.endswith(".parquet") for n in _names(stage.location))
    reopened = _open(root)
    assert reopened.pending() == [2] and reopened.records() == stage.records()


def test_pyarrow_pandas_and_duckdb_read_the_published_folder(tmp_path: Path) -> None:
    import duckdb
    import pandas as pd

    stage = _open(location(tmp_path / "out"))
    for shard in range(3):
        _commit(stage, shard)
    write_table_shard(stage.ref(0, "late"), _table(9))  # a zombie's objects: never read
    folder = tmp_path / "out" / "gen"
    expected = [i for s in range(3) for i in _table(s).column("id").to_pylist()]
    assert sorted(pq.read_table(folder).column("id").to_pylist()) == expected
    assert sorted(pd.read_parquet(folder)["id"].tolist()) == expected
    got = duckdb.sql(f"SELECT id FROM read_parquet('{folder}/part-*.parquet') ORDER BY id").fetchall()
    assert [r[0] for r in got] == expected


def test_a_late_attempt_never_replaces_a_committed_shard(root: Location) -> None:
    stage = _open(root)
    first = _commit(stage, 1)
    before = stage.location.child("part-00001.parquet").read_bytes()
    zombie = write_table_shard(stage.ref(1, "zombie"), _table(7, rows=5))  # a worker that woke up late
    assert stage.commit(zombie) is False
    assert stage.location.child("part-00001.parquet").read_bytes() == before
    assert stage.records() == [first] and _read(stage) == [100, 101, 102]
    assert not any("zombie" in n for n in _names(stage.location))  # its objects are deleted
    late = write_table_shard(stage.ref(1, "later"), _table(8))  # written after the driver's last look
    reopened = _open(root)
    assert not any(
        "later" in n for n in _names(reopened.location)
    )  # an uncommitted attempt is cleaned on open
    assert reopened.records() == [first] and _read(reopened) == [100, 101, 102]
    assert late.shard == 1


def test_records_of_another_generation_are_ignored(root: Location) -> None:
    stage = _open(root)
    stale = ShardRecord("gen", stage.generation + 1, 0, "x0", (), 0)
    assert stage.commit(stale) is False and stage.pending() == [0, 1, 2]
    with pytest.raises(StoreError, match="does not belong here"):
        stage.commit(ShardRecord("other", stage.generation, 0, "x0", (), 0))


def test_a_shard_with_another_schema_is_refused(root: Location) -> None:
    stage = _open(root)
    _commit(stage, 0)
    other = write_table_shard(stage.ref(1, "w"), pa.table({"id": ["not an int"]}))
    with pytest.raises(StoreError, match="schema differs"):
        stage.commit(other)
    assert stage.pending() == [1, 2]


def test_a_commit_the_driver_did_not_publish_is_published_on_reopen(root: Location, monkeypatch) -> None:
    stage = _open(root)
    publish = Stage._publish
    monkeypatch.setattr(
        Stage, "_publish", lambda self, record: None
    )  # the driver dies right after the log append
    record = write_table_shard(stage.ref(0, "w0"), _table(0))
    assert stage.commit(record)
    assert _visible(stage.location) == []
    monkeypatch.setattr(Stage, "_publish", publish)
    reopened = _open(root)
    assert _visible(reopened.location) == ["part-00000.parquet"] and _read(reopened) == [0, 1, 2]
    assert reopened.pending() == [1, 2]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_missing_or_truncated_object_is_dropped_and_its_shard_runs_again(
    root: Location, damage: str
) -> None:
    stage = _open(root)
    for shard in range(3):
        _commit(stage, shard)
    part = stage.location.child("part-00001.parquet")
    if damage == "delete":
        part.delete()
    else:
        part.write_bytes(part.read_bytes()[:40])
    reopened = _open(root)
    assert reopened.pending() == [1]
    assert _visible(reopened.location) == ["part-00000.parquet", "part-00002.parquet"]  # the bad file is gone
    assert _read(reopened) == [0, 1, 2, 200, 201, 202]
    _commit(reopened, 1, attempt="again")
    assert _read(_open(root)) == [0, 1, 2, 100, 101, 102, 200, 201, 202]


def test_files_a_log_does_not_list_are_refused_without_overwrite(root: Location) -> None:
    root.child("gen", "part-00000.parquet").write_bytes(b"from somewhere else")
    with pytest.raises(StoreError, match="no commit log lists"):
        _open(root)
    assert _names(root.child("gen")) == ["part-00000.parquet"]  # refused before writing anything
    stage = _open(root, overwrite=True)
    assert _visible(stage.location) == [] and stage.pending() == [0, 1, 2]


def test_an_output_of_the_old_manifest_format_is_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "out" / "gen"
    legacy.mkdir(parents=True)
    (legacy / "_manifest.json").write_text("{}")
    with pytest.raises(StoreError, match="older version"):
        _open(location(tmp_path / "out"))


# --- configs and generations -------------------------------------------------------------------------------


def test_a_changed_config_is_refused_naming_keys_and_writes_nothing(root: Location) -> None:
    _commit(_open(root), 0)
    before = _names(root.child("gen"))
    changed = {**CONFIG, "steer": {"p0": 0.8, "layer": 12}, "seed": 1}
    assert stage_mismatch(root, "gen", changed, 1) == ["seed", "steer.p0"]
    with pytest.raises(ConfigMismatchError, match="differing keys: seed, steer.p0") as err:
        _open(root, changed)
    assert err.value.keys == ["seed", "steer.p0"] and "--overwrite" in str(err.value)
    assert _names(root.child("gen")) == before
    assert _open(root, {**CONFIG, "workers": 8}).pending() == [1, 2]  # an ignored key changes nothing


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(root: Location) -> None:
    old = _open(root)
    for shard in range(3):
        _commit(old, shard)
    new_config = {**CONFIG, "seed": 7}
    new = _open(root, new_config, n=2, overwrite=True)
    assert not new.publishing and new.pending() == [0, 1] and new.generation == old.generation + 1
    _commit(new, 0, attempt="n")
    # interrupted here: the old generation is whole, published and readable, by the store and by a plain reader
    assert _read(_open(root)) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    assert _visible(root.child("gen")) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert stage_mismatch(root, "gen", CONFIG, 1) == []  # what is published is still the old config's
    resumed = _open(root, new_config, n=2, overwrite=True)
    assert resumed.generation == new.generation and resumed.pending() == [1]  # the overwrite resumes
    _commit(resumed, 1, attempt="n")
    assert resumed.finish()
    assert _visible(root.child("gen")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]  # the third old shard is gone
    assert _read(_open(root, new_config, n=2)) == [0, 1, 2, 100, 101, 102]
    with pytest.raises(ConfigMismatchError):
        _open(root)  # now the old config is the different one


def test_an_abandoned_overwrite_is_replaced_by_the_next_one(root: Location) -> None:
    _commit(_open(root), 0)
    first = _open(root, {**CONFIG, "seed": 7}, overwrite=True)
    _commit(first, 0, attempt="f")
    second = _open(root, {**CONFIG, "seed": 8}, overwrite=True)
    assert second.generation == first.generation + 1 and second.pending() == [0, 1, 2]
    assert not any(n.startswith(f"_attempts/g{first.generation}/") for n in _names(root.child("gen")))


def test_the_log_is_compacted_and_replays_to_the_same_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_log, "COMPACT_EVERY", 10)  # read by the log as it appends
    root = location(tmp_path / "out")
    stage = _open(root, n=25)
    for shard in range(25):
        _commit(stage, shard, rows=1)
        stage.compact_if_due()
    log = [n for n in _names(stage.location) if n.startswith("_log/")]
    # 27 records (open, begin, 25 commits): two segments of 10, then the 7 single records after them; a
    # segment holds only its own records, so no object grows with the number of shards.
    assert log == ["_log/000000000010.segment.json", "_log/000000000020.segment.json"] + [
        f"_log/{seq:012d}.json" for seq in range(21, 28)
    ]
    segment = json.loads(stage.location.child("_log", "000000000020.segment.json").read_bytes())
    assert [r["seq"] for r in segment["records"]] == list(range(11, 21))
    reopened = _open(root, n=25)
    assert reopened.records() == stage.records() and reopened.is_complete()
    assert COMPACT_EVERY == 1000


def test_a_stage_of_named_files_publishes_them_together(root: Location) -> None:
    stage = Stage.open(root, "bundles", CONFIG, 1, n_shards=1)
    record = write_files_shard(
        stage.ref(0, "b"), {"power/meta.json": b"{}", "power/v.bin": b"xyz"}, _table(0)
    )
    assert stage.commit(record)
    assert _visible(stage.location) == ["part-00000.parquet", "power/meta.json", "power/v.bin"]
    assert stage.object(0, "power/v.bin").read_bytes() == b"xyz"


# --- the lease -------------------------------------------------------------------------------------------------


def test_a_second_driver_is_refused_and_the_first_ones_files_are_untouched(root: Location) -> None:
    with OutputLease(root, "conva run"):
        stage = _open(root)
        _commit(stage, 0)
        before = {f.name: f.size for f in root.list()}
        with pytest.raises(LeaseError, match="being written by another driver.*conva run, pid"):
            OutputLease(root, "conva run").acquire()
        assert {f.name: f.size for f in root.list()} == before
    assert not root.child("_lease.json").exists()  # released


def test_a_stale_lease_is_broken_only_on_request(tmp_path: Path) -> None:
    root = location(tmp_path)
    stale = {"owner": "x", "job": "conva run", "host": "elsewhere", "pid": 1, "started": 0, "heartbeat": 0}
    root.child("_lease.json").write_text(json.dumps(stale))
    with pytest.raises(LeaseError, match="stale lease.*--break-lease"):
        OutputLease(root, "conva run").acquire()
    lease = OutputLease(root, "conva run", break_stale=True)
    lease.acquire()
    assert json.loads(root.child("_lease.json").read_text())["owner"] == lease.owner
    lease.release()


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    import socket

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    root = location(tmp_path)
    held = {
        "owner": "x",
        "job": "conva run",
        "host": socket.gethostname(),
        "pid": pid,
        "started": 0,
        "heartbeat": 9e12,
    }
    root.child("_lease.json").write_text(json.dumps(held))
    with OutputLease(root, "conva run") as lease:
        assert json.loads(root.child("_lease.json").read_text())["owner"] == lease.owner


# --- what the store does not do ----------------------------------------------------------------------------


def test_store_does_not_import_ray() -> None:
    code = "import sys, conva.batch.store, conva.batch.storage, conva.batch.lease, conva.batch.inputs; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_float_columns_written_plain_others_with_dictionary_and_statistics(tmp_path: Path) -> None:
    stage = _open(location(tmp_path / "out"))
    table = pa.table(
        {
            "layer": pa.array([1, 1, 2], pa.int32()),
            "value": ["a", "b", "a"],
            "activation": pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float32(), 2)),
            "score": pa.array([0.5, 0.25, 0.125], pa.float64()),
        }
    )
    assert stage.commit(write_table_shard(stage.ref(0, "w"), table))
    meta = pq.ParquetFile(tmp_path / "out" / "gen" / "part-00000.parquet").metadata.row_group(0)
    cols = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i) for i in range(meta.num_columns)}
    for name in ("activation", "score"):
        assert "PLAIN_DICTIONARY" not in cols[name].encodings and "RLE_DICTIONARY" not in cols[name].encodings
        assert not cols[name].is_stats_set
    for name in ("layer", "value"):
        assert cols[name].is_stats_set
        assert {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(cols[name].encodings)
