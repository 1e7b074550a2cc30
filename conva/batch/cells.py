"""A study's cells and the tables built from them.

A **cell** is one (model, value, method, P0, band, setting, strength) of a :class:`conva.batch.study.StudyConfig`:
:func:`expand_cells` lists a model's steering cells, :func:`utility_cells` and :func:`choice_cells` its
multiple-choice and forced-choice ones. :func:`steering_table` turns the steering cells into the one table
a model's steering stage reads (per-row ``method, p0, strength, setting, band`` overriding ``[steer]``);
:func:`utility_table` and :func:`choice_table` do the same for the other two; :func:`results_table` joins the
committed generations with the judge's scores, one row per cell and prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from conva import data as D
from conva.batch.config import Config
from conva.batch.schemas import (
    CHOICE_INPUT_SCHEMA,
    RESULT_SCHEMA,
    STUDY_STEERING_SCHEMA,
    UTILITY_INPUT_SCHEMA,
)
from conva.batch.study import BAND_METHODS, StudyConfig, band_layers
from conva.bundle import ValueBundle
from conva.judges import JudgeSettings
from conva.models import model_name
from conva.steering.spec import P0_METHODS, SteerSpec

__all__ = [
    "Cell",
    "UtilityCell",
    "ChoiceCell",
    "expand_cells",
    "utility_cells",
    "choice_cells",
    "steering_table",
    "utility_table",
    "choice_table",
    "results_table",
    "pair_prompts",
    "choice_spec",
]


@dataclass(frozen=True)
class Cell:
    """One steered condition; ``p0`` only for ConVA, ``band`` ``-`` where no vector is added."""

    model: str
    value: str
    method: str
    p0: float | None
    band: str
    setting: str
    strength: float | None

    @property
    def id(self) -> str:
        return f"{self.model}|{self.value}|{self.method}|p0={_tag(self.p0, self.strength)}|band={self.band}|{self.setting}"


@dataclass(frozen=True)
class UtilityCell:
    """A multiple-choice condition: settings do not apply, and ``none`` is one cell per model (value ``*``)."""

    model: str
    value: str
    method: str
    p0: float | None
    band: str
    strength: float | None

    @property
    def id(self) -> str:
        return f"{self.model}|{self.value}|{self.method}|p0={_tag(self.p0, self.strength)}|band={self.band}"


def _variants(study: StudyConfig, method: str) -> list[tuple[float | None, str, float | None]]:
    s = study.study
    bands = list(s.bands) if method in BAND_METHODS else ["-"]
    p0s: list[float | None] = list(s.p0) if method in P0_METHODS else [None]
    strengths: list[float | None] = list(s.caa_strengths) if method == "caa" else [None]
    return [(p, b, x) for b in bands for p in p0s for x in strengths]


def _tag(p0: float | None, strength: float | None) -> str:
    return ("-" if p0 is None else f"{p0:g}") + ("" if strength is None else f"|s={strength:g}")


def expand_cells(study: StudyConfig, spec: str) -> list[Cell]:
    """Every cell of one model, in a fixed order (value, setting, method, band, P0, strength)."""
    name = model_name(spec)
    return [
        Cell(name, value, method, p0, band, setting, strength)
        for value in study.job.data.values
        for setting in study.study.settings
        for method in study.study.methods
        for p0, band, strength in _variants(study, method)
    ]


def utility_cells(study: StudyConfig, spec: str) -> list[UtilityCell]:
    """The multiple-choice cells of one model: every steered method per value, and one unsteered cell."""
    name = model_name(spec)
    cells = [UtilityCell(name, "*", "none", None, "-", None)]  # the baseline every utility ratio divides by
    cells += [
        UtilityCell(name, value, method, p0, band, strength)
        for value in study.job.data.values
        for method in study.study.methods
        if method != "none"
        for p0, band, strength in _variants(study, method)
    ]
    return cells


def _prompts(cfg: Config, value: str) -> list[D.Prompt]:
    from conva.batch.sources import value_prompts

    return value_prompts(cfg, value)[0]


def steering_table(cfg: Config, cells: Sequence[Cell], per_value: int = 0) -> pa.Table:
    """One steering table for all cells of a model: a row per (cell, prompt), per-row overrides set.

    ``row_id`` is ``<cell id>#<prompt index>``; the ``cell_id`` column is carried for joins. ``per_value``:
    only each value's first prompts (0: all; ``study.generate_prompts``).
    """
    prompts = {v: _prompts(cfg, v)[: per_value or None] for v in {c.value for c in cells}}
    rows = []
    for cell in cells:
        for i, p in enumerate(prompts[cell.value]):
            rows.append(
                dict(
                    row_id=f"{cell.id}#{i:04d}",
                    value=cell.value,
                    prompt=p.prompt,
                    error=None,
                    method=cell.method,
                    p0=cell.p0,
                    strength=cell.strength,
                    setting=cell.setting,
                    band=band_layers(cell.band) if cell.band != "-" else None,
                    cell_id=cell.id,
                )
            )
    return pa.Table.from_pylist(rows, schema=STUDY_STEERING_SCHEMA)


def utility_table(cells: Sequence[UtilityCell], items: Sequence, prompts: Sequence[str]) -> pa.Table:
    """A row per (utility cell, question) with the cell's overrides and the question's prompt and answer."""
    rows = [
        dict(
            row_id=f"{c.id}#{i:04d}",
            cell_id=c.id,
            value=None if c.value == "*" else c.value,
            method=c.method,
            p0=c.p0,
            strength=c.strength,
            band=band_layers(c.band) if c.band != "-" else None,
            item=i,
            prompt=prompts[i],
            answer=items[i].answer,
        )
        for c in cells
        for i in range(len(items))
    ]
    return pa.Table.from_pylist(rows, schema=UTILITY_INPUT_SCHEMA)


def results_table(cells: Sequence[Cell], generations: pa.Table, judged: pa.Table) -> pa.Table:
    """Join generations with their judgements into :data:`RESULT_SCHEMA`, one row per (cell, prompt)."""
    by_id = {c.id: c for c in cells}
    verdicts = {r["row_id"]: r for r in judged.to_pylist()}
    rows = []
    for g in generations.to_pylist():
        cell = by_id[g["row_id"].rsplit("#", 1)[0]]
        j = verdicts.get(g["row_id"], {})
        eps = g.get("eps") or []
        rows.append(
            dict(
                cell_id=cell.id,
                row_id=g["row_id"],
                model=cell.model,
                value=cell.value,
                method=cell.method,
                p0=cell.p0,
                band=cell.band,
                setting=cell.setting,
                strength=cell.strength,
                prompt=g["prompt"],
                context=g.get("context"),
                output=g["output"],
                n_output_tokens=g["n_output_tokens"],
                gate_open=g["gate_open"],
                gate_score=g["gate_score"],
                eps_mean=float(np.mean(eps)) if eps else None,
                judge=j.get("judge"),
                judge_score=j.get("judge_score"),
                judge_prob=j.get("judge_prob"),
                judge_raw=j.get("judge_raw"),
                ppl=j.get("ppl"),
                ppl_plain=j.get("ppl_plain"),
                fluency=j.get("fluency"),
                error=g["error"] or j.get("error"),
            )
        )
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def pair_prompts(settings: JudgeSettings, value: str, pairs: list[D.Pair]) -> list[str] | None:
    """The question each demo answer pair answers (row ``i`` of the answers answers prompt ``i``); else None."""
    if settings.pairs != "demo":
        return None
    prompts = {p.row: p.prompt for p in D.demo_prompts(value)}
    return [prompts.get(p.row, "") for p in pairs]


@dataclass(frozen=True)
class ChoiceCell:
    """A forced-choice condition: the prompts of ``value`` steered by ``vector``'s bundle (None: unsteered).

    ``method``: ``none``; ``conva_nogate`` and ``caa`` with every studied value's vector (the cross-value
    matrix; ungated, so a vector's effect is not hidden by another value's gate); ``random`` (ConVA's ε
    along a random direction) and ``conva`` (gated) with the own vector only.
    """

    model: str
    value: str
    vector: str | None
    method: str
    p0: float | None
    band: str
    strength: float | None

    @property
    def id(self) -> str:
        return f"{self.model}|{self.value}|v={self.vector or '-'}|{self.method}|p0={_tag(self.p0, self.strength)}|band={self.band}"


def choice_cells(study: StudyConfig, spec: str) -> list[ChoiceCell]:
    """Every forced-choice cell of one model (:class:`ChoiceCell`), in a fixed order.

    Unsteered always; with ``conva`` among the study's methods, ConVA ungated at each P0 and band for every
    vector, and the random control (HF backend only: on vLLM each row's own ε would take one of the
    engine's ``vllm.max_specs`` slots) and gated ConVA for the own vector; with ``caa``, CAA at each strength
    and band for every vector.
    """
    name, s = model_name(spec), study.study
    values = study.job.data.values
    cells = []
    for value in values:
        cells.append(ChoiceCell(name, value, None, "none", None, "-", None))
        for band in s.bands:
            if "conva" in s.methods or "conva_nogate" in s.methods:
                for p0 in s.p0:
                    cells += [ChoiceCell(name, value, v, "conva_nogate", p0, band, None) for v in values]
                    if study.job.steer.backend != "vllm":  # there each row's ε would take an engine spec slot
                        cells.append(ChoiceCell(name, value, value, "random", p0, band, None))
                    if "conva" in s.methods:
                        cells.append(ChoiceCell(name, value, value, "conva", p0, band, None))
            if "caa" in s.methods:
                for x in s.caa_strengths:
                    cells += [ChoiceCell(name, value, v, "caa", None, band, x) for v in values]
    return cells


def choice_table(cfg: Config, cells: Sequence[ChoiceCell]) -> pa.Table:
    """A row per (forced-choice cell, yes/no prompt): the value's steered prompts that carry ``value_side``.

    ``prompt`` is the question as asked (:func:`conva.choice.choice_prompt`); prompts without a
    ``value_side`` are not yes/no questions and are left out (a study of them has no forced choice).
    """
    from conva.choice import choice_prompt

    prompts = {v: _prompts(cfg, v) for v in {c.value for c in cells}}
    rows = []
    for cell in cells:
        for i, p in enumerate(prompts[cell.value]):
            if p.value_side is None:
                continue
            rows.append(
                dict(
                    row_id=f"{cell.id}#{i:04d}",
                    cell_id=cell.id,
                    value=cell.value,
                    vector=cell.vector,
                    method=cell.method,
                    p0=cell.p0,
                    strength=cell.strength,
                    band=band_layers(cell.band) if cell.band != "-" else None,
                    item=i,
                    prompt=choice_prompt(p.prompt),
                    value_side=p.value_side,
                )
            )
    return pa.Table.from_pylist(rows, schema=CHOICE_INPUT_SCHEMA)


def choice_spec(row: dict, bundles: dict[str, ValueBundle], cfg: Config) -> SteerSpec:
    """The steering of one forced-choice row: its method with its vector's bundle (the gate only for ``conva``).

    CAA is ungated here whatever ``gate.apply_to`` says (gate scope ``conva``), like ``conva_nogate``: the
    matrix measures what each vector does, not what another value's gate lets through.
    """
    if row["method"] == "none":
        return SteerSpec("none")
    band = tuple(row["band"]) if row["band"] else None
    return SteerSpec(
        row["method"],
        bundles[row["vector"]],
        p0=row["p0"],
        strength=row["strength"] or 0.0,
        band=band,
        gate_scope="conva",
        prefix_on=cfg.gate.prefix_on,
    )
