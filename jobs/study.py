"""`python -m conva.jobs.study --config FILE [--section.key=value ...] [--overwrite] [--validate]`: a whole study, one Ray job.

Per model, one pool of model workers runs every stage on the same runner as the run job
(:func:`conva.jobs.runner.run_model`), loading the model once per worker: extraction and fit
(``<out>/models/<slug>/{activations,bundles}``), then

* ``study_generations``: every cell's prompts in one steering table (per-row overrides);
* ``study_judged``: the judge's verdict and the answer's perplexity per generation, shard ``i`` as soon
  as generation shard ``i`` is committed;
* ``study_utility``: multiple-choice answers with each cell's steering and gate active;
* ``study_choice``: forced choice (:mod:`conva.choice`): every yes/no prompt's log-odds of the value's
  side, unsteered, under every studied value's vector (the cross-value matrix), the random control and
  gated ConVA;
* ``study_judge``: the judge's agreement on held-out labelled pairs.

**Models run at the same time** when the cluster has room for their workers (each model's ``ray``
section sizes its own pool: ``study.models`` may give a model its own ``model``/``ray``/``vllm``/
``steer``/``extract`` settings), and queue, in order, when it does not. Then a Ray task next to the
data rebuilds ``<out>/{results,pooled,matched,summary,utility,probes,judges,choice,specificity,cross_value,cosines}.parquet`` and
``<out>/report/`` from the committed stages. Bands a study asks for are checked against each model's
bundles once they are fitted, before anything is steered. A rerun skips every committed shard; a changed config is refused naming the keys
(``--overwrite`` replaces once the new run is complete). ``--validate`` checks and starts nothing.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from conva.batch.cells import (
    choice_cells,
    choice_table,
    expand_cells,
    steering_table,
    utility_cells,
    utility_table,
)
from conva.batch.config import Config
from conva.batch.lease import OutputLease
from conva.batch.sources import utility_questions
from conva.batch.storage import Location
from conva.batch.study import StudyConfig, check_bands, load_study, model_config, model_spec, study_dict
from conva.batch.summary import OUTPUT_FILES
from conva.jobs.common import (
    COMMANDS,
    RAY_PROBE,
    JobError,
    connect_ray,
    interrupted,
    interrupts,
    job_parser,
    log_context,
    output_location,
    report_interrupt,
    run_log,
    setup_logging,
    split_overrides,
)
from conva.jobs.planning import generated
from conva.jobs.preflight import ModelJob, plan_job, stage_plans
from conva.jobs.registry import stage_decl
from conva.jobs.runner import FAILURES, committed_line, run_model
from conva.jobs.stages import GeneratedInput, StageSpec, run_config, shard_config
from conva.judge_validation import labels_digest
from conva.mc import mc_prompts
from conva.models import ModelNotFoundError, check_model, model_name
from conva.workers.tasks import WorkerSpec

__all__ = ["run_study", "main", "OUTPUT_FILES", "study_jobs"]

_log = logging.getLogger("conva.jobs")


@dataclass(frozen=True)
class _ModelRun:
    """One model of the study: its planned job, the workers' settings and its cells."""

    job: ModelJob
    worker: WorkerSpec
    cells: tuple
    entry: str | dict


def study_jobs(study: StudyConfig, out: Location, overwrite: bool) -> list[_ModelRun]:
    """Pre-flight every model of the study (no writes): its config, stages, inputs and workers' settings."""
    runs = []
    judge = {**study_dict(study)["judge"], "fluency": study_dict(study)["fluency"]}
    cache = study.judge.cache_dir or (str(out.child("judge_cache")) if out.is_local else "")
    for entry in study.study.models:
        spec = model_spec(entry)
        try:
            check_model(spec)
        except ModelNotFoundError as err:
            raise JobError(f"study.models: {err}") from err
        cfg = model_config(study, entry, out.uri)
        cells, own = _study_stages(study, cfg, spec, judge)
        job = plan_job(
            cfg,
            Location(cfg.output.dir),
            ("extract", "fit"),
            overwrite,
            label=model_name(spec),
            extra=own,
            reads=_judge_reads(study),
        )
        worker = WorkerSpec(cfg, study.judge, study.fluency, study.utility, cache)
        runs.append(_ModelRun(job, worker, tuple(cells), entry))
    return runs


def _study_stages(study: StudyConfig, cfg: Config, spec: str, judge: dict) -> tuple[list, list[StageSpec]]:
    """One model's study cells and the specs of the stages the study adds to its job (steer over the
    study's cells, evaluate, utility, choice, agreement), each keyed on what decides its output."""
    # The labelled answers only validate the judge: they change the agreement stage, never the verdicts.
    verdicts, labels = {k: v for k, v in judge.items() if k != "labels"}, labels_digest(study.judge.labels)
    cells, ucells = expand_cells(study, spec), utility_cells(study, spec)
    if not study.study.generate:
        cells, ucells = [], []
    rps, base = cfg.ray.steer_shard_rows, run_config(cfg)
    steer_in = generated(steering_table(cfg, cells, study.study.generate_prompts), rps)
    util_in = generated(_utility_rows(study, ucells), rps)
    # One forward pass a row: shards as large as the job's, not as steering's (which generates).
    crs = cfg.ray.rows_per_shard
    choice_in = generated(choice_table(cfg, choice_cells(study, spec)), crs)
    gen = {
        **base,
        "cells": [c.id for c in cells],
        "shards": shard_config(rps, steer_in.table.num_rows, steer_in.sha256),
    }
    prompts = f"data.prompts = {cfg.data.prompts!r}"
    own = [
        StageSpec("steer", "study_generations", gen, steer_in.n_shards, steer_in, source=prompts),
        StageSpec("evaluate", stage_decl("evaluate").folder, {**gen, "judge": verdicts}, steer_in.n_shards),
        StageSpec(
            "utility",
            stage_decl("utility").folder,
            {
                **base,
                "utility": study_dict(study)["utility"],
                "shards": shard_config(rps, util_in.table.num_rows, util_in.sha256),
            },
            util_in.n_shards,
            util_in,
            source=f"utility.mc = {study.utility.mc!r}",
        ),
        StageSpec(
            "choice",
            stage_decl("choice").folder,
            {**base, "shards": shard_config(crs, choice_in.table.num_rows, choice_in.sha256)},
            choice_in.n_shards,
            choice_in,
            source=prompts,
        ),
        StageSpec("agreement", stage_decl("agreement").folder, {**base, "judge": judge, "labels": labels}, 1),
    ]
    return cells, own


def _judge_reads(study: StudyConfig) -> tuple[str, ...]:
    """Files the study's workers read themselves: the judge's labelled pairs when they are a file or folder."""
    pairs = study.judge.pairs
    if pairs == "demo":
        return ()
    return (pairs[len("paper:") :],) if pairs.startswith("paper:") else (pairs,)


def _utility_rows(study: StudyConfig, ucells) -> pa.Table:
    if not study.utility.mc:
        return utility_table([], [], [])
    items = utility_questions(study.job, study.utility.mc, study.utility.max_items)
    return utility_table(ucells, items, mc_prompts(items, study.utility.shots))


def run_study(
    study: StudyConfig,
    overwrite: bool = False,
    *,
    break_lease: bool = False,
    models: list[_ModelRun] | None = None,
) -> Location:
    """Run (or resume) every model of ``study``; returns the study's output holding the Parquet files and report.

    ``models``: the study's pre-flight (:func:`study_jobs`) when the caller made it already. Side effects:
    writes under ``job.output.dir``; with ``overwrite``, **replaces stages written with another config**
    once the new ones are complete.
    """
    job_cfg, out = output_location(study.job)
    study = study.model_copy(update={"job": job_cfg})
    models = study_jobs(study, out, overwrite) if models is None else models
    start = time.monotonic()
    with (
        OutputLease(
            out,
            f"conva study {study.study.name}",
            ttl_s=job_cfg.output.lease_ttl_s,
            break_stale=break_lease,
            probe=RAY_PROBE,
        ),
        run_log(out),
    ):
        out.child("study.json").write_text(json.dumps(study_dict(study), indent=1, sort_keys=True))
        _log.info("study %s, config:\n%s", study.study.name, json.dumps(study_dict(study), indent=1))
        try:
            worked = _run_models(study, models, overwrite)
        except KeyboardInterrupt as err:
            _log.warning(
                "study %s interrupted by %s after %.1f s; committed: %s",
                study.study.name,
                interrupted(err),
                time.monotonic() - start,
                _committed(models),
            )
            raise
        if worked or not all(out.child(f"{name}.parquet").exists() for name in OUTPUT_FILES):
            _write_outputs(study, out, models)
        else:
            _log.info("every stage of every model was committed already; %s is up to date", out)
        _log.info("study %s done in %.1f s", study.study.name, time.monotonic() - start)
    return out


def _committed(models: list[_ModelRun]) -> str:
    return "; ".join(f"{m.job.label}: {committed_line(m.job)}" for m in models)


class _Capacity:
    """Admits models in order while their pools fit the cluster's CPUs and GPUs; the rest wait their turn.

    ``probe`` (``ray.cluster_resources``) is read again every ``refresh_s`` while a model waits: on an
    autoscaling cluster the nodes that join are admitted to as they arrive (and nodes that leave shrink
    what is free), rather than the cluster being judged by its size at the start.
    """

    def __init__(self, total: dict, probe: Callable[[], dict] | None = None, refresh_s: float = 5.0) -> None:
        self.free = {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}
        self.total = dict(self.free)
        self.probe, self.refresh_s = probe, refresh_s
        self.running = 0
        self.cond = threading.Condition()
        self.turn = 0
        self.cancelled = False

    @staticmethod
    def need(run: _ModelRun) -> dict:
        r = run.job.cfg.ray
        return {"CPU": r.num_workers * r.num_cpus_per_worker, "GPU": r.num_workers * r.num_gpus_per_worker}

    def acquire(self, order: int, need: dict) -> None:
        with self.cond:
            # A model bigger than the whole cluster runs alone (with the workers that fit), never forever queued.
            def admitted() -> bool:
                return self.cancelled or (
                    self.turn == order
                    and (self.running == 0 or all(need[k] <= self.free[k] + 1e-9 for k in need))
                )

            while not self.cond.wait_for(admitted, timeout=self.refresh_s if self.probe else None):
                self._refresh()
            for k in need:
                self.free[k] -= need[k]
            self.running += 1
            self.turn += 1
            self.cond.notify_all()

    def _refresh(self) -> None:
        """Take in nodes that joined (or left) since the last look (the lock is held)."""
        assert self.probe is not None
        now = self.probe()
        for k in self.total:
            grown = float(now.get(k, 0)) - self.total[k]
            if grown:
                self.total[k] += grown
                self.free[k] += grown

    def cancel(self) -> None:
        """Let every waiting model through at once (to find the run cancelled and start nothing)."""
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    def release(self, need: dict) -> None:
        with self.cond:
            for k in need:
                self.free[k] += need[k]
            self.running -= 1
            self.cond.notify_all()


def _check_bands(study: StudyConfig, folders: dict) -> None:
    """The study's bands against a model's fitted bundles (read from their folders), before it steers anything."""
    from conva.bundle import BUNDLE_FILES, decode_bundle

    bundles = {
        v: decode_bundle({n: f.child(n).read_bytes() for n in BUNDLE_FILES}, f.uri)
        for v, f in folders.items()
    }
    check_bands(study, bundles)


def _run_models(study: StudyConfig, models: list[_ModelRun], overwrite: bool) -> bool:
    """Every model's pipeline in its own thread, admitted by :class:`_Capacity`; the first failure is raised.

    Returns whether any model had work (nothing starts, not even Ray, when every stage is committed).
    """
    import ray

    if not any(p.pending or p.replaces for m in models for p in stage_plans(m.job, overwrite)):
        return False
    connect_ray()
    capacity = _Capacity(ray.cluster_resources(), probe=ray.cluster_resources)
    errors: list[BaseException] = []
    cancel = threading.Event()  # set when the driver is interrupted: every model's runner stops, its pool too

    def one(order: int, run: _ModelRun) -> None:
        log_context.set(f"[{run.job.label}] ")
        need = capacity.need(run)
        capacity.acquire(order, need)
        try:
            if not cancel.is_set():
                run_model(
                    run.job,
                    run.worker,
                    overwrite,
                    check_bundles=lambda folders: _check_bands(study, folders),
                    cancel=cancel,
                )
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            if not cancel.is_set():
                errors.append(err)
                _log.error("failed: %s", err)
        finally:
            capacity.release(need)

    threads = [
        threading.Thread(target=one, args=(i, m), name=f"conva-{m.job.label}") for i, m in enumerate(models)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except (
        KeyboardInterrupt
    ):  # signals reach the main thread only: stop the models' threads, wait for their pools
        cancel.set()
        capacity.cancel()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
    return True


def _write_outputs(study: StudyConfig, out: Location, models: list[_ModelRun]) -> None:
    """Rebuild the study's tables and report from the committed stages, in a Ray task next to the data."""
    import ray

    from conva.jobs.stages import bundle_folders, open_stages

    parts = []
    for m in models:
        stages = open_stages(m.job.out, list(m.job.specs), False)
        files = {
            name: [f.uri for f in stages[name].parquet_files()]
            for name in ("steer", "evaluate", "utility", "choice", "agreement")
        }
        bundles = {v: f.uri for v, f in bundle_folders(stages["fit"], m.job.cfg.data.values).items()}
        parts.append(
            {"cells": list(m.cells), "files": files, "bundles": bundles, "model": model_spec(m.entry)}
        )
    connect_ray()
    task = ray.remote(num_cpus=1)(_build_outputs)
    ray.get(task.remote(study, out.uri, parts))


def _build_outputs(study: StudyConfig, out_uri: str, parts: list[dict]) -> None:
    """(Ray task) Read the committed stages, write the study's tables (:data:`OUTPUT_FILES`) and its report."""
    import pyarrow.dataset as ds

    from conva.batch.report import write_report_to
    from conva.batch.schemas import AGREEMENT_SCHEMA, CHOICE_SCHEMA, UTILITY_SCHEMA
    from conva.batch.specificity import cosine_rows
    from conva.batch.storage import Location as Loc
    from conva.batch.summary import probe_rows, study_tables
    from conva.bundle import BUNDLE_FILES, decode_bundle

    def read(uris: list[str], schema: pa.Schema | None = None) -> pa.Table:
        if not uris:
            return schema.empty_table() if schema is not None else pa.table({})
        locs = [Loc(u) for u in uris]
        return ds.dataset([u.path for u in locs], format="parquet", filesystem=locs[0].fs).to_table()

    tables = []
    for p in parts:
        bundles = {}
        for value, folder in sorted(p["bundles"].items()):
            files = {name: Loc(folder).child(name).read_bytes() for name in BUNDLE_FILES}
            bundles[value] = decode_bundle(files, folder)
        tables.append(
            dict(
                cells=p["cells"],
                generations=read(p["files"]["steer"]),
                judged=read(p["files"]["evaluate"]),
                utility=read(p["files"]["utility"], UTILITY_SCHEMA),
                choice=read(p["files"]["choice"], CHOICE_SCHEMA),
                agreement=read(p["files"]["agreement"], AGREEMENT_SCHEMA),
                probes=probe_rows(model_name(p["model"]), bundles),
                cosines=cosine_rows(model_name(p["model"]), bundles),
            )
        )
    out = Loc(out_uri)
    for name, table in study_tables(tables, n_boot=study.study.bootstrap, seed=study.study.seed).items():
        sink = io.BytesIO()
        pq.write_table(table, sink)
        out.child(f"{name}.parquet").write_bytes(sink.getvalue())
    write_report_to(out)


def _generated_rows(job: ModelJob, stage: str) -> int:
    """Rows of a study stage's generated input table (a study builds every one of its inputs itself)."""
    spec = job.spec(stage)
    if spec is None or not isinstance(spec.input, GeneratedInput):
        raise TypeError(f"a study's {stage!r} stage has no generated input table")
    return spec.input.table.num_rows


def _validate(study: StudyConfig) -> str:
    job_cfg, out = output_location(study.job)
    study = study.model_copy(update={"job": job_cfg})
    models = study_jobs(study, out, overwrite=False)
    rows = sum(_generated_rows(m.job, "steer") for m in models)
    util = sum(_generated_rows(m.job, "utility") for m in models)
    return f"ok ({len(models)} model(s), {rows} generations and {util} multiple-choice rows in all, output {out})"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on a failure a user can fix (one line on stderr), 130/143 on SIGINT/SIGTERM."""
    argv = sys.argv[1:] if argv is None else argv
    parser = job_parser(
        "conva study",
        f"{COMMANDS['study']}. The study's own sections (study, judge, utility, "
        "fluency) are explained by `conva config --explain study` etc.",
        study=True,
    )
    parser.add_argument("--validate", action="store_true", help="check the config and inputs; start nothing")
    setup_logging()
    models = None
    with interrupts():
        try:
            args, overrides = split_overrides(parser, argv)
            study = load_study(args.config, overrides)
            if args.validate:
                print(f"conva study: {_validate(study)}")
                return 0
            start = time.monotonic()
            overwrite = args.overwrite or study.job.output.overwrite
            job_cfg, out = output_location(study.job)
            models = study_jobs(study.model_copy(update={"job": job_cfg}), out, overwrite)
            out = run_study(study, overwrite, break_lease=args.break_lease, models=models)
        except FAILURES as err:
            print(f"conva study: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            return report_interrupt("study", err, _committed(models) if models is not None else None, argv)
    from conva.batch.report import format_summary, local_copy

    with local_copy(out) as folder:
        print(format_summary(folder))
    print(
        f"\nstudy finished in {time.monotonic() - start:.0f} s; results in {out}\nreport: {out.child('report', 'index.html')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
