"""The job's stages as plain functions over Arrow tables: what to extract, extract, fit, what to steer, steer.

Ray workers call :func:`extract_table` and :func:`steer_table` on one shard each; the driver calls
:func:`extraction_rows` / :func:`steering_rows` to make the input and :func:`fit_bundles` to fit
centrally. The same functions run in one process for the library and the tests, so the distributed
job and the single-process path compute the same thing.

Schemas (version :data:`SCHEMA_VERSION`; documented in the README):

* extraction input: ``row_id, dataset, value, label, group, text, chat_template``
* activations: ``row_id, dataset, value, label, group, text_hash, layer, position, activation
  (fixed-size list<float32>), error`` — one row per (text, layer)
* steering input: ``row_id, value, prompt, error`` and optionally per-row ``method, p0, strength,
  setting, band`` overriding ``[steer]`` (:data:`ROW_OVERRIDES`)
* generations: ``row_id, prompt, context, output, n_prompt_tokens, n_output_tokens, model, value, method,
  setting, p0, strength, gate_score, gate_open, layers, eps, p_before, p_after, error`` — one row per input
  row; ``context`` is the user message the answer was generated from (``prompt`` with any prefix)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from conva import data as D
from conva.batch.config import Config
from conva.batch.schemas import (
    BUNDLE_PROBE_SCHEMA,
    EXTRACTION_INPUT_SCHEMA,
    GENERATION_SCHEMA,
    STEERING_INPUT_SCHEMA,
    activation_schema,
)
from conva.bundle import ValueBundle
from conva.fit import FitSettings, LayerData, ModelInfo, fit_value
from conva.mc import MCItem, demo_mc, load_mc, mc_prompt
from conva.record import format_prompt, record_activations
from conva.steering.spec import RowResult, SteerSpec

__all__ = [
    "steering_rows_from_file",
    "extraction_rows",
    "extract_table",
    "steering_rows",
    "steer_table",
    "fit_bundles",
    "fit_settings",
    "check_prompt",
    "load_pair_source",
    "load_prompt_source",
    "row_spec",
    "row_settings",
    "prompt_problem",
    "ROW_OVERRIDES",
    "hf_generate_fn",
    "GenerateFn",
    "fit_rows_filter",
    "gate_data",
    "value_prompts",
    "load_mc_source",
    "gate_questions",
    "utility_questions",
    "steering_rows_from_records",
    "value_activations",
    "probe_rows",
    "activation_model",
]


def load_pair_source(source: str, value: str, kind: str) -> list[D.Pair]:
    """Pairs for ``value`` from ``demo``, ``paper:<folder>`` or a project-schema file/folder."""
    if source == "demo":
        return D.demo_pairs(value)
    if source.startswith("paper:"):
        return D.paper_pairs(source[len("paper:") :], value, kind)
    return D.load_pairs(source, value)


def load_prompt_source(source: str, value: str | None) -> list[D.Prompt]:
    """Prompts for ``value`` (neutral ones for None) from ``demo``, ``paper:<folder>`` or a file/folder."""
    if source == "demo":
        return D.demo_prompts(value) if value is not None else D.demo_neutral()
    if source.startswith("paper:"):
        return D.paper_prompts(source[len("paper:") :], value) if value else []
    return D.load_prompts(source, value)


def value_prompts(cfg: Config, value: str) -> tuple[list[D.Prompt], list[D.Prompt]]:
    """A value's prompts from ``data.prompts``, split apart: ``(to steer, for the gate)``.

    With a probe gate, the last ``gate.value_prompts`` prompts of each value train the gates (positives of
    the value's own, negatives of the others') and are never steered; the rest are steered, capped at
    ``data.max_prompts_per_value``.
    """
    prompts = load_prompt_source(cfg.data.prompts, value)
    k = cfg.gate.value_prompts if cfg.gate.kind == "probe" else 0
    if k and not (
        cfg.data.prompts == "demo" or cfg.data.prompts.startswith("paper:") or D.is_folder(cfg.data.prompts)
    ):
        raise ValueError(
            "gate.value_prompts takes each value's prompts from data.prompts, which must then be "
            f"'demo', 'paper:<folder>' or a folder (got the file {cfg.data.prompts!r})"
        )
    if k >= len(prompts) > 0 or (k and not prompts):
        raise ValueError(
            f"gate.value_prompts = {k} would leave none of {value!r}'s {len(prompts)} prompts to steer"
        )
    steer, gate = prompts[: len(prompts) - k], prompts[len(prompts) - k :] if k else []
    cap = cfg.data.max_prompts_per_value
    return (steer[:cap] if cap else steer), gate


def load_mc_source(source: str) -> list[MCItem]:
    """Multiple-choice questions from ``demo`` (the project's set) or an MMLU-layout CSV."""
    return demo_mc() if source == "demo" else load_mc(source)


def gate_questions(cfg: Config) -> list[MCItem]:
    """The multiple-choice questions the probe gate reads as unrelated inputs: the last ``gate.mc_questions``.

    The study's utility asks only the questions before them (:func:`utility_questions`), so its gate
    open rate on multiple choice is measured on questions the gate never saw.
    """
    k = cfg.gate.mc_questions
    if cfg.gate.kind != "probe" or not cfg.gate.mc or not k:
        return []
    items = load_mc_source(cfg.gate.mc)
    if k >= len(items):
        raise ValueError(
            f"gate.mc_questions = {k} would take all {len(items)} questions of {cfg.gate.mc!r} "
            "(the utility asks the questions before the gate's)"
        )
    return items[len(items) - k :]


def utility_questions(cfg: Config, source: str, max_items: int = 0) -> list[MCItem]:
    """The questions of ``source`` a study's utility asks: none the gate reads, at most ``max_items`` (0: all)."""
    items = load_mc_source(source)
    if source == cfg.gate.mc:
        items = items[: len(items) - len(gate_questions(cfg))]
    return items[:max_items] if max_items else items


def extraction_rows(cfg: Config) -> pa.Table:
    """Every text the fit needs, in a fixed order: pair texts per value, then the gate's texts if a probe gate.

    A probe gate is value-specific: it reads the studied values' pair texts, every value's gate prompts
    (:func:`value_prompts`; each value's are the positives of its own gate and, for the others, negatives
    or only reported on, by ``gate.negatives``), the neutral prompts and the gate's multiple-choice
    questions (:func:`gate_questions`), in the steering prompt's template. A value outside ``data.values``
    has its pairs read only as negatives (``gate.negatives = "unrelated+other_values"``), capped at
    ``gate.other_pairs_per_value``.
    """
    rows: list[dict] = []
    for value in cfg.data.values:
        for i, pair in enumerate(load_pair_source(cfg.data.pairs, value, cfg.data.pair_kind)):
            for label, text, tag in ((1, pair.positive, "pos"), (0, pair.negative, "neg")):
                rows.append(
                    dict(
                        row_id=f"pairs/{value}/{i:06d}/{tag}",
                        dataset="pairs",
                        value=value,
                        label=label,
                        group=i,
                        text=text,
                        chat_template=cfg.extract.chat_template,
                    )
                )
    if cfg.gate.kind == "probe":
        rows += _gate_rows(cfg)
    return pa.Table.from_pylist(rows, schema=EXTRACTION_INPUT_SCHEMA)


def _gate_rows(cfg: Config) -> list[dict]:
    rows = []
    other_negatives = cfg.gate.negatives == "unrelated+other_values"
    for value in D.VALUES:
        cap = None if value in cfg.data.values else cfg.gate.other_pairs_per_value or None
        studied = value in cfg.data.values
        pairs = (
            load_pair_source(cfg.data.pairs, value, cfg.data.pair_kind) if studied or other_negatives else []
        )
        for i, pair in enumerate(pairs[:cap]):
            for text, tag in ((pair.positive, "pos"), (pair.negative, "neg")):
                # The gate reads prompts as the model sees them when steered: in the steering template.
                rows.append(
                    dict(
                        row_id=f"gate/{value}/{i:06d}/{tag}",
                        dataset="gate",
                        value=value,
                        label=1,
                        group=i,
                        text=text,
                        chat_template=cfg.steer.chat_template,
                    )
                )
        for i, prompt in enumerate(value_prompts(cfg, value)[1] if cfg.gate.value_prompts else []):
            rows.append(
                dict(
                    row_id=f"gate_prompt/{value}/{i:06d}",
                    dataset="gate_prompt",
                    value=value,
                    label=1,
                    group=i,
                    text=prompt.prompt,
                    chat_template=cfg.steer.chat_template,
                )
            )
    neutral = D.demo_neutral() if cfg.data.neutral == "demo" else D.load_prompts(cfg.data.neutral)
    for i, prompt in enumerate(neutral):
        rows.append(
            dict(
                row_id=f"neutral/{i:06d}",
                dataset="neutral",
                value=None,
                label=0,
                group=i,
                text=prompt.prompt,
                chat_template=cfg.steer.chat_template,
            )
        )
    for i, item in enumerate(gate_questions(cfg)):
        rows.append(
            dict(
                row_id=f"mc/{i:06d}",
                dataset="mc",
                value=None,
                label=0,
                group=i,
                text=mc_prompt(item),  # as the utility asks it (0-shot)
                chat_template=cfg.steer.chat_template,
            )
        )
    return rows


def extract_table(
    model, tok, rows: pa.Table, layers: Sequence[int], position: str, batch_size: int
) -> pa.Table:
    """Activations for one shard of :func:`extraction_rows`: one output row per (text, layer), layer-major.

    A text longer than the model's maximum length becomes an error row (``error`` says why, ``activation``
    is null, at every layer); the fit leaves such texts out. The other rows are what they would be without it.
    """
    texts = rows.column("text").to_pylist()
    flags = rows.column("chat_template").to_pylist()
    limit = _max_length(model)
    errors = _length_errors(tok, texts, flags, limit)
    acts = np.zeros((len(texts), len(layers), model.config.hidden_size), dtype=np.float32)
    for flag in (False, True):
        idx = [i for i, f in enumerate(flags) if f == flag and errors[i] is None]
        if idx:
            acts[idx] = record_activations(
                model,
                tok,
                [texts[i] for i in idx],
                layers,
                position=position,
                chat_template=flag,
                batch_size=batch_size,
            )
    n, L, d = acts.shape
    hashes = [D.text_hash(t) for t in texts]
    # Layer-major order lets a reader fetch one layer's rows from contiguous row groups.
    take = np.tile(np.arange(n), L)
    meta = rows.select(["row_id", "dataset", "value", "label", "group"]).take(pa.array(take))
    bad = np.tile(np.asarray([e is not None for e in errors]), L)
    flat = pa.FixedSizeListArray.from_arrays(
        pa.array(acts.transpose(1, 0, 2).reshape(-1)), d, mask=pa.array(bad) if bad.any() else None
    )
    return pa.table(
        {
            **{name: meta.column(name) for name in meta.column_names},
            "text_hash": pa.array([hashes[i] for i in take], pa.string()),
            "layer": pa.array(np.repeat(np.asarray(layers, dtype=np.int32), n)),
            "position": pa.array([position] * (n * L), pa.string()),
            "activation": flat,
            "error": pa.array([errors[i] for i in take], pa.string()),
        },
        schema=activation_schema(d),
    )


def _length_errors(tok, texts: list[str], chat_template: list[bool], limit: int) -> list[str | None]:
    """Per text: why it cannot be recorded (more tokens than the model's limit), or None."""
    errors: list[str | None] = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, f in enumerate(chat_template) if f == flag]
        if not idx:
            continue
        ids = tok([format_prompt(tok, texts[i], flag) for i in idx], add_special_tokens=not flag)["input_ids"]
        for i, seq in zip(idx, ids):
            if len(seq) > limit:
                errors[i] = f"text too long: {len(seq)} tokens > the model's limit of {limit}"
    return errors


def fit_settings(cfg: Config) -> FitSettings:
    """The fit part of a job config as the library's settings."""
    return FitSettings(
        probe=cfg.probe, gate=cfg.gate, band=cfg.fit.band, band_width=cfg.fit.band_width, p0=cfg.fit.p0
    )


_GATE_DATASETS = ("gate", "gate_prompt", "neutral", "mc")


def fit_rows_filter(value: str):
    """The activation rows one value's fit reads (a pyarrow dataset filter): its pairs and all gate texts."""
    import pyarrow.compute as pc

    own = (pc.field("dataset") == "pairs") & (pc.field("value") == value)
    return own | pc.field("dataset").isin(list(_GATE_DATASETS))


def gate_data(
    meta: pa.Table, value: str, read_rows: Callable[[int, np.ndarray], np.ndarray], layers: Sequence[int]
) -> LayerData | None:
    """The probe gate's rows for ``value``: its own prompts and texts (1), the other values' prompts and texts,
    neutral prompts and multiple-choice questions (0).

    Groups keep a pair's two texts together in the gate's split; ``origin`` says which kind each row is
    (:data:`conva.gates.ROW_KINDS`); the fit labels them by ``gate.negatives``.
    None when ``meta`` holds no gate texts (the gate is not a probe).
    """
    dataset = np.asarray(meta.column("dataset").to_pylist(), dtype=object)
    values = np.asarray(meta.column("value").to_pylist(), dtype=object)
    groups = np.asarray(meta.column("group").to_pylist())
    rows = np.flatnonzero(np.isin(dataset, _GATE_DATASETS))
    if not len(rows):
        return None
    own, kind = values[rows] == value, dataset[rows].astype(str)
    origin = np.select(
        [kind == "gate", kind == "gate_prompt"],
        [np.where(own, "own_pair", "other_pair"), np.where(own, "own", "other")],
        default=kind,  # neutral, mc
    )
    keys = np.asarray([f"{dataset[r]}/{values[r]}/{groups[r]}" for r in rows])

    def matrix(l: int, r: np.ndarray = rows) -> np.ndarray:
        return read_rows(l, r)

    return LayerData(
        matrix,
        np.isin(origin, ("own", "own_pair")).astype(np.int64),
        keys,
        tuple(layers),
        origin=origin,
    )


def fit_bundles(
    meta: pa.Table,
    read_layer: Callable[[int], np.ndarray],
    layers: Sequence[int],
    cfg: Config,
    model: ModelInfo,
    dataset_hash: str = "",
) -> dict[str, ValueBundle]:
    """Fit every value's bundle; ``read_layer(l)`` returns ``[n, d]`` rows aligned with ``meta``.

    ``meta`` holds one row per text (``row_id, dataset, value, label, group``). Each call of
    ``read_layer`` is cached for one layer only, so at most one layer's activations are in memory.
    """
    cache: dict[int, np.ndarray] = {}

    def read_rows(l: int, rows: np.ndarray) -> np.ndarray:
        if l not in cache:
            cache.clear()
            cache[l] = read_layer(l)
        return cache[l][rows]

    dataset = np.asarray(meta.column("dataset").to_pylist())
    values = np.asarray(meta.column("value").to_pylist(), dtype=object)
    labels = np.asarray(meta.column("label").to_pylist())
    groups = np.asarray(meta.column("group").to_pylist())
    bundles = {}
    for value in cfg.data.values:
        pair_rows = np.flatnonzero((dataset == "pairs") & (values == value))

        def matrix(l: int, r: np.ndarray = pair_rows) -> np.ndarray:
            return read_rows(l, r)

        pairs = LayerData(matrix, labels[pair_rows], groups[pair_rows], tuple(layers))
        gate = gate_data(meta, value, read_rows, layers)
        bundles[value] = fit_value(
            value,
            pairs,
            gate,
            model,
            fit_settings(cfg),
            position=cfg.extract.position,
            chat_template=cfg.extract.chat_template,
            dataset_hash=dataset_hash,
        )
    return bundles


def steering_rows(cfg: Config) -> pa.Table:
    """The prompts to steer: each value's prompts from ``data.prompts`` but the gate's (capped per value if asked)."""
    rows = []
    for value in cfg.data.values:
        prompts, _ = value_prompts(cfg, value)
        rows += [
            dict(row_id=f"{value}/{i:06d}", value=value, prompt=p.prompt, error=None)
            for i, p in enumerate(prompts)
        ]
    return pa.Table.from_pylist(rows, schema=STEERING_INPUT_SCHEMA)


def steering_rows_from_records(
    name: str, records: Iterable[D.Record], values: Sequence[str] | None = None
) -> pa.Table:
    """Bulk steering input in the project schema, leniently: unusable rows carry an ``error`` reason.

    ``name`` (the file's base name) prefixes the row ids, ``<name>/<row>``; a row naming a value outside
    ``values`` (no bundle is fitted for it) is an error row too. **Neutral rows**: a value that is absent,
    null or empty text (a CSV cell cannot be null) means none, in every format; such a row is generated
    unsteered (:func:`row_spec`). The driver screens a whole input with this same function
    (:mod:`conva.batch.badrows`), so ``validate`` counts exactly the error rows the workers will write, but for
    prompts over the token limit (that needs the tokenizer).
    """
    rows = []
    for rec in records:
        value, error = rec.fields.get("value"), rec.error
        if isinstance(value, str) and not value.strip():
            value = None
        if error is None and "value" not in rec.fields:
            error = _misspelt(rec.fields, "value")
        if error is None and value is not None and value not in D.VALUES:
            error = f"unknown value {value!r}"
        if error is None and value is not None and values is not None and value not in values:
            error = f"no bundle for value {value!r} (not in data.values)"
        prompt = rec.fields.get("prompt")
        if error is None:
            error = _prompt_field_error(rec.fields) or prompt_problem(prompt)
        if error is not None and not isinstance(prompt, str):
            prompt = rec.raw or None  # an error row keeps what was read: the line, the record, the row
        rows.append(
            dict(
                row_id=f"{name}/{rec.row:06d}",
                value=value if isinstance(value, str) else None,
                prompt=prompt if isinstance(prompt, str) else None,
                error=error,
            )
        )
    return pa.Table.from_pylist(rows, schema=STEERING_INPUT_SCHEMA)


def _misspelt(fields: dict, known: str) -> str | None:
    """A field that looks like ``known`` misspelt (``Value``, ``values``, ``prompts``), as an error reason."""
    import difflib

    lowered = {str(f).strip().lower(): f for f in fields}
    near = difflib.get_close_matches(known, list(lowered), n=1, cutoff=0.75)
    if not near:
        return None
    return f"no {known} field, but a field {lowered[near[0]]!r}: the column must be named {known!r}"


def _prompt_field_error(fields: dict) -> str | None:
    if "prompt" not in fields:
        return _misspelt(fields, "prompt") or (
            "no prompt field" + (f": the row has {', '.join(map(str, fields))}" if fields else "")
        )
    prompt = fields["prompt"]
    if prompt is None or isinstance(prompt, str):
        return None
    return f"prompt is {type(prompt).__name__}, not text"


def steering_rows_from_file(path: str | Path, values: Sequence[str] | None = None) -> pa.Table:
    """:func:`steering_rows_from_records` of a whole file (path or URI), in one process."""
    return steering_rows_from_records(Path(str(path)).name, D.read_records(path), values)


def prompt_problem(prompt: str | None) -> str | None:
    """Why ``prompt`` cannot be steered, as far as the text alone tells (null, empty, NUL), or None."""
    if prompt is None:
        return "prompt is null"
    if not prompt.strip():
        return "empty prompt" if not prompt else "prompt is whitespace only"
    if "\x00" in prompt:
        return "prompt contains NUL characters"
    return None


def check_prompt(tok, prompt: str | None, chat_template: bool, max_tokens: int) -> str | None:
    """Why ``prompt`` cannot be steered (empty, NUL, too long…), or None if it can."""
    problem = prompt_problem(prompt)
    if problem is not None:
        return problem
    assert prompt is not None  # prompt_problem refuses a null prompt
    if len(prompt) > 64 * max_tokens:  # no tokenizer emits fewer than one token per 64 characters
        return f"prompt too long: {len(prompt)} characters (limit {max_tokens} tokens)"
    try:
        n = len(
            tok(format_prompt(tok, prompt, chat_template), add_special_tokens=not chat_template)["input_ids"]
        )
    except Exception as exc:  # tokenizers raise assorted types on odd input
        return f"tokenizer failure: {type(exc).__name__}: {exc}"
    if n > max_tokens:
        return f"prompt too long: {n} tokens > limit {max_tokens}"
    return None


# Optional per-row columns of the steering input that override ``[steer]`` (a study mixes cells in one batch).
ROW_OVERRIDES = ("method", "p0", "strength", "setting", "band")


def row_settings(cfg: Config, row: dict) -> dict:
    """The row's ``method, p0, strength, setting, band``: ``[steer]``, overridden by the row's own columns."""
    s = {k: getattr(cfg.steer, k, None) for k in ROW_OVERRIDES}
    s.update({k: row[k] for k in ROW_OVERRIDES if row.get(k) is not None})
    return s


def row_spec(cfg: Config, bundle: ValueBundle | None, row: dict) -> SteerSpec:
    """The steering spec of one input row (:func:`row_settings`); a row without a bundle (neutral) is unsteered."""
    s = row_settings(cfg, row)
    band = tuple(s["band"]) if s["band"] else None
    gate: dict[str, Any] = dict(gate_scope=cfg.gate.apply_to, prefix_on=cfg.gate.prefix_on)
    if bundle is None or s["method"] == "none":
        return SteerSpec("none", bundle, setting=s["setting"], **gate) if bundle else SteerSpec("none")
    return SteerSpec(
        s["method"], bundle, p0=s["p0"], strength=s["strength"], band=band, setting=s["setting"], **gate
    )


GenerateFn = Callable[[list[str], list[SteerSpec]], list[RowResult]]


def hf_generate_fn(model, tok, cfg: Config) -> GenerateFn:
    """The HF backend's generation with the ``[steer]`` settings, as a steering table's ``generate_fn``."""
    s = cfg.steer

    def run(prompts: list[str], specs: list[SteerSpec]) -> list[RowResult]:
        from conva.steering.hf import generate  # torch loads with the model, not with the config

        return generate(
            model,
            tok,
            prompts,
            specs,
            max_new_tokens=s.max_new_tokens,
            chat_template=s.chat_template,
            positions=s.positions,
            epsilon=s.epsilon,
            mode=s.mode,
            batch_size=s.batch_size,
        )

    return run


def steer_table(
    model,
    tok,
    rows: pa.Table,
    bundles: dict[str, ValueBundle],
    cfg: Config,
    model_name: str,
    *,
    generate_fn: GenerateFn | None = None,
    max_length: int | None = None,
) -> pa.Table:
    """Steered generations for one shard of steering rows: exactly one output row per input row.

    Every backend goes through here, so rows are checked and error rows made the same way: ``model`` and
    the HF generation are the default; another backend passes its ``generate_fn`` and ``max_length``.
    """
    s = cfg.steer
    generate_fn = generate_fn or hf_generate_fn(model, tok, cfg)
    limit = s.max_prompt_tokens or max(1, (max_length or _max_length(model)) - s.max_new_tokens)
    records = rows.to_pylist()
    errors = [r["error"] or check_prompt(tok, r["prompt"], s.chat_template, limit) for r in records]
    if not all(
        r["value"] in bundles for r, e in zip(records, errors) if e is None and r["value"] is not None
    ):
        missing = sorted({r["value"] for r in records if r["value"] not in bundles})
        raise ValueError(f"no bundle for value(s) {missing}")
    good = [i for i, e in enumerate(errors) if e is None]
    specs = [row_spec(cfg, bundles.get(records[i]["value"]), records[i]) for i in good]
    results = generate_fn([records[i]["prompt"] for i in good], specs) if good else []
    by_row: dict[int, tuple[RowResult, SteerSpec]] = dict(zip(good, zip(results, specs)))
    out = [
        _generation_row(r, row_settings(cfg, r), by_row.get(i), errors[i], model_name)
        for i, r in enumerate(records)
    ]
    return pa.Table.from_pylist(out, schema=GENERATION_SCHEMA)


def _max_length(model) -> int:
    return int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 2048)
    )


def _generation_row(
    rec: dict, asked: dict, done: tuple[RowResult, SteerSpec] | None, error: str | None, model: str
) -> dict:
    """One output row. ``method`` and ``setting`` are always the row's own (``asked``), error and neutral rows too.

    ``context`` is the user message the answer was generated from (the prompt with any prefix).
    """
    method = asked["method"]
    row = dict(
        row_id=rec["row_id"],
        prompt=rec["prompt"],
        context=None,
        output=None,
        n_prompt_tokens=None,
        n_output_tokens=None,
        model=model,
        value=rec["value"],
        method=method,
        setting=asked["setting"],
        p0=asked["p0"] if method in ("conva", "conva_nogate") else None,
        strength=asked["strength"] if method in ("caa", "probe_fixed") else None,
        gate_score=None,
        gate_open=None,
        layers=None,
        eps=None,
        p_before=None,
        p_after=None,
        error=error,
    )
    if done is not None:
        res, spec = done
        row.update(
            output=res.text,
            context=res.context,
            n_prompt_tokens=res.n_prompt_tokens,
            n_output_tokens=len(res.tokens),
            p0=spec.target(),
            strength=spec.strength if spec.method in ("caa", "probe_fixed") else None,
            gate_score=res.gate_score,
            gate_open=res.gate_open,
            layers=list(res.layers),
            eps=list(res.eps),
            p_before=list(res.p_before),
            p_after=list(res.p_after),
        )
    return row


_META_COLUMNS = ["row_id", "dataset", "value", "label", "group"]


def probe_rows(bundle: ValueBundle) -> pa.Table:
    """One row per probed layer of a bundle: accuracies, band membership, the gate (``bundles/part-*.parquet``)."""
    g, n = bundle.gate, len(bundle.layers)
    return pa.table(
        {
            "value": [bundle.value] * n,
            "layer": bundle.layers.astype(np.int32),
            "train_acc": bundle.train_acc.astype(np.float64),
            "test_acc": bundle.test_acc.astype(np.float64),
            "in_band": [int(l) in bundle.band for l in bundle.layers],
            "fingerprint": [bundle.fingerprint] * n,
            "gate_kind": [g.kind] * n,
            "gate_layer": pa.array([g.layer] * n, pa.int32()),
            "gate_threshold": pa.array([g.threshold] * n, pa.float64()),
        },
        schema=BUNDLE_PROBE_SCHEMA,
    )


def activation_model(infos: Iterable[dict]) -> tuple[ModelInfo, list[int]]:
    """The one model a stage's activation shards were recorded with, and its layers; refuse a mix."""
    distinct = {json.dumps(i, sort_keys=True) for i in infos}
    if len(distinct) != 1:
        raise ValueError(
            f"the activation shards were recorded with {len(distinct)} different models (or none); "
            "rerun extract with --overwrite"
        )
    meta = json.loads(distinct.pop())
    return ModelInfo(meta["name"], meta["fingerprint"], meta["hidden_size"], meta["n_blocks"]), list(
        meta["layers"]
    )


def value_activations(dataset, value: str, layers: Sequence[int], hidden: int):
    """``(meta, read_layer)`` for fitting ``value``: its pair texts and every gate text, one layer at a time.

    ``meta`` has one row per recorded text (``row_id, dataset, value, label, group``); ``read_layer(l)``
    returns ``[n, hidden]`` float32 rows aligned with it. Error rows (texts the extraction could not
    record) are left out. ``read_layer`` scans only the files that hold these texts, and in them only the
    layer's row group (pruned by its statistics): a value's layer costs a few row groups whatever the
    size of the whole activation store.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    rows = fit_rows_filter(value) & pc.field("error").is_null()
    meta = dataset.to_table(
        columns=[*_META_COLUMNS, "__filename"], filter=rows & (pc.field("layer") == layers[0])
    )
    files = set(meta.column("__filename").to_pylist())
    meta, ids = meta.drop_columns(["__filename"]), meta.column("row_id")
    own = ds.FileSystemDataset(
        [f for f in dataset.get_fragments() if f.path in files],
        dataset.schema,
        dataset.format,
        dataset.filesystem,
    )

    def read_layer(layer: int) -> np.ndarray:
        part = own.to_table(columns=["row_id", "activation"], filter=rows & (pc.field("layer") == layer))
        if not part.column("row_id").equals(ids):
            raise ValueError(
                f"activations of layer {layer} are not aligned with layer {layers[0]} for {value!r}"
            )
        flat = part.column("activation").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(part.num_rows, hidden)

    return meta, read_layer
