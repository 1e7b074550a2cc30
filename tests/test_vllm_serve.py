"""``vllm serve`` with ConVA's plugin on loopback (SmolLM2): the README's example client gets a steered and
an unsteered answer, and a bad spec is answered 400 while a good request sent with it is served.

The server is a real ``vllm serve`` process (multi-process engine, as deployed) started with this
interpreter, so the plugin is loaded by its entry point in the API server and the engine core alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed")

from conva.bundle import ValueBundle, save_bundle  # noqa: E402
from conva.gates import Gate  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUESTION = "Should I take the job offer abroad or stay near my family?"


def _smollm2_bundle(folder: Path) -> str:
    """Random unit probes on SmolLM2's shape (576 wide, 30 blocks), steering layers 10-20, no gate."""
    from transformers import AutoConfig

    from conva.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model("smollm2"))
    d, n = config.hidden_size, config.num_hidden_layers
    w = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    ones = np.ones(n, np.float32)
    bundle = ValueBundle(
        value="achievement",
        model_name="smollm2",
        fingerprint="x",
        hidden_size=d,
        n_blocks=n,
        layers=np.arange(n),
        w=w,
        b=np.full(n, -2.0, np.float32),
        train_acc=ones,
        test_acc=ones,
        caa=w.copy(),
        band=tuple(range(10, 21)),
        p0=0.95,
        gate=Gate(),
    )
    return str(save_bundle(bundle, folder))


@pytest.fixture
def server(smollm2_server: str) -> str:
    """The session's SmolLM2 server (``tests/conftest.py``): a multi-process engine with the plugin loaded."""
    return smollm2_server


def test_example_client_gets_a_steered_and_an_unsteered_answer(server: str, tmp_path: Path) -> None:
    bundle = _smollm2_bundle(tmp_path / "achievement")
    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "vllm_serve_client.py"), "--url", server, "--bundle", bundle,
         "--telemetry", str(tmp_path / "tel"), "--max-tokens", "16"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    plain, steered = (json.loads(line) for line in run.stdout.strip().splitlines())
    assert (plain["steered"], steered["steered"]) == (False, True)
    assert plain["answer"] and steered["answer"] and plain["answer"] != steered["answer"]
    tel = steered["telemetry"]
    assert tel["error"] is None and tel["layers"] == list(range(10, 21)) and tel["gate_open"] is True
    assert len(tel["eps"]) == 11 and max(tel["eps"]) > 0
    assert min(tel["p_after"]) >= 0.95 - 1e-4  # ConVA reaches P0 at every steered layer


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_bad_spec_is_refused_and_the_request_beside_it_served(server: str, tmp_path: Path) -> None:
    bundle = _smollm2_bundle(tmp_path / "achievement")
    messages = [{"role": "user", "content": QUESTION}]
    base = {"model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0.0}
    bodies = [
        {**base, "vllm_xargs": {"conva_bundle": bundle, "conva_p0": 1.5}},
        {**base, "vllm_xargs": {"conva_bundle": str(tmp_path / "nowhere")}},
        {**base, "vllm_xargs": {"conva_bundle": bundle, "conva_p0": 0.9}},
        base,
    ]
    answers: list[tuple[int, dict[str, Any]]] = [(0, {})] * len(bodies)

    def send(i: int) -> None:
        answers[i] = _post(server, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (c1, e1), (c2, e2), (c3, ok), (c4, plain) = answers
    assert (c1, c2, c3, c4) == (400, 400, 200, 200)
    assert "P0 must lie strictly between 0 and 1" in e1["error"]["message"]
    assert "not a readable bundle" in e2["error"]["message"]
    text = [a["choices"][0]["message"]["content"] for a in (ok, plain, _post(server, base)[1])]
    assert text[0] and text[1] and text[0] != text[1]
    assert text[2] == text[1]  # the server still serves, unsteered as before
