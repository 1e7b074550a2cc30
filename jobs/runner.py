"""One job from the command line to its outputs: parse, pre-flight, lease, open the stages, run them, publish.

Order matters for "fail fast, write nothing": everything that can be checked without a model is
checked first (:func:`conva.jobs.preflight.plan_job`); then the output's lease is taken (a second driver is
refused); only then are the stages opened, ``config.json`` and ``run.log`` written, Ray joined, every
node checked, and the workers started, last, and not at all when every shard is already committed.
One pool of model workers serves all the job's stages (:func:`run_model`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping

from conva.batch.badrows import RowTally
from conva.batch.config import Config
from conva.batch.inputs import InputPlan, files_line, layout_lines
from conva.batch.lease import OutputLease
from conva.batch.store import ShardRecord, Stage, stage_status
from conva.jobs.common import (
    COMMANDS,
    EXPECTED_ERRORS,
    RAY_PROBE,
    JobError,
    connect_ray,
    interrupted,
    interrupts,
    log_config,
    output_location,
    parse_args,
    report_interrupt,
    run_log,
    setup_logging,
    write_config,
)
from conva.jobs.nodes import check_nodes
from conva.jobs.preflight import (
    ModelJob,
    check_gpu_fit,
    check_run_errors,
    plan_job,
    stage_plans,
)
from conva.jobs.registry import job_names, job_stages, stage_decl
from conva.jobs.stages import StageResult, open_stages, stage_runs
from conva.workers.calls import Cancelled, ShardFailedError
from conva.workers.pool import WorkerPool, WorkerStartError
from conva.workers.scheduler import run_stages
from conva.workers.tasks import StageRun, WorkerSpec

__all__ = ["JOBS", "run_job", "run_planned", "run_model", "main", "FAILURES", "final_line", "committed_line"]

_log = logging.getLogger("conva.jobs")


class _Jobs(Mapping[str, tuple[str, ...]]):
    """job → the stages it writes, read from the stage registry (:func:`conva.jobs.registry.job_stages`)
    each time, so a stage registered later is a job too."""

    def __getitem__(self, job: str) -> tuple[str, ...]:
        if job not in job_names():
            raise KeyError(job)
        return job_stages(job)

    def __iter__(self) -> Iterator[str]:
        return iter(job_names())

    def __len__(self) -> int:
        return len(job_names())


JOBS: Mapping[str, tuple[str, ...]] = _Jobs()
FAILURES: tuple[type[BaseException], ...] = (
    *EXPECTED_ERRORS,
    ShardFailedError,
    WorkerStartError,
    NotImplementedError,
)


def run_job(
    job: str, cfg: Config, overwrite: bool = False, *, break_lease: bool = False
) -> list[StageResult]:
    """Run job ``job`` (a key of :data:`JOBS`) with ``cfg``; returns what each stage did.

    Side effects: writes ``<output.dir>/{activations,bundles,generations}/``, ``config.json`` (when what it
    describes is published) and appends to ``run.log``; with ``overwrite``, **replaces a stage written with another config** once the new
    run has committed all its shards (until then the old output stays readable).
    """
    cfg, out = output_location(cfg)
    return run_planned(job, plan_job(cfg, out, JOBS[job], overwrite), overwrite, break_lease=break_lease)


def run_planned(job: str, plan: ModelJob, overwrite: bool, *, break_lease: bool = False) -> list[StageResult]:
    """:func:`run_job` on a job :func:`~conva.jobs.preflight.plan_job` planned (the CLI keeps the plan, to report on it)."""
    start = time.monotonic()
    with (
        OutputLease(
            plan.out,
            f"conva {job}",
            ttl_s=plan.cfg.output.lease_ttl_s,
            break_stale=break_lease,
            probe=RAY_PROBE,
        ),
        run_log(plan.out),
    ):
        # config.json describes what readers see: a run that replaces a published generation (--overwrite)
        # writes it once the new generation is published, so an interrupted overwrite leaves the old pair.
        replacing = any(p.replaces for p in stage_plans(plan, overwrite))
        if not replacing:
            write_config(plan.cfg, plan.out)
        log_config(plan.cfg, job, overwrite)
        for line in input_notes(plan):
            _log.warning("data.prompts: %s", line.removeprefix("warning: "))
        try:
            results = run_model(plan, WorkerSpec(plan.cfg), overwrite)
            if replacing:
                write_config(plan.cfg, plan.out)
        except KeyboardInterrupt as err:
            _log.warning(
                "job %s interrupted by %s after %.1f s; committed: %s",
                job,
                interrupted(err),
                time.monotonic() - start,
                committed_line(plan),
            )
            raise
        _log.log(
            logging.WARNING if any(r.error_rows for r in results) else logging.INFO,
            "job %s done in %.1f s: %s",
            job,
            time.monotonic() - start,
            final_line(results, plan),
        )
        return results


def input_notes(plan: ModelJob) -> list[str]:
    """The bulk prompts file's layout notes (blank lines, CSV rows spanning lines), as validate prints them."""
    spec = plan.spec("steer")
    return layout_lines(spec.input) if spec is not None and isinstance(spec.input, InputPlan) else []


def final_line(results: list[StageResult], plan: ModelJob | None = None) -> str:
    """What a job did, for its last line: shards run per stage, then its rows (over all committed shards).

    For the steering stage: rows read, steered, gated off, neutral and error rows by reason, and the
    files of a prompts file or folder read and skipped.
    """
    parts = [", ".join(f"{r.stage} {r.processed}/{r.shards}" for r in results) + " shards run now"]
    for r in results:
        if r.stage == "steer" and r.tally is not None and r.tally.rows:
            text = f"{r.folder}: {r.tally.counts()}"
            if r.tally.bad:
                text += f" (see the `error` column: {r.tally.one_line()})"
            parts.append(text)
        elif r.error_rows:
            parts.append(
                f"{r.folder}: {r.error_rows} of {r.input_rows} {_row_unit(r.stage)} are error rows (see the "
                "`error` column)"
            )
    counted = any(r.stage == "steer" and r.tally is not None and r.tally.rows for r in results)
    if (
        not counted
        and not any(r.error_rows for r in results)
        and any(_row_unit(r.stage, "") for r in results)
    ):
        parts.append("no error rows")
    spec = plan.spec("steer") if plan is not None else None
    if spec is not None and isinstance(spec.input, InputPlan):
        parts.append(f"data.prompts {files_line(spec.input)}")
    return "; ".join(parts)


def committed_line(plan: ModelJob) -> str:
    """``activations 5/5, generations 3/9 shards``: what the plan's stages hold now (the run's own generation)."""
    stages: dict[str, Stage] = plan.extra.get("stages", {})
    parts = []
    for spec in plan.specs:
        if not spec.writes:
            continue
        stage = stages.get(spec.name)
        if stage is not None:
            parts.append(f"{spec.folder} {len(stage.committed())}/{stage.n_shards}")
        else:
            status = stage_status(plan.out, spec.folder)
            parts.append(f"{spec.folder} {status.committed if status.exists else 0}/{spec.n_shards}")
    return ", ".join(parts) + " shards"


class _Tally:
    """Per stage: shards and rows committed in this run, error rows by reason, first and last commit times."""

    def __init__(self) -> None:
        self.shards: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.bad: defaultdict[str, RowTally] = defaultdict(RowTally)
        self.last: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, stage: str, record: ShardRecord) -> None:
        with self.lock:
            self.shards[stage] += 1
            self.rows[stage] += record.rows
            if "reasons" in record.extra:
                self.bad[stage].merge(RowTally.from_json(record.extra["reasons"]))
            self.last[stage] = time.monotonic()
        if stage == "fit":
            e = record.extra
            opens = ", ".join(f"{k} {v:.2f}" for k, v in sorted(e.get("gate_open", {}).items()))
            _log.info(
                "fit: %s: band %s, best held-out accuracy %.3f, gate %s%s",
                e.get("value", f"bundle {record.shard}"),
                e.get("band"),
                e.get("best_test_acc", float("nan")),
                e.get("gate"),
                f" (opens on held-out: {opens})" if opens else "",
            )
            if e.get("skipped"):
                _log.warning(
                    "fit: %d text(s) were not recorded and are left out, e.g. %s",
                    e["skipped"],
                    "; ".join(f"{r['row_id']}: {r['error']}" for r in e.get("skipped_examples", [])),
                )


def _stage_errors(stage: Stage) -> RowTally:
    """The error rows of every committed shard of a stage (all runs), from the shards' records."""
    tally = RowTally()
    for record in stage.records():
        if "reasons" in record.extra:
            tally.merge(RowTally.from_json(record.extra["reasons"]))
    return tally


def run_model(
    job: ModelJob,
    spec: WorkerSpec,
    overwrite: bool,
    on_commit: Callable[[str, ShardRecord], None] | None = None,
    check_bundles: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[StageResult]:
    """Run the pending shards of every stage of ``job`` on one pool of model workers, then publish.

    Starts no Ray and no worker when every shard is already committed. The model is loaded once per
    worker and serves every stage; stages overlap where their dependencies allow. ``job.extra["stages"]``
    holds the open stages (for a report after an interruption); ``cancel`` stops the run from another
    thread (:class:`~conva.workers.calls.Cancelled`). The workers are stopped however the run ends.
    """
    t0 = time.monotonic()
    work = any(p.pending for p in stage_plans(job, overwrite))
    if work:  # before anything is written: every node must see the output, the model and the inputs
        connect_ray()
        check_gpu_fit(job.cfg, check_nodes(job))
    stages = open_stages(job.out, list(job.specs), overwrite)
    job.extra["stages"] = stages
    tally = _Tally()

    def committed(stage: str, record: ShardRecord) -> None:
        tally(stage, record)
        if on_commit is not None:
            on_commit(stage, record)

    runs = stage_runs(job.cfg, list(job.specs), stages, on_commit=committed, check_bundles=check_bundles)
    startup = 0.0
    if not runs:
        _log.info(
            "%s: every shard of %s is committed; nothing to do",
            job.label,
            ", ".join(s.folder for s in job.specs if s.writes),
        )
    else:
        if not work:  # a stage whose committed objects went missing runs again after all
            connect_ray()
            check_gpu_fit(job.cfg, check_nodes(job))
        startup = _run_pool(job, spec, runs, stages, tally, cancel) - t0
    return _stage_results(job, stages, tally, t0, startup)


def _run_pool(
    job: ModelJob,
    spec: WorkerSpec,
    runs: list[StageRun],
    stages: dict[str, Stage],
    tally: _Tally,
    cancel: threading.Event | None,
) -> float:
    """Start the pool, run ``runs`` on it, stop it and publish what is committed (also when interrupted);
    returns when its workers were ready (``time.monotonic()``)."""
    pool = WorkerPool(spec, job.label, _loads(job.cfg, [r.name for r in runs]))
    try:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{job.label}: cancelled before its workers started")
        pool.start()
        started = time.monotonic()
        run_stages(pool, runs, cancel)
    finally:
        pool.stop()
        for stage in stages.values():  # what is committed is published, also when interrupted
            stage.close(raise_error=False)
    job.extra.update(
        busy=pool.busy,
        returned_bytes=pool.returned_bytes,
        loads=dict(pool.loads),
        replacements=pool.replacements,
    )
    shards = sum(tally.shards.values())
    _log.info(
        "%s: workers returned %d bytes of shard records for %d shards (no shard data); model loads per "
        "worker: %s",
        job.label,
        pool.returned_bytes,
        shards,
        json.dumps(dict(pool.loads), sort_keys=True),
    )
    return started


def _stage_results(
    job: ModelJob, stages: dict[str, Stage], tally: _Tally, t0: float, startup: float
) -> list[StageResult]:
    """Per stage the job writes, once its publishing is finished: what this run did and its error rows
    (over every committed shard, this run's and earlier ones)."""
    results = []
    for s in job.specs:
        if not s.writes:
            continue
        stages[s.name].finish()
        now = tally.bad.get(s.name)
        if now is not None and now.bad:
            _log.warning(
                "%s: %d of %d %s written in this run are error rows (see the `error` column): %s",
                s.folder,
                now.bad,
                now.rows,
                _row_unit(s.name),
                now.one_line(),
            )
        whole = _stage_errors(stages[s.name])
        seconds = tally.last.get(s.name, time.monotonic()) - t0
        results.append(
            StageResult(
                s.name,
                s.n_shards,
                tally.shards[s.name],
                tally.rows[s.name],
                seconds,
                startup if tally.shards[s.name] else 0.0,
                s.folder,
                whole.bad,
                whole.rows,
                whole if _row_unit(s.name, "") else None,
            )
        )
    return results


def _row_unit(stage: str, default: str = "rows") -> str:
    """What one input row of ``stage`` is (its declaration's ``row_unit``); ``default`` for a stage without an
    error column."""
    return stage_decl(stage).row_unit or default


def _loads(cfg: Config, stages: list[str]) -> tuple[str, ...]:
    """What each worker loads when it starts: nothing for a fit alone; else the model (or the vLLM engine)."""
    if set(stages) <= {"fit"}:
        return ()
    if "extract" in stages or cfg.steer.backend == "hf":
        return ("hf",)
    return ("steer",)


def main(job: str, argv: list[str] | None = None) -> int:
    """``conva <job> --config FILE [--key=value ...] [--overwrite]``: 0 on success, 2 on a failure, 130/143 on a signal.

    The last line says what the job did and how many rows are error rows; after SIGINT or SIGTERM it
    says what is committed and how to resume.
    """
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    plan = None
    with interrupts():
        try:
            cfg, args = parse_args(f"conva {job}", argv, COMMANDS[job])
            cfg, out = output_location(cfg)
            plan = plan_job(cfg, out, JOBS[job], args.overwrite)
            start = time.monotonic()
            results = run_planned(job, plan, args.overwrite, break_lease=args.break_lease)
        except FAILURES as err:
            print(f"conva {job}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            return report_interrupt(job, err, committed_line(plan) if plan is not None else None, argv)
    print(f"conva {job}: done in {time.monotonic() - start:.0f} s: {final_line(results, plan)}")
    try:  # what only the workers found (prompts over the token limit) counts toward the limit too
        for r in results:
            if r.stage == "steer" and r.tally is not None:
                check_run_errors(plan.cfg, r.folder, r.tally)
    except JobError as err:
        print(f"conva {job}: error: {err}", file=sys.stderr)
        return 2
    return 0
