"""The fenced commit log and the lease on real storage (a folder and a ``moto_server`` bucket) and a real Ray head.

Two drivers on one output must never both commit: each log record is created only if absent, a driver
opening a stage claims the next record (fencing out any earlier opener), and every append first checks
the driver still holds the output's lease. A new driver takes over the lease by itself when the holder's
Ray job finished or its Ray cluster is gone, and refuses a live holder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from conva.batch import storage
from conva.batch.lease import CLAIMS, LeaseError, LeaseLostError, OutputLease, held_fence
from conva.batch.storage import Location, location
from conva.batch.store import FencedError, ShardRecord, Stage, StoreError, write_table_shard
from conva.batch.store import log as store_log
from conva.batch.store import stage as store_stage
from conva.jobs.common import RAY_PROBE

CONFIG = {"model": {"name": "tiny"}, "seed": 0}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return location(tmp_path / "out")
    s3 = request.getfixturevalue("s3_env")
    return location(f"{s3.bucket()}/out")


def _open(root: Location, n: int = 4, **kw) -> Stage:
    return Stage.open(root, "gen", CONFIG, 1, n_shards=n, **kw)


def _record(stage: Stage, shard: int, attempt: str) -> ShardRecord:
    ids = list(range(shard * 100, shard * 100 + 3))
    return write_table_shard(stage.ref(shard, attempt), pa.table({"id": pa.array(ids, pa.int64())}))


def _ids(stage: Stage) -> list[int]:
    return sorted(stage.dataset().to_table().column("id").to_pylist())


def _names(where: Location) -> list[str]:
    return [f.name for f in where.list()]


# --- create if absent --------------------------------------------------------------------------------------


def test_create_bytes_lets_exactly_one_writer_have_a_name(root: Location) -> None:
    target = root.child("_log", "000000000001.json")
    target.create_bytes(b"first")
    with pytest.raises(FileExistsError):
        target.create_bytes(b"second")
    assert target.read_bytes() == b"first" and _names(root) == ["_log/000000000001.json"]


def test_racing_creators_one_wins_on_s3(s3_env) -> None:
    """Eight threads create one key at once through the conditional PUT: exactly one succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    target = location(f"{s3_env.bucket()}/race/x.json")

    def attempt(i: int) -> bool:
        try:
            target.create_bytes(f"writer {i}".encode())
            return True
        except FileExistsError:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(attempt, range(8)))
    assert won.count(True) == 1
    assert target.read_bytes() == f"writer {won.index(True)}".encode()


# --- two drivers on one stage -----------------------------------------------------------------------------


def test_a_later_opener_fences_out_the_first_driver_and_every_shard_is_read_once(root: Location) -> None:
    first = _open(root)
    assert first.commit(_record(first, 0, "a0"))
    second = _open(root)  # appends its open record: the first driver's next append must fail
    assert second.pending() == [1, 2, 3]
    late = _record(first, 1, "a1")
    log_before = _names(root.child("gen", "_log"))
    with pytest.raises(FencedError, match="written by another driver.*this one stops now"):
        first.commit(late)
    with pytest.raises(FencedError):  # and it stays stopped
        first.commit(_record(first, 2, "a2"))
    assert _names(root.child("gen", "_log")) == log_before  # the losing driver wrote no record
    for shard in (1, 2, 3):
        assert second.commit(_record(second, shard, f"b{shard}"))
    second.finish()
    reopened = _open(root)
    assert reopened.is_complete() and reopened.pending() == []
    assert _ids(reopened) == [i for s in range(4) for i in range(s * 100, s * 100 + 3)]
    visible = [n for n in _names(root.child("gen")) if not n.startswith("_")]
    assert visible == [f"part-{s:05d}.parquet" for s in range(4)]
    assert not any(n.startswith("_attempts/") for n in _names(root.child("gen")))  # the loser's, collected


def test_an_opener_whose_replay_is_stale_stops_before_deleting_anything(root: Location, monkeypatch) -> None:
    """Two drivers replay the log at the same moment; the first appends; the second's open must fail and leave
    the first's in-flight attempt alone."""

    first = _open(root)
    stale = store_log.replay(root.child("gen"))  # what the second driver read before the first appended
    in_flight = _record(first, 1, "inflight")  # written, not yet committed
    assert first.commit(_record(first, 0, "a0"))
    before = _names(root.child("gen"))
    real_replay = store_stage.replay
    monkeypatch.setattr(store_stage, "replay", lambda folder: stale)
    with pytest.raises(FencedError):
        _open(root)
    monkeypatch.setattr(store_stage, "replay", real_replay)
    assert _names(root.child("gen")) == before  # nothing deleted: the attempt in flight is intact
    assert first.commit(in_flight)
    assert _ids(first) == [0, 1, 2, 100, 101, 102]


# --- the lease fence --------------------------------------------------------------------------------------


def test_a_driver_whose_lease_is_taken_over_stops_before_its_next_commit(root: Location) -> None:
    # 4 s, not 1: until the stall the renewals must keep up, and on S3 with three test processes on two cores
    # opening the stage once took over half of a 1 s TTL (the driver stopped there, before the stall).
    ttl = 4.0
    lease = OutputLease(root, "conva run", ttl_s=ttl)
    with lease:
        stage = _open(root, fence=held_fence(root))
        assert stage.commit(_record(stage, 0, "a0"))
        lease._stop.set()  # the driver stalls: its renewals stop
        lease._thread.join()
        time.sleep(ttl + 0.1)  # its heartbeat is stale now
        thief = OutputLease(root, "conva run", ttl_s=ttl, break_stale=True)
        thief.acquire()
        assert thief.epoch == lease.epoch + 1
        lease._renew_once()  # the stalled driver's renewal resumes and sees the newer epoch
        log_before = _names(root.child("gen", "_log"))
        with pytest.raises(LeaseLostError, match="taken over by conva run.*stops before its next commit"):
            stage.commit(_record(stage, 1, "a1"))
        assert _names(root.child("gen", "_log")) == log_before
        assert json.loads(root.child("_lease.json").read_bytes())["owner"] == thief.owner
    # the stalled driver's exit does not release the thief's lease
    assert json.loads(root.child("_lease.json").read_bytes())["owner"] == thief.owner
    thief.release()
    assert _names(root.child(CLAIMS)) == [f"{thief.epoch:010d}.json"]  # only the newest claim stays


def test_the_fence_of_a_lease_covers_the_folders_below_it(tmp_path: Path) -> None:
    root = location(tmp_path)
    assert held_fence(root) is None
    with OutputLease(root, "conva study") as lease:
        assert held_fence(root.child("smollm2")) == lease.ensure_held == held_fence(root)
        assert held_fence(location(str(tmp_path) + "-other")) is None
    assert held_fence(root.child("smollm2")) is None


def test_a_driver_that_cannot_renew_for_half_the_ttl_stops(tmp_path: Path) -> None:
    root = location(tmp_path)
    with OutputLease(root, "conva run", ttl_s=1.0) as lease:
        stage = _open(root, fence=held_fence(root))
        assert stage.commit(_record(stage, 0, "a0"))
        lease._stop.set()
        lease._thread.join()
        time.sleep(0.6)
        with pytest.raises(LeaseLostError, match="could not renew its lease for 1 s"):
            stage.commit(_record(stage, 1, "a1"))
    assert _open(root).pending() == [1, 2, 3]


def test_two_drivers_taking_over_one_stale_lease_at_once_one_wins(tmp_path: Path, monkeypatch) -> None:
    root = location(tmp_path)
    stale = {"owner": "x", "epoch": 3, "job": "conva run", "host": "elsewhere", "pid": 1, "started": 0}
    (tmp_path / "_lease.json").write_text(json.dumps({**stale, "heartbeat": 0}))
    a = OutputLease(root, "conva run", break_stale=True)
    b = OutputLease(root, "conva run", break_stale=True)
    seen_by_b = json.loads((tmp_path / "_lease.json").read_text())  # b checks the stale holder ...
    a.acquire()  # ... while a takes the lease over
    monkeypatch.setattr(b, "_read", lambda: seen_by_b)
    with pytest.raises(LeaseError, match="another driver took the lease at the same moment"):
        b.acquire()
    assert a.epoch == 4 and json.loads((tmp_path / "_lease.json").read_text())["owner"] == a.owner
    a.release()


# --- publishing -------------------------------------------------------------------------------------------


def test_a_committed_shard_whose_source_is_missing_is_an_error(root: Location) -> None:
    stage = _open(root)
    record = _record(stage, 0, "gone")
    stage.location.child(f"_attempts/g{stage.generation}/00000-gone/part-00000.parquet").delete()
    with pytest.raises(StoreError, match="cannot publish committed shard 0.*is missing"):
        stage.commit(record)


def test_the_background_publisher_reports_a_missing_source_at_finish(root: Location) -> None:
    stage = _open(root, n=2, background=True)
    assert stage.commit(_record(stage, 0, "a0"))
    record = _record(stage, 1, "gone")
    stage.location.child(f"_attempts/g{stage.generation}/00001-gone/part-00001.parquet").delete()
    assert stage.commit(record)
    with pytest.raises(StoreError, match="publishing failed: .*cannot publish committed shard 1"):
        stage.finish()


def test_background_publishing_publishes_every_commit_exactly_once(root: Location) -> None:
    stage = _open(root, n=30, background=True)
    for shard in range(30):
        assert stage.commit(_record(stage, shard, f"a{shard}"))
        assert stage.is_committed(shard) and stage.n_committed == shard + 1
    assert stage.object(7, "part-00007.parquet").exists()  # waits for that shard's publish
    stage.finish()
    assert _ids(_open(root, n=30)) == [i for s in range(30) for i in range(s * 100, s * 100 + 3)]
    assert not any(n.startswith("_attempts/") for n in _names(root.child("gen")))


def test_on_s3_a_shard_is_one_put_one_copy_and_its_source_goes_in_one_batched_delete(s3_env) -> None:
    stage = _open(location(f"{s3_env.bucket()}/out"), n=6, background=True)
    before = len(s3_env.requests())
    records = [_record(stage, shard, f"a{shard}") for shard in range(6)]
    worker_requests = s3_env.requests()[before:]
    assert stage.commit_many(records) == [True] * 6
    stage.close()
    driver_requests = s3_env.requests()[before + len(worker_requests) :]
    attempts = [f"/out/gen/_attempts/g{stage.generation}/{s:05d}-a{s}/part-{s:05d}.parquet" for s in range(6)]
    # a worker's shard is a single PutObject (no multipart upload's create, part and complete)
    assert sorted(r.split(" ", 1)[1].split("/", 2)[2] for r in worker_requests) == sorted(
        a.lstrip("/") for a in attempts
    ) and all(r.startswith("PUT ") and "?" not in r for r in worker_requests)
    bucket = stage.location.path.split("/")[0]
    copies = sorted(r for r in driver_requests if r.startswith("PUT ") and "/out/gen/part-" in r)
    assert copies == [f"PUT /{bucket}/out/gen/part-{s:05d}.parquet" for s in range(6)]  # one CopyObject each
    assert [r for r in driver_requests if "?delete" in r] == [f"POST /{bucket}?delete"]
    log_puts = [r for r in driver_requests if r.startswith(f"PUT /{bucket}/out/gen/_log/")]
    assert len(log_puts) == 1  # the group commit: one log record for the six shards
    assert len(driver_requests) == len(copies) + len(log_puts) + 1  # and nothing else
    assert _names(stage.location) == [f"_log/{n}" for n in _log_objects(stage)] + [
        f"part-{s:05d}.parquet" for s in range(6)
    ]


def test_sources_a_dead_driver_left_undeleted_are_collected_by_the_next_open(s3_env) -> None:
    root = location(f"{s3_env.bucket()}/out")
    stage = _open(root, n=3, background=True)
    assert stage.commit_many([_record(stage, s, f"a{s}") for s in range(3)]) == [True] * 3
    stage._wait_published()  # published, sources not yet deleted: the batch is not full; then the driver dies
    assert sum(n.startswith("_attempts/") for n in _names(root.child("gen"))) == 3
    reopened = _open(root, n=3)
    assert _ids(reopened) == [i for s in range(3) for i in range(s * 100, s * 100 + 3)]
    assert not any(n.startswith("_attempts/") for n in _names(root.child("gen")))
    assert reopened.pending() == []


# --- group commits -------------------------------------------------------------------------------------------


def _log_objects(stage: Stage) -> list[str]:
    return sorted(n for n in _names(stage.location.child("_log")) if not n.endswith(".segment.json"))


def test_a_group_commit_is_one_log_record_and_a_reopen_replays_every_shard_of_it(root: Location) -> None:
    stage = _open(root, n=6)
    before = _log_objects(stage)
    records = [_record(stage, s, f"a{s}") for s in (0, 1, 2)]
    twin = _record(stage, 1, "b1")  # a speculative twin returned in the same pass: the first one wins
    assert stage.commit_many([*records, twin]) == [True, True, True, False]
    added = sorted(set(_log_objects(stage)) - set(before))
    assert len(added) == 1  # one append for the three commits
    body = json.loads(stage.location.child("_log", added[0]).read_bytes())
    assert body["op"] == "commit" and [r["shard"] for r in body["records"]] == [0, 1, 2]
    assert not stage.location.child(f"_attempts/g{stage.generation}/00001-b1").list()  # the twin is deleted
    assert stage.commit_many([_record(stage, s, f"a{s}") for s in (3, 4, 5)]) == [True] * 3
    stage.finish()
    again = _open(root, n=6)
    assert again.committed() == set(range(6)) and again.is_complete()
    assert _ids(again) == [i for s in range(6) for i in range(s * 100, s * 100 + 3)]


def test_a_schema_change_inside_a_group_commits_the_records_before_it(root: Location) -> None:
    stage = _open(root, n=3)
    odd = write_table_shard(stage.ref(1, "x"), pa.table({"id": pa.array(["a"], pa.string())}))
    with pytest.raises(StoreError, match="shard 1's schema differs"):
        stage.commit_many([_record(stage, 0, "a0"), odd, _record(stage, 2, "a2")])
    stage.finish()
    assert _open(root, n=3).committed() == {0}  # shard 0 is committed; 1 and 2 run again


def test_a_log_of_single_commit_records_still_replays(tmp_path: Path) -> None:
    """Logs written before group commits hold one ``record`` per commit record."""
    stage = _open(location(tmp_path / "out"), n=2)
    stage.commit(_record(stage, 0, "a0"))
    stage.finish()
    log = stage.location.child("_log")
    for name in _names(log):
        body = json.loads(log.child(name).read_bytes())
        for rec in body.get("records", [body]) if name.endswith(".segment.json") else [body]:
            if rec.get("op") == "commit":
                rec["record"] = rec.pop("records")[0]
        log.child(name).write_bytes(json.dumps(body).encode())
    assert _open(location(tmp_path / "out"), n=2).committed() == {0}


def test_objects_over_the_single_copy_limit_are_copied_in_parts(s3_env, monkeypatch) -> None:
    monkeypatch.setattr(storage, "MAX_SINGLE_COPY", 5 * 1024**2)  # S3's smallest part: 5 MiB
    where = location(f"{s3_env.bucket()}/big")
    data = os.urandom(12 * 1024**2)
    where.child("src.bin").write_bytes(data)
    where.child("src.bin").move_to(where.child("dest.bin"), size=len(data))
    assert where.child("dest.bin").read_bytes() == data and _names(where) == ["dest.bin"]
    key = where.child("dest.bin").path.split("/", 1)[1]
    etag = storage._s3_client(where.uri).head_object(Bucket=where.path.split("/")[0], Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart object of three parts, not one CopyObject


# --- taking over from a dead holder -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A real single-node Ray head (no CPUs: no workers) on a free port; stopped by pid, never ``ray stop``."""
    address, temp = _start_head()
    try:
        yield address
    finally:
        _kill_cluster(temp)


def _kill_cluster(temp: str) -> None:
    """SIGKILL every process of this cluster only: those whose command line names its temp folder or its GCS
    port, and their descendants (Ray's agents name neither)."""
    port = Path(temp, "port").read_text().strip() if Path(temp, "port").exists() else None
    parents: dict[int, int] = {}
    ours: set[int] = set()
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if temp.encode() in cmdline or (port and f":{port}".encode() in cmdline):
            ours.add(pid)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= more
        grew = bool(more)
    ours.discard(os.getpid())
    for pid in ours:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(pid) for pid in ours):
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_head() -> tuple[str, str]:
    """``ray start --head`` on a free port with its own temp folder; returns its address and the folder."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="rayfence")
    Path(temp, "port").write_text(str(port))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0"]
    cmd += ["--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    except BaseException:
        _kill_cluster(temp)
        raise
    return f"127.0.0.1:{port}", temp


_HOLDER = """
import json, os, socket, sys, time, ray
from conva.batch.lease import OutputLease
from conva.batch.storage import location
from conva.jobs.common import RAY_PROBE
if sys.argv[5] != "-":  # the driver runs on another machine (a head pod): its pid means nothing here
    socket.gethostname = lambda: sys.argv[5]
if sys.argv[4] == "late":  # as the CLI does: the lease first, then Ray
    lease = OutputLease(location(sys.argv[1]), "conva run", ttl_s=float(sys.argv[3]), probe=RAY_PROBE)
    lease.__enter__()
    print(json.dumps(json.loads(location(sys.argv[1]).child("_lease.json").read_bytes())), flush=True)
    os.environ["RAY_ADDRESS"] = sys.argv[2]
    from conva.jobs.common import connect_ray
    connect_ray()
else:
    ray.init(address=sys.argv[2], logging_level=40)
    lease = OutputLease(location(sys.argv[1]), "conva run", ttl_s=float(sys.argv[3]), probe=RAY_PROBE)
    lease.__enter__()
print(json.dumps(json.loads(location(sys.argv[1]).child("_lease.json").read_bytes())), flush=True)
if sys.argv[4] == "exit":
    ray.shutdown()
    os._exit(0)  # the driver ends without releasing: its Ray job is finished
time.sleep(600)
"""


def _holder(out: Path, address: str, ttl: float, mode: str, host: str = "-") -> tuple[subprocess.Popen, dict]:
    """A driver in its own process, connected to Ray, holding the lease; returns it and its lease body.

    ``host``: the host name it records (another machine's, so that its pid cannot show it dead)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(out), address, str(ttl), mode, host],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-3000:]
    return proc, json.loads(line)


@pytest.mark.slow
def test_a_live_holder_on_a_live_cluster_is_refused(ray_head: str, tmp_path: Path) -> None:
    proc, held = _holder(tmp_path, ray_head, 60.0, "hold", host="ray-head-pod")
    try:
        assert held["ray"]["gcs_address"].endswith(ray_head.split(":")[1]) and held["ray"]["job_id"]
        with pytest.raises(LeaseError, match="being written by another driver"):
            OutputLease(location(tmp_path), "conva run", ttl_s=60.0, probe=RAY_PROBE).acquire()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_lease_taken_before_ray_names_the_cluster_and_job_as_soon_as_ray_is_connected(
    ray_head: str, tmp_path: Path
) -> None:
    proc, before = _holder(tmp_path, ray_head, 600.0, "late", host="ray-head-pod")  # no heartbeat for 100 s
    try:
        after = json.loads(proc.stdout.readline())
        assert before["ray"] == {} and after["epoch"] == before["epoch"] and after["owner"] == before["owner"]
        assert after["ray"]["gcs_address"].endswith(ray_head.split(":")[1]) and after["ray"]["job_id"]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_the_lease_of_a_finished_ray_job_is_taken_over_at_once(ray_head: str, tmp_path: Path) -> None:
    proc, held = _holder(tmp_path, ray_head, 60.0, "exit", host="ray-head-pod")
    proc.wait(60)
    lease = OutputLease(location(tmp_path), "conva run", ttl_s=60.0, probe=RAY_PROBE)
    with lease:  # a fresh heartbeat, yet taken: the cluster reports the holder's job finished
        assert lease.epoch == held["epoch"] + 1
        assert json.loads((tmp_path / "_lease.json").read_text())["owner"] == lease.owner


@pytest.mark.slow
def test_a_holder_whose_cluster_is_gone_is_taken_over_once_stale_with_no_flag(tmp_path: Path) -> None:
    """The head of the holder's cluster is killed with the driver (a RayJob's head pod dies); the retry, with
    no flag, waits for the heartbeat to go stale and takes over."""
    address, temp = _start_head()
    proc = None
    try:
        proc, held = _holder(tmp_path, address, 4.0, "hold", host="ray-head-pod")
        assert held["host"] == "ray-head-pod" and held["ray"]["cluster_id"]
        proc.kill()  # kill -9 of the driver ...
        proc.wait()
        _kill_cluster(temp)  # ... and of every process of the head
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        _kill_cluster(temp)
    last_beat = json.loads((tmp_path / "_lease.json").read_text())["heartbeat"]
    started = time.monotonic()
    with OutputLease(location(tmp_path), "conva run", ttl_s=4.0, probe=RAY_PROBE) as lease:
        taken, waited = time.time(), time.monotonic() - started
        assert lease.epoch == held["epoch"] + 1
    assert taken >= last_beat + 4.0  # only once the heartbeat was stale ...
    # ... and by itself (no break_stale was given): within the ttl, one probe of the gone cluster (a 5 s
    # timeout) and a poll, with room for a loaded 2-core machine.
    assert waited < 4.0 + 10.0


def test_a_stale_holder_whose_death_cannot_be_shown_still_needs_break_lease(tmp_path: Path) -> None:
    """No Ray identity and another host: nothing shows the holder dead, so only --break-lease takes it."""
    held = {"owner": "x", "epoch": 3, "job": "conva run", "host": "elsewhere", "pid": 1, "started": 0}
    (tmp_path / "_lease.json").write_text(json.dumps({**held, "heartbeat": time.time() - 120}))
    with pytest.raises(LeaseError, match="stale lease.*--break-lease"):
        OutputLease(location(tmp_path), "conva run").acquire()
    lease = OutputLease(location(tmp_path), "conva run", break_stale=True)
    lease.acquire()
    assert lease.epoch == 4
    lease.release()


def test_a_holder_whose_cluster_address_answers_nothing_is_waited_for_then_taken(tmp_path: Path) -> None:
    """A holder on another host whose recorded GCS address no longer answers (a fresh port: nothing listens)."""
    ray_info = {
        "gcs_address": f"127.0.0.1:{_free_port()}",
        "cluster_id": uuid.uuid4().hex,
        "job_id": "01000000",
    }
    held = {"owner": "x", "epoch": 1, "job": "conva run", "host": "elsewhere", "pid": 1, "started": 0}
    (tmp_path / "_lease.json").write_text(
        json.dumps({**held, "heartbeat": time.time() - 1.0, "ray": ray_info})
    )
    started = time.monotonic()
    with OutputLease(location(tmp_path), "conva run", ttl_s=2.0) as lease:
        assert lease.epoch == 2 and 0.9 <= time.monotonic() - started < 3.0
