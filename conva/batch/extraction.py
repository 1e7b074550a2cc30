"""Extraction and fitting as functions over Arrow tables: the texts to record, their activations, the bundles.

The driver builds the extraction input with :func:`extraction_rows`; a worker records one shard of it with
:func:`extract_table` (one row per text and layer, schema :func:`conva.batch.schemas.activation_schema`);
:func:`fit_bundles` fits every value's :class:`~conva.bundle.ValueBundle` from the activation rows (the fit
stage reads one value's rows with :func:`fit_rows_filter` and :func:`value_activations`). The same functions
run in one process for the library and the tests, so the distributed job and the single-process path
compute the same thing.

Schemas (version :data:`conva.batch.schemas.SCHEMA_VERSION`; documented in the README):

* extraction input: ``row_id, dataset, value, label, group, text, chat_template``
* activations: ``row_id, dataset, value, label, group, text_hash, layer, position, activation
  (fixed-size list<float32>), error`` — one row per (text, layer)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from conva import data as D
from conva.batch.config import Config
from conva.batch.schemas import (
    BUNDLE_PROBE_SCHEMA,
    EXTRACTION_INPUT_SCHEMA,
    activation_schema,
)
from conva.batch.sources import gate_questions, load_pair_source, value_prompts
from conva.bundle import ValueBundle
from conva.fit import FitSettings, LayerData, ModelInfo, fit_value
from conva.mc import mc_prompt
from conva.record import format_prompt, max_positions, record_activations

__all__ = [
    "extraction_rows",
    "extract_table",
    "fit_settings",
    "fit_rows_filter",
    "gate_data",
    "fit_bundles",
    "probe_rows",
    "activation_model",
    "value_activations",
]


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
    """The gate's texts: value pairs (and the values' own prompts) labelled 1, neutral prompts and MC questions 0.

    Every text is read as the model sees it when steered: in the steering template.
    """
    rows = []

    def add(row_id: str, dataset: str, value: str | None, label: int, group: int, text: str) -> None:
        rows.append(
            dict(
                row_id=row_id,
                dataset=dataset,
                value=value,
                label=label,
                group=group,
                text=text,
                chat_template=cfg.steer.chat_template,
            )
        )

    other_negatives = cfg.gate.negatives == "unrelated+other_values"
    for value in D.VALUES:
        studied = value in cfg.data.values
        cap = None if studied else cfg.gate.other_pairs_per_value or None
        pairs = (
            load_pair_source(cfg.data.pairs, value, cfg.data.pair_kind) if studied or other_negatives else []
        )
        for i, pair in enumerate(pairs[:cap]):
            add(f"gate/{value}/{i:06d}/pos", "gate", value, 1, i, pair.positive)
            add(f"gate/{value}/{i:06d}/neg", "gate", value, 1, i, pair.negative)
        for i, prompt in enumerate(value_prompts(cfg, value)[1] if cfg.gate.value_prompts else []):
            add(f"gate_prompt/{value}/{i:06d}", "gate_prompt", value, 1, i, prompt.prompt)
    neutral = D.demo_neutral() if cfg.data.neutral == "demo" else D.load_prompts(cfg.data.neutral)
    for i, prompt in enumerate(neutral):
        add(f"neutral/{i:06d}", "neutral", None, 0, i, prompt.prompt)
    for i, item in enumerate(gate_questions(cfg)):
        add(f"mc/{i:06d}", "mc", None, 0, i, mc_prompt(item))  # as the utility asks it (0-shot)
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
    limit = max_positions(model)
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
