"""Checks a job runs before any model loads: fail in seconds, naming the key, the node and the path.

Two halves:

* :func:`plan_job` on the driver, writing nothing: the config, the model's existence (no weights
  loaded), the backend, what the model needs against the GPUs it is given, the inputs (planned in one
  streaming pass, never held), every stage's config against what the output already holds, and for a
  ``steer`` job that the bundles were made for this model.
* :func:`check_nodes` on the cluster, once Ray is up and before any worker starts: one small task per
  node that could host a worker checks that it sees the output the driver sees (it reads a token the
  driver wrote there and writes one the driver reads back), that it finds the model, and that it can
  read every input the workers read. A node that cannot gets an error naming it and the path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field, replace

import conva.jobs.builtin_stages  # noqa: F401  (registers the built-in stages before any job is planned)
from conva.batch.badrows import RowTally
from conva.batch.config import RESULT_NEUTRAL_KEYS, Config
from conva.batch.schemas import SCHEMA_VERSION
from conva.batch.storage import S3_HINT, Location, s3_setup_problem
from conva.batch.store import stage_status
from conva.bundle import BUNDLE_FILES, BundleError, decode_bundle
from conva.data import DataError
from conva.jobs.common import JobError
from conva.jobs.planning import check_error_fraction, is_file_source
from conva.jobs.registry import declared, stage_decl
from conva.jobs.stages import (
    StageSpec,
    check_stages,
)
from conva.models import ModelNotFoundError, check_model, model_name

__all__ = [
    "ModelJob",
    "StagePlan",
    "plan_job",
    "stage_plans",
    "check_error_fraction",
    "check_run_errors",
    "check_nodes",
    "check_output",
    "worker_inputs",
    "model_bytes",
    "check_gpu_fit",
    "wait_for_hosts",
]

_log = logging.getLogger("conva.jobs")
_NODE_CHECK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ModelJob:
    """One model's job as pre-flight planned it: its config, output, stages, and the files workers read."""

    cfg: Config
    out: Location
    specs: tuple[StageSpec, ...]
    reads: tuple[str, ...] = ()  # input files (paths or URIs) the workers read themselves
    label: str = ""
    extra: dict = field(default_factory=dict)
    rows: dict[str, RowTally] = field(default_factory=dict)  # config key → its bulk input's rows, screened

    def spec(self, name: str) -> StageSpec | None:
        return next((s for s in self.specs if s.name == name), None)


def plan_job(
    cfg: Config,
    out: Location,
    stages: tuple[str, ...],
    overwrite: bool,
    *,
    label: str = "",
    extra: list[StageSpec] | tuple = (),
    reads: tuple[str, ...] = (),
) -> ModelJob:
    """Everything ``stages`` (of extract, fit, steer) need, checked and planned; raises naming the key. Writes nothing.

    ``extra``: further stages the job writes (a study's), which steer with the model's bundles; ``reads``:
    further files its workers read themselves (checked on every node). A bulk prompts file is screened
    row by row while it is planned (:attr:`ModelJob.rows`); one with more bad rows than
    ``data.max_error_fraction`` is refused here, before any model loads.
    """
    try:
        check_model(cfg.model.name)
    except ModelNotFoundError as err:
        raise JobError(f"model.name: {err}") from err
    if "steer" in stages or extra:
        check_backend_settings(cfg)
    check_output(out)
    screened: dict[str, RowTally] = {}
    specs = [*model_specs(cfg, stages, screened), *extra]
    if "steer" in stages and "fit" not in stages:
        check_bundles(cfg, out)  # first: "made for another model" says more than the keys that differ
    check_stages(out, specs, overwrite)
    reads = (*worker_inputs(cfg), *reads) if "steer" in stages else tuple(reads)
    return ModelJob(cfg, out, tuple(specs), reads, label or model_name(cfg.model.name), rows=screened)


@dataclass(frozen=True)
class StagePlan:
    """What a run would do to one stage it writes, read from the stage's log without writing.

    ``committed``: shards already committed for this config (kept; an interrupted ``--overwrite`` resumes
    its own). ``replaces``: the keys in which the published output differs, which ``--overwrite``
    replaces (``published`` shards of it) once the new run is complete.
    """

    spec: StageSpec
    committed: int = 0
    replaces: tuple[str, ...] = ()
    published: int = 0

    @property
    def pending(self) -> int:
        return self.spec.n_shards - self.committed


def stage_plans(job: ModelJob, overwrite: bool) -> list[StagePlan]:
    """Per stage the job writes, what is committed and what would run (see :class:`StagePlan`); writes nothing."""
    plans = []
    for spec in job.specs:
        if not spec.writes:
            continue
        status = stage_status(
            job.out, spec.folder, spec.config, SCHEMA_VERSION, ignore_keys=RESULT_NEUTRAL_KEYS
        )
        if not status.exists:
            plans.append(StagePlan(spec))
        elif status.mismatch:  # without --overwrite, plan_job refused already
            plans.append(
                StagePlan(spec, status.resumable if overwrite else 0, status.mismatch, status.committed)
            )
        else:
            plans.append(StagePlan(spec, min(status.committed, spec.n_shards)))
    return plans


def check_run_errors(cfg: Config, folder: str, tally: RowTally) -> None:
    """After a run: refuse (exit non-zero) a stage whose committed rows hold more error rows than allowed.

    The rows are committed and stay so; what only the workers find (a prompt over the token limit)
    counts toward ``data.max_error_fraction`` here, as the screened rows did before the run.
    """
    limit = cfg.data.max_error_fraction
    if tally.rows and tally.bad > limit * tally.rows:
        raise JobError(
            f"{folder}: {tally.bad} of {tally.rows} rows ({tally.bad / tally.rows:.0%}) are error rows, more "
            f"than data.max_error_fraction = {limit:g} allows: {tally.one_line()}. The rows are committed "
            "(see the `error` column); fix the input, or raise --data.max_error_fraction"
        )


def check_output(out: Location) -> None:
    """The output can be written, as far as the driver can tell without writing (every node checks later).

    A local path: its nearest existing ancestor is a writable folder on a filesystem that stores files
    (not ``/proc``, ``/sys``, ``/dev``). An object store: credentials are configured (S3: see
    :func:`s3_setup_problem`), the bucket exists and the credentials reach it.
    """
    if out.is_local:
        probe = out.uri
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise JobError(f"output.dir: {out} is not writable: {probe} is a file, not a folder")
        mount, kind = _mount_of(probe)
        if kind in _SPECIAL_FILESYSTEMS:
            raise JobError(
                f"output.dir: {out} is on {mount}, a {kind} filesystem (the kernel's view, not storage): "
                "choose a folder on a disk or a shared mount"
            )
        if not os.access(probe, os.W_OK | os.X_OK):
            raise JobError(f"output.dir: {out} is not writable: no write permission on {probe}")
        return
    problem = s3_setup_problem(out.uri) if out.uri.startswith("s3://") else None
    if problem is not None:
        raise JobError(f"output.dir: {problem}")
    bucket = out.path.split("/", 1)[0]
    try:
        found = out.fs.get_file_info(bucket)
    except OSError as err:
        raise JobError(
            f"output.dir: cannot reach {out}: {err}{S3_HINT if out.uri.startswith('s3://') else ''}"
        ) from err
    if found.type.name == "NotFound":
        raise JobError(f"output.dir: the bucket of {out} does not exist")


# Filesystems that hold the kernel's state, not files: an output there fails on its first write.
_SPECIAL_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "mqueue",
        "hugetlbfs",
        "binfmt_misc",
        "efivarfs",
        "autofs",
    }
)


def _mount_of(path: str) -> tuple[str, str]:
    """The mount point holding ``path`` and its filesystem type, from ``/proc/self/mounts`` (``("", "")`` if unknown)."""
    try:
        with open("/proc/self/mounts") as fh:
            mounts = [line.split()[1:3] for line in fh if len(line.split()) > 2]
    except OSError:
        return "", ""
    real = os.path.realpath(path)
    best = ("", "")
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, kind)
    return best


def model_specs(
    cfg: Config, stages: tuple[str, ...], screened: dict[str, RowTally] | None = None
) -> list[StageSpec]:
    """The specs of the stages a job on ``stages`` writes, plus the ones it only reads (those they need).

    Each is planned by its declaration (:mod:`conva.jobs.registry`), in registration order.
    ``screened`` receives the screened rows of a bulk prompts file (see :func:`steering_spec`).
    """
    needed = set(stages) | {d for name in stages for d in stage_decl(name).after}
    specs = []
    for decl in declared():
        if decl.name in needed and decl.plan is not None:
            spec = decl.plan(decl, cfg, screened if screened is not None else {})
            specs.append(replace(spec, writes=decl.name in stages))
    return specs


def worker_inputs(cfg: Config) -> tuple[str, ...]:
    """Input files the workers read themselves (every other input is planned and written by the driver)."""
    source = cfg.data.prompts
    return (source,) if is_file_source(source) else ()


def check_backend_settings(cfg: Config) -> None:
    """The steering backend can be built here and supports the worker shape asked for."""
    from conva.workers.backends import check_backend

    try:
        check_backend(cfg.steer.backend)
    except NotImplementedError as err:
        raise JobError(str(err)) from err
    if cfg.steer.backend == "vllm" and cfg.ray.num_gpus_per_worker > 1:
        raise JobError(
            f"ray.num_gpus_per_worker: {cfg.ray.num_gpus_per_worker:g} GPUs per worker would need vLLM's "
            "tensor parallelism, which runs the model's layers in other processes; ConVA's steering op keeps "
            "its state in the engine's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so it cannot steer "
            'there. Use steer.backend = "hf" (it spreads the model over the worker\'s GPUs) or one GPU.'
        )


def check_bundles(cfg: Config, out: Location) -> None:
    """For a ``steer`` job: every value's bundle is there and was made for this model (read from files only)."""
    from conva.fingerprint import file_fingerprint

    fingerprint = file_fingerprint(cfg.model.name, cfg.model.dtype)
    for value in cfg.data.values:
        folder = out.child("bundles", value)
        try:
            files = {name: folder.child(name).read_bytes() for name in BUNDLE_FILES}
        except (FileNotFoundError, OSError):
            raise JobError(
                f"data.values: no bundle for {value!r} in {folder.parent()}; run `conva fit` first"
            ) from None
        try:
            decode_bundle(files, folder.uri, fingerprint=fingerprint)
        except BundleError as err:
            raise JobError(f"model.name: {err}") from err


_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_bytes(cfg: Config) -> int | None:
    """Bytes of the model's weights as loaded: its safetensors files, rescaled from their dtype to ``model.dtype``.

    None where that cannot be read from local files (a hub id, the packaged GGUF models).
    """
    path = check_model(cfg.model.name)
    if not os.path.isdir(path):
        return None
    stored = sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")
    )
    if not stored:
        return None
    try:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    stored_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return stored * _WIDTH[cfg.model.dtype] // _WIDTH.get(stored_dtype, 4)


def check_gpu_fit(cfg: Config, gpu_memory: dict[str, list[int]] | None = None) -> None:
    """Refuse a model that cannot fit the GPUs each worker gets (weights × 1.2 for activations and cache).

    ``gpu_memory``: node → bytes of each of its GPUs (from :func:`check_nodes`); without it nothing is known
    yet and nothing is refused.
    """
    r = cfg.ray
    if not gpu_memory or r.num_gpus_per_worker <= 0 or cfg.model.device == "cpu":
        return
    weights = model_bytes(cfg)
    if weights is None:
        return
    per_worker = math.floor(r.num_gpus_per_worker) if r.num_gpus_per_worker >= 1 else r.num_gpus_per_worker
    for node, gpus in gpu_memory.items():
        if not gpus:
            continue
        room = min(gpus) * per_worker
        if weights * 1.2 > room:
            raise JobError(
                f"ray.num_gpus_per_worker: {cfg.model.name} needs about {weights * 1.2 / 2**30:.1f} GiB "
                f"({weights / 2**30:.1f} GiB of {cfg.model.dtype} weights + 20 %), but a worker on node {node} "
                f"gets {r.num_gpus_per_worker:g} GPU(s) of {min(gpus) / 2**30:.0f} GiB = {room / 2**30:.1f} GiB; "
                "give each worker more GPUs (the HF backend spreads the model over them) or a smaller dtype"
            )


# --- on every node ------------------------------------------------------------------------------------------


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


def bundles_complete(out: Location) -> bool:
    status = stage_status(out, stage_decl("fit").folder)
    return status.exists and status.committed == status.n_shards
