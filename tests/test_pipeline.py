"""Stage functions in one process: row contract, error rows, per-row overrides, layer-major activations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from conva.config import load_config
from conva.pipeline import GENERATION_SCHEMA, STEERING_INPUT_SCHEMA, extract_table, steer_table
from conva.record import record_activations


def test_extract_table_is_layer_major_and_matches_record(tiny):
    model, tok = tiny
    rows = pa.table({"row_id": ["a", "b", "c"], "dataset": ["pairs"] * 3, "value": ["power"] * 3,
                     "label": pa.array([1, 0, 1], pa.int8()), "group": [0, 0, 1],
                     "text": ["I lead.", "I follow.", "I rule the room."], "chat_template": [False, False, True]})
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
    rows = pa.Table.from_pylist(
        [dict(row_id=f"r{i}", value="power", prompt=p, error=None) for i, p in enumerate(prompts)],
        schema=STEERING_INPUT_SCHEMA,
    ).append_column("method", pa.array([None] * 6 + ["caa"])).append_column("strength", pa.array([None] * 6 + [2.5]))
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
