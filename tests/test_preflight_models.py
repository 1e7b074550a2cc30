"""Models checked offline in pre-flight, as a user meets it (subprocesses, no network access needed).

An unknown hub model is refused by ``conva validate`` and by ``conva run`` before Ray starts, in
seconds, whether the hub is forbidden (``HF_HUB_OFFLINE=1``) or merely unreachable (an endpoint on
loopback that answers nothing); a typo of a built-in name gets the names and the nearest one.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.toml")


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def conva(cwd: Path, *args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "conva.jobs.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - start


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("offline", [True, False])
def test_an_unknown_hub_model_is_refused_in_preflight_in_seconds(tmp_path, command, offline) -> None:
    hub = tmp_path / "hf"
    env = {"HF_HOME": str(hub), "HF_HUB_CACHE": "", "RAY_ADDRESS": ""}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:  # the hub allowed, but its endpoint answers nothing: as on a node without network access
        env.update(HF_HUB_OFFLINE="", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    done, seconds = conva(
        tmp_path,
        command,
        "--config",
        TINY,
        "--model.name=meta-llama/Llama-9-70B",
        f"--output.dir={tmp_path / 'out'}",
        env=env,
    )
    why = (
        "HF_HUB_OFFLINE forbids a download; download it first"
        if offline
        else f"{env.get('HF_ENDPOINT')} cannot be reached from this machine, so it cannot be downloaded; download "
        "it where there is network into a cache every node shares (HF_HOME)"
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        f"conva {command}: error: model.name: model 'meta-llama/Llama-9-70B' is not in the local Hugging Face "
        f"cache ({hub / 'hub'}), and {why}"
    ), done.stderr[-2000:]
    assert "started a local Ray" not in done.stderr and not (tmp_path / "out").exists()
    # a Python start, the config and the check: a few seconds even on a busy machine, not the workers' 2 min
    assert seconds < 15, seconds


def test_a_cached_hub_model_passes_offline_and_a_typo_gets_the_builtin_names(tmp_path) -> None:
    hub = tmp_path / "hf"
    snapshot = hub / "hub" / "models--org--cached" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    env = {"HF_HOME": str(hub), "HF_HUB_CACHE": "", "HF_HUB_OFFLINE": "1"}
    args = ["validate", "--config", TINY, f"--output.dir={tmp_path / 'out'}"]
    done, _ = conva(tmp_path, *args, "--model.name=org/cached", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    done, _ = conva(tmp_path, *args, "--model.name=smolm2", env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "conva validate: error: model.name: model 'smolm2' is neither a local folder, a built-in name nor a "
        "Hugging Face repo id; the built-in names are smollm2 (SmolLM2-135M-Instruct), gemma3-270m (Gemma 3 "
        "270M, a base model), tiny (a tiny random Llama, for trying configs); did you mean 'smollm2'?"
    )


@pytest.mark.slow
def test_a_model_only_the_driver_has_is_refused_on_the_node_that_lacks_it(tmp_path, ray_session) -> None:
    """The driver finds the repo in its hub cache; the cluster's node has no such cache and no network: named."""
    import ray

    from conva.models import _hub_reachable

    if _hub_reachable():  # the session's workers could download it: this machine has network access
        pytest.skip("the hub answers from this machine; the node would be allowed to download")
    hub = tmp_path / "hf"
    snapshot = hub / "hub" / "models--org--driver-only" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    done, seconds = conva(
        tmp_path,
        "run",
        "--config",
        TINY,
        "--model.name=org/driver-only",
        f"--output.dir={tmp_path / 'out'}",
        env={"HF_HOME": str(hub), "HF_HUB_CACHE": "", "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and re.fullmatch(
        r"conva run: error: pre-flight: node 127\.0\.0\.1 \(id [0-9a-f]+\): model\.name: model 'org/driver-only' "
        r"is not in the local Hugging Face cache \(.+\), and https://huggingface\.co cannot be reached from this "
        r"machine, so it cannot be downloaded; .*",
        last,
    ), done.stderr[-2000:]
    assert not re.search(r"worker \w+ ready", done.stderr)  # refused before any worker started
