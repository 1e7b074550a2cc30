"""The fit stage, on the driver: stream activations one (value, layer) at a time, fit, save one bundle per value.

Each activation shard is written with one row group per layer, and shards follow the extraction rows'
value-major order, so a filter on ``layer`` and ``value`` reads only the matching row groups: never all
layers, nor all values, in memory. Bundles are the stage's "shards": ``<out>/bundles/<value>/`` is
saved, then a row of probe accuracies is committed as shard ``i`` of ``data.values``, so a rerun
refits only the values not committed yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm import tqdm

from conva.bundle import ValueBundle, save_bundle
from conva.config import Config
from conva.fit import ModelInfo
from conva.pipeline import fit_bundles, fit_rows_filter
from conva.store import Stage
from jobs.common import JobError
from jobs.stages import StageResult, _test_stop_hook
from workers.extraction import MODEL_META_KEY

__all__ = ["run_fit", "recorded_model", "PROBE_SCHEMA"]

_log = logging.getLogger("conva.jobs")
_META_COLUMNS = ["row_id", "dataset", "value", "label", "group"]
PROBE_SCHEMA = pa.schema([
    ("value", pa.string()), ("layer", pa.int32()), ("train_acc", pa.float64()), ("test_acc", pa.float64()),
    ("in_band", pa.bool_()), ("fingerprint", pa.string()), ("gate_kind", pa.string()), ("gate_layer", pa.int32()),
    ("gate_threshold", pa.float64()),
])


def run_fit(cfg: Config, acts: Stage, stage: Stage, n_activation_shards: int) -> StageResult:
    """Fit every pending value's bundle from the committed activations (which must be complete)."""
    if not acts.is_complete(n_activation_shards):
        missing = acts.pending(n_activation_shards)
        raise JobError(f"activations in {acts.path} are incomplete (shards {missing[:10]} missing); "
                       "run the extract job first")
    start, values = time.monotonic(), cfg.data.values
    todo = stage.pending(len(values))
    if not todo:
        _log.info("fit: all %d bundles already committed in %s; nothing to do", len(values), stage.path)
        return StageResult("fit", len(values), 0, 0, 0.0)
    info, layers = recorded_model(acts)
    dataset, digest = acts.dataset(), _activations_hash(acts)
    _log_error_rows(dataset, layers[0])
    for done, i in enumerate(tqdm(todo, desc="fit", unit="value", disable=None), start=1):
        value, t0 = values[i], time.monotonic()
        meta, read_layer = _value_reader(dataset, value, layers, info.hidden_size)
        one = replace(cfg, data=replace(cfg.data, values=(value,)))
        bundle = fit_bundles(meta, read_layer, layers, one, info, dataset_hash=digest)[value]
        save_bundle(bundle, stage.path / value)  # the shard commit below is what marks it done
        stage.commit(i, _probe_rows(bundle))
        _log.info("fit: %s band %s, best held-out acc %.3f, gate %s (%.1f s)", value, list(bundle.band),
                  float(np.nanmax(bundle.test_acc)), bundle.gate.kind, time.monotonic() - t0)
        _test_stop_hook("fit", done)
    return StageResult("fit", len(values), len(todo), len(todo), time.monotonic() - start)


def recorded_model(acts: Stage) -> tuple[ModelInfo, list[int]]:
    """The model every activation shard was recorded with, and the recorded layers; refuse a mix of models."""
    metas = {pq.read_schema(acts.path / r.file).metadata.get(MODEL_META_KEY) for r in acts.manifest.shards}
    if len(metas) != 1 or None in metas:
        raise JobError(f"activation shards in {acts.path} do not name one model; rerun extract with --overwrite")
    meta = json.loads(metas.pop())
    return ModelInfo(meta["name"], meta["fingerprint"], meta["hidden_size"], meta["n_blocks"]), list(meta["layers"])


def _value_reader(dataset: ds.Dataset, value: str, layers: list[int], hidden: int):
    """``meta`` (the value's pair texts and every gate text) and ``read_layer(l) -> [n, d]`` aligned to it.

    ``read_layer`` scans only the shard files that hold the value's or the neutral texts (found once, from
    the first layer's rows), and in them only the layer's row group (pruned by its statistics): a value's
    layer costs a few row groups whatever the size of the whole activation store.
    """
    # Error rows (texts the extraction could not record, e.g. over the model's length) are left out.
    rows = fit_rows_filter(value) & pc.field("error").is_null()
    meta = dataset.to_table(columns=[*_META_COLUMNS, "__filename"], filter=rows & (pc.field("layer") == layers[0]))
    files = set(meta.column("__filename").to_pylist())
    meta, ids = meta.drop_columns(["__filename"]), meta.column("row_id")
    own = ds.FileSystemDataset([f for f in dataset.get_fragments() if f.path in files], dataset.schema,
                               dataset.format, dataset.filesystem)

    def read_layer(layer: int) -> np.ndarray:
        part = own.to_table(columns=["row_id", "activation"], filter=rows & (pc.field("layer") == layer))
        if not part.column("row_id").equals(ids):
            raise JobError(f"activations of layer {layer} are not aligned with layer {layers[0]} for {value!r}")
        flat = part.column("activation").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(part.num_rows, hidden)

    return meta, read_layer


def _log_error_rows(dataset: ds.Dataset, layer: int) -> None:
    bad = dataset.to_table(columns=["row_id", "error"], filter=(pc.field("layer") == layer) & pc.field("error").is_valid())
    if bad.num_rows:
        first = bad.slice(0, 3).to_pylist()
        _log.warning("fit: %d text(s) were not recorded and are left out, e.g. %s", bad.num_rows,
                     "; ".join(f"{r['row_id']}: {r['error']}" for r in first))


def _activations_hash(acts: Stage) -> str:
    return hashlib.sha256("".join(r.sha256 for r in acts.manifest.shards).encode()).hexdigest()[:16]


def _probe_rows(bundle: ValueBundle) -> pa.Table:
    g, n = bundle.gate, len(bundle.layers)
    return pa.table({
        "value": [bundle.value] * n, "layer": bundle.layers.astype(np.int32),
        "train_acc": bundle.train_acc.astype(np.float64), "test_acc": bundle.test_acc.astype(np.float64),
        "in_band": [int(l) in bundle.band for l in bundle.layers], "fingerprint": [bundle.fingerprint] * n,
        "gate_kind": [g.kind] * n, "gate_layer": pa.array([g.layer] * n, pa.int32()),
        "gate_threshold": pa.array([g.threshold] * n, pa.float64()),
    }, schema=PROBE_SCHEMA)
