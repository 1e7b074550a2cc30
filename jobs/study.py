"""`python -m jobs.study --config FILE [--section.key=value ...] [--overwrite] [--validate]`: a whole study, one Ray job.

Per model: the ordinary extract and fit jobs (``<out>/models/<slug>/{activations,bundles}``, resumed like
any job), then one actor set runs the study's stages on it, each a store stage committed shard by shard:

* ``study_generations``: every cell's prompts in one steering table (per-row overrides);
* ``study_judged``: the judge's verdict, the answer's perplexity (and fluency rating) per generation;
* ``study_utility``: multiple-choice answers with each cell's steering and gate active;
* ``study_judge``: the judge's agreement on held-out labelled pairs.

Then ``<out>/{results,pooled,matched,summary,utility,probes,judges}.parquet`` are rebuilt from the committed stages and
``<out>/report/index.html`` from those. A rerun skips every committed shard; a changed config is refused
naming the keys (``--overwrite`` replaces). ``--validate`` checks the config and inputs and starts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conva.config import RESULT_NEUTRAL_KEYS, ConfigError, config_dict
from conva.mc import demo_mc, load_mc, mc_prompts
from conva.models import ModelNotFoundError, check_model, model_name
from conva.pipeline import SCHEMA_VERSION
from conva.report import format_summary, write_report
from conva.store import ConfigMismatchError, Stage, check_writable, open_stage, shard_ranges, stage_mismatch
from conva.study import (StudyConfig, check_bands, expand_cells, load_study, model_config, steering_table, study_dict,
                         utility_cells, utility_table)
from conva.summary import OUTPUT_FILES, probe_rows, study_tables
from jobs.common import EXPECTED_ERRORS, JobError, attach_run_log, connect_ray, setup_logging
from jobs.runner import run_job
from jobs.stages import shard_config
from workers.judging import StudyWorker
from workers.pool import ShardFailedError, WorkerStartError, actor_options, run_shards, stop_actors
from workers.steering import load_bundles

__all__ = ["run_study", "main", "OUTPUT_FILES"]

_log = logging.getLogger("conva.jobs")
_STAGES = ("study_generations", "study_judged", "study_utility", "study_judge")


def run_study(study: StudyConfig, overwrite: bool = False) -> Path:
    """Run (or resume) every model of ``study``; returns the study folder holding the Parquet files and report.

    Side effects: writes under ``job.output.dir``; with ``overwrite``, **replaces stages written with another config**.
    """
    out = check_writable(study.job.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study_dict(study), indent=1, sort_keys=True))
    handler = attach_run_log(out)
    start = time.monotonic()
    try:
        _log.info("study %s, config:\n%s", study.study.name, json.dumps(study_dict(study), indent=1))
        parts = [_run_model(study, spec, out, overwrite) for spec in study.study.models]
        _write_outputs(study, out, parts)
        _log.info("study %s done in %.1f s", study.study.name, time.monotonic() - start)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return out


def _run_model(study: StudyConfig, spec: str, out: Path, overwrite: bool) -> dict:
    cfg = model_config(study, spec, out)
    run_job("extract", cfg, overwrite)
    run_job("fit", cfg, overwrite)
    model_out, bundle_dir = Path(cfg.output.dir), str(Path(cfg.output.dir) / "bundles")
    bundles = load_bundles(bundle_dir, cfg.data.values, None, None)
    check_bands(study, bundles)
    cells, ucells = expand_cells(study, spec), utility_cells(study, spec)
    steer_rows = steering_table(cfg, cells)
    util_rows = _utility_rows(study, ucells)
    stages = _open(study, cfg, model_out, steer_rows, util_rows, [c.id for c in cells], overwrite)
    r, retries = cfg.ray.steer_shard_rows, cfg.ray.max_task_retries
    gen_ranges, util_ranges = shard_ranges(steer_rows.num_rows, r), shard_ranges(util_rows.num_rows, r)
    pending = {"gen": stages["study_generations"].pending(len(gen_ranges)),
               "judged": stages["study_judged"].pending(len(gen_ranges)),
               "util": stages["study_utility"].pending(len(util_ranges)), "judge": stages["study_judge"].pending(1)}
    if any(pending.values()):
        actors = _start(study, cfg, out, max(1, min(cfg.ray.num_workers, max(map(len, pending.values())))))
        try:
            _commit_all(actors, "steer", stages["study_generations"], pending["gen"],
                        lambda s: (_take(steer_rows, gen_ranges[s]), bundle_dir), stage_retries=retries)
            gen = stages["study_generations"]
            _commit_all(actors, "evaluate", stages["study_judged"], pending["judged"],
                        lambda s: (pq.read_table(gen.path / f"part-{s:05d}.parquet"), bundle_dir), stage_retries=retries)
            _commit_all(actors, "utility", stages["study_utility"], pending["util"],
                        lambda s: (_take(util_rows, util_ranges[s]), bundle_dir), stage_retries=retries)
            if pending["judge"]:  # one call: the judge's agreement per value, committed as shard 0
                import ray

                stages["study_judge"].commit(0, ray.get(actors[0].agreement.remote(bundle_dir)))
        finally:
            stop_actors(actors)
    read = {k: stages[k].dataset().to_table() for k in _STAGES}
    return dict(cells=cells, generations=read["study_generations"], judged=read["study_judged"],
                utility=read["study_utility"], agreement=read["study_judge"], probes=probe_rows(model_name(spec), bundles))


def _utility_rows(study: StudyConfig, ucells) -> pa.Table:
    if not study.utility.mc:
        return utility_table([], [], [])
    items = demo_mc() if study.utility.mc == "demo" else load_mc(study.utility.mc)
    items = items[: study.utility.max_items] if study.utility.max_items else items
    return utility_table(ucells, items, mc_prompts(items, study.utility.shots))


def _open(study: StudyConfig, cfg, model_out: Path, steer_rows: pa.Table, util_rows: pa.Table, cell_ids: list[str],
          overwrite: bool) -> dict[str, Stage]:
    base = {k: v for k, v in config_dict(cfg).items() if k not in ("output", "ray")}
    shard = lambda rows: shard_config(cfg.ray.steer_shard_rows, rows)
    judge = {**study_dict(study)["judge"], "fluency": study_dict(study)["fluency"]}
    gen = {**base, "cells": cell_ids, "shards": shard(steer_rows)}
    configs = {"study_generations": gen, "study_judged": {**gen, "judge": judge},
               "study_utility": {**base, "utility": study_dict(study)["utility"], "shards": shard(util_rows)},
               "study_judge": {**base, "judge": judge}}
    if not overwrite:  # check all before opening any, so a refusal names every differing key and writes nothing
        keys = sorted({k for s, c in configs.items() for k in stage_mismatch(model_out, s, c, SCHEMA_VERSION,
                                                                              ignore_keys=RESULT_NEUTRAL_KEYS)})
        if keys:
            raise ConfigMismatchError(model_out, keys)
    return {s: open_stage(model_out, s, c, SCHEMA_VERSION, overwrite=overwrite, ignore_keys=RESULT_NEUTRAL_KEYS)
            for s, c in configs.items()}


def _start(study: StudyConfig, cfg, out: Path, n: int) -> list:
    import ray
    from ray.exceptions import RayError, RayTaskError

    connect_ray(cfg)
    remote = ray.remote(StudyWorker).options(**actor_options(cfg))
    cache = study.judge.cache_dir or str(out / "judge_cache")
    actors = [remote.remote(cfg, study.judge, study.fluency, study.utility, cache) for _ in range(n)]
    try:
        ray.get([a.__ray_ready__.remote() for a in actors])
    except RayError as err:
        stop_actors(actors)
        cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
        raise WorkerStartError(f"StudyWorker failed to start: {str(cause).strip().splitlines()[-1]}") from err
    return actors


def _commit_all(actors: list, method: str, stage: Stage, todo: list[int], args, stage_retries: int = 0) -> None:
    """Run ``actor.<method>(shard, *args(shard))`` for every pending shard; the driver commits each result."""
    if not todo:
        return
    t0 = time.monotonic()
    for shard, table in run_shards(actors, method, method, todo, args, retries=stage_retries):
        stage.commit(shard, table)
        _log.info("%s: committed shard %d (%d rows)", method, shard, table.num_rows)
    _log.info("%s: %d shards in %.1f s", method, len(todo), time.monotonic() - t0)


def _take(rows: pa.Table, bounds: tuple[int, int]) -> pa.Table:
    return rows.take(pa.array(range(*bounds), pa.int64()))  # a copy: a slice would pickle its parent's buffers


def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def _write_outputs(study: StudyConfig, out: Path, parts: list[dict]) -> None:
    tables = study_tables(parts, n_boot=study.study.bootstrap, seed=study.study.seed)
    for name in OUTPUT_FILES:
        _write(tables[name], out / f"{name}.parquet")


def _validate(study: StudyConfig) -> str:
    out = check_writable(study.job.output.dir)
    for spec in study.study.models:
        try:
            check_model(spec)
        except ModelNotFoundError as err:
            raise JobError(f"study.models: {err}") from err
    cfg = model_config(study, study.study.models[0], out)
    rows = steering_table(cfg, expand_cells(study, study.study.models[0]))
    util = _utility_rows(study, utility_cells(study, study.study.models[0]))
    return (f"ok ({len(study.study.models)} model(s), {rows.num_rows} generations and {util.num_rows} "
            f"multiple-choice rows per model, output {out})")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on a failure a user can fix (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="jobs.study", description="ConVA study: models × values × methods × P0")
    parser.add_argument("--config", required=True, help="study TOML (see examples/demo_study.toml)")
    parser.add_argument("--overwrite", action="store_true", help="replace stages written with another config")
    parser.add_argument("--validate", action="store_true", help="check the config and inputs; start nothing")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        study = load_study(args.config, overrides)
        if args.validate:
            print(f"jobs.study: {_validate(study)}")
            return 0
        start = time.monotonic()
        out = run_study(study, args.overwrite or study.job.output.overwrite)
        report = write_report(out)
    except (*EXPECTED_ERRORS, ConfigError, ShardFailedError, WorkerStartError) as err:
        print(f"jobs.study: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(out))
    print(f"\nstudy finished in {time.monotonic() - start:.0f} s; results in {out}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
