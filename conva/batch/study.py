"""Studies: models × values × methods × P0 grid × layer bands × settings, as cells over one steering table.

A study config is a job config (the sections of :class:`conva.batch.config.Config`, without ``model.name``)
plus four sections of its own::

    [study]    name, models, methods, p0, bands, settings, caa_strengths, bootstrap, seed
    [judge]    conva.judges.JudgeSettings (kind = classifier | probe | llm, ...)
    [utility]  mc ("demo", an MMLU-layout CSV, or "" for none), max_items, shots
    [fluency]  perplexity (bool), llm (bool: the LLM judge's grammaticality rating)

Its cells and their tables live in :mod:`conva.batch.cells`. A **cell** is one (model, value, method, P0, band, setting, strength). ConVA cells multiply by the P0 grid
and the bands; CAA by the bands and its strengths (a sweep, so CAA can be compared at matched fluency);
``prompt`` and ``none`` by neither. Every cell of one model goes into **one**
steering table whose per-row ``method, p0, strength, setting, band`` columns override ``[steer]``
(:data:`conva.batch.steer_rows.ROW_OVERRIDES`), so a model is extracted and fitted once and its bundles serve
every cell; band variants are read from the same probes.

Outputs (written by ``conva.jobs.study``, computed in :mod:`conva.batch.summary`): ``results.parquet`` (one row per
cell and prompt, with the judge's score and the answer's perplexities), ``pooled.parquet`` (the headline
rows: per model, method, P0, band, strength and setting over all values, with bootstrap intervals over all
their prompts), ``matched.parquet`` (ConVA against CAA and prompting at matched fluency),
``summary.parquet`` (one row per cell), ``utility.parquet``, ``probes.parquet``, ``judges.parquet``.

Example:
    >>> study = load_study("examples/demo_study.toml")          # doctest: +SKIP
    >>> cells = expand_cells(study, "smollm2"); len(cells)      # doctest: +SKIP
    40
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Sequence

from pydantic import AfterValidator, Field, create_model

# The job sections go through conva.batch.config's own builder, so they obey the job rules exactly.
from conva.batch.config import (
    Config,
    ConfigError,
    build_config,
    build_section,
    config_dict,
    read_config_data,
    vllm_gate_problem,
)
from conva.bundle import ValueBundle
from conva.judge_validation import labels_folder
from conva.judges import JudgeSettings
from conva.models import model_name
from conva.probes import Band
from conva.settings import P0, Items, OneOf, Settings
from conva.steering.spec import SETTINGS

__all__ = [
    "STUDY_METHODS",
    "StudySection",
    "UtilitySection",
    "FluencySection",
    "StudyConfig",
    "load_study",
    "study_dict",
    "study_schema",
    "model_config",
    "model_slug",
    "model_spec",
    "MODEL_SECTIONS",
    "band_layers",
    "check_bands",
    "BAND_METHODS",
]

STUDY_METHODS = ("conva", "conva_nogate", "caa", "prompt", "none")


def _band(band: str) -> str:
    Band.parse(band)  # a ValueError names what is wrong with the band
    return band


BAND_METHODS = ("conva", "conva_nogate", "caa")
"""The methods whose cells multiply by the study's layer bands (the others add no vector, or add it everywhere)."""


class StudySection(Settings):
    """``[study]``: the grid of cells: models × values × methods × P0 × bands × settings (× CAA strengths)."""

    name: str = "study"
    """The study's name, in its logs and report."""
    models: Items[str | dict] = Field(("smollm2",), min_length=1)
    """Models: a spec ("smollm2", a folder, a repo id) or a table {name = spec, model = {...}, ray = {...},
    vllm = {...}, steer = {...}, extract = {...}} whose sections override the job's for that model only."""
    methods: Items[Annotated[str, OneOf(STUDY_METHODS)]] = Field(
        ("conva", "caa", "prompt", "none"), min_length=1
    )
    """Any of conva, conva_nogate, caa, prompt, none."""
    p0: Items[P0] = Field((0.99,), min_length=1)
    """ConVA's target probabilities, one cell each."""
    bands: Items[Annotated[str, AfterValidator(_band)]] = ("auto",)
    """"auto" (the bundle's band) or "LO-HI"."""
    settings: Items[Annotated[str, OneOf(SETTINGS)]] = Field(("plain",), min_length=1)
    """plain, opposite (a prefix pushing against the value), or both."""
    caa_strengths: Items[Annotated[float, Field(gt=0)]] = Field((0.05, 0.1, 0.25), min_length=1)
    """CAA strengths, one cell each: CAA adds strength × (mean positive − negative activation) at every band layer,
    swept so that CAA is compared with ConVA at matched fluency (on SmolLM2 with a 15-layer band, 0.5 already
    breaks fluency)."""
    bootstrap: int = Field(1000, ge=1)
    """Bootstrap resamples of each cell's CSR interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    generate_prompts: int = Field(0, ge=0)
    """Prompts per value that get judged generations (the first ones; 0: all): generating costs a pass per new
    token, the forced choice one pass per prompt, so a study can read every prompt judge-free and answer fewer."""
    generate: bool = True
    """Judged generations (answers, their judge and perplexity, multiple choice); false runs only the forced
    choice (conva.choice: one forward pass per prompt and steering, judge-free)."""


class UtilitySection(Settings):
    """``[utility]``: multiple-choice accuracy with each cell's steering and gate active."""

    mc: str = "demo"
    """Multiple-choice questions: "demo", an MMLU-layout CSV, or "" for no utility."""
    max_items: int = Field(0, ge=0)
    """Questions used, at most (0: all)."""
    shots: int = Field(0, ge=0)
    """Worked examples before each question (the paper: 5)."""
    batch_size: int = Field(8, ge=1)
    """Questions scored together."""


class FluencySection(Settings):
    """``[fluency]``: how each answer's fluency is measured."""

    perplexity: bool = True
    """Score each answer's perplexity under the unsteered model."""
    llm: bool = False
    """Also ask the LLM judge for a grammaticality rating (its endpoint or local model)."""
    batch_size: int = Field(8, ge=1)
    """Answers scored together."""


class StudyConfig(Settings):
    """A whole study: its own sections and the job config every model's extraction, fit and steering use."""

    study: StudySection = Field(default_factory=StudySection)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    utility: UtilitySection = Field(default_factory=UtilitySection)
    fluency: FluencySection = Field(default_factory=FluencySection)
    job: Config = Field(default_factory=Config)


_OWN = ("study", "judge", "utility", "fluency")


def load_study(path: str | Path | None, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study TOML, merge ``--section.key=value`` overrides, type-check and validate; loads no model."""
    data = read_config_data(path, list(overrides))
    own = {k: data.pop(k, {}) for k in _OWN}
    if "name" in data.get("model", {}):
        raise ConfigError("model.name: a study lists its models under study.models")
    job = build_config(data)
    sections = {
        k: build_section(cls, own[k], f"{k}.")
        for k, cls in (
            ("study", StudySection),
            ("judge", JudgeSettings),
            ("utility", UtilitySection),
            ("fluency", FluencySection),
        )
    }
    study = StudyConfig(**sections, job=job)
    _check(study)
    return study


def study_schema() -> dict[str, Any]:
    """The JSON schema of a study file (``conva config --schema --study``): the job's sections and the
    study's own, side by side as the file has them (``model.name`` is refused there: the models are
    ``study.models``)."""
    from conva.batch.configdoc import sections

    fields: dict[str, Any] = {
        name: (cls, Field(default_factory=cls)) for name, cls in sections(Config, StudyConfig).items()
    }
    model: type[Settings] = create_model("StudyFile", __base__=Settings, **fields)
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ConVA study config"
    return schema


def _check(study: StudyConfig) -> None:
    s = study.study
    for key, ok, problem in _llm_problems(study):
        if not ok:
            raise ConfigError(f"{key}: {problem}")
    _check_judge_files(study.judge, study.fluency.llm or study.judge.kind == "llm")
    specs = [model_spec(m, i) for i, m in enumerate(s.models)]
    if len({model_slug(m) for m in specs}) != len(specs):
        raise ConfigError("study.models: two models share one name")
    for i, entry in enumerate(s.models):
        model_config(study, entry, "/")  # each model's own sections must make a valid job config
    problem = vllm_gate_problem(study.job, list(s.methods), list(s.settings))
    if problem:
        raise ConfigError(f"steer.backend: {problem}")


def _llm_problems(study: StudyConfig) -> list[tuple[str, bool, str]]:
    """What an LLM judge (``judge.kind = "llm"`` or ``fluency.llm``) needs: an endpoint, or a model to load."""
    j = study.judge
    if j.kind != "llm" and not study.fluency.llm:
        return []
    if j.backend == "local":
        return [
            ("judge.model", bool(j.model), "judge.backend = 'local' needs judge.model, a model spec to load"),
            (
                "judge.base_url",
                not j.base_url,
                "judge.backend = 'local' loads judge.model; leave base_url empty",
            ),
        ]
    return [
        (
            "judge.base_url",
            bool(j.base_url) and bool(j.model),
            "the llm judge (and fluency.llm) need judge.base_url and judge.model (or judge.backend = 'local')",
        )
    ]


def _check_judge_files(j: JudgeSettings, llm: bool) -> None:
    """A local judge model must exist; a labels folder named by path must hold the labelled answers."""
    from conva.models import ModelNotFoundError, check_model

    if llm and j.backend == "local":
        try:
            check_model(j.model)
        except ModelNotFoundError as err:
            raise ConfigError(f"judge.model: {err}") from None
    folder = labels_folder(j.labels)
    if j.labels != "demo" and folder is not None:
        missing = [f for f in ("answers.jsonl", "labels_a.jsonl") if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"judge.labels: {folder} holds no {' or '.join(missing)}")


def check_bands(study: StudyConfig, bundles: dict[str, ValueBundle]) -> None:
    """Refuse study bands a bundle has no probes for, or that start before a gate it must obey reads.

    A probe gate read inside the steering pass must see an unsteered state: its layer may not come after
    the first steered layer of any method the gate applies to.
    """
    gated = [
        m
        for m in study.study.methods
        if m == "conva" or (study.job.gate.apply_to == "all_methods" and m in ("caa", "prompt"))
    ]
    for band in study.study.bands:
        layers = band_layers(band)
        if layers is None:
            continue
        for value, b in bundles.items():
            b.rows(layers)  # every layer probed, else BundleError
            if gated and b.gate.kind == "probe" and b.gate.layer is not None and b.gate.layer > layers[0]:
                raise ConfigError(
                    f"study.bands: band {band} starts before {value!r}'s gate layer {b.gate.layer}; "
                    f"the probe gate of {', '.join(gated)} must read an unsteered layer"
                )


def study_dict(study: StudyConfig) -> dict[str, Any]:
    """The study as JSON-able data (for logs, hashes, manifests). Holds no credential, only ``api_key_env``."""
    data: dict[str, Any] = study.model_dump(mode="json")
    return data


def model_slug(spec: str) -> str:
    """A model's name as a single safe path component (``SmolLM2-135M-Instruct``), the name of its folder.

    ASCII letters, digits and ``._-`` only, starting with a letter or digit, no ``..``: a spec such as
    ``..``, ``.`` or ``/m/.hidden`` must not name the study folder itself, ``models/`` or a hidden folder.
    """
    slug = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._-]", "_", model_name(spec))).lstrip("._-")[:64]
    return slug or "model"


MODEL_SECTIONS = ("model", "ray", "vllm", "steer", "extract")


def model_spec(entry: str | dict, index: int = 0) -> str:
    """The model spec of a ``study.models`` entry: the string itself, or a table's ``name``."""
    if isinstance(entry, str):
        return entry
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f'study.models[{index}]: a model table needs name = "<model spec>"')
    return name


def model_config(study: StudyConfig, entry: str | dict, out: str | Path) -> Config:
    """The job config for one model of the study: its name, its own sections, ``<out>/models/<slug>`` as output.

    A table entry may override ``model`` (dtype, device...), ``ray`` (workers, GPUs per worker...),
    ``vllm``, ``steer`` and ``extract`` for that model only; everything that defines the study's cells
    (data, probes, gates, bands, P0) is shared.
    """
    spec = model_spec(entry)
    job = study.job
    if isinstance(entry, dict):
        extra = sorted(set(entry) - {"name", *MODEL_SECTIONS})
        if extra:
            raise ConfigError(
                f"study.models: {spec!r} sets {extra[0]!r}; a model may only set "
                f"{', '.join(MODEL_SECTIONS)} of its own"
            )
        data = _merge_sections(config_dict(job), {k: v for k, v in entry.items() if k != "name"})
        try:
            job = build_config(data)
        except ConfigError as err:
            raise ConfigError(f"study.models ({spec}): {err}") from err
    where = str(out).rstrip("/") + "/models/" + model_slug(spec)
    return job.model_copy(
        update={
            "model": job.model.model_copy(update={"name": spec}),
            "output": job.output.model_copy(update={"dir": where}),
        }
    )


def _merge_sections(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def band_layers(band: str) -> tuple[int, ...] | None:
    """A study band's layers (:class:`conva.probes.Band`): None for ``auto`` (each bundle's own band)."""
    return Band.parse(band).layers
