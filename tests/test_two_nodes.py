"""The run job on two Ray nodes with two filesystems, submitted with ``ray job submit`` (issue 11).

The head has no CPUs, so the driver runs there and every actor on the worker; the model lives in the
folder both nodes share. (a) With the output on the shared folder too, extract → fit → steer
completes with every row once. (b) With the output in a folder only the head sees, pre-flight must
stop the job in seconds, naming the worker node and the path, before any model loads.

Whether a model loaded is read from the worker node's logs of the job (transformers' load bar,
``MODEL_LOAD_MARKER``); (a) checks that the marker is there when models do load, so its absence in
(b) means something.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conva.batch.config import load_config
from conva.batch.extraction import extraction_rows
from conva.batch.steer_rows import steering_rows
from conva.batch.storage import location
from conva.batch.store import StoreError
from conva.batch.store.log import replay
from conva.tiny import make_tiny_model
from tests.clusters import MODEL_LOAD_MARKER, TwoNodeCluster

REPO = Path(__file__).resolve().parents[1]
CONFIG = "examples/tiny.toml"
# Extraction in a few large shards (558 texts); the 8 prompts in shards of 3: three steering shards, two actors.
SHAPE = ["--ray.num_workers=2", "--ray.rows_per_shard=64", "--ray.steer_rows_per_shard=3"]


@pytest.fixture(scope="module")
def shared_model(two_nodes: TwoNodeCluster) -> str:
    return make_tiny_model(two_nodes.shared / "model")


@pytest.mark.slow
def test_output_on_the_shared_folder_has_every_row_once(two_nodes: TwoNodeCluster, shared_model: str) -> None:
    out = two_nodes.shared / "out"
    overrides = [f"--model.name={shared_model}", f"--output.dir={out}", *SHAPE]
    job = two_nodes.submit(["--config", CONFIG, *overrides], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    expected = steering_rows(load_config(REPO / CONFIG, overrides)).column("row_id").to_pylist()
    assert len(set(expected)) == len(expected) == 8
    got = ds.dataset(out / "generations", format="parquet").to_table(columns=["row_id", "error"])
    assert sorted(got.column("row_id").to_pylist()) == sorted(expected)
    assert got.column("error").null_count == got.num_rows
    # No terminal under `ray job submit`: progress comes as log lines, and the job's last line says its error rows.
    assert re.search(r"steer: shard 3 of 3 committed, [\d.]+ rows/s, ETA \d+m\d\ds", job.output), job.output[
        -4000:
    ]
    assert re.search(r"conva run: done in \d+ s: .*, no error rows", job.output), job.output[-4000:]

    record = two_nodes.job(job.submission_id)
    assert record["driver_node_id"] == two_nodes.head_node_id
    actors = two_nodes.actors(record["job_id"])
    assert len(actors) >= 2 and {a["node_id"] for a in actors} == {two_nodes.worker_node_id}, actors
    assert MODEL_LOAD_MARKER in two_nodes.worker_logs(record["job_id"])


@pytest.mark.slow
def test_output_on_a_head_only_folder_fails_in_preflight_naming_the_worker(
    two_nodes: TwoNodeCluster, shared_model: str
) -> None:
    out = two_nodes.head_only / "out"
    job = two_nodes.submit(
        ["--config", CONFIG, f"--model.name={shared_model}", f"--output.dir={out}", *SHAPE], timeout=300
    )
    tail = job.output[-4000:]
    assert job.returncode != 0, tail
    assert "pre-flight" in job.output.lower() and "127.0.0.1" in job.output, tail
    # Both nodes are 127.0.0.1 here: only the node id tells the worker from the head. (The path alone is
    # in the logged config too; with the node id on its line, it is the error that names it.)
    assert any(two_nodes.worker_node_id in line and str(out) in line for line in job.output.splitlines()), (
        tail
    )
    assert job.seconds < 60, f"took {job.seconds:.0f} s: {tail}"
    assert not (out / "activations").exists()
    assert two_nodes.run(["test", "!", "-e", str(out / "activations")], node="worker").returncode == 0
    assert MODEL_LOAD_MARKER not in two_nodes.worker_logs(two_nodes.job(job.submission_id).get("job_id"))


def _committed_shards(stage_dir: Path) -> int:
    """Shards the stage's commit log holds, as the store replays it (0 while a compaction moves records)."""
    try:
        return sum(len(g.shards) for g in replay(location(stage_dir)).gens.values())
    except StoreError:  # a single record listed, then deleted once its segment was written: ask again
        return 0


@pytest.mark.slow
def test_the_head_killed_mid_job_then_the_same_submit_resumes_with_every_row_once(
    two_nodes: TwoNodeCluster, shared_model: str
) -> None:
    """A RayJob retry after the head pod died: ``kill -9`` of the driver, the head's Ray and the worker node
    mid-extraction, a fresh cluster, then the same ``ray job submit`` with no flag. The new driver finds the
    lease's holder on a cluster that is gone, waits out the heartbeat and takes over; extraction resumes
    (only its pending shards run) and every row is in the output exactly once."""
    out = two_nodes.shared / "head-killed"
    plan = two_nodes.shared / "faults.json"
    plan.write_text(json.dumps({"sleep_s": 0.5}))  # each shard takes a while: room to kill mid-stage
    env = {"env_vars": {"CONVA_WORKER_HOOK": f"{REPO}/tests/faults.py:hook", "CONVA_TEST_FAULTS": str(plan)}}
    # One worker: what is checked is per shard (resumed, each row once); two actors are the first test's point.
    shape = ["--ray.num_workers=1", "--ray.rows_per_shard=16", "--ray.steer_rows_per_shard=3"]
    args = ["--config", CONFIG, f"--model.name={shared_model}", f"--output.dir={out}", *shape]
    args.append("--output.lease_ttl_s=5")
    two_nodes.submit_no_wait(args, runtime_env=env)
    deadline = time.monotonic() + 240
    while _committed_shards(out / "activations") < 3:
        assert time.monotonic() < deadline, "the first job committed nothing in 240 s"
        time.sleep(0.1)
    two_nodes.restart()
    before = _committed_shards(out / "activations")
    plan.write_text("{}")
    job = two_nodes.submit(args, timeout=300, runtime_env=env)
    assert job.returncode == 0, job.output[-4000:]
    pending = re.search(r"extract: (\d+) of (\d+) shards pending", job.output)
    assert pending, job.output[-4000:]
    assert 3 <= before < int(pending[2]) and int(pending[1]) == int(pending[2]) - before  # resumed mid-stage
    # Not by the old driver's pid (another host, as a new head pod is): its cluster is gone, so once stale.
    assert re.search(r"taking over the stale lease of .*ray-head-0.*cluster", job.output), job.output[-4000:]
    claims = sorted(int(p.name.split(".")[0]) for p in (out / "_lease.claims").glob("*.json"))
    assert claims[-1] >= 2  # the second driver took the lease over (the killed one never released it)
    acts = ds.dataset(out / "activations", format="parquet").to_table(columns=["row_id", "layer"])
    pairs = set(zip(acts.column("row_id").to_pylist(), acts.column("layer").to_pylist()))
    cfg = load_config(REPO / CONFIG, args[2:])
    texts = set(extraction_rows(cfg).column("row_id").to_pylist())
    assert len(pairs) == acts.num_rows and {r for r, _ in pairs} == texts  # each text's rows, each once
    expected = steering_rows(cfg).column("row_id").to_pylist()
    got = ds.dataset(out / "generations", format="parquet").to_table(columns=["row_id"]).column("row_id")
    assert sorted(got.to_pylist()) == sorted(expected)
