"""The declarations of ConVA's own stages (see :mod:`conva.jobs.registry`), in pipeline order.

extract → activations, fit → bundles, steer → generations are a model job's stages (``conva run``); a
study adds evaluate, utility, choice and agreement over its own folders (planned by
:mod:`conva.jobs.study`). Each declaration names its folder, the config keys that decide its output,
how it is planned, how its shards become tasks, and the worker function that runs one shard.
"""

from __future__ import annotations

import hashlib
from typing import Any

from conva.batch.badrows import RowTally
from conva.batch.config import Config
from conva.batch.extraction import activation_model, extraction_rows
from conva.batch.store import ShardRef
from conva.jobs.planning import generated, pairs_source, read_input, steering_spec
from conva.jobs.registry import StageDecl, register_stage
from conva.jobs.stages import ACTIVATION_KEYS, BUNDLE_KEYS, StageSpec, bundle_folders, shard_config
from conva.workers import shards
from conva.workers.tasks import ShardTask

__all__ = ["BUILTIN_STAGES"]


def _plan_extract(decl: StageDecl, cfg: Config, screened: dict[str, RowTally]) -> StageSpec:
    # the gate also reads each value's own prompts: a bad prompts file is named as such
    rows = read_input(
        "data.pairs",
        lambda: extraction_rows(cfg),
        {
            "data.pairs": cfg.data.pairs,
            "data.prompts": cfg.data.prompts,
            "data.neutral": cfg.data.neutral,
            "gate.mc": cfg.gate.mc,
        },
    )
    inp = generated(rows, cfg.ray.rows_per_shard)
    config = {**decl.config(cfg), "shards": shard_config(inp.rows_per_shard, rows.num_rows, inp.sha256)}
    return StageSpec(decl.name, decl.folder, config, inp.n_shards, inp, source=pairs_source(cfg))


def _plan_fit(decl: StageDecl, cfg: Config, screened: dict[str, RowTally]) -> StageSpec:
    config = {**decl.config(cfg), "shards": {"values": list(cfg.data.values)}}
    return StageSpec(decl.name, decl.folder, config, len(cfg.data.values), None)


def _plan_steer(decl: StageDecl, cfg: Config, screened: dict[str, RowTally]) -> StageSpec:
    return steering_spec(cfg, decl.folder, decl.config(cfg), screened)


def _extract_tasks(spec, stages, slices, values):
    return None, lambda ref: ShardTask("extract", ref, slice=slices[ref.shard])


def _fit_tasks(spec, stages, slices, values):
    acts, cache = stages["extract"], dict[str, Any]()

    def make(ref: ShardRef) -> ShardTask:
        if not cache:  # once, after the last activation shard is committed
            records = acts.records()
            info, layers = activation_model(r.extra["model"] for r in records)
            digest = hashlib.sha256(
                "".join(o.sha256 for r in records for o in r.objects).encode()
            ).hexdigest()[:16]
            cache.update(files=tuple(acts.parquet_files()), model=info.__dict__, layers=layers, digest=digest)
        params = {
            "value": values[ref.shard],
            "model": cache["model"],
            "layers": cache["layers"],
            "dataset_hash": cache["digest"],
        }
        return ShardTask("fit", ref, files=cache["files"], params=params)

    return None, make


def _steer_tasks(spec, stages, slices, values):
    fit, kind = stages["fit"], spec.input_kind
    return None, lambda ref: ShardTask(
        "steer", ref, slice=slices[ref.shard], bundles=bundle_folders(fit, values), params={"input": kind}
    )


def _evaluate_tasks(spec, stages, slices, values):
    gen, fit = stages["steer"], stages["fit"]

    def make(ref: ShardRef) -> ShardTask:
        part = gen.object(ref.shard, f"part-{ref.shard:05d}.parquet")
        return ShardTask("evaluate", ref, files=(part,), bundles=bundle_folders(fit, values))

    return gen.is_committed, make  # judging shard i waits for generation shard i only


def _sliced_tasks(spec, stages, slices, values):
    """A study stage reading its own input slice and the bundles (utility, choice)."""
    fit = stages["fit"]
    return None, lambda ref: ShardTask(
        spec.name, ref, slice=slices[ref.shard], bundles=bundle_folders(fit, values)
    )


def _agreement_tasks(spec, stages, slices, values):
    fit = stages["fit"]
    return None, lambda ref: ShardTask("agreement", ref, bundles=bundle_folders(fit, values))


BUILTIN_STAGES = (
    StageDecl(
        "extract",
        "activations",
        _extract_tasks,
        shards.extract,
        _plan_extract,
        ACTIVATION_KEYS,
        row_unit="texts",
        input_noun="texts",
        in_run=True,
    ),
    StageDecl("fit", "bundles", _fit_tasks, shards.fit, _plan_fit, BUNDLE_KEYS, ("extract",), in_run=True),
    StageDecl(
        "steer",
        "generations",
        _steer_tasks,
        shards.steer,
        _plan_steer,
        None,
        ("fit",),
        row_unit="rows",
        input_noun="prompts",
        in_run=True,
    ),
    StageDecl("evaluate", "study_judged", _evaluate_tasks, shards.evaluate, after=("steer", "fit")),
    StageDecl("utility", "study_utility", _sliced_tasks, shards.utility, after=("fit",)),
    StageDecl("choice", "study_choice", _sliced_tasks, shards.choice, after=("fit",)),
    StageDecl("agreement", "study_judge", _agreement_tasks, shards.agreement, after=("fit",)),
)
"""ConVA's own stages, registered (in this order) when this module is imported: :mod:`conva.jobs.preflight`,
which plans every job, imports it, so the registry is complete before any job is planned."""
for _decl in BUILTIN_STAGES:
    register_stage(_decl)
