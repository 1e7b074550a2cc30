"""Outputs checked by ``conva validate`` before anything runs (subprocesses): one line each, naming what to set.

An empty ``output.dir``, a folder on the kernel's ``/proc``, and an ``s3://`` output with no credentials
(with or without an endpoint) are refused with exit code 2 and nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.toml")


def _validate(cwd: Path, tiny_path: str, output: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "conva.jobs.cli",
            "validate",
            "--config",
            TINY,
            f"--model.name={tiny_path}",
            f"--output.dir={output}",
        ],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(REPO), "HOME": str(cwd), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


S3_NO_CREDENTIALS = (
    "has no credentials to use ({where}; no AWS_ACCESS_KEY_ID, AWS_PROFILE or ~/.aws/credentials): set "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and for an S3-compatible server (MinIO, Ceph, a local one) "
    "AWS_ENDPOINT_URL; on AWS with an instance role, set AWS_REGION"
)


@pytest.mark.parametrize(
    "output, env, message",
    [
        (
            "",
            {},
            "output.dir: empty: it would write into the current folder; name the output folder, e.g. "
            "--output.dir=runs/mine (or an s3:// URI)",
        ),
        (
            "/proc/conva-out",
            {},
            "output.dir: /proc/conva-out is on /proc, a proc filesystem (the kernel's view, not storage): choose "
            "a folder on a disk or a shared mount",
        ),
        (
            "s3://bucket/runs/x",
            {},
            "output.dir: s3://bucket/runs/x "
            + S3_NO_CREDENTIALS.format(where="no endpoint (AWS_ENDPOINT_URL is unset)"),
        ),
        (
            "s3://bucket/runs/x",
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
            "output.dir: s3://bucket/runs/x "
            + S3_NO_CREDENTIALS.format(where="the endpoint http://127.0.0.1:9"),
        ),
    ],
)
def test_validate_refuses_outputs_a_run_could_not_write(tmp_path, tiny_path, output, env, message) -> None:
    done = _validate(tmp_path, tiny_path, output, env)
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (2, f"conva validate: error: {message}")
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == []
    )  # nothing written, not even into the current folder
