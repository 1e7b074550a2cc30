"""Checks a job runs before any worker starts: fail in seconds, with one message naming the key, write nothing.

Covers the config (already validated by ``load_config``), the model's existence (no weights loaded),
the inputs (read in full: they are the job's row tables), the output folder's writability, the stages
a job needs from an earlier job, and, for ``steer``, that every bundle was made for this model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from conva.bundle import BundleError, load_bundle
from conva.config import Config
from conva.data import DataError, is_folder
from conva.models import ModelNotFoundError, check_model
from conva.pipeline import STEERING_INPUT_SCHEMA, extraction_rows, steering_rows, steering_rows_from_file
from conva.store import OutputNotWritableError, check_writable
from jobs.common import JobError
from conva.fingerprint import file_fingerprint
from workers.backends import check_backend

__all__ = ["Inputs", "preflight", "steering_input", "table_hash"]

_log = logging.getLogger("conva.jobs")


@dataclass(frozen=True)
class Inputs:
    """What a job will process, built before anything starts; None where the job does not need it."""

    out: Path
    extraction: pa.Table | None = None
    steering: pa.Table | None = None


def preflight(cfg: Config, stages: tuple[str, ...]) -> Inputs:
    """Validate everything ``stages`` (of extract, fit, steer) need; raise naming the config key. Writes nothing."""
    try:
        check_model(cfg.model.name)
    except ModelNotFoundError as err:
        raise JobError(f"model.name: {err}") from err
    if "steer" in stages:
        check_backend(cfg.steer.backend)
    try:
        out = check_writable(cfg.output.dir)
    except OutputNotWritableError as err:
        raise JobError(f"output.dir: {err}") from err
    extraction = _read("data.pairs", lambda: extraction_rows(cfg)) if {"extract", "fit"} & set(stages) else None
    steering = _read("data.prompts", lambda: steering_input(cfg)) if "steer" in stages else None
    if "fit" in stages and "extract" not in stages:
        _require_stage(out, "activations", "extract")
    if "steer" in stages and "fit" not in stages:
        _require_stage(out, "bundles", "fit")
        _check_bundles(cfg, out)
    return Inputs(out, extraction, steering)


def steering_input(cfg: Config) -> pa.Table:
    """The rows to steer. A single file is read leniently (bad rows become error rows); else strictly.

    Rows of a value outside ``data.values`` (no bundle is fitted for it) become error rows too;
    ``data.max_prompts_per_value`` applies to ``demo``/``paper:`` sources and folders, not to a file.
    """
    source = cfg.data.prompts
    if source == "demo" or source.startswith("paper:") or is_folder(source):
        return steering_rows(cfg)
    rows = steering_rows_from_file(source)
    errors = [e if e is not None or v is None or v in cfg.data.values else f"no bundle for value {v!r} (not in data.values)"
              for v, e in zip(rows.column("value").to_pylist(), rows.column("error").to_pylist())]
    return rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(errors, pa.string())).cast(
        STEERING_INPUT_SCHEMA)


def table_hash(table: pa.Table) -> str:
    """sha256 of a row table's content, so a resumed stage refuses inputs that changed under it."""
    digest = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=4096):
        digest.update(json.dumps(batch.to_pylist(), sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _read(key: str, build):
    try:
        return build()
    except DataError as err:
        raise JobError(f"{key}: {err}") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise JobError(f"{key}: cannot read the input: {type(err).__name__}: {err}") from err


def _require_stage(out: Path, stage: str, job: str) -> None:
    if not (out / stage / "_manifest.json").is_file():
        raise JobError(f"output.dir: {out / stage} does not exist; run the {job} job first (or the run job)")


def _check_bundles(cfg: Config, out: Path) -> None:
    fingerprint = file_fingerprint(cfg.model.name, cfg.model.dtype)
    for value in cfg.data.values:
        path = out / "bundles" / value
        if not (path / "meta.json").is_file():
            raise JobError(f"data.values: no bundle for {value!r} in {path.parent}; run the fit job first")
        try:
            load_bundle(path, fingerprint=fingerprint)
        except BundleError as err:
            raise JobError(f"model.name: {err}") from err
