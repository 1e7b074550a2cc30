"""A real local Ray cluster: ``ray start --head`` on loopback, ``ray job submit`` of the run job, Parquet checks.

The head runs with ``--block`` in its own process group, and is stopped by signalling that group:
``ray stop`` would also kill any other Ray on the machine (e.g. the one ``test_ray_jobs`` starts in
this pytest session). Its own temp folder and free ports keep it apart from that one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conva.config import load_config
from conva.pipeline import steering_rows
from conva.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def cluster():
    gcs, dashboard, client, agent = _free_ports(4)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}",
         "--num-cpus=2", "--disable-usage-stats"],
        env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{dashboard}/api/version", 90)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the group this test started, and only it
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


@pytest.mark.slow
def test_run_job_submitted_to_a_local_cluster(cluster, tmp_path) -> None:
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--config", "examples/tiny.toml", f"--model.name={model}", f"--output.dir={out}",
            "--ray.num_workers=2", "--ray.rows_per_shard=3"]
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster, "--working-dir", str(REPO), "--",
         sys.executable, "-m", "jobs.run", *args[:2], *args[2:]],
        env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    cfg = load_config(REPO / "examples" / "tiny.toml", args[2:])
    ids = steering_rows(cfg).column("row_id").to_pylist()
    gens = ds.dataset(out / "generations").to_table()
    got = gens.column("row_id").to_pylist()
    assert len(got) == len(ids) == len(set(got)) and set(got) == set(ids)
    assert gens.column("error").null_count == len(got)
    manifest = json.loads((out / "generations" / "_manifest.json").read_text())
    assert len(manifest["shards"]) == -(-len(ids) // 3)  # every shard committed, none twice
    for value in cfg.data.values:
        assert (out / "bundles" / value / "vectors.safetensors").is_file()
        assert (out / "bundles" / value / "meta.json").is_file()
    assert "joined Ray cluster" in (out / "run.log").read_text()
