"""The output store: atomic shard commits, manifest reconciliation, resume, config checks, path safety."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conva import store
from conva.store import (ConfigMismatchError, OutputNotWritableError, StoreError, check_name,
                         check_writable, config_hash, diff_keys, open_stage, shard_ranges)

CONFIG = {"model": {"name": "tiny"}, "steer": {"p0": 0.9, "layer": 12}, "workers": 4, "seed": 0}
REPO = Path(__file__).resolve().parents[1]


def _table(shard: int, rows: int = 3) -> pa.Table:
    """A shard's rows: ids continue across shards so a read-back can be checked exactly."""
    ids = list(range(shard * 100, shard * 100 + rows))
    return pa.table({"id": pa.array(ids, pa.int64()), "text": [f"row {i}" for i in ids]})


def _visible(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.iterdir() if not p.name.startswith("_"))


def _manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "_manifest.json").read_text())


# --- sharding, hashing, names --------------------------------------------------------------------


def test_shard_ranges_cover_rows_exactly_once() -> None:
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert shard_ranges(0, 4) == []
    assert shard_ranges(10, 4) == shard_ranges(10, 4)
    with pytest.raises(ValueError):
        shard_ranges(10, 0)
    with pytest.raises(ValueError):
        shard_ranges(-1, 4)


def test_config_hash_is_canonical_sha256() -> None:
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()
    assert config_hash(CONFIG) == hashlib.sha256(canonical).hexdigest()
    assert config_hash(dict(reversed(CONFIG.items()))) == config_hash(CONFIG)
    assert config_hash({"a": (1, 2)}) == config_hash({"a": [1, 2]})
    assert config_hash({"a": Path("/x")}) == config_hash({"a": "/x"})
    without_workers = {k: v for k, v in CONFIG.items() if k != "workers"}
    assert config_hash(CONFIG, ["workers"]) == config_hash(without_workers)
    assert config_hash(CONFIG, ["steer.p0"]) == config_hash({**CONFIG, "steer": {"layer": 12}})
    assert config_hash({"a": 1}) != config_hash({"a": 1.0}) != config_hash({"a": True})
    with pytest.raises(TypeError, match="object"):
        config_hash({"a": object()})


def test_diff_keys_dotted_and_sorted() -> None:
    other = {"model": {"name": "tiny"}, "steer": {"p0": 0.8, "layer": 12, "gate": "x"}, "seed": 0}
    assert diff_keys(CONFIG, other) == ["steer.gate", "steer.p0", "workers"]
    assert diff_keys(CONFIG, CONFIG) == []
    assert diff_keys({"a": {"b": 1}}, {"a": 1}) == ["a"]
    assert diff_keys({"a": 1}, {"a": True}) == ["a"]


@pytest.mark.parametrize("name", ["", "..", "a..b", "../x", "a/b", "/abs", ".hidden", "_staging",
                                  "-x", "a b", "x" * 65, "é"])
def test_unsafe_names_refused_naming_them(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid stage name"):
        open_stage(tmp_path, name, CONFIG, 1)
    with pytest.raises(ValueError, match="invalid dataset"):
        check_name(name, "dataset")
    assert list(tmp_path.iterdir()) == []


def test_safe_names_accepted() -> None:
    for name in ["activations", "gen.v2", "A-1_b", "x" * 64]:
        assert check_name(name) == name


def test_stage_symlink_out_of_out_dir_refused(tmp_path: Path) -> None:
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "generations").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the output folder"):
        open_stage(out, "generations", CONFIG, 1)
    assert list(outside.iterdir()) == []


# --- writability ------------------------------------------------------------------------------


def test_check_writable_leaves_nothing_behind(tmp_path: Path) -> None:
    assert check_writable(tmp_path) == tmp_path.resolve()
    assert check_writable(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").resolve()
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_file_as_parent(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritableError, match=str(tmp_path / "file" / "out")) as err:
        check_writable(tmp_path / "file" / "out")
    assert isinstance(err.value, PermissionError)


def test_check_writable_refuses_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:  # a real read-only folder; root ignores the mode, so it also gets the fake below
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(OutputNotWritableError, match=str(tmp_path)):
                check_writable(tmp_path)
        finally:
            tmp_path.chmod(0o700)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputNotWritableError, match=f"output folder {tmp_path} is not writable"):
        open_stage(tmp_path, "generations", CONFIG, 1)
    assert list(tmp_path.iterdir()) == []


# --- commit, read back, resume ---------------------------------------------------------------------


def test_commit_round_trip(tmp_path: Path) -> None:
    stage = open_stage(tmp_path / "out", "generations", CONFIG, schema_version=2)
    assert stage.path == (tmp_path / "out" / "generations").resolve()
    assert stage.committed() == set() and stage.row_count() == 0
    assert stage.dataset().count_rows() == 0
    stage.commit(1, _table(1, 4))
    stage.commit(0, _table(0, 3))
    assert stage.committed() == {0, 1}
    assert stage.row_count() == 7
    assert stage.pending(3) == [2] and not stage.is_complete(3) and stage.is_complete(2)
    assert stage.dataset().to_table().column("id").to_pylist() == [0, 1, 2, 100, 101, 102, 103]
    assert _visible(stage.path) == ["part-00000.parquet", "part-00001.parquet"]
    assert list((stage.path / "_staging").iterdir()) == []

    manifest = _manifest(stage.path)
    assert manifest["schema_version"] == 2
    assert manifest["config"] == CONFIG and manifest["config_hash"] == config_hash(CONFIG)
    shard1 = (stage.path / "part-00001.parquet").read_bytes()
    assert manifest["shards"][1] == {"shard": 1, "file": "part-00001.parquet", "rows": 4,
                                     "bytes": len(shard1), "sha256": hashlib.sha256(shard1).hexdigest()}
    assert [s["shard"] for s in manifest["shards"]] == [0, 1]


def test_commit_refuses_committed_shard_unless_overwrite(tmp_path: Path) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    stage.commit(0, _table(0, 3))
    with pytest.raises(StoreError, match="shard 0 .* already committed"):
        stage.commit(0, _table(0, 5))
    assert stage.row_count() == 3
    stage.commit(0, _table(0, 5), overwrite=True)
    assert stage.row_count() == 5 and _manifest(stage.path)["shards"][0]["rows"] == 5
    assert pq.read_table(stage.path / "part-00000.parquet").num_rows == 5


def test_commit_refuses_bad_shard_and_schema_change(tmp_path: Path) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    for bad in [-1, True, 1.0]:
        with pytest.raises(ValueError, match="shard must be"):
            stage.commit(bad, _table(0))  # type: ignore[arg-type]
    stage.commit(0, _table(0))
    with pytest.raises(StoreError, match="schema differs"):
        stage.commit(1, pa.table({"id": [1.5]}))
    stage.commit(0, pa.table({"id": [1.5]}), overwrite=True)  # the only shard may change its schema
    assert stage.committed() == {0}


def test_readers_see_committed_rows_only(tmp_path: Path) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    stage.commit(0, _table(0, 3))
    stage.commit(1, _table(1, 2))
    # leftovers a crash could leave: readers must skip them without being told
    (stage.path / "_staging" / "part-00002.abc.tmp").write_bytes(b"PAR1 half a file")
    (stage.path / "_staging" / "part-00003.parquet").write_bytes(b"PAR1 half a file")
    (stage.path / ".part-00004.parquet").write_bytes(b"PAR1 half a file")
    expected = [0, 1, 2, 100, 101]
    assert sorted(ds.dataset(stage.path, format="parquet").to_table().column("id").to_pylist()) == expected
    assert sorted(pq.read_table(stage.path).column("id").to_pylist()) == expected
    assert sorted(pd.read_parquet(stage.path)["id"].tolist()) == expected


def test_duckdb_reads_the_shard_glob(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    stage.commit(0, _table(0, 3))
    stage.commit(1, _table(1, 2))
    (stage.path / "_staging" / "part-00002.abc.tmp").write_bytes(b"PAR1 half a file")
    glob = str(stage.path / "part-*.parquet")
    assert duckdb.sql(f"select count(*), sum(id) from read_parquet('{glob}')").fetchall() == [(5, 204)]


def test_resume_reports_pending(tmp_path: Path) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    for shard in [0, 2, 3]:
        stage.commit(shard, _table(shard))
    again = open_stage(tmp_path, "generations", CONFIG, 1)
    assert again.committed() == {0, 2, 3}
    assert again.pending(6) == [1, 4, 5]
    assert again.row_count() == 9
    for shard in again.pending(6):
        again.commit(shard, _table(shard))
    assert open_stage(tmp_path, "generations", CONFIG, 1).is_complete(6)


# --- crashes and reconciliation ------------------------------------------------------------------


def test_failed_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    stage.commit(0, _table(0))
    before = _manifest(stage.path)
    real_write = pq.write_table

    def half_write(table: pa.Table, where: object, **kwargs: object) -> None:
        sink = pa.BufferOutputStream()
        real_write(table, sink)
        data = sink.getvalue().to_pybytes()
        Path(str(where)).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        stage.commit(1, _table(1))
    assert _visible(stage.path) == ["part-00000.parquet"]
    assert list((stage.path / "_staging").iterdir()) == []
    assert _manifest(stage.path) == before and stage.committed() == {0}


_CRASH = """
import os, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from conva.store import open_stage

def half_write_then_die(table, where, **kwargs):
    Path(str(where)).write_bytes(b"PAR1" + b"x" * 100)  # half a file, no footer
    os._exit(3)  # killed: no except, no finally

stage = open_stage(sys.argv[1], "generations", {"seed": 0}, 1)
stage.commit(0, pa.table({"id": [1, 2]}))
pq.write_table = half_write_then_die
stage.commit(1, pa.table({"id": [3, 4]}))
"""


def test_killed_mid_write_then_reopen_cleans_staging(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], env=env, capture_output=True)
    assert run.returncode == 3, run.stderr.decode()
    stage_dir = tmp_path / "generations"
    assert _visible(stage_dir) == ["part-00000.parquet"]
    assert len(list((stage_dir / "_staging").iterdir())) == 1  # the dead writer's half file
    assert pd.read_parquet(stage_dir)["id"].tolist() == [1, 2]

    stage = open_stage(tmp_path, "generations", {"seed": 0}, 1)
    assert list((stage_dir / "_staging").iterdir()) == []
    assert stage.committed() == {0} and stage.pending(2) == [1]


def test_unlisted_committed_file_is_adopted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    stage.commit(0, _table(0, 3))

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # between the shard's rename and the manifest update

    monkeypatch.setattr(store, "_save_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        stage.commit(1, _table(1, 4))
    monkeypatch.undo()
    assert _visible(stage.path) == ["part-00000.parquet", "part-00001.parquet"]
    assert [s["shard"] for s in _manifest(stage.path)["shards"]] == [0]

    again = open_stage(tmp_path, "generations", CONFIG, 1)
    assert again.committed() == {0, 1} and again.row_count() == 7
    data = (again.path / "part-00001.parquet").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert _manifest(again.path)["shards"][1] == {"shard": 1, "file": "part-00001.parquet", "rows": 4,
                                                  "bytes": len(data), "sha256": sha}


def test_unreadable_unlisted_file_is_removed(tmp_path: Path) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    stage.commit(0, _table(0))
    (stage.path / "part-00001.parquet").write_bytes(b"PAR1 not parquet")
    again = open_stage(tmp_path, "generations", CONFIG, 1)
    assert again.committed() == {0} and _visible(again.path) == ["part-00000.parquet"]


def test_listed_file_missing_is_dropped(tmp_path: Path) -> None:
    stage = open_stage(tmp_path, "generations", CONFIG, 1)
    for shard in range(3):
        stage.commit(shard, _table(shard))
    (stage.path / "part-00001.parquet").unlink()
    again = open_stage(tmp_path, "generations", CONFIG, 1)
    assert again.committed() == {0, 2} and again.pending(3) == [1] and again.row_count() == 6
    assert [s["shard"] for s in _manifest(again.path)["shards"]] == [0, 2]


# --- config changes --------------------------------------------------------------------------------


def test_config_change_refused_naming_keys(tmp_path: Path) -> None:
    open_stage(tmp_path, "generations", CONFIG, 1).commit(0, _table(0))
    changed = {**CONFIG, "steer": {"p0": 0.8, "layer": 12}, "seed": 1}
    with pytest.raises(ConfigMismatchError, match="differing keys: seed, steer.p0") as err:
        open_stage(tmp_path, "generations", changed, 1)
    assert err.value.keys == ["seed", "steer.p0"]
    with pytest.raises(ConfigMismatchError, match="differing keys: schema_version"):
        open_stage(tmp_path, "generations", CONFIG, 2)
    assert open_stage(tmp_path, "generations", CONFIG, 1).committed() == {0}  # untouched


def test_ignored_keys_do_not_block_resume(tmp_path: Path) -> None:
    open_stage(tmp_path, "generations", CONFIG, 1).commit(0, _table(0))
    with pytest.raises(ConfigMismatchError, match="differing keys: workers"):
        open_stage(tmp_path, "generations", {**CONFIG, "workers": 8}, 1)
    stage = open_stage(tmp_path, "generations", {**CONFIG, "workers": 8}, 1, ignore_keys=["workers"])
    assert stage.committed() == {0}
    assert _manifest(stage.path)["config"]["workers"] == 8
    assert _manifest(stage.path)["config_hash"] == config_hash(CONFIG, ["workers"])
    # a stage written with a key ignored keeps ignoring it, so any later workers count resumes
    for workers in [2, 4]:
        stage = open_stage(tmp_path, "generations", {**CONFIG, "workers": workers}, 1)
        assert stage.committed() == {0} and stage.manifest.ignore_keys == ("workers",)


def test_overwrite_replaces_a_different_config(tmp_path: Path) -> None:
    first = open_stage(tmp_path, "generations", CONFIG, 1)
    for shard in range(3):
        first.commit(shard, _table(shard))
    other = open_stage(tmp_path, "activations", CONFIG, 1)
    other.commit(0, _table(0))
    changed = {**CONFIG, "seed": 1}
    stage = open_stage(tmp_path, "generations", changed, 1, overwrite=True)
    assert stage.committed() == set() and _visible(stage.path) == []
    assert _manifest(stage.path)["config"] == changed and _manifest(stage.path)["shards"] == []
    assert open_stage(tmp_path, "activations", CONFIG, 1).committed() == {0}  # other stages untouched
    stage.commit(0, _table(0, 2))
    assert open_stage(tmp_path, "generations", changed, 1).row_count() == 2


def test_overwrite_with_same_config_resumes(tmp_path: Path) -> None:
    open_stage(tmp_path, "generations", CONFIG, 1).commit(0, _table(0))
    assert open_stage(tmp_path, "generations", CONFIG, 1, overwrite=True).committed() == {0}


def test_shard_files_without_manifest_refused(tmp_path: Path) -> None:
    (tmp_path / "generations").mkdir()
    pq.write_table(_table(0), tmp_path / "generations" / "part-00000.parquet")
    with pytest.raises(StoreError, match="no _manifest.json"):
        open_stage(tmp_path, "generations", CONFIG, 1)
    assert open_stage(tmp_path, "generations", CONFIG, 1, overwrite=True).committed() == set()
    assert _visible(tmp_path / "generations") == []


def test_store_does_not_import_ray() -> None:
    code = "import sys, conva.store; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)


def test_float_columns_written_plain_others_with_dictionary_and_statistics(tmp_path: Path) -> None:
    """Activations are stored without dictionary encoding or statistics (a 7x faster commit, smaller files);
    the columns readers filter on keep their statistics, so a layer's row group is still pruned."""
    import numpy as np

    n, d = 8, 16
    table = pa.table({
        "value": ["power"] * n, "layer": pa.array(np.repeat([0, 1], n // 2).astype(np.int32)),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * d, dtype=np.float32)), d),
        "eps": pa.array([[0.5, 1.5]] * n, pa.list_(pa.float32())),
    })
    stage = open_stage(tmp_path, "activations", {"k": 1}, schema_version=1)
    stage.commit(0, table, row_group_size=n // 2)
    meta = pq.ParquetFile(tmp_path / "activations" / "part-00000.parquet").metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    for name in ("activation.list.element", "eps.list.element"):
        assert not any("DICTIONARY" in e for e in columns[name].encodings), (name, columns[name].encodings)
        assert columns[name].statistics is None, name
    for name in ("value", "layer"):
        assert columns[name].statistics is not None and columns[name].statistics.has_min_max, name
    assert columns["layer"].statistics.min == columns["layer"].statistics.max == 0
    assert pq.read_table(tmp_path / "activations" / "part-00000.parquet").equals(table)
