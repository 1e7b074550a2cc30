"""Where a job's bytes live: a local folder, a shared mount (NFS, EFS, a PVC) or an object store, one API.

A :class:`Location` is a path or URI (``/mnt/shared/runs/x``, ``s3://bucket/runs/x``, ``gs://…``,
``file:///…``) opened through ``pyarrow.fs``. Object stores are configured the way pyarrow configures
them: for S3, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``,
so a local S3 server works unchanged. A location pickles as its URI alone, so it can be handed to a
Ray actor on another node, which opens the same storage there.

Writes are atomic: a reader sees a whole object or none. Object stores publish a PUT whole; on a
local or mounted filesystem the bytes go to a temporary name, are fsync'd and renamed into place.
Nothing here needs rename on an object store: :mod:`conva.batch.store` commits through a log instead.

Example:
    >>> import tempfile
    >>> root = location(tempfile.mkdtemp())
    >>> root.child("a", "b.txt").write_bytes(b"hello")
    >>> root.child("a", "b.txt").read_bytes(), [f.name for f in root.list()]
    (b'hello', ['a/b.txt'])
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from conva.files import atomic_write

__all__ = ["Location", "StoredFile", "location", "is_uri", "s3_setup_problem", "S3_HINT"]


def is_uri(text: str | os.PathLike) -> bool:
    """Whether ``text`` names storage by URI (``s3://…``) rather than a plain local path."""
    return "://" in str(text)


@dataclass(frozen=True)
class StoredFile:
    """A file found by :meth:`Location.list`: its path relative to the listed folder and its size."""

    name: str
    size: int


@functools.lru_cache(maxsize=64)
def _filesystem(root: str) -> pafs.FileSystem:
    """One filesystem object per scheme and bucket, per process (S3 clients are costly to build)."""
    if root == "local":
        return pafs.LocalFileSystem()
    fs, _ = pafs.FileSystem.from_uri(root)
    return fs


@dataclass(frozen=True)
class Location:
    """A file or folder on some storage, named by ``uri`` (an absolute local path, or ``scheme://…``)."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    def __reduce__(self):  # pickle the URI only: the filesystem is reopened on the other side
        return (Location, (self.uri,))

    @property
    def is_local(self) -> bool:
        """Whether this is a POSIX path on this machine (a local disk or a mounted shared filesystem)."""
        return not is_uri(self.uri)

    @property
    def fs(self) -> pafs.FileSystem:
        """The ``pyarrow.fs`` filesystem holding this location."""
        if self.is_local:
            return _filesystem("local")
        scheme, rest = self.uri.split("://", 1)
        return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}")

    @property
    def path(self) -> str:
        """The path within :attr:`fs` (``bucket/key`` on S3)."""
        if self.is_local:
            return self.uri
        return self.uri.split("://", 1)[1].rstrip("/")

    @property
    def name(self) -> str:
        """The last component of the path."""
        return posixpath.basename(self.path.rstrip("/"))

    def child(self, *parts: str) -> Location:
        """A location under this one; ``parts`` may hold ``/`` but never ``..``."""
        for part in parts:
            if ".." in part.split("/") or part.startswith("/"):
                raise ValueError(f"{part!r} would leave {self.uri}")
        return Location(posixpath.join(self.uri.rstrip("/"), *parts))

    def parent(self) -> Location:
        """The folder holding this location."""
        return Location(posixpath.dirname(self.uri.rstrip("/")))

    def relative_to(self, root: Location) -> str:
        """This location's path below ``root``."""
        prefix = root.uri.rstrip("/") + "/"
        if not self.uri.startswith(prefix):
            raise ValueError(f"{self.uri} is not inside {root.uri}")
        return self.uri[len(prefix) :]

    # --- reading -------------------------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        """pyarrow's file info (type, size) for this location."""
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        """Whether a file or folder is there."""
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        """Whether this is a folder (on object stores: a prefix holding objects)."""
        return self.info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        """The whole file."""
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def list(self) -> list[StoredFile]:
        """Every file below this folder (recursively), sorted by name; empty if the folder does not exist."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        base = self.path.rstrip("/") + "/"
        found = [
            StoredFile(i.path[len(base) :], i.size or 0)
            for i in self.fs.get_file_info(selector)
            if i.type == pafs.FileType.File
        ]
        return sorted(found, key=lambda f: f.name)

    # --- writing -------------------------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Write the file atomically, **replacing** any file of that name.

        Local and mounted filesystems: a temporary sibling, fsync, rename, fsync of the folder (durable
        before this returns). Object stores: one PUT, which readers see whole or not at all.
        """
        if not self.is_local:  # object stores have no folders to create: a key is written whole
            with self.fs.open_output_stream(self.path) as out:
                out.write(data)
            return
        atomic_write(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def move_to(self, dest: Location) -> None:
        """Move this file to ``dest`` (replacing it): a rename locally, copy + delete on object stores."""
        if self.is_local != dest.is_local:
            raise ValueError(f"cannot move {self.uri} to {dest.uri}: different storage")
        if self.is_local:
            os.makedirs(os.path.dirname(dest.path), exist_ok=True)
        self.fs.move(self.path, dest.path)
        if self.is_local:
            _fsync_dir(os.path.dirname(dest.path))

    def delete(self) -> None:
        """Delete this file; nothing if it is not there."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        """Delete this folder and everything below it; nothing if it is not there."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def make_dirs(self) -> None:
        """Create this folder (and its parents) where the storage has folders."""
        self.fs.create_dir(self.path, recursive=True)


def location(spec: str | os.PathLike | Location, base: str | os.PathLike | None = None) -> Location:
    """A :class:`Location` for a local path (made absolute against ``base`` or the working folder) or a URI.

    ``file://`` URIs become plain local paths. Other URIs are checked for a known scheme at once, so a
    typo fails here rather than on a worker.
    """
    if isinstance(spec, Location):
        return spec
    text = os.fspath(spec)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_uri(text):
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = Path(base or os.getcwd()) / path
        return Location(os.path.normpath(str(path)))
    scheme = text.split("://", 1)[0]
    if not text.split("://", 1)[1].strip("/"):
        raise ValueError(f"{text!r} names no bucket or folder")
    try:
        _filesystem(f"{scheme}://{text.split('://', 1)[1].split('/', 1)[0]}")
    except (ValueError, OSError) as err:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise ValueError(f"cannot open {text!r}: {err}") from err
    return Location(text.rstrip("/"))


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


S3_HINT = (
    "; for an S3-compatible server (MinIO, Ceph, a local one) set AWS_ENDPOINT_URL, and AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY and AWS_REGION"
)


def s3_setup_problem(uri: str) -> str | None:
    """Why an ``s3://`` URI cannot work as configured (no credentials anywhere), naming what to set; or None.

    Credentials count when they are in the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, a web
    identity or container role), in a shared credentials or config file, or in the URI
    (``access_key=``, ``anonymous=true``). With none, an instance role is trusted only on AWS itself, that
    is without ``AWS_ENDPOINT_URL`` and with ``AWS_REGION`` set.
    """
    env = os.environ
    if "access_key=" in uri or "anonymous=true" in uri:
        return None
    if any(
        env.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        )
    ):
        return None
    files = [
        env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
        env.get("AWS_CONFIG_FILE") or "~/.aws/config",
    ]
    if any(os.path.isfile(os.path.expanduser(f)) for f in files):
        return None
    endpoint = env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or ("endpoint_override=" in uri)
    if not endpoint and (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        return None  # on AWS, an instance or pod role may hold the credentials
    where = (
        f"the endpoint {endpoint}" if isinstance(endpoint, str) else "no endpoint (AWS_ENDPOINT_URL is unset)"
    )
    return (
        f"{uri} has no credentials to use ({where}; no AWS_ACCESS_KEY_ID, AWS_PROFILE or ~/.aws/credentials): set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and for an S3-compatible server (MinIO, Ceph, a local one) "
        "AWS_ENDPOINT_URL; on AWS with an instance role, set AWS_REGION"
    )
