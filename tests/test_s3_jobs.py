"""The run job with its output on a real S3 endpoint (``moto_server`` on loopback): no rename anywhere.

Activations, bundles and generations go to ``s3://…``; a driver killed in the middle of steering is
rerun with no row lost or duplicated; a zombie attempt's late write changes nothing; an interrupted
``--overwrite`` leaves the old output whole and readable. What the bucket holds is read by plain HTTP
(``S3Server.list``), not through the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conva.batch.config import load_config
from conva.batch.schemas import SCHEMA_VERSION
from conva.batch.steer_rows import steering_rows
from conva.batch.storage import location
from conva.batch.store import Stage, stage_status
from conva.jobs.runner import run_job
from conva.tiny import make_tiny_model
from tests.clusters import session_driver_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _argv(model: str, out: str, *extra: str) -> list[str]:
    return [
        f"--model.name={model}",
        f"--output.dir={out}",
        '--data.values=["power", "security"]',
        "--ray.rows_per_shard=96",
        "--ray.steer_rows_per_shard=1",
        "--ray.num_workers=1",  # what these tests check is per shard: a second worker adds a start, not a case
        *extra,
    ]


def _cfg(model: str, out: str, *extra: str):
    return load_config(TINY, _argv(model, out, *extra))


def _generations(out: str) -> pa.Table:
    """The published generations, read by pyarrow straight from the bucket's folder (not through the store)."""
    where = location(out).child("generations")
    return ds.dataset(where.path, filesystem=where.fs, format="parquet").to_table()


def _parts(s3, out: str) -> dict[str, bytes]:
    return {k: location(f"s3://{k}").read_bytes() for k in _keys(s3, out, "generations/part-")}


def _keys(s3, out: str, prefix: str) -> list[str]:
    bucket = out.split("/")[2]
    folder = out.split("/", 3)[3]
    return [f"{bucket}/{k}" for k in s3.list(out) if k.startswith(f"{folder}/{prefix}")]


def _exactly_once(cfg, out: str) -> None:
    expected = steering_rows(cfg).column("row_id").to_pylist()
    got = _generations(out).column("row_id").to_pylist()
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m conva.jobs.run`` on the session's Ray (:func:`tests.clusters.session_driver_env`)."""
    with open(log, "w") as fh:  # its own session: whatever it started is signalled as a group after the kill
        return subprocess.Popen(
            [sys.executable, "-m", "conva.jobs.run", "--config", str(TINY), *argv],
            cwd=REPO,
            env=session_driver_env(),
            start_new_session=True,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the driver ended before the kill: {log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def done(ray_session, s3, model):
    """A whole run job whose output is an S3 folder."""
    out = f"{s3.bucket()}/run"
    results = run_job("run", _cfg(model, out))
    return dict(out=out, results=results)


def test_every_stage_is_written_to_the_bucket(done, s3, model) -> None:
    out, keys = done["out"], s3.list(done["out"])
    folder = out.split("/", 3)[3]
    # (pyarrow keeps an emptied "folder" alive with a zero-byte marker key ending in "/": not an object)
    names = {k[len(folder) + 1 :] for k in keys if not k.endswith("/")}
    for value in ("power", "security"):
        assert {f"bundles/{value}/meta.json", f"bundles/{value}/vectors.safetensors"} <= names
    assert {"config.json", "run.log"} <= names and not any("_attempts/" in n for n in names)
    n_acts = done["results"][0].shards
    assert sorted(n for n in names if n.startswith("activations/part-")) == [
        f"activations/part-{i:05d}.parquet" for i in range(n_acts)
    ]
    _exactly_once(_cfg(model, out), out)
    assert "_lease.json" not in names  # released at the end


def test_a_driver_killed_mid_steering_loses_and_duplicates_no_row(
    ray_session, s3, model, tmp_path, fault_plan
) -> None:
    out = f"{s3.bucket()}/killed"
    fault_plan.write_text(json.dumps({"sleep_s": 0.4}))  # the killed driver's shards only
    proc = _spawn(_argv(model, out), tmp_path / "driver.log")
    try:
        _kill_when(proc, lambda: len(_keys(s3, out, "generations/part-")) >= 2, tmp_path / "driver.log")
    finally:
        fault_plan.write_text("{}")
    before = _parts(s3, out)
    cfg = _cfg(model, out)
    results = {r.stage: r for r in run_job("run", cfg)}
    n = results["steer"].shards
    assert 2 <= len(before) < n
    # only the shards not published at the kill run again (one logged but unpublished commit is published instead)
    assert n - len(before) - 1 <= results["steer"].processed <= n - len(before)
    assert results["extract"].processed == results["fit"].processed == 0
    after = _parts(s3, out)
    assert {k: after[k] for k in before} == before  # committed shards were never rewritten
    _exactly_once(cfg, out)


def test_a_zombie_attempts_late_write_is_ignored(done, s3, model) -> None:
    out = done["out"]
    before, rows = _parts(s3, out), _generations(out)
    zombie = location(out).child("generations", "_attempts", "g1", "00000-zombie", "part-00000.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(rows.slice(0, 1), sink)
    zombie.write_bytes(sink.getvalue().to_pybytes())  # a worker of a dead driver finishing its PUT late
    assert _generations(out).equals(rows)  # readers never see it
    stage = Stage.open(location(out), "generations", _stage_config(out), SCHEMA_VERSION, n_shards=len(before))
    assert stage.is_complete() and not zombie.exists()  # the next open deletes it; the commit stands
    assert _parts(s3, out) == before and _generations(out).equals(rows)


def _stage_config(out: str) -> dict:
    """The config the generations stage was committed with (from its log's ``begin`` record)."""
    log = location(out).child("generations", "_log")
    for f in log.list():
        body = json.loads(log.child(f.name).read_bytes())
        for record in body.get("records", [body]):  # a segment holds many records
            if record.get("op") == "begin":
                return record["config"]
        if "state" in body:
            return body["state"]["gens"][0]["config"]
    raise AssertionError("no begin record")


def test_an_interrupted_overwrite_leaves_the_old_output_whole_and_readable(
    done, s3, model, tmp_path, fault_plan
) -> None:
    out = done["out"]
    old_parts, old_rows = _parts(s3, out), _generations(out)
    fault_plan.write_text(json.dumps({"sleep_s": 0.4}))  # the killed driver's shards only
    argv = [*_argv(model, out, "--steer.p0=0.9"), "--overwrite"]
    proc = _spawn(argv, tmp_path / "driver.log")
    try:
        _kill_when(
            proc, lambda: len(_keys(s3, out, "generations/_attempts/g2/")) >= 2, tmp_path / "driver.log"
        )
    finally:
        fault_plan.write_text("{}")
    assert _parts(s3, out) == old_parts and _generations(out).equals(old_rows)  # the old output, whole
    assert stage_status(location(out), "generations").pending_generation
    assert set(_generations(out).column("p0").drop_null().to_pylist()) == {0.95}  # the old config's P0
    cfg = _cfg(model, out, "--steer.p0=0.9")
    results = {r.stage: r for r in run_job("run", cfg, overwrite=True)}
    assert results["steer"].processed < results["steer"].shards  # the overwrite resumed where it was killed
    _exactly_once(cfg, out)
    assert set(_generations(out).column("p0").drop_null().to_pylist()) == {0.9}
    assert not [k for k in _keys(s3, out, "generations/_attempts/") if not k.endswith("/")]
