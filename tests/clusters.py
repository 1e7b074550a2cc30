"""A two-node Ray cluster with two filesystems on one machine, for tests that must cross a node boundary.

Layout (see /work/shared/ENVIRONMENT.md, "A multi-node Ray cluster on one machine")::

    private network namespace (unshare -n: only lo; held by a shell that waits on the test process)
    ├── head node:   ray start --head --num-cpus=0     sees the machine's disk as is
    └── worker node: ray start --address … --num-cpus=N, in its own mount namespace
                     (unshare -m --propagation private) with an empty tmpfs over ``head_only``

With no CPUs on the head, every actor lands on the worker, while ``ray job submit`` runs the driver on
the head. ``shared`` is the same folder on both nodes (as an NFS mount would be); a file the head
writes under ``head_only`` is invisible to the worker. Everything talks over the namespace's own
loopback, so nothing can reach (or be reached from) the machine's real network, and fixed ports cannot
collide with another Ray on the machine. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` (needed for a second
node) is set only inside the namespace.

Teardown never runs ``ray stop`` (it would kill every Ray on the machine): it signals the two nodes'
process groups, then the process holding the namespace kills by pid whatever is still inside it
(Ray's workers and the job driver start their own process groups), and teardown fails loudly if
anything survives. The holder does the same if the test process dies without tearing down. The
worker's tmpfs lives only in its mount namespace, so it goes with the last process. Needs root
(for ``unshare``) and util-linux's ``unshare``/``nsenter``/``mount`` plus iproute2's ``ip``.

Example::

    with two_node_cluster() as cluster:
        job = cluster.submit(["--config", "examples/tiny.toml", f"--output.dir={cluster.shared / 'out'}"])
        assert job.returncode == 0, job.output
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "JobRun",
    "TwoNodeCluster",
    "two_node_cluster",
    "session_driver_env",
    "MODEL_LOAD_MARKER",
    "REQUIRED_TOOLS",
]

REPO = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent
RAY = str(_BIN / "ray")
REQUIRED_TOOLS = ("unshare", "nsenter", "mount", "ip")

# What transformers prints on a worker when it loads weights (its load progress bar). Tests use it
# both ways: present in a run that steers (the control), absent when pre-flight must stop the job first.
MODEL_LOAD_MARKER = "Loading weights"

# Inside the private namespace nothing else listens, so these fixed ports are free by construction.
# The two nodes get disjoint worker-port ranges (they share the namespace's loopback), and the Ray
# client server sits outside both (the head refuses to start otherwise).
_GCS_PORT, _DASHBOARD_PORT, _CLIENT_PORT = 6379, 8265, 10001
_HEAD_AGENT_PORT, _WORKER_AGENT_PORT = 52365, 52366
_HEAD_WORKER_PORTS, _WORKER_WORKER_PORTS = (10002, 10999), (11000, 19999)
_OBJECT_STORE_BYTES = 256 * 2**20  # plenty for the tiny model; the default (30% of RAM, per node) is not


class JobRun(NamedTuple):
    """One ``ray job submit``: its exit status, the client's output (the driver's log included), its wall
    time in seconds, and the submission id (for :meth:`TwoNodeCluster.job`)."""

    returncode: int
    output: str
    seconds: float
    submission_id: str


@dataclass
class TwoNodeCluster:
    """A running two-node cluster (made by :func:`two_node_cluster`); every command runs inside its namespace.

    ``address`` is the job API (``http://127.0.0.1:8265``, reachable only inside the namespace: use
    :meth:`submit`, :meth:`run` or :meth:`get`). ``shared`` is visible to both nodes; ``head_only``
    exists on both but the worker sees an empty tmpfs there. ``startup_seconds``: from nothing to two
    live nodes. :meth:`restart` kills both nodes and starts them again (the node ids change).
    """

    root: Path
    shared: Path
    head_only: Path
    address: str
    head_node_id: str
    worker_node_id: str
    startup_seconds: float
    _netns: str
    _worker_pid: int
    _procs: list[subprocess.Popen] = field(default_factory=list)  # the namespace's holder, then the nodes
    _worker_cpus: int = 2
    restarts: int = 0  # the head's host name is ray-head-<restarts>

    def restart(self, timeout: float = 120) -> float:
        """``kill -9`` every process of the cluster (the head's Ray, the job's driver, the worker node and its
        actors: a head pod lost with what ran beside it), then start both nodes afresh, on the same ports
        and folders; returns the seconds it took. ``shared`` keeps its files; the worker's tmpfs is new; the
        new head's host name is another (``ray-head-<restarts>``), as a new head pod's would be.
        """
        start = time.monotonic()
        holder, nodes = self._procs[0], self._procs[1:]
        ns_id = os.readlink(self._netns)
        deadline = time.monotonic() + 30
        while (
            left := [pid for pid in _in_netns(ns_id) if pid != holder.pid]
        ) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        _wait_all(nodes, 10)
        if left:
            raise RuntimeError(f"processes survived kill -9 in the cluster's namespace: {left}")
        del self._procs[1:]
        # `ray start --head` refuses when its temp folder names a running cluster at its address and any
        # process on the machine (another namespace's, e.g. another test's head on 6379) is a GCS there.
        (self.root / "th" / "ray_current_cluster").unlink(missing_ok=True)
        self.restarts += 1
        self.head_node_id, self.worker_node_id, self._worker_pid = _start_nodes(
            self.root, self._netns, self._procs, self._worker_cpus, timeout, f"ray-head-{self.restarts}"
        )
        return time.monotonic() - start

    def submit_no_wait(self, args: Sequence[str], runtime_env: dict | None = None) -> str:
        """``ray job submit --no-wait`` of ``python -m conva.jobs.run <args>``; returns the submission id."""
        sid = f"conva-test-{uuid.uuid4().hex[:12]}"
        done = self.run(self._submit_command(sid, args, runtime_env, wait=False), timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray job submit --no-wait failed: {done.stdout[-2000:]}")
        return sid

    def _submit_command(
        self, sid: str, args: Sequence[str], runtime_env: dict | None, wait: bool = True
    ) -> list[str]:
        cmd = [RAY, "job", "submit", "--address", self.address, "--submission-id", sid]
        cmd += ["--working-dir", str(REPO)]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        if not wait:
            cmd.append("--no-wait")
        return [*cmd, "--", "python", "-m", "conva.jobs.run", *args]

    def run(
        self,
        cmd: Sequence[str],
        *,
        node: str = "head",
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the namespace, seeing the disk as ``node`` ("head" or "worker") does; output merged.

        ``env`` is added to the nodes' environment (no ``PYTHONPATH``; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``).
        Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
        """
        enter = ["nsenter", f"--net={self._netns}"]
        if node == "worker":
            enter.append(f"--mount=/proc/{self._worker_pid}/ns/mnt")
        elif node != "head":
            raise ValueError(f"node must be 'head' or 'worker', not {node!r}")
        return subprocess.run(
            [*enter, "--", *cmd],
            env={**_node_env(), **(env or {})},
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )

    def submit(self, args: Sequence[str], timeout: float = 300, runtime_env: dict | None = None) -> JobRun:
        """``ray job submit --working-dir <repo> -- python -m conva.jobs.run <args>``, waiting for the job to end.

        The driver runs on the head, from the uploaded working dir (``runtime_env``: more of Ray's runtime
        environment, e.g. ``env_vars`` for the driver and its workers). On timeout the job is stopped on
        the cluster and ``subprocess.TimeoutExpired`` is raised.
        """
        sid = f"conva-test-{uuid.uuid4().hex[:12]}"
        cmd = self._submit_command(sid, args, runtime_env)
        start = time.monotonic()
        try:
            done = self.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.run([RAY, "job", "stop", "--address", self.address, sid], timeout=60)
            raise
        return JobRun(done.returncode, done.stdout, time.monotonic() - start, sid)

    def get(self, path: str) -> object:
        """GET ``path`` (e.g. ``/api/jobs/``) from the dashboard, inside the namespace; the decoded JSON."""
        done = self.run([sys.executable, "-c", _HTTP_GET, self.address + path], timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"GET {path} failed: {done.stdout[-2000:]}")
        return json.loads(done.stdout)

    def job(self, submission_id: str) -> dict:
        """The job API's record of a submission: ``job_id`` (hex, None if no driver connected),
        ``driver_node_id``, ``status``, ``message``…"""
        return self.get(f"/api/jobs/{submission_id}")

    def actors(self, job_id: str) -> list[dict]:
        """Every actor the job created, dead or alive: ``class_name``, ``node_id``, ``state``… (Ray's state API)."""
        reply = self.get(
            f"/api/v0/actors?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D"
            f"&filter_values={job_id}"
        )
        return reply["data"]["result"]["result"]

    def worker_logs(self, job_id: str | None) -> str:
        """All that the job's worker processes on the worker node wrote to stdout and stderr ("" if none ran)."""
        if not job_id:
            return ""
        logs = sorted((self.root / "tw").glob(f"session_*/logs/worker-*-{job_id}-*.*"))
        return "".join(p.read_text(errors="replace") for p in logs if p.suffix in (".out", ".err"))


def session_driver_env() -> dict[str, str]:
    """The environment of a driver subprocess that joins this process's Ray (``RAY_ADDRESS``), as a driver on a
    cluster does, instead of starting a Ray of its own (~10 s on the 2-core machine). Its workers are the
    session's, so they follow the session's fault plan and reach S3 with the session's AWS variables."""
    import ray

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


@contextmanager
def two_node_cluster(worker_cpus: int = 2, timeout: float = 120) -> Iterator[TwoNodeCluster]:
    """Start the two-node cluster, yield it, and tear everything down (also when the body raises).

    Raises ``RuntimeError`` naming what is missing when this machine cannot host it (not root, a tool
    missing), and ``TimeoutError`` with the nodes' logs when a node does not come up in ``timeout`` s.
    """
    _check_host()
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="cv", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    shared, head_only = root / "shared", root / "head_only"
    for folder in (shared, head_only, root / "th", root / "tw"):
        folder.mkdir()
    procs: list[subprocess.Popen] = []
    netns = ""
    try:
        holder = _spawn(
            ["unshare", "-n", "--", "sh", "-c", _HOLDER, str(root)],
            root / "netns.log",
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        procs.append(holder)
        ready = holder.stdout.readline().strip() == b"up"
        holder.stdout.close()
        if not ready:
            raise RuntimeError(
                f"cannot bring up lo in a private network namespace: {_tail(root / 'netns.log')}"
            )
        netns = f"/proc/{holder.pid}/ns/net"
        head_id, worker_id, worker_pid = _start_nodes(root, netns, procs, worker_cpus, timeout, "ray-head-0")
        address = f"http://127.0.0.1:{_DASHBOARD_PORT}"
        yield TwoNodeCluster(
            root,
            shared,
            head_only,
            address,
            head_id,
            worker_id,
            time.monotonic() - start,
            netns,
            worker_pid,
            procs,
            worker_cpus,
        )
    finally:
        survivors = _teardown(procs, netns)
        shutil.rmtree(root, ignore_errors=True)
        if survivors:
            raise RuntimeError(f"processes survived the cluster's teardown: {survivors}")


def _start_nodes(
    root: Path, netns: str, procs: list[subprocess.Popen], worker_cpus: int, timeout: float, head_host: str
) -> tuple[str, str, int]:
    """Start the head (host name ``head_host``), then the worker in its own mount namespace (both appended to
    ``procs``); returns the head's and the worker's node ids and the worker's pid, once both are alive."""
    enter = ["nsenter", f"--net={netns}", "--"]
    # The head in a UTS namespace of its own, named like a pod: a restarted head is "another machine" (its
    # driver's pid says nothing about the old driver), as a KubeRay head pod's replacement is.
    named = ["unshare", "-u", "--", "sh", "-c", 'hostname "$0" && exec "$@"', head_host]
    procs.append(_spawn([*enter, *named, *_head_command(root)], root / "head.log", env=_node_env()))
    address = f"http://127.0.0.1:{_DASHBOARD_PORT}"
    probe = TwoNodeCluster(root, root / "shared", root / "head_only", address, "", "", 0.0, netns, 0)
    _wait(lambda: probe.get("/api/version"), procs, timeout, root)
    mount_then_exec = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
    worker = _spawn(
        [
            *enter,
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            mount_then_exec,
            str(root / "head_only"),
            *_worker_command(root, worker_cpus),
        ],
        root / "worker.log",
        env=_node_env(),
    )
    procs.append(worker)
    nodes = _wait(lambda: _two_alive(probe), procs, timeout, root)
    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
    return head_id, worker_id, worker.pid


# Holds the network namespace open until its stdin closes, that is when the test process lets go of it
# or dies, however it dies (even SIGKILL); then kills every process left in the namespace and removes
# the cluster's folder ($0), so a killed test run cannot leave a cluster behind.
_HOLDER = """ip link set lo up && echo up || exit 1
read -r _
me=$(readlink /proc/$$/ns/net)
for _ in 1 2 3 4 5 6 7 8 9 10; do
  found=
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" != $$ ] && [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$me" ] && kill -9 "$pid" 2>/dev/null && found=1
  done
  [ -z "$found" ] && break
  sleep 0.2
done
rm -rf "$0"
"""

# A dependency-free HTTP GET, run by the venv's Python inside the namespace.
_HTTP_GET = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
)


def _node_env() -> dict[str, str]:
    """The nodes' environment: ours, minus PYTHONPATH (the job must run from its uploaded working dir)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{_BIN}{os.pathsep}{env.get('PATH', '')}",
    )  # `python` in an entrypoint is this venv's
    return env


def _head_command(root: Path) -> list[str]:
    return [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=0",
        "--node-ip-address=127.0.0.1",
        f"--port={_GCS_PORT}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={_DASHBOARD_PORT}",
        f"--ray-client-server-port={_CLIENT_PORT}",
        f"--dashboard-agent-listen-port={_HEAD_AGENT_PORT}",
        f"--min-worker-port={_HEAD_WORKER_PORTS[0]}",
        f"--max-worker-port={_HEAD_WORKER_PORTS[1]}",
        f"--object-store-memory={_OBJECT_STORE_BYTES}",
        f"--temp-dir={root / 'th'}",
        "--disable-usage-stats",
    ]


def _worker_command(root: Path, cpus: int) -> list[str]:
    return [
        RAY,
        "start",
        "--block",
        f"--address=127.0.0.1:{_GCS_PORT}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        f"--dashboard-agent-listen-port={_WORKER_AGENT_PORT}",
        f"--min-worker-port={_WORKER_WORKER_PORTS[0]}",
        f"--max-worker-port={_WORKER_WORKER_PORTS[1]}",
        f"--object-store-memory={_OBJECT_STORE_BYTES}",
        f"--temp-dir={root / 'tw'}",
        "--disable-usage-stats",
    ]


def _check_host() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the two-node cluster needs {', '.join(missing)} (util-linux, mount, iproute2)")
    if os.geteuid() != 0:
        raise RuntimeError("the two-node cluster needs root (unshare -n / -m and mount)")


def _spawn(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    stdout: int | None = None,
    stdin: int = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group, to signal it as one), stderr to ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            cmd,
            env=env,
            start_new_session=True,
            stdin=stdin,
            stdout=stdout if stdout is not None else fh,
            stderr=fh,
        )


def _two_alive(cluster: TwoNodeCluster) -> list[dict] | None:
    nodes = cluster.get("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    return alive if len(alive) == 2 else None


def _wait(check, procs: list[subprocess.Popen], timeout: float, root: Path):
    """Poll ``check`` until it returns something truthy; errors count as "not yet", a dead node as failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError(
                f"a cluster process exited while starting; head: {_tail(root / 'head.log')}; "
                f"worker: {_tail(root / 'worker.log')}"
            )
        try:
            if result := check():
                return result
        except (RuntimeError, KeyError, ValueError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    raise TimeoutError(
        f"the cluster did not come up in {timeout} s; head: {_tail(root / 'head.log')}; "
        f"worker: {_tail(root / 'worker.log')}"
    )


def _tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else "(no log)"


def _teardown(procs: list[subprocess.Popen], netns: str) -> list[int]:
    """Stop the nodes by process group, then let the holder kill the rest; the pids still alive after that."""
    holder, nodes = procs[:1], procs[1:]
    for proc in nodes:
        _signal_group(proc, signal.SIGTERM)
    _wait_all(nodes, 2)  # Ray shuts down slowly on SIGTERM; its state is thrown away anyway
    for proc in nodes:
        _signal_group(proc, signal.SIGKILL)
    ns_id = os.readlink(netns) if netns else ""
    for proc in holder:
        proc.stdin.close()  # the holder's cue to kill what is left in the namespace, then exit
        _wait_all(holder, 10)
        _signal_group(proc, signal.SIGKILL)
    _wait_all(procs, 10)
    return _in_netns(ns_id) if ns_id else []


def _in_netns(ns_id: str) -> list[int]:
    """Pids of live processes in the network namespace ``ns_id`` (all started by this cluster)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") == ns_id and _alive(entry):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return pids


def _alive(proc_dir: Path) -> bool:
    """False for a zombie: it is dead, only waiting for its parent to reap it."""
    return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
