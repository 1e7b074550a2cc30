"""Data loaders, probes, gates, bundles, block location and config: exact checks without a real model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conva import data as D
from conva.batch.config import ConfigError, load_config
from conva.blocks import find_blocks
from conva.bundle import BundleError, load_bundle, save_bundle
from conva.probes import ProbeSettings, choose_band, fit_probes, parse_band, split_three
from conva.values import VALUES

# ---------------------------------------------------------------- data


def test_paper_loader_reads_all_thirty_files(paper_data):
    files = sorted(paper_data.glob("*.csv"))
    assert len(files) == 30
    for value in VALUES:
        for kind in ("context_controlled", "non_context_controlled"):
            pairs = D.paper_pairs(paper_data, value, kind)
            assert len(pairs) == 100 and all(p.value == value and p.positive and p.negative for p in pairs)
        assert len(D.paper_prompts(paper_data, value)) == 100


def test_paper_loader_accepts_the_other_spellings(paper_data, tmp_path):
    (tmp_path / "power_hard.csv").write_bytes((paper_data / "power_context_controlled.csv").read_bytes())
    (tmp_path / "power_easy.csv").write_bytes((paper_data / "power_non_context_controlled.csv").read_bytes())
    assert len(D.paper_pairs(tmp_path, "power")) == 100
    assert len(D.paper_pairs(tmp_path, "power", "non_context_controlled")) == 100


@pytest.mark.parametrize(
    "content, row, field",
    [
        ('question_1,question_2\n"a","b"\n"c",""\n', 3, "question_2"),  # rows are numbered by their line
        ('question_1,question_2\n"a","b"\n\n"c"\n', 4, None),  # a blank line is no row, but has a number
        (b'question_1,question_2\n"a","b"\n"\xff\xfe","d"\n', 3, None),
        ('question_1,other\n"a","b"\n', 2, "question_2"),
    ],
)
def test_malformed_csv_names_file_row_and_field(tmp_path, content, row, field):
    path = tmp_path / "power_context_controlled.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(D.DataError) as err:
        D.load_pairs(path)
    assert err.value.file == str(path) and err.value.row == row and err.value.field == field
    assert str(path) in str(err.value) and f"row {row}" in str(err.value)


def test_project_schema_jsonl_csv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"value": "power", "positive": "I lead.", "negative": "I follow."}] * 3
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("value,positive,negative\n" + "power,I lead.,I follow.\n" * 3)
    for name in ("p.jsonl", "p.parquet", "p.csv"):
        assert [p.positive for p in D.load_pairs(tmp_path / name)] == ["I lead."] * 3
    (tmp_path / "bad.jsonl").write_text(
        '{"value": "power", "positive": "x", "negative": "y"}\n{"value": "greed", '
        '"positive": "x", "negative": "y"}\n'
    )
    with pytest.raises(D.DataError, match=r"bad.jsonl, row 2, field 'value'"):
        D.load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "q.jsonl").write_text('{"value": "power", "prompt": "Should I?"}\n{"prompt": 5}\n')
    with pytest.raises(D.DataError, match=r"row 2, field 'prompt': expected text"):
        D.load_prompts(tmp_path / "q.jsonl")


def test_demo_data_is_complete():
    for value in VALUES:
        assert len(D.demo_pairs(value)) >= 40
        assert len(D.demo_prompts(value)) >= 20
        assert len(D.demo_answers(value)) >= 20
    assert len(D.demo_neutral()) >= 150
    assert all(p.value is None for p in D.demo_neutral())


# ---------------------------------------------------------------- probes and gates


def _planted(n=20000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    labels = np.repeat([1, 0], n // 2)
    x = rng.normal(size=(n, d)) + np.outer(np.where(labels == 1, 1.5, -1.5), direction)
    return x.astype(np.float32), labels, direction


def test_probe_recovers_planted_direction():
    x, labels, direction = _planted()
    groups = np.tile(np.arange(len(labels) // 2), 2)
    fit = fit_probes(lambda l: x * (l + 1), labels, groups, layers=[0, 1, 2])
    for w in fit.w:
        assert float(w @ direction / np.linalg.norm(w)) > 0.99
    assert fit.test_acc.min() > 0.9 and fit.b.shape == (3,)
    # By-pair split: both texts of a pair fall on the same side.
    from conva.probes import split_indices

    train, test = split_indices(labels, groups, ProbeSettings())
    assert set(groups[train]).isdisjoint(groups[test]) and len(test) == 6000
    tr, val, te = split_three(groups, ProbeSettings())
    assert np.array_equal(te, test) and np.array_equal(np.sort(np.concatenate([tr, val])), train)
    assert set(groups[tr]).isdisjoint(groups[val]) and len(val) == 4000 and fit.n_val == len(val)


def test_band_is_chosen_on_validation_rows_and_test_rows_change_nothing_else():
    x, labels, _ = _planted(n=4000)
    groups = np.tile(np.arange(len(labels) // 2), 2)
    _, val, test = split_three(groups, ProbeSettings())
    rng = np.random.default_rng(1)
    noise = rng.normal(size=x.shape).astype(np.float32)

    # Layers 3-5 carry the value on validation rows; layers 0-2 on test rows only: the band follows validation.
    def layer(l: int, corrupt_test: bool = False) -> np.ndarray:
        m = x.copy() if 3 <= l <= 5 else noise.copy()
        m[val] = x[val] if 3 <= l <= 5 else noise[val]
        m[test] = x[test] if l <= 2 else noise[test]
        if corrupt_test:
            m[test] = rng.normal(size=(len(test), x.shape[1]))
        return m

    fit = fit_probes(layer, labels, groups, range(8))
    assert choose_band(fit, 3) == (3, 4, 5) and fit.test_acc[:3].min() > fit.test_acc[3:6].max()
    again = fit_probes(lambda l: layer(l, corrupt_test=True), labels, groups, range(8))
    assert (
        choose_band(again, 3) == (3, 4, 5)
        and np.array_equal(again.w, fit.w)
        and np.array_equal(again.val_acc, fit.val_acc)
    )
    assert not np.array_equal(again.test_acc, fit.test_acc)


def test_non_convergence_is_counted():
    x, labels, _ = _planted(n=400)
    fit = fit_probes(lambda l: x * 50, labels, np.arange(len(labels)), [0, 1], ProbeSettings(max_iter=1))
    assert fit.converged.tolist() == [False, False]
    assert fit_probes(lambda l: x, labels, np.arange(len(labels)), [0]).converged.tolist() == [True]


def test_band_choice_and_presets():
    x, labels, _ = _planted()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=x.shape).astype(np.float32)
    fit = fit_probes(lambda l: x if 3 <= l <= 5 else noise, labels, np.arange(len(labels)), layers=range(8))
    assert choose_band(fit, 3) == (3, 4, 5)
    assert parse_band("qwen2.5-7b", 28) == tuple(range(8, 24))
    assert parse_band("2-4", 8) == (2, 3, 4) and parse_band("auto", 8) is None
    with pytest.raises(ValueError, match="does not fit"):
        parse_band("10-40", 32)


# ---------------------------------------------------------------- bundles


@pytest.fixture()
def saved_bundle(tiny_bundles, tmp_path) -> Path:
    return save_bundle(tiny_bundles[0], tmp_path / "power")


def test_bundle_round_trip(tiny_bundles, saved_bundle):
    original = tiny_bundles[0]
    loaded = load_bundle(saved_bundle, fingerprint=original.fingerprint, hidden_size=original.hidden_size)
    for name in ("w", "b", "layers", "caa", "test_acc"):
        assert np.array_equal(getattr(loaded, name), getattr(original, name))
    assert loaded.band == original.band and loaded.gate.layer == original.gate.layer
    assert np.array_equal(loaded.gate.w, original.gate.w) and loaded.gate.threshold == original.gate.threshold
    assert not list(saved_bundle.glob("*.pkl")) and not list(saved_bundle.glob("*.bin"))


def test_bundle_for_another_model_is_refused(saved_bundle):
    with pytest.raises(BundleError, match="not for the loaded model"):
        load_bundle(saved_bundle, fingerprint="0" * 16)
    with pytest.raises(BundleError, match="hidden size"):
        load_bundle(saved_bundle, hidden_size=999)


@pytest.mark.parametrize("tamper", ["nan", "shape", "values"])
def test_tampered_bundle_is_refused(saved_bundle, tamper):
    tensors = load_file(str(saved_bundle / "vectors.safetensors"))
    if tamper == "nan":
        tensors["w"][0, 0] = np.nan
    elif tamper == "shape":
        tensors["b"] = tensors["b"][:-1]
    else:
        tensors["w"][0, 0] += 1.0
    save_file(tensors, str(saved_bundle / "vectors.safetensors"))
    message = {"nan": "NaN or infinite", "shape": "shape", "values": "does not match the hash"}[tamper]
    with pytest.raises(BundleError, match=message):
        load_bundle(saved_bundle)


# ---------------------------------------------------------------- blocks and config


def test_find_blocks_across_architectures(tmp_path):
    from transformers import AutoModelForCausalLM

    from conva.tiny import make_tiny_model

    for arch in ("qwen2", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / arch, arch=arch))
        assert len(find_blocks(model)) == 4
    import torch

    with pytest.raises(ValueError, match="cannot locate the decoder blocks of Linear"):
        find_blocks(torch.nn.Linear(2, 2))


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[steer]\np0 = 0.9\n[data]\nvalues = ["power"]\n')
    cfg = load_config(path, ["--steer.max_new_tokens=7", "--fit.band=3-5"])
    assert cfg.steer.p0 == 0.9 and cfg.steer.max_new_tokens == 7 and cfg.data.values == ("power",)
    for override, key in [
        ("--steer.p00=1", "steer.p00"),
        ("--steer.p0=1.5", "steer.p0"),
        ("--steer.method=magic", "steer.method"),
        ('--data.values=["greed"]', "data.values"),
        ("--steer.max_new_tokens=ten", "steer.max_new_tokens"),
        ("--gate.apply_to=some", "gate.apply_to"),
        ("--gate.prefix_on=never", "gate.prefix_on"),
        ("--probe.val_size=0.8", "probe.val_size"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path, [override])
    # The vllm backend scores a gate on the text it feeds the engine: prefixed rows are refused, not mis-gated.
    for bad in (["--steer.setting=opposite"], ["--steer.method=prompt"]):
        with pytest.raises(ConfigError, match="steer.backend.*raw prompt|steer.backend.*'prompt' method"):
            load_config(path, ["--steer.backend=vllm", *bad])
    assert load_config(path, ["--steer.backend=vllm", "--steer.method=prompt", "--gate.apply_to=conva"])
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("steer:\n  p0: 0.8\n")
    assert load_config(yaml_path).steer.p0 == 0.8


def test_external_gate_scores_a_classifier(tmp_path, tiny):
    """An HF sequence classifier as the gate: scores are its softmax on the mapped labels, averaged (the reference's)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from conva.gates import Gate, external_scores
    from conva.steering.hf import steer_logits
    from conva.steering.spec import SteerSpec

    model, tok = tiny
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=3,
        pad_token_id=tok.pad_token_id,
        id2label={0: "Power", 1: "Achievement", 2: "Other"},
        label2id={"Power": 0, "Achievement": 1, "Other": 2},
    )
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(cfg).eval()
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    texts = ["Should I lead the team?", "What is two plus two?"]
    gate = Gate("external", 0.0, model=str(tmp_path / "clf"), labels=("Power", "Achievement"))
    scores = external_scores(gate, texts)
    with torch.no_grad():
        expected = [
            torch.softmax(clf(**tok([t], return_tensors="pt")).logits, -1)[0, :2].mean().item() for t in texts
        ]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="not labels of"):
        external_scores(replace(gate, labels=("Greed",)), texts)
    # In steering, the external score decides per row: a threshold between the two scores opens one. It scores
    # the raw prompt, also in the opposite setting, and the classifier is loaded once for the process.
    from conva.gates import _classifier

    loads = _classifier.cache_info().misses
    bundle = replace(tiny_bundles_power(tiny), gate=replace(gate, threshold=float(np.mean(scores))))
    for setting in ("plain", "opposite"):
        _, rows = steer_logits(model, tok, texts, [SteerSpec("conva", bundle, setting=setting)] * 2)
        assert [r.gate_open for r in rows] == list(scores >= np.mean(scores))
        assert [r.gate_score for r in rows] == pytest.approx(list(scores), rel=1e-5)
    assert _classifier.cache_info().misses == loads


def tiny_bundles_power(tiny):
    """A minimal hand-made bundle for the tiny model (random unit probes on layers 1–3)."""
    from conva.bundle import ValueBundle
    from conva.models import model_fingerprint

    model, _ = tiny
    d, rng = model.config.hidden_size, np.random.default_rng(0)
    w = rng.normal(size=(4, d)).astype(np.float32)
    return ValueBundle(
        "power",
        "tiny",
        model_fingerprint(model),
        d,
        4,
        np.arange(4),
        w,
        np.zeros(4, np.float32),
        np.ones(4, np.float32),
        np.ones(4, np.float32),
        w.copy(),
        (1, 2, 3),
        0.9,
    )


def test_mean_pooling_matches_hidden_states(tiny):
    import torch

    from conva.record import record_activations

    model, tok = tiny
    texts = ["A short one.", "A somewhat longer sentence about the sea and the sky."]
    acts = record_activations(model, tok, texts, [0, 2], position="mean")
    for i, text in enumerate(texts):
        with torch.no_grad():
            hs = model(**tok([text], return_tensors="pt"), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(acts[i, 0], hs[1][0].mean(0).numpy(), atol=1e-5)
        # hidden_states[l + 1] is block l's output, except the last entry, which HF takes after the final norm.
        np.testing.assert_allclose(acts[i, 1], hs[3][0].mean(0).numpy(), atol=1e-5)


def test_left_padding_does_not_shift_absolute_positions(tmp_path):
    """GPT-2 learns absolute positions: a padded row must read the same activations as alone."""
    from conva.models import load_model
    from conva.record import record_activations
    from conva.steering.hf import steer_logits
    from conva.steering.spec import SteerSpec
    from conva.tiny import make_tiny_model

    model, tok = load_model(make_tiny_model(tmp_path / "gpt2", arch="gpt2"))
    texts = ["A short one.", "A much longer sentence about the sea, the sky and the wind over the hills."]
    batched = record_activations(model, tok, texts, [1, 3], batch_size=2)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(batched[i], record_activations(model, tok, [text], [1, 3])[0], atol=1e-5)
    logits, _ = steer_logits(model, tok, texts, [SteerSpec("none")] * 2)
    alone, _ = steer_logits(model, tok, texts[:1], [SteerSpec("none")])
    np.testing.assert_allclose(logits[0].numpy(), alone[0].numpy(), atol=1e-4)


def test_sources_may_be_pyarrow_fs_uris(paper_data, tmp_path):
    """Inputs are read through pyarrow.fs: a file:// URI (like s3:// or gs://) works as a path does."""
    uri = paper_data.resolve().as_uri()
    assert len(D.paper_pairs(uri, "power")) == 100 and D.is_folder(uri)
    (tmp_path / "p.jsonl").write_text('{"value": "power", "prompt": "Should I lead?"}\n{"prompt": 3}\n')
    records = list(D.read_records((tmp_path / "p.jsonl").as_uri()))
    assert [r.row for r in records] == [1, 2] and records[0].fields["prompt"] == "Should I lead?"
    with pytest.raises(D.DataError, match="no such file"):
        D.load_prompts((tmp_path / "missing.jsonl").as_uri())
    with pytest.raises(D.DataError, match="cannot open this URI"):
        D.load_prompts("nosuchscheme://bucket/file.jsonl")
