"""A real S3-compatible HTTP endpoint on loopback (``moto_server`` from ``moto[server]``), for storage tests.

``pyarrow.fs.FileSystem.from_uri("s3://bucket/prefix")`` finds it through the standard AWS variables
in :attr:`S3Server.env` alone, so code under test needs no test-only settings: a job run with that
environment writes to this server exactly as it would to S3. Objects live in the server's memory and
go when it stops.

Example::

    with s3_server() as s3:
        uri = s3.bucket()                                    # "s3://b-1a2b3c4d"
        subprocess.run([..., f"--output.dir={uri}/run"], env={**os.environ, **s3.env})
        assert s3.list(uri) == [...]
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["S3Server", "s3_server"]

_MOTO = str(Path(sys.executable).parent / "moto_server")
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class S3Server:
    """A running ``moto_server``. ``endpoint`` is ``http://127.0.0.1:PORT``; ``env`` holds the variables
    ``pyarrow.fs`` (and boto3, the AWS CLI) honour: endpoint, dummy credentials, region, and no
    instance-metadata lookups (which would leave loopback)."""

    endpoint: str
    env: Mapping[str, str]
    log: Path  # the server's log: one line per request served

    def requests(self) -> list[str]:
        """Every request the server has answered so far, oldest first, as ``"METHOD /bucket/key?query"``."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split('"')
            if len(parts) > 2 and parts[1].count(" ") == 2 and parts[1].endswith(("HTTP/1.1", "HTTP/1.0")):
                found.append(parts[1].rsplit(" ", 1)[0])
        return found

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem on this server, configured explicitly (independent of ``env``)."""
        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_REGION"],
            allow_bucket_creation=True,
        )

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its URI, ``s3://<name>``."""
        name = name or f"b-{uuid.uuid4().hex[:8]}"
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def list(self, uri: str) -> list[str]:
        """Every object key in the folder ``s3://bucket[/folder]``, sorted, read by plain HTTP
        (ListObjectsV2), not through pyarrow: what the store really holds."""
        parsed = urllib.parse.urlparse(uri)
        prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            with urllib.request.urlopen(
                f"{self.endpoint}/{parsed.netloc}?{urllib.parse.urlencode(query)}", timeout=10
            ) as reply:
                root = ET.fromstring(reply.read())
            keys += [k.text for k in root.iter(f"{_S3_NS}Key")]
            token = root.findtext(f"{_S3_NS}NextContinuationToken")
            if not token:
                return sorted(keys)


@contextmanager
def s3_server(timeout: float = 30) -> Iterator[S3Server]:
    """Start ``moto_server -H 127.0.0.1 -p <free port>``, wait until it answers, yield it, stop it.

    Raises ``RuntimeError`` with the server's log if it does not serve within ``timeout`` s (three
    tries, in case another process takes the free port first).
    """
    log = Path(tempfile.mkdtemp(prefix="moto")) / "moto.log"
    proc = None
    try:
        for _ in range(3):
            port = _free_port()
            with open(log, "wb") as fh:
                proc = subprocess.Popen(
                    [_MOTO, "-H", "127.0.0.1", "-p", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=fh,
                    start_new_session=True,
                )
            endpoint = f"http://127.0.0.1:{port}"
            if _serving(endpoint, proc, timeout):
                break
            _stop(proc)
        else:
            raise RuntimeError(
                f"moto_server did not serve S3 on loopback: {log.read_text(errors='replace')[-2000:]}"
            )
        yield S3Server(
            endpoint,
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            },
            log,
        )
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(log.parent, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serving(endpoint: str, proc: subprocess.Popen, timeout: float) -> bool:
    """True once our process answers an S3 "list buckets"; False if it exits (port taken) or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(endpoint, timeout=2) as reply:
                body = reply.read()
            # Still ours (not another server that took the port) and speaking S3.
            return proc.poll() is None and b"ListAllMyBucketsResult" in body
        except OSError:
            time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
