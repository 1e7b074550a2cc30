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
from dataclasses import dataclass, field, replace

import conva.jobs.builtin_stages  # noqa: F401  (registers the built-in stages before any job is planned)
from conva.batch.badrows import RowTally
from conva.batch.config import RESULT_NEUTRAL_KEYS, Config
from conva.batch.schemas import SCHEMA_VERSION
from conva.batch.storage import S3_HINT, Location, s3_setup_problem
from conva.batch.store import stage_status
from conva.bundle import BUNDLE_FILES, BundleError, decode_bundle
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
    "check_output",
    "worker_inputs",
    "model_bytes",
    "check_gpu_fit",
]

_log = logging.getLogger("conva.jobs")


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
    if tally.too_many_bad(limit):
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
    if cfg.steer.backend == "vllm":
        check_tensor_parallel(cfg.vllm.tensor_parallel_size, cfg.ray.num_gpus_per_worker)


def check_tensor_parallel(tp: int, gpus: float) -> None:
    """vLLM's tensor parallelism needs a GPU per rank in the worker (its ranks run on the worker's node, under
    vLLM's multiprocessing executor); a worker given several GPUs without it would leave all but one idle."""
    if tp > 1 and gpus < tp:
        raise JobError(
            f"vllm.tensor_parallel_size: {tp} ranks need ray.num_gpus_per_worker >= {tp} (each rank takes one "
            f"of its worker's GPUs), got {gpus:g}; raise ray.num_gpus_per_worker or lower the tensor parallelism"
        )
    if gpus > 1 and tp != gpus:
        raise JobError(
            f"ray.num_gpus_per_worker: {gpus:g} GPUs per worker are used by the vllm backend through vLLM's tensor "
            f'parallelism: set vllm.tensor_parallel_size = {gpus:g} (now {tp}), or use steer.backend = "hf" '
            "(it spreads the model over the worker's GPUs)"
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


def bundles_complete(out: Location) -> bool:
    status = stage_status(out, stage_decl("fit").folder)
    return status.exists and status.committed == status.n_shards
