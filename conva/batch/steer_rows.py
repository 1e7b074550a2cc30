"""Steering as functions over Arrow tables: the prompts to steer, each row's spec, and the generations.

The driver builds the steering input (:func:`steering_rows` from the config, or a user's file read leniently
by the workers with :func:`steering_rows_from_records`: a bad row becomes an error row); a worker steers one
shard with :func:`steer_table`, which makes each row's :class:`~conva.steering.spec.SteerSpec`
(:func:`row_spec`: ``[steer]`` with the row's own overrides) and writes exactly one generation row per
input row.

Schemas (documented in the README):

* steering input: ``row_id, value, prompt, error`` and optionally per-row ``method, p0, strength,
  setting, band`` overriding ``[steer]`` (:data:`ROW_OVERRIDES`)
* generations: ``row_id, prompt, context, output, n_prompt_tokens, n_output_tokens, model, value, method,
  setting, p0, strength, gate_score, gate_open, layers, eps, p_before, p_after, error`` — one row per input
  row; ``context`` is the user message the answer was generated from (``prompt`` with any prefix)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from conva import data as D
from conva.batch.config import Config
from conva.batch.schemas import (
    GENERATION_SCHEMA,
    STEERING_INPUT_SCHEMA,
)
from conva.batch.sources import value_prompts
from conva.bundle import ValueBundle
from conva.record import format_prompt, max_positions
from conva.steering.spec import P0_METHODS, STRENGTH_METHODS, RowResult, SteerSpec

__all__ = [
    "steering_rows",
    "steering_rows_from_records",
    "steering_rows_from_file",
    "prompt_problem",
    "check_prompt",
    "ROW_OVERRIDES",
    "row_settings",
    "row_spec",
    "GenerateFn",
    "hf_generate_fn",
    "steer_table",
]


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
    limit = s.max_prompt_tokens or max(1, (max_length or max_positions(model)) - s.max_new_tokens)
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
        _generation_row(r, _asked(cfg, r, bundles.get(r["value"])), by_row.get(i), errors[i], model_name)
        for i, r in enumerate(records)
    ]
    return pa.Table.from_pylist(out, schema=GENERATION_SCHEMA)


def _asked(cfg: Config, row: dict, bundle: ValueBundle | None) -> dict:
    """The row's settings (:func:`row_settings`) with the P0 it is steered toward: ``steer.p0`` (or the row's
    own), unset: its bundle's ``fit.p0``. So the ``p0`` column has one meaning on every row, error rows too
    (None where no bundle was fitted for the row's value, or the method has no P0)."""
    s = row_settings(cfg, row)
    if s["p0"] is None and bundle is not None:
        s["p0"] = bundle.p0
    return s


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
        p0=asked["p0"] if method in P0_METHODS else None,
        strength=asked["strength"] if method in STRENGTH_METHODS else None,
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
            strength=spec.strength if spec.method in STRENGTH_METHODS else None,
            gate_score=res.gate_score,
            gate_open=res.gate_open,
            layers=list(res.layers),
            eps=list(res.eps),
            p_before=list(res.p_before),
            p_after=list(res.p_after),
        )
    return row
