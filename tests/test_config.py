"""The config models (``conva.batch.config``, ``conva.settings``): errors, schema, hash markers, registries.

Every check runs on the real pydantic models and the real example configs; nothing loads a model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
from pathlib import Path

import jsonschema
import pydantic
import pytest

from conva.batch import registry
from conva.batch.config import (
    RESULT_NEUTRAL_KEYS,
    Config,
    ConfigError,
    config_dict,
    config_schema,
    load_config,
    read_config_data,
)
from conva.batch.store import config_hash
from conva.batch.study import load_study, study_schema
from conva.fit import GATE_FIT_KEYS, GateSettings
from conva.jobs import cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"
STEER_KEYS = (
    "backend, batch_size, chat_template, epsilon, max_new_tokens, max_prompt_tokens, method, mode, p0, "
    "positions, setting, strength"
)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # an unknown key: the dotted key and the keys its section knows
        (["--steer.p00=1"], f"unknown key 'steer.p00' (known under steer: {STEER_KEYS})"),
        (
            ["--bogus.x=1"],
            "unknown key 'bogus' (known under the top: data, extract, fit, gate, model, output, probe, ray, steer, "
            "vllm)",
        ),
        # a wrong type: the key, the type it expects and what it got
        (["--ray.num_workers=two"], "ray.num_workers: expected an integer, got text 'two'"),
        (["--steer.chat_template=1"], "steer.chat_template: expected true or false, got integer 1"),
        (["--gate.labels=[1]"], "gate.labels[0]: expected text, got integer 1"),
        (["--ray=3"], "ray: expected a table of keys, got int"),
        # out of bounds: the key, its bounds as a rule, the value
        (["--fit.p0=1"], "fit.p0: must lie strictly between 0 and 1, got 1"),
        (["--gate.recall=1.5"], "gate.recall: must lie in (0, 1], got 1.5"),
        (["--ray.max_restarts=101"], "ray.max_restarts: must lie in [0, 100], got 101"),
        (["--ray.num_workers=0"], "ray.num_workers: must be at least 1, got 0"),
        (["--probe.C=0"], "probe.C: must be positive, got 0"),
        (["--gate.mc_questions=-1"], "gate.mc_questions: must be 0 or more, got -1"),
        # a name outside its choices, and the cross-key checks of a section and of the whole config
        (["--steer.mode=fast"], "steer.mode: 'fast' is not one of batched, compiled, reference"),
        (
            ["--ray.num_gpus_per_worker=1.5"],
            "ray.num_gpus_per_worker: above 1 must be a whole number of GPUs "
            "(one worker spans that many GPUs of one node)",
        ),
        (
            ["--steer.mode=reference", "--steer.epsilon=per_token"],
            "steer.mode: 'reference' reproduces the paper: positions='all', epsilon='frozen'",
        ),
        (["--gate.kind=external"], "gate.model: an external gate needs gate.model and gate.labels"),
    ],
)
def test_config_errors_name_the_key_the_type_and_the_bounds(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value) == message


def test_study_sections_report_alike() -> None:
    demo = REPO / "examples" / "demo_study.toml"
    for bad, message in [
        (
            ["--judge.x=1"],
            "unknown key 'judge.x' (known under judge: api_key_env, backend, backoff_s, base_url, "
            "cache_dir, fluency, kind, labels, max_concurrency, max_retries, max_tokens, model, pairs, seed, "
            "test_size, threshold, timeout_s)",
        ),
        (["--study.p0=[0.5, 1.0]"], "study.p0[1]: must lie strictly between 0 and 1, got 1.0"),
        (["--study.models=[]"], "study.models: list at least 1 item(s)"),
        (
            ['--study.methods=["probe_fixed"]'],
            "study.methods[0]: 'probe_fixed' is not one of conva, conva_nogate, caa, prompt, none",
        ),
        (["--utility.shots=-1"], "utility.shots: must be 0 or more, got -1"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_study(demo, bad)
        assert str(err.value) == message


def test_p0_is_one_type_in_fit_steer_and_study() -> None:
    demo = REPO / "examples" / "demo_study.toml"
    for bad in ("0", "1", "1.5", "-0.2"):
        got = {}
        for key, load in (
            ("fit.p0", lambda v: load_config(TINY, [f"--fit.p0={v}"])),
            ("steer.p0", lambda v: load_config(TINY, [f"--steer.p0={v}"])),
            ("study.p0[0]", lambda v: load_study(demo, [f"--study.p0=[{v}]"])),
        ):
            with pytest.raises(ConfigError) as err:
                load(bad)
            got[key] = str(err.value).removeprefix(f"{key}: ")
        assert len(set(got.values())) == 1 and got["fit.p0"].startswith("must lie strictly between 0 and 1")
    assert load_config(TINY, ["--fit.p0=0.5", "--steer.p0=0.7"]).steer.p0 == 0.7
    assert load_study(demo, ["--study.p0=[0.5, 0.7]"]).study.p0 == (0.5, 0.7)
    assert load_config(TINY, []).steer.p0 is None  # unset: each bundle's fit.p0


def test_models_are_frozen_strict_picklable_and_dump_as_json() -> None:
    cfg = load_config(TINY, ['--data.values=["power"]', "--fit.band=[1, 2]"])
    assert cfg.data.values == ("power",) and cfg.fit.band == (1, 2)  # lists become tuples
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.steer.p0 = 0.5  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and hash(again) == hash(cfg)
    data = config_dict(cfg)
    assert data["fit"]["band"] == [1, 2] and json.loads(json.dumps(data)) == data
    assert Config.model_validate(data) == cfg  # the dump reads back as the same config


def _leaves(data: dict, prefix: str = "") -> list[str]:
    return [
        leaf
        for key, value in data.items()
        for leaf in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def _changed(data: dict, key: str) -> dict:
    out = copy.deepcopy(data)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = ["changed", node[last]]
    return out


def test_the_hash_ignores_exactly_the_keys_marked_result_neutral() -> None:
    base = config_dict(Config())
    schema = config_schema()
    sections = {
        name: schema["$defs"][prop["$ref"].split("/")[-1]] for name, prop in schema["properties"].items()
    }
    marked = {
        f"{name}.{key}"
        for name, section in sections.items()
        for key, prop in section["properties"].items()
        if section.get("result_neutral") or prop.get("result_neutral")
    }
    ignored = {
        key
        for key in _leaves(base)
        if config_hash(_changed(base, key), RESULT_NEUTRAL_KEYS) == config_hash(base, RESULT_NEUTRAL_KEYS)
    }
    assert ignored == marked
    # The keys the hand-kept list held before the markers replaced it, section ray whole.
    assert marked == {
        *(f"ray.{k}" for k in sections["ray"]["properties"]),
        "output.overwrite",
        "extract.batch_size",
        "steer.batch_size",
        "data.max_error_fraction",
    }
    assert len(ignored) < len(_leaves(base)) - 40  # every other key does change the hash


def test_the_bundles_hash_reads_the_gates_fit_keys_only() -> None:
    from conva.jobs.stages import BUNDLE_KEYS, select

    base = config_dict(Config())
    steer_time = {"apply_to", "prefix_on"}
    assert set(GATE_FIT_KEYS) == set(GateSettings.model_fields) - steer_time
    for key in GateSettings.model_fields:
        changed = _changed(base, f"gate.{key}")
        same = config_hash(select(changed, BUNDLE_KEYS)) == config_hash(select(base, BUNDLE_KEYS))
        assert same == (key in steer_time), key
    explained = cli_output(["config", "--explain", "gate"])
    assert [
        line.split(" = ")[0].strip()
        for line in explained.splitlines()
        if line.startswith("  ") and " = " in line and line.endswith("; read when steering)")
    ] == [
        "apply_to",
        "prefix_on",
    ]


def cli_output(argv: list[str]) -> str:
    """What ``conva <argv>`` prints, run in this process (it must succeed)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(argv) == 0
    return buffer.getvalue()


def test_the_schema_is_json_schema_and_accepts_what_the_models_accept() -> None:
    schema = json.loads(cli_output(["config", "--schema"]))
    assert schema == json.loads(json.dumps(config_schema()))
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema)
    jobs = [p for p in sorted((REPO / "examples").glob("*.toml")) if "study" not in p.name]
    assert len(jobs) >= 2
    for path in jobs:
        data = read_config_data(path)
        load_config(path)  # the models accept it
        assert not list(check.iter_errors(data)), path
    good = read_config_data(TINY)
    for bad in (
        ["--steer.p00=1"],
        ["--steer.max_new_tokens=ten"],
        ["--steer.chat_template=1"],
        ["--fit.p0=1.5"],
        ["--steer.method=magic"],
        ['--data.values=["greed"]'],
        ["--ray.queue_depth=17"],
    ):
        data = read_config_data(TINY, bad)
        with pytest.raises(ConfigError):
            load_config(TINY, bad)
        assert list(check.iter_errors(data)), bad  # the editor refuses what the job refuses
    assert not list(check.iter_errors(good))
    # The study file: the job's sections and the study's own side by side.
    study = json.loads(cli_output(["config", "--schema", "--study"]))
    assert study == json.loads(json.dumps(study_schema()))
    jsonschema.Draft202012Validator.check_schema(study)
    demo = read_config_data(REPO / "examples" / "demo_study.toml")
    assert not list(jsonschema.Draft202012Validator(study).iter_errors(demo))
    assert list(jsonschema.Draft202012Validator(study).iter_errors({**demo, "judge": {"kind": "oracle"}}))


def test_a_backend_registered_once_is_accepted_by_the_config(monkeypatch) -> None:
    from conva.workers import backends

    # Every built-in name has a factory on the Ray side, and every factory's name is accepted.
    assert set(registry.BUILTIN_BACKENDS) <= set(backends.BACKENDS) <= set(registry.backend_names())
    monkeypatch.setattr(registry, "BACKEND_NAMES", dict(registry.BACKEND_NAMES))
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    with pytest.raises(ConfigError, match=r"^steer\.backend: 'echo' is not one of hf, vllm"):
        load_config(TINY, ["--steer.backend=echo"])

    @backends.register_backend("echo")
    def echo(cfg: Config) -> tuple[str, str]:
        return ("echo", cfg.steer.backend)

    cfg = load_config(TINY, ["--steer.backend=echo"])
    assert cfg.steer.backend == "echo" and backends.make_steerer(cfg) == ("echo", "echo")  # type: ignore[comparison-overlap]
    assert "echo" in config_schema()["$defs"]["SteerConfig"]["properties"]["backend"]["enum"]
    assert "echo" in cli_output(["config", "--explain", "steer"]).split("backend = ")[1].splitlines()[0]
