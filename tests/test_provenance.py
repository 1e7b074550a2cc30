"""Provenance that matches the data, as a user meets it: ``config.json`` and the rows' hash after an interrupted overwrite.

A run writes generations whose every row carries ``config_sha256`` (the hash of ``config.json``) and
``conva_version``. An ``--overwrite`` with another config, interrupted by SIGINT mid-steering, leaves the
old generation readable and ``config.json`` still describing it; the rerun publishes the new generation
and ``config.json`` with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conva.batch.store import config_hash
from tests.clusters import session_driver_env

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.toml")


def _published(out: Path) -> tuple[str, set[str], set[str]]:
    """The hash of ``config.json``, and the hashes and versions the readable generations carry."""
    table = ds.dataset(str(out / "generations"), format="parquet").to_table()
    return (
        config_hash(json.loads((out / "config.json").read_text())),
        set(table.column("config_sha256").to_pylist()),
        set(table.column("conva_version").to_pylist()),
    )


@pytest.mark.slow
def test_config_json_and_the_rows_hash_agree_after_an_interrupted_overwrite(
    tmp_path, tiny_path, ray_session, faults
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"value": v, "prompt": f"Should I {verb}?"}) + "\n"
            for v, verb in [("power", "lead"), ("security", "save"), ("power", "rule"), ("security", "hide")]
        )
    )
    out = tmp_path / "out"
    args = [
        "run",
        "--config",
        TINY,
        f"--model.name={tiny_path}",
        f"--data.prompts={prompts}",
        f"--output.dir={out}",
        "--steer.max_new_tokens=2",
        "--ray.steer_rows_per_shard=1",
    ]
    env = session_driver_env()
    cli = [sys.executable, "-m", "conva.jobs.cli"]
    first = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    old, hashes, versions = _published(out)
    assert hashes == {old} and len(versions) == 1 and next(iter(versions)).startswith("0.1.0")

    faults(sleep_s=2.0)  # every shard takes two seconds: the signal lands mid-steering
    again = [*args, "--steer.p0=0.95", "--overwrite"]
    log = tmp_path / "overwrite.log"
    commits = len(list((out / "generations" / "_log").glob("*.json")))
    with open(log, "w") as fh:
        proc = subprocess.Popen([*cli, *again], env=env, stdout=fh, stderr=fh, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / "generations" / "_log").glob("*.json"))) < commits + 2 and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # after the new generation's `begin` and its first commit
        assert proc.wait(120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _published(out)[:2] == (old, {old})  # the readable data and config.json: both the old generation

    faults()
    done = subprocess.run([*cli, *again], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    new, hashes, _ = _published(out)
    assert new != old and hashes == {new}
