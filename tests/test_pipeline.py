"""Stage functions in one process: row contract, error rows, per-row overrides, layer-major activations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from conva.batch.config import load_config
from conva.batch.extraction import extract_table
from conva.batch.schemas import GENERATION_SCHEMA, STEERING_INPUT_SCHEMA
from conva.batch.steer_rows import steer_table
from conva.record import record_activations


def test_extract_table_is_layer_major_and_matches_record(tiny):
    model, tok = tiny
    rows = pa.table(
        {
            "row_id": ["a", "b", "c"],
            "dataset": ["pairs"] * 3,
            "value": ["power"] * 3,
            "label": pa.array([1, 0, 1], pa.int8()),
            "group": [0, 0, 1],
            "text": ["I lead.", "I follow.", "I rule the room."],
            "chat_template": [False, False, True],
        }
    )
    out = extract_table(model, tok, rows, [1, 3], "last", 2)
    assert out.num_rows == 6 and out.column("layer").to_pylist() == [1, 1, 1, 3, 3, 3]
    assert out.column("row_id").to_pylist() == ["a", "b", "c"] * 2
    acts = np.asarray(out.column("activation").combine_chunks().flatten()).reshape(6, -1)
    raw = record_activations(model, tok, ["I lead.", "I follow."], [1, 3], batch_size=2)
    templ = record_activations(model, tok, ["I rule the room."], [1, 3], chat_template=True)
    assert np.array_equal(acts[[0, 1, 3, 4]], raw.transpose(1, 0, 2).reshape(4, -1))
    assert np.array_equal(acts[[2, 5]], templ[0])


def test_steer_table_row_contract_errors_and_overrides(tiny, tiny_bundles):
    model, tok = tiny
    bundle = tiny_bundles[0]
    cfg = load_config(None, ["--steer.max_new_tokens=4", "--steer.method=conva", "--steer.p0=0.99"])
    prompts = ["Should I lead?", "", "   ", "a\x00b", "word " * 600, None, "Should I obey?"]
    rows = (
        pa.Table.from_pylist(
            [dict(row_id=f"r{i}", value="power", prompt=p, error=None) for i, p in enumerate(prompts)],
            schema=STEERING_INPUT_SCHEMA,
        )
        .append_column("method", pa.array([None] * 6 + ["caa"]))
        .append_column("strength", pa.array([None] * 6 + [2.5]))
    )
    out = steer_table(model, tok, rows, {"power": bundle}, cfg, "tiny")
    assert out.schema == GENERATION_SCHEMA and out.num_rows == len(prompts)
    assert out.column("row_id").to_pylist() == [f"r{i}" for i in range(len(prompts))]
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[6] is None
    assert errors[1] == "empty prompt" and errors[2] == "prompt is whitespace only"
    assert errors[3] == "prompt contains NUL characters" and errors[4].startswith("prompt too long")
    assert errors[5] == "prompt is null"
    assert out.column("method").to_pylist()[0] == "conva" and out.column("p0").to_pylist()[0] == 0.99
    assert out.column("method").to_pylist()[6] == "caa" and out.column("strength").to_pylist()[6] == 2.5
    assert out.column("eps").to_pylist()[6] == [2.5] * len(bundle.band)


def test_the_p0_column_means_the_p0_steered_toward_on_good_and_error_rows(tiny, tiny_bundles):
    """``steer.p0`` unset: every ConVA row, good or error, stores its bundle's ``fit.p0``; a row whose value
    has no bundle (an error row for a value not fitted) and a CAA row store none."""
    model, tok = tiny
    bundle = tiny_bundles[0]
    cfg = load_config(None, ["--steer.max_new_tokens=2", "--steer.method=conva"])
    assert cfg.steer.p0 is None
    rows = pa.Table.from_pylist(
        [
            dict(row_id="good", value="power", prompt="Should I lead?", error=None),
            dict(row_id="long", value="power", prompt="word " * 600, error=None),
            dict(row_id="bad", value="nope", prompt="Should I?", error="unknown value 'nope'"),
        ],
        schema=STEERING_INPUT_SCHEMA,
    )
    out = steer_table(model, tok, rows, {"power": bundle}, cfg, "tiny")
    assert out.column("error").to_pylist()[0] is None and out.column("error").to_pylist()[1] is not None
    assert out.column("p0").to_pylist() == [bundle.p0, bundle.p0, None]
    caa = load_config(None, ["--steer.max_new_tokens=2", "--steer.method=caa", "--steer.strength=1.0"])
    assert (
        steer_table(model, tok, rows, {"power": bundle}, caa, "tiny").column("p0").to_pylist() == [None] * 3
    )


def test_over_long_text_is_an_error_row_and_the_fit_leaves_it_out(tiny, tiny_path, tmp_path):
    """An extraction text over the model's length (tiny: 512 positions) becomes an error row at every layer
    (null activation, the reason in ``error``); the other rows are unchanged and the fit job fits without it."""

    import types

    from conva.batch.extraction import extraction_rows
    from conva.batch.schemas import SCHEMA_VERSION
    from conva.batch.storage import location
    from conva.batch.store import Stage, write_table_shard
    from conva.bundle import load_bundle
    from conva.workers.shards import fit
    from conva.workers.tasks import ShardTask

    model, tok = tiny
    cfg = load_config(
        None, [f"--model.name={tiny_path}", '--data.values=["power"]', "--gate.kind=none", "--fit.band=1-2"]
    )
    rows = extraction_rows(cfg)
    long_text = "word " * 600
    bad = rows.set_column(
        rows.schema.get_field_index("text"),
        "text",
        pa.array([long_text] + rows.column("text").to_pylist()[1:]),
    )
    layers = list(range(4))
    out = extract_table(model, tok, bad, layers, "last", 16)
    n = rows.num_rows
    errors = out.column("error").to_pylist()
    assert [i % n for i, e in enumerate(errors) if e is not None] == [0] * len(layers)
    assert errors[0].startswith("text too long: ") and errors[0].endswith("> the model's limit of 512")
    assert out.column("activation").null_count == len(layers)
    # The other rows are recorded exactly as a shard without the bad text would be (same batches).
    clean = extract_table(model, tok, rows.slice(1), layers, "last", 16)
    keep = [i for i in range(n * len(layers)) if i % n]
    assert out.take(keep).drop_columns(["error"]).equals(clean.drop_columns(["error"]))

    meta = {
        "name": "tiny",
        "fingerprint": "f",
        "hidden_size": model.config.hidden_size,
        "n_blocks": len(layers),
        "layers": layers,
    }
    root = location(tmp_path)
    acts = Stage.open(root, "activations", {"t": 1}, SCHEMA_VERSION, n_shards=1)
    assert acts.commit(write_table_shard(acts.ref(0, "a"), out, row_group_size=n, extra={"model": meta}))
    bundles = Stage.open(root, "bundles", {"t": 1}, SCHEMA_VERSION, n_shards=1)
    params = {
        "value": "power",
        "model": {k: meta[k] for k in ("name", "fingerprint", "hidden_size", "n_blocks")},
        "layers": layers,
        "dataset_hash": "h",
    }
    task = ShardTask("fit", bundles.ref(0, "f"), files=tuple(acts.parquet_files()), params=params)
    record = fit(types.SimpleNamespace(cfg=cfg), task)  # the fit shard, as a worker runs it
    assert bundles.commit(record)
    assert record.extra["skipped"] == 1 and record.extra["skipped_examples"][0]["error"].startswith(
        "text too long"
    )
    bundle = load_bundle(tmp_path / "bundles" / "power")
    assert bundle.extra["n_train"] + bundle.extra["n_val"] + bundle.extra["n_test"] == n - 1
