"""Pre-flight on every node, before any model loads: each node reaches the output, the model and the inputs.

:func:`check_nodes` runs one small Ray task per node (:func:`_node_check`); :func:`wait_for_hosts` waits
for an autoscaling cluster to offer the nodes the job asks for. Both are called by the runner after
:func:`conva.jobs.preflight.plan_job` planned the job, and only when there is work to do.
"""

from __future__ import annotations

import logging
import time
import uuid

from conva.batch.config import Config
from conva.data import DataError
from conva.jobs.common import JobError
from conva.jobs.preflight import ModelJob
from conva.models import ModelNotFoundError, check_model

__all__ = ["check_nodes", "wait_for_hosts"]

_log = logging.getLogger("conva.jobs")

_NODE_CHECK_TIMEOUT_S = 120.0


def _node_check(token: str, expected: bytes, reply: str, model: str, reads: list[str]) -> dict:
    """Run on one node: can it see the output, find the model, read the inputs? Returns its problems."""
    import subprocess

    import ray

    from conva.batch.storage import Location as Loc

    problems: list[str] = []
    try:
        if Loc(token).read_bytes() != expected:
            problems.append(
                f"output.dir: {Loc(token).parent().parent().parent()} is not the folder the driver "
                f"writes: {token} holds other bytes"
            )
    except (FileNotFoundError, OSError) as err:
        problems.append(
            f"output.dir: cannot read {token}, which the driver wrote ({type(err).__name__}); this node "
            f"does not see the driver's output folder: output.dir must be storage every node shares "
            "(a shared mount or an object store)"
        )
    else:
        try:
            Loc(reply).write_bytes(expected)
        except OSError as err:
            problems.append(f"output.dir: cannot write {reply}: {type(err).__name__}: {err}")
    try:
        check_model(model)
    except ModelNotFoundError as err:
        problems.append(f"model.name: {err}")
    for source in reads:
        try:
            from conva.batch.storage import location
            from conva.data import data_files

            for file in data_files(source):
                with location(file).fs.open_input_stream(location(file).path) as stream:
                    stream.read(1)
        except (DataError, OSError, ValueError) as err:
            problems.append(f"data.prompts: cannot read {source}: {err}")
    gpus: list[int] = []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        gpus = [int(line) * 2**20 for line in out.stdout.split() if line.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "problems": problems,
        "gpus": gpus,
    }


def _hosts(wants: dict[str, float]) -> tuple[list[dict], list[dict]]:
    """The alive nodes, and those with the resources of one worker."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return nodes, [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in wants.items() if v)]


def _shape(nodes: list[dict]) -> str:
    return ", ".join(
        f"{n['NodeManagerAddress']} (CPU {n['Resources'].get('CPU', 0):g}, GPU {n['Resources'].get('GPU', 0):g})"
        for n in nodes
    )


def wait_for_hosts(cfg: Config, poll_s: float = 2.0) -> list[dict]:
    """The alive nodes that can host a worker; on an autoscaling cluster, wait for the first of them.

    Without ``ray.autoscaling``, no such node now means none ever: refuse at once. With it, "none yet"
    is normal (GPU groups that scale from zero): ask the autoscaler for ``ray.min_workers`` workers'
    resources (``ray.autoscaler.sdk.request_resources``) and wait up to ``ray.startup_timeout_s`` for a
    node, then refuse naming what was asked. Raises :class:`JobError`.
    """
    r = cfg.ray
    wants = {"CPU": r.num_cpus_per_worker, "GPU": r.num_gpus_per_worker}
    nodes, hosts = _hosts(wants)
    if hosts:
        return hosts
    one = f"{r.num_cpus_per_worker:g} CPU and {r.num_gpus_per_worker:g} GPU"
    if not r.autoscaling:
        raise JobError(
            f"ray: no node can host a worker with {one} (nodes: {_shape(nodes)}); lower "
            "ray.num_cpus_per_worker / ray.num_gpus_per_worker, add nodes, or set ray.autoscaling = true "
            "if the cluster adds nodes on demand"
        )
    from ray.autoscaler.sdk import request_resources

    bundle = {k: float(v) for k, v in wants.items() if v}
    n = max(1, min(r.min_workers, r.num_workers))
    request_resources(bundles=[bundle] * n)
    _log.info(
        "no node can host a worker with %s yet: asked the autoscaler for %d; waiting up to %.0f s "
        "(ray.startup_timeout_s)",
        one,
        n,
        r.startup_timeout_s,
    )
    deadline = time.monotonic() + r.startup_timeout_s
    while not hosts and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        nodes, hosts = _hosts(wants)
    if not hosts:
        raise JobError(
            f"ray: no node could host a worker with {one} after {r.startup_timeout_s:.0f} s "
            f"(ray.startup_timeout_s): the autoscaler was asked for {n} (ray.min_workers) and added none "
            f"(nodes now: {_shape(nodes)}); check that a worker group offers that much and can grow "
            "(its maxReplicas, `ray status`, the autoscaler's log)"
        )
    _log.info("%d node(s) can host a worker now", len(hosts))
    return hosts


def check_nodes(job: ModelJob) -> dict[str, list[int]]:
    """Run the node check on every alive node that can host one of the job's workers; raise naming node and path.

    Returns the GPU memory (bytes per GPU) of each checked node, for :func:`check_gpu_fit`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    hosts = wait_for_hosts(job.cfg)
    folder = job.out.child(f"_preflight-{uuid.uuid4().hex[:12]}")
    token, expected = folder.child("driver"), uuid.uuid4().hex.encode()
    try:
        token.write_bytes(expected)
    except OSError as err:
        raise JobError(f"output.dir: cannot write {token}: {type(err).__name__}: {err}") from err
    remote = ray.remote(num_cpus=0)(_node_check)
    calls = {}
    for n in hosts:
        reply = folder.child(f"node-{n['NodeID'][:12]}")
        strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ref = remote.options(scheduling_strategy=strategy).remote(
            token.uri, expected, reply.uri, job.cfg.model.name, list(job.reads)
        )
        calls[ref] = (n, reply)
    t0 = time.monotonic()
    try:
        ready, missing = ray.wait(list(calls), num_returns=len(calls), timeout=_NODE_CHECK_TIMEOUT_S)
        problems, gpus = [], {}
        for ref in missing:
            n = calls[ref][0]
            problems.append(
                f"node {n['NodeManagerAddress']} (id {n['NodeID']}) did not answer the pre-flight "
                f"check within {_NODE_CHECK_TIMEOUT_S:.0f} s"
            )
        for ref in ready:
            n, reply = calls[ref]
            found = ray.get(ref)
            name = f"node {found['ip']} (id {found['node']})"
            problems += [f"{name}: {p}" for p in found["problems"]]
            if not found["problems"]:
                try:
                    ok = reply.read_bytes() == expected
                except (FileNotFoundError, OSError):
                    ok = False
                if not ok:
                    problems.append(
                        f"{name}: output.dir: the node wrote {reply.uri} but the driver cannot read it "
                        "back: output.dir must be storage every node shares"
                    )
            gpus[found["ip"]] = found["gpus"]
    finally:
        folder.delete_tree()
    if problems:
        raise JobError("pre-flight: " + "; ".join(problems))
    _log.info("%s: pre-flight passed on %d node(s) in %.1f s", job.label, len(hosts), time.monotonic() - t0)
    return gpus
