"""The runner's tails and faults on real Ray, with fake workers (``steer.backend = "fake"``, workers/fake.py).

Fake workers sleep instead of computing and write real Parquet shards through the store, so these tests
exercise the real pool, runner and store in seconds: a fake worker imports no torch; a straggler gets a
speculative attempt and every shard is still committed once, each row exactly once, with no attempt
left behind; a hardware-class error replaces the worker and the shard succeeds on another; the restart
budget grows with the pool and the run's length.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conva.batch.config import Config
from conva.batch.storage import location
from conva.workers.errors import classify
from conva.workers.pool import WorkerPool
from conva.workers.simulation import simulate
from conva.workers.tasks import WorkerSpec

pytestmark = pytest.mark.slow

ROWS = 3


def _cfg(workers: int, seconds: float, **ray_keys: object) -> Config:
    cfg = Config()
    ray_cfg = cfg.ray.model_copy(
        update=dict(
            num_workers=workers,
            min_workers=workers,
            num_cpus_per_worker=0.0,
            fake_shard_seconds=seconds,
            **ray_keys,
        )
    )
    return cfg.model_copy(update=dict(steer=cfg.steer.model_copy(update=dict(backend="fake")), ray=ray_cfg))


def _row_ids(stage) -> list[int]:
    return sorted(stage.dataset().to_table(columns=["row_id"]).column("row_id").to_pylist())


def _maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_a_fake_worker_imports_no_torch_and_writes_one_row_per_input_row(ray_session, tmp_path) -> None:
    import ray

    from conva.workers.worker import ModelWorker

    pool = WorkerPool(WorkerSpec(_cfg(2, 0.05)), "fake", ())
    pool.start()
    try:
        m, stage = simulate(location(str(tmp_path / "out")), pool.spec.cfg, 6, rows=ROWS, pool=pool)
        pids = {member.info["pid"] for member in pool.members}
        assert len(pids) == 2 and not any(_maps_torch(pid) for pid in pids)
    finally:
        pool.stop()
    assert (m.committed, m.rows) == (6, 6 * ROWS)
    assert _row_ids(stage) == list(range(6 * ROWS))
    # The check can fail: a model worker's process (it sets torch's threads as it starts) maps torch.
    model = ray.remote(ModelWorker).options(num_cpus=0).remote(WorkerSpec(Config()))
    try:
        pid = ray.get(model.ready.remote())["pid"]
        assert _maps_torch(pid)
    finally:
        ray.kill(model, no_restart=True)


def _straggler_run(tmp_path: Path, faults, speculate_after: float) -> tuple[float, object, Path]:
    faults(slow={"stage": "steer", "shard": 25, "seconds": 8})
    cfg = _cfg(3, 0.2, speculate_after=speculate_after, shard_timeout_s=0.0)
    out = tmp_path / f"out-{speculate_after:g}"
    t0 = time.monotonic()
    m, stage = simulate(location(str(out)), cfg, 30, rows=ROWS)  # stops its pool: the loser is killed
    return time.monotonic() - t0, (m, stage), out / "generations"


def test_a_straggler_gets_a_speculative_attempt_and_each_shard_commits_once(
    ray_session, tmp_path, faults, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="conva.jobs")
    wall, (m, stage), folder = _straggler_run(tmp_path, faults, speculate_after=3.0)
    assert (
        "a speculative attempt on" in caplog.text and "the speculative attempt finished first" in caplog.text
    )
    # 30 shards of 0.2 s on 3 workers is 2 s of work: the job ends long before the straggler's 8 s.
    assert m.run_s < 6.0, m
    assert (m.committed, m.rows) == (30, 30 * ROWS)
    assert _row_ids(stage) == list(range(30 * ROWS))
    parts = sorted(p.name for p in folder.glob("part-*.parquet"))
    assert parts == [f"part-{i:05d}.parquet" for i in range(30)]
    assert sum(pq.read_metadata(folder / p).num_rows for p in parts) == 30 * ROWS
    # The loser (still asleep when the run ended) was collected: no attempt is left in the stage.
    assert [p for p in (folder / "_attempts").rglob("*") if p.is_file()] == []


def test_without_speculation_the_straggler_sets_the_wall(ray_session, tmp_path, faults) -> None:
    wall, (m, stage), _ = _straggler_run(tmp_path, faults, speculate_after=0.0)
    assert m.run_s >= 8.0, m  # the control: the same run waits for the straggler's 8 s
    assert _row_ids(stage) == list(range(30 * ROWS))


def test_a_hardware_error_replaces_the_worker_and_retries_the_shard(
    ray_session, tmp_path, faults, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="conva.jobs")
    faults(fail={"stage": "steer", "shard": 4, "times": 1, "error": "CUDAError"})
    cfg = _cfg(2, 0.05, max_restarts=1)
    pool = WorkerPool(WorkerSpec(cfg), "fake", ())
    pool.start()
    first = {member.info["pid"] for member in pool.members}
    try:
        m, stage = simulate(location(str(tmp_path / "out")), cfg, 10, rows=ROWS, pool=pool)
        pool.grow()
        time.sleep(0.1)
        now = {member.info["pid"] for member in pool.members}
    finally:
        pool.stop()
    assert pool.replacements == 1
    assert "hardware error on worker" in caplog.text and "CUDA error: an illegal memory access" in caplog.text
    assert len(first - now) == 1  # the worker that raised it is gone
    assert (m.committed, m.rows) == (10, 10 * ROWS)
    assert _row_ids(stage) == list(range(10 * ROWS))


def test_hardware_errors_are_classified_by_type_or_the_device_message() -> None:
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == "hardware"
    assert (
        classify(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1, unhandled system error")) == "hardware"
    )
    assert classify(RuntimeError("CUDA error: uncorrectable ECC error encountered")) == "hardware"
    assert classify(RuntimeError("shape mismatch")) == "fatal"
    assert classify(ValueError("CUDA error: in a ValueError is a bug, not the device")) == "fatal"
    assert classify(OSError("connection reset")) == "transient"


def test_the_restart_budget_grows_per_worker_per_hour() -> None:
    cfg = _cfg(40, 1.0, max_restarts=2, restarts_per_worker_hour=0.5)
    pool = WorkerPool(WorkerSpec(cfg), "fake", ())
    assert pool.restart_budget == 2
    pool.since -= 2 * 3600  # two hours into the run: 2 + 0.5 x 40 workers x 2 h
    assert pool.restart_budget == 42
    flat = WorkerPool(WorkerSpec(_cfg(40, 1.0, max_restarts=2, restarts_per_worker_hour=0.0)), "fake", ())
    flat.since -= 2 * 3600
    assert flat.restart_budget == 2


def test_preflight_waits_for_an_autoscaler_then_says_what_it_asked_for(ray_session) -> None:
    from ray.autoscaler.sdk import request_resources

    from conva.jobs.common import JobError
    from conva.jobs.nodes import wait_for_hosts

    base = Config()
    gpu = base.ray.model_copy(
        update=dict(num_gpus_per_worker=1.0, min_workers=2, num_workers=4, startup_timeout_s=3.0)
    )
    # No node has a GPU. Without an autoscaler none ever will: refused at once, pointing at the setting.
    t0 = time.monotonic()
    with pytest.raises(
        JobError, match="no node can host a worker with 1 CPU and 1 GPU .*ray.autoscaling = true"
    ):
        wait_for_hosts(base.model_copy(update=dict(ray=gpu)))
    assert time.monotonic() - t0 < 2.0
    # With one, "none yet": it asks for min_workers workers' resources and waits out the start-up timeout.
    t0 = time.monotonic()
    try:
        with pytest.raises(
            JobError, match=r"no node could host a worker with 1 CPU and 1 GPU after 3 s .* asked for 2"
        ):
            wait_for_hosts(
                base.model_copy(update=dict(ray=gpu.model_copy(update=dict(autoscaling=True)))), poll_s=0.5
            )
    finally:
        request_resources(bundles=[])  # withdraw the request from this cluster
    assert 3.0 <= time.monotonic() - t0 < 6.0
    # A node that fits is taken at once, autoscaling or not.
    assert wait_for_hosts(
        base.model_copy(update=dict(ray=base.ray.model_copy(update=dict(autoscaling=True))))
    )


def test_a_parquet_input_is_planned_from_its_metadata_and_a_change_is_still_seen(tmp_path) -> None:
    import pyarrow as pa

    from conva.batch.inputs import plan_input

    path = tmp_path / "prompts.parquet"
    rows = [{"value": "power", "prompt": f"prompt {i}"} for i in range(100)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=30)
    seen: list[int] = []

    def screen(name: str, records: list) -> None:
        seen.extend(r.row for r in records)

    full = plan_input(str(path), 8)
    meta = plan_input(str(path), 8, screen, metadata_only=True, screen_rows=5)
    assert list(meta.slices) == list(full.slices) and meta.rows == full.rows == 100
    assert seen == list(range(1, 9))  # whole shards up to the budget: the workers screen the rest
    seen.clear()
    plan_input(str(path), 8, screen, metadata_only=True, screen_rows=9)
    assert seen == list(range(1, 17))
    assert (
        plan_input(str(path), 8, metadata_only=True).sha256 == meta.sha256
    )  # the same file, the same identity
    rows[57]["prompt"] = "prompt 5X"  # same length, one value changed
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=30)
    assert plan_input(str(path), 8, metadata_only=True).sha256 != meta.sha256


def test_a_study_admits_a_waiting_model_when_nodes_join() -> None:
    import threading

    from conva.jobs.study import _Capacity

    cluster = {"CPU": 8.0, "GPU": 1.0}
    capacity = _Capacity(dict(cluster), probe=lambda: dict(cluster), refresh_s=0.05)
    one = {"CPU": 1.0, "GPU": 1.0}
    capacity.acquire(0, one)  # the first model takes the only GPU
    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: (capacity.acquire(1, one), admitted.set()), daemon=True)
    waiter.start()
    assert not admitted.wait(0.5)  # no GPU free, none released
    cluster["GPU"] = 2.0  # a GPU node joins (an autoscaler added it); the first model still runs
    assert admitted.wait(5.0)
    assert capacity.free == {"CPU": 6.0, "GPU": 0.0} and capacity.total == {"CPU": 8.0, "GPU": 2.0}


def test_a_json_lines_file_indexed_by_ray_tasks_off_the_driver_gets_the_same_plan(
    ray_session, tmp_path
) -> None:
    import os

    from conva.batch.inputs import plan_input
    from conva.workers.cluster_map import cluster_map

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"".join(b'{"prompt": "%d"}\n' % i + (b"\n" if i % 7 == 0 else b"") for i in range(300)))
    assert os.getpid() not in cluster_map(lambda _: os.getpid(), range(3))  # tasks run in Ray's workers

    on_cluster = plan_input(str(path), 8, map_ranges=cluster_map, range_bytes=500)
    here = plan_input(str(path), 8, range_bytes=500)
    assert path.stat().st_size > 10 * 500 and len(here.slices) > 10  # many ranges, many shards
    assert list(on_cluster.slices) == list(here.slices)
    assert (on_cluster.rows, on_cluster.sha256, on_cluster.files) == (here.rows, here.sha256, here.files)
    # A task's own error comes back, naming the node that could not read the file.
    with pytest.raises(FileNotFoundError, match=r"^on node 127\.0\.0\.1: .*gone\.jsonl"):
        cluster_map(lambda p: open(p).read(), [str(tmp_path / "gone.jsonl")])


def test_a_jobs_json_lines_prompts_are_indexed_by_ray_tasks_once_ray_is_joined(
    ray_session, tmp_path, monkeypatch
) -> None:
    from conva.batch import line_index
    from conva.batch.inputs import plan_input
    from conva.jobs import planning
    from conva.workers.cluster_map import cluster_map

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"".join(b'{"value": "power", "prompt": "p%d"}\n' % i for i in range(200)))
    ranges: list[int] = []

    def spy(fn, bounds):
        bounds = list(bounds)
        ranges.append(len(bounds))
        return cluster_map(fn, bounds)

    monkeypatch.setattr(planning, "cluster_map", spy)
    monkeypatch.setattr(line_index, "RANGE_BYTES", 500)  # many ranges from a small file
    cfg = Config()
    cfg = cfg.model_copy(update=dict(data=cfg.data.model_copy(update=dict(prompts=str(path)))))
    spec = planning.steering_spec(cfg, "generations", {})
    assert ranges == [-(-path.stat().st_size // 500)]  # one task per range, in one map
    here = plan_input(str(path), cfg.ray.steer_shard_rows)
    assert list(spec.input.slices) == list(here.slices) and spec.input.sha256 == here.sha256
    assert spec.n_shards == len(here.slices) > 10
    # A cluster with no CPU yet (autoscaling from zero worker nodes): tasks would wait, so threads index here.
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0})
    again = planning.steering_spec(cfg, "generations", {})
    assert len(ranges) == 1 and list(again.input.slices) == list(here.slices)
