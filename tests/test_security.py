"""Security: artifacts load without pickle, remote code stays off, API keys come only from the environment,
paths from configs or rows stay inside the output folder, the cluster docs say how to lock Ray down.

Already proved elsewhere (not repeated): tampered bundles with NaN, a wrong shape or changed values, and a
bundle for another model (``test_core``); stage and dataset names with ``..``, ``/`` or odd characters and
a stage symlinked out of the output folder (``test_store``); the embedded Ray listening on loopback only
(``test_ray_jobs``); the cluster head's dashboard bound to 127.0.0.1 (``test_cluster_files``); the client
never writing the key to its cache or errors (``test_judges``).
"""

from __future__ import annotations

import ast
import http.server
import json
import pickle
import secrets
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conva.batch.config import ConfigError, load_config
from conva.bundle import BundleError, load_bundle, save_bundle

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"


# --- 11: artifacts without pickle ------------------------------------------------------------------------

_PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
_PICKLING_CALLS = {
    ("torch", "load"),
    ("np", "load"),
    ("numpy", "load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}


def _unsafe(source: str) -> list[str]:
    """Pickle imports and calls, ``allow_pickle``/``weights_only=False``, and ``trust_remote_code=True`` literals."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[-1] in _PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            found += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if {(node.module or "").split(".")[-1], a.name} & _PICKLING_MODULES
            ]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in _PICKLING_CALLS
        ):
            found.append(f"{node.value.id}.{node.attr}")
        elif (
            isinstance(node, ast.keyword)
            and node.arg in ("allow_pickle", "weights_only", "trust_remote_code")
            and isinstance(node.value, ast.Constant)
            and node.value.value is (node.arg != "weights_only")
        ):
            found.append(f"{node.arg}={node.value.value}")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    code = (
        "import pickle\nfrom ray import cloudpickle\nimport torch\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n"
        "torch.load(p, weights_only=False)\nf(x, trust_remote_code=True)\nf(x, trust_remote_code=flag)\n"
    )
    assert sorted(_unsafe(code)) == sorted(
        [
            "import pickle",
            "from ray import cloudpickle",
            "torch.load",
            "np.load",
            "allow_pickle=True",
            "torch.load",
            "weights_only=False",
            "trust_remote_code=True",
        ]
    )


def test_no_pickle_and_no_hardcoded_remote_code_in_the_project() -> None:
    files = [p for d in ("conva", "workers", "jobs") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := _unsafe(p.read_text()))}
    assert found == {}


@pytest.fixture
def bundle_dir(tiny_bundles, tmp_path) -> Path:
    return save_bundle(tiny_bundles[0], tmp_path / "power")


def test_bundle_loads_with_every_unpickler_disabled(bundle_dir, tiny_bundles, monkeypatch) -> None:
    import torch

    def refuse(*_a, **_k):
        raise AssertionError("pickle was used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    bundle = load_bundle(bundle_dir, fingerprint=tiny_bundles[0].fingerprint)
    assert np.array_equal(bundle.w, tiny_bundles[0].w)
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["meta.json", "vectors.safetensors"]


class _Payload:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("where", ["vectors.safetensors", "meta.json"])
def test_a_planted_pickle_is_refused_and_never_runs(bundle_dir, tmp_path, where) -> None:
    marker = tmp_path / "pwned"
    (bundle_dir / where).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(BundleError, match="not a readable bundle"):
        load_bundle(bundle_dir)
    assert not marker.exists()


def test_inf_values_and_edited_tensor_hashes_are_refused(bundle_dir) -> None:
    meta = json.loads((bundle_dir / "meta.json").read_text())
    meta["tensor_sha256"]["w"] = "0" * 64  # the recorded fingerprint no longer matches the tensor
    (bundle_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="tensor 'w' does not match the hash"):
        load_bundle(bundle_dir)
    tensors = load_file(str(bundle_dir / "vectors.safetensors"))
    tensors["caa"][0, 1] = np.inf
    save_file(tensors, str(bundle_dir / "vectors.safetensors"))
    with pytest.raises(BundleError, match="tensor 'caa' holds NaN or infinite values"):
        load_bundle(bundle_dir)


# --- 12: trust_remote_code -------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_the_config_says_so(tiny_path, monkeypatch) -> None:
    from conva import models
    from conva.workers import backends
    from conva.workers.tasks import WorkerSpec
    from conva.workers.worker import ModelWorker

    seen: list[bool] = []
    load_model = models.load_model

    def spy(name, dtype="float32", device="cpu", trust_remote_code=False, device_map=None):
        seen.append(trust_remote_code)
        return load_model(name, dtype, device, device_map=device_map)

    monkeypatch.setattr(models, "load_model", spy)
    monkeypatch.setattr(backends, "load_model", spy)
    default = load_config(TINY, [f"--model.name={tiny_path}"])
    turned_on = load_config(TINY, [f"--model.name={tiny_path}", "--model.trust_remote_code=true"])
    assert default.model.trust_remote_code is False
    for cfg in (default, turned_on):
        ModelWorker(WorkerSpec(cfg)).load(("hf",))  # the model worker, as a Ray actor runs it
        backends.HFSteerer(cfg)
    assert seen == [False, False, True, True]


def test_the_run_log_says_when_remote_code_is_on(tiny_path, tmp_path, monkeypatch) -> None:
    from conva.jobs import runner
    from conva.jobs.common import JobError
    from conva.jobs.runner import run_job

    def stop(*_a, **_k):
        raise JobError("stopped before any worker (test)")

    monkeypatch.setattr(runner, "connect_ray", stop)
    logs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        with pytest.raises(JobError, match="stopped before any worker"):
            run_job(
                "extract",
                load_config(
                    TINY,
                    [f"--model.name={tiny_path}", f"--output.dir={out}", f"--model.trust_remote_code={flag}"],
                ),
            )
        logs[flag] = (out / "run.log").read_text()
        assert json.loads((out / "config.json").read_text())["model"]["trust_remote_code"] is (flag == "true")
    assert "trust_remote_code is ON" in logs["true"] and "trust_remote_code is ON" not in logs["false"]


# --- 13: judge API keys ----------------------------------------------------------------------------------


class _Judge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible judge on loopback that records the Authorization header of every request."""

    auth: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).auth.append(self.headers.get("Authorization"))
        payload = json.dumps({"choices": [{"message": {"content": "Yes."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.slow
def test_judge_api_key_appears_in_no_output(tiny_path, tmp_path, monkeypatch, capfd) -> None:
    import ray

    from conva.jobs.study import main

    key = f"sk-conva-{secrets.token_hex(12)}"
    ray.shutdown()  # a Ray of its own: the key must be in the environment it starts with (never in a runtime_env)
    monkeypatch.setenv("CONVA_TEST_JUDGE_KEY", key)  # before Ray starts, so the study's workers inherit it
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "study"
    argv = [
        "--config",
        str(REPO / "examples" / "demo_study.toml"),
        f'--study.models=["{tiny_path}"]',
        '--study.methods=["none"]',
        '--data.values=["power"]',
        "--data.max_prompts_per_value=2",
        "--fit.band=1-3",
        "--steer.max_new_tokens=4",
        '--utility.mc=""',
        "--fluency.perplexity=false",
        "--judge.kind=llm",
        f"--judge.base_url=http://127.0.0.1:{server.server_port}/v1",
        "--judge.model=judge",
        "--judge.api_key_env=CONVA_TEST_JUDGE_KEY",
        "--ray.num_workers=1",
        "--ray.rows_per_shard=4",
        f"--output.dir={out}",
    ]
    session_logs = None
    try:
        assert main(argv) == 0
        session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        leaked_in_ray_logs = [
            p.name for p in session_logs.rglob("*") if p.is_file() and key.encode() in p.read_bytes()
        ]
    finally:
        ray.shutdown()
        server.shutdown()
    assert _Judge.auth and set(_Judge.auth) == {f"Bearer {key}"}  # the key was in play, sent as a header only
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".parquet", ".json", ".log", ".html"} <= kinds, kinds
    assert [str(p.relative_to(out)) for p in files if key.encode() in p.read_bytes()] == []
    assert leaked_in_ray_logs == []
    captured = capfd.readouterr()
    assert key not in captured.out and key not in captured.err
    assert "CONVA_TEST_JUDGE_KEY" in (out / "study.json").read_text()  # the variable's name is what is stored


# --- 14: paths from configs and rows stay inside the output folder --------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["..", ".", "../../etc", "/abs/models/..", "a/../../..", "x;rm -rf ~", "mod\u00e8le", "/m/.hidden", "~"],
)
def test_model_folders_of_a_study_stay_inside_its_output(spec, tmp_path) -> None:
    from conva.batch.store import check_name
    from conva.batch.study import StudyConfig, model_config, model_slug

    slug = model_slug(spec)
    assert check_name(slug, "model folder") == slug  # one safe path component: no '..', '/', leading dot
    folder = Path(model_config(StudyConfig(), spec, tmp_path).output.dir).resolve()
    assert folder.parent == (tmp_path / "models").resolve()


@pytest.mark.parametrize("value", ["../../etc", "/tmp/x", "power/../../x", "power\x00"])
def test_values_that_become_bundle_folders_are_refused(value, tmp_path, bundle_dir) -> None:
    with pytest.raises(ConfigError, match="data.values"):
        load_config(TINY, [f"--data.values={json.dumps([value])}"])
    meta = json.loads((bundle_dir / "meta.json").read_text())
    meta["value"] = value  # meta.json is not hashed: its value is checked by name
    (bundle_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown value"):
        load_bundle(bundle_dir)


def test_input_rows_naming_odd_values_become_error_rows(tmp_path) -> None:
    from conva.batch.steer_rows import steering_rows_from_file

    path = tmp_path / "prompts.jsonl"
    rows = [
        {"value": "../../etc", "prompt": "hi"},
        {"value": "/abs", "prompt": "hi"},
        {"value": "power", "prompt": "hi"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = steering_rows_from_file(path).to_pylist()
    assert [r["error"] for r in table] == ["unknown value '../../etc'", "unknown value '/abs'", None]


# --- 15: cluster docs ----------------------------------------------------------------------------------------


def test_cluster_security_doc_covers_the_dashboard_and_job_server() -> None:
    text = (REPO / "cluster" / "SECURITY.md").read_text()
    for needed in (
        "8265",
        "job server",
        "dashboard",
        "127.0.0.1",
        "RAY_AUTH_MODE=token",
        "port-forward",
        "NetworkPolicy",
        "environment variables",
    ):
        assert needed in text, needed
