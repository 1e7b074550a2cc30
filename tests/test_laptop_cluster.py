"""Cluster entry on a laptop, as a user meets it: the README's ``ray job submit`` recipe, a dead RAY_ADDRESS, leases.

* The README's "On a laptop: ray job submit" lines run as written, with free ports instead of 6379/8265,
  the venv's Python for ``conva``, and a private ``--temp-dir`` and free ports for Ray's other services
  added to ``ray start`` (other Rays run on this machine, as the README says): the head starts on 127.0.0.1, the submitted tiny job runs to its last line, and
  Ctrl-C on the head stops every process it started.
* A job with ``RAY_ADDRESS`` at which nothing answers is refused within seconds, naming the address.
* ``--break-lease`` on a fresh lease says that its holder is alive and since when; ``validate`` on a
  stale one says what a run *would* do, and changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.toml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe() -> list[str]:
    """The shell lines of the README's laptop recipe, as written."""
    section = (REPO / "README.md").read_text().split("\n### On a laptop: ray job submit\n", 1)[1]
    body = re.search(r"```bash\n(.*?)```", section, re.S)
    assert body is not None
    return [line for line in body[1].splitlines() if line.strip() and not line.startswith("#")]


def _processes_under(marker: str) -> list[int]:
    """Pids of live processes whose command line holds ``marker`` (this test's own Ray temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split()[2]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_the_laptop_recipe_runs_as_written(tmp_path) -> None:
    start, submit = recipe()
    gcs, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="conva-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        CONVA_CACHE=str(tmp_path / "cache"),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    (tmp_path / "examples").symlink_to(REPO / "examples")
    # `ray` run by this interpreter: Ray starts its workers and the job's driver with the Python that runs it
    ray = tmp_path / "bin" / "ray"
    ray.parent.mkdir()
    ray.write_text(
        f"#!{sys.executable}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"
    )
    ray.chmod(0o755)
    RAY = str(ray)

    def local(line: str) -> str:
        line = line.replace("--port=6379", f"--port={gcs}").replace("8265", str(dashboard))
        line = re.sub(r"^ray ", f"{shlex.quote(RAY)} ", line)
        return line.replace(" -- conva ", f" -- {shlex.quote(sys.executable)} -m conva.jobs.cli ")

    head = subprocess.Popen(
        shlex.split(local(start))
        + [f"--temp-dir={temp}"]
        + [  # Ray's other fixed default ports, which another Ray on this machine may hold
            f"--{name}={_free_port()}"
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "ray-client-server-port",
            )
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # Ctrl-C reaches it as in a terminal, even when this test runs in a background job (whose shell
        # starts it with SIGINT ignored, a disposition children inherit)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # the job server answers once the dashboard is up
            probe = subprocess.run(
                [RAY, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                env=env,
                capture_output=True,
                timeout=60,
            )
            if probe.returncode == 0:
                break
            assert head.poll() is None and time.monotonic() < deadline, probe.stderr[-2000:]
            time.sleep(2)
        while True:  # a fresh head's job agent comes up a little after its job server: Ray asks to retry
            done = subprocess.run(
                ["bash", "-c", local(submit)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        shown = done.stdout + done.stderr
        assert re.search(
            r"conva run: done in \d+ s: extract \d+/\d+, fit 2/2, steer 1/1 shards run now", shown
        )
        assert "succeeded" in shown
        assert list((tmp_path / "runs" / "tiny-submitted" / "generations").glob("part-*.parquet"))
        assert _processes_under(temp)  # the head's processes run until it is stopped
        head.send_signal(signal.SIGINT)  # Ctrl-C in terminal 1
        head.wait(120)
        deadline = time.monotonic() + 60
        while _processes_under(temp) and time.monotonic() < deadline:
            time.sleep(1)
        assert _processes_under(temp) == []  # everything it started is gone
    finally:
        for pid in _processes_under(temp):  # only this test's own Ray, found by its private folder
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _cli(cwd: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "conva.jobs.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "CONVA_CACHE": str(cwd / "cache"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, time.monotonic() - t0


def test_a_ray_address_that_answers_nothing_is_refused_in_seconds(tmp_path) -> None:
    port = _free_port()
    done, seconds = _cli(
        tmp_path,
        "run",
        "--config",
        TINY,
        f"--output.dir={tmp_path / 'out'}",
        env={"RAY_ADDRESS": f"127.0.0.1:{port}"},
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"conva run: error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} "
        "(ConnectionRefusedError: [Errno 111] Connection refused). Start one there (`ray start --head "
        "--node-ip-address=127.0.0.1 --port=6379` on a laptop), or unset RAY_ADDRESS to run on an embedded "
        "local Ray"
    ), done.stderr[-2000:]
    assert seconds < 60, seconds  # Ray's own retries take minutes


def _lease(out: Path, age_s: float) -> dict:
    now = time.time()
    held = {
        "owner": "x",
        "job": "conva run",
        "host": "another-host",
        "pid": 4242,
        "started": now - age_s - 30,
        "heartbeat": now - age_s,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "_lease.json").write_text(json.dumps(held))
    return held


def test_break_lease_on_a_fresh_lease_says_the_holder_is_alive_and_validate_says_what_it_would_do(
    tmp_path,
) -> None:
    out = tmp_path / "out"
    held = _lease(out, age_s=1)
    args = ["validate", "--config", TINY, f"--output.dir={out}", "--break-lease"]
    done, _ = _cli(tmp_path, *args)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["started"]))
    assert done.returncode == 2
    assert re.fullmatch(
        rf"conva validate: error: {re.escape(str(out))}: --break-lease breaks only a stale lease, and this one "
        rf"is fresh: its holder \(conva run, pid 4242 on another-host, started {started}\) renewed it \d+ s ago, "
        r"so it is alive \(a lease goes stale after output.lease_ttl_s=60 s without a heartbeat\)\. Wait for it "
        r"to finish, or stop it and rerun",
        done.stderr.strip().splitlines()[-1],
    ), done.stderr
    before = _lease(out, age_s=600)
    done, _ = _cli(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{out}: a run would break the stale lease of conva run, pid 4242 on another-host" in done.stderr
    assert json.loads((out / "_lease.json").read_text()) == before  # validate changed nothing
