"""Where a job's bytes live: a local folder, a shared mount (NFS, EFS, a PVC) or an object store, one API.

A :class:`Location` is a path or URI (``/mnt/shared/runs/x``, ``s3://bucket/runs/x``, ``gs://…``,
``file:///…``) opened through ``pyarrow.fs``. Object stores are configured the way pyarrow configures
them: for S3, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``,
so a local S3 server works unchanged. A location pickles as its URI alone, so it can be handed to a
Ray actor on another node, which opens the same storage there.

Writes are atomic: a reader sees a whole object or none. Object stores publish a PUT whole; on a
local or mounted filesystem the bytes go to a temporary name, are fsync'd and renamed into place. On S3 a
shard-sized write is a single ``PutObject`` (pyarrow's ``allow_delayed_open``), not a three-request upload.
Nothing here needs rename on an object store: :mod:`conva.batch.store` commits through a log instead.

**Create if absent** (:meth:`Location.create_bytes`) is what makes the store's commit log single-writer:
on a filesystem the bytes are written to a temporary sibling and ``link``-ed to the name, which fails if
the name exists (POSIX, NFSv3+); on S3 it is one ``PutObject`` with ``If-None-Match: *``, sent through
boto3 because ``pyarrow.fs`` cannot send that header. Other object stores are refused.
:meth:`Location.delete_many` deletes up to 1,000 objects per request on S3 (``DeleteObjects``), and
:meth:`Location.copy_to` copies objects over 5 GiB (the limit of one ``CopyObject``) in parts.

Example:
    >>> import tempfile
    >>> root = location(tempfile.mkdtemp())
    >>> root.child("a", "b.txt").write_bytes(b"hello")
    >>> root.child("a", "b.txt").read_bytes(), [f.name for f in root.list()]
    (b'hello', ['a/b.txt'])
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from conva.files import atomic_write

__all__ = ["Location", "StoredFile", "location", "is_uri", "s3_setup_problem", "S3_HINT", "MAX_SINGLE_COPY"]

# The largest object one S3 CopyObject may copy; a larger one is copied in parts (UploadPartCopy).
MAX_SINGLE_COPY = 5 * 1024**3


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
    if root.startswith("s3://"):
        # Delayed open: a write below pyarrow's part size is one PutObject when the stream closes, instead of a
        # multipart upload's three requests (create, part, complete); a missing file still raises at open.
        root += "?allow_delayed_open=true"
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

    def create_bytes(self, data: bytes) -> None:
        """Write the file only if no file of that name exists; else raise ``FileExistsError`` (atomic).

        Two writers racing for one name: exactly one succeeds, whatever the timing. Locally the bytes are
        written and fsync'd under a temporary name, then hard-linked to the name (``link`` fails if it
        exists). On S3: ``PutObject`` with ``If-None-Match: *`` (HTTP 412 when the key exists).
        """
        if self.is_local:
            _create_local(self.path, data)
        elif self.uri.startswith("s3://"):
            bucket, key = self.path.split("/", 1)
            _s3_create(self.uri, bucket, key, data)
        else:
            raise ValueError(
                f"{self.uri}: the store needs create-if-absent writes, which conva supports on local or mounted "
                "filesystems and on S3 (conditional PUT) only"
            )

    def move_to(self, dest: Location, size: int | None = None) -> None:
        """Move this file to ``dest`` (replacing it): a rename locally, :meth:`copy_to` + delete on object stores.

        Raises ``FileNotFoundError`` if this file is not there.
        """
        if self.is_local != dest.is_local:
            raise ValueError(f"cannot move {self.uri} to {dest.uri}: different storage")
        if self.is_local:
            os.makedirs(os.path.dirname(dest.path), exist_ok=True)
            os.rename(self.path, dest.path)  # FileNotFoundError if the source is gone
            _fsync_dir(os.path.dirname(dest.path))
            return
        self.copy_to(dest, size)
        if self.uri.startswith("s3://"):
            self.parent().delete_many([self.name])  # pyarrow's delete would leave a folder marker behind
        else:
            self.delete()

    def copy_to(self, dest: Location, size: int | None = None) -> None:
        """Copy this object to ``dest`` server-side (object stores; locally a plain copy).

        Raises ``FileNotFoundError`` if this file is not there. On S3: one ``CopyObject`` (pyarrow's: it
        sends that request alone, no folder markers; a test counts the requests), or for an object over
        :data:`MAX_SINGLE_COPY` bytes (``size``, when the caller knows it) a copy in parts (boto3).
        """
        if self.uri.startswith("s3://") and dest.uri.startswith("s3://"):
            if size is not None and size > MAX_SINGLE_COPY:
                _s3_copy_large(self, dest)
            else:
                _s3_copy(self, dest)
            return
        if self.info().type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri} does not exist")
        if dest.is_local:
            os.makedirs(os.path.dirname(dest.path), exist_ok=True)
        self.fs.copy_file(self.path, dest.path)

    def delete(self) -> None:
        """Delete this file; nothing if it is not there."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def delete_many(self, names: Sequence[str]) -> None:
        """Delete the files ``names`` (paths below this folder); missing ones are ignored.

        On S3 one ``DeleteObjects`` request per 1,000 names instead of one request per file.
        """
        if not names:
            return
        if self.uri.startswith("s3://"):
            bucket, _, prefix = self.path.partition("/")
            keys = [posixpath.join(prefix, n) if prefix else n for n in names]
            _s3_delete(self.uri, bucket, keys)
            return
        for name in names:
            self.child(name).delete()

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


def _create_local(path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists: write a temporary sibling, fsync, ``link``, unlink."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic; FileExistsError if the name is taken, never a replace
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            _create_exclusive(path, data)  # a filesystem without hard links (some FUSE mounts)
    finally:
        os.unlink(tmp)
    _fsync_dir(folder)


def _create_exclusive(path: str, data: bytes) -> None:
    """``O_CREAT | O_EXCL``: still exactly one creator, but a crash mid-write can leave a short file (which the
    store reports as an unreadable record rather than reading it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _s3_client(root: str):
    """The boto3 client for ``root`` under the current AWS endpoint setting (one per endpoint, per process)."""
    return _s3_client_for(root, os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"))


@functools.lru_cache(maxsize=16)
def _s3_client_for(root: str, endpoint: str | None):
    """A boto3 S3 client configured like ``pyarrow.fs`` (the AWS variables), with bounded timeouts.

    Bounded timeouts matter for fencing: a conditional PUT that hangs longer than the lease margin could
    land after the lease passed to another driver (see :mod:`conva.batch.lease`).
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:  # boto3 is a dependency of conva; a stripped install may lack it
        raise ValueError(f"{root}: writing a commit log on S3 needs boto3 (pip install boto3)") from err
    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _s3_create(uri: str, bucket: str, key: str, data: bytes) -> None:
    from botocore.exceptions import ClientError

    try:
        _s3_client(f"s3://{bucket}").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # 412: the key exists; 409 ConditionalRequestConflict: another conditional write to it is in flight.
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise FileExistsError(f"{uri} exists (written by another writer)") from err
        raise OSError(f"{uri}: conditional PUT failed: {err}") from err


def _s3_delete(uri: str, bucket: str, keys: list[str]) -> None:
    client = _s3_client(f"s3://{bucket}")
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        reply = client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
        )
        errors = [e for e in reply.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            raise OSError(f"{uri}: could not delete {len(errors)} objects, e.g. {errors[0]}")


def _s3_copy(src: Location, dest: Location) -> None:
    """One ``CopyObject``, sent by pyarrow (C++: a quarter of boto3's CPU, and without the GIL, which matters
    on a driver publishing from several threads)."""
    try:
        src.fs.copy_file(src.path, dest.path)
    except FileNotFoundError:
        raise
    except OSError as err:
        if "NO_SUCH_KEY" in str(err):
            raise FileNotFoundError(f"{src.uri} does not exist") from err
        raise OSError(f"copying {src.uri} to {dest.uri} failed: {err}") from err


def _s3_copy_large(src: Location, dest: Location) -> None:
    """Copy an object over 5 GiB server-side in parts (boto3's managed copy: UploadPartCopy)."""
    from boto3.s3.transfer import TransferConfig

    sbucket, skey = src.path.split("/", 1)
    dbucket, dkey = dest.path.split("/", 1)
    part = 512 * 1024**2
    _s3_client(f"s3://{dbucket}").copy(
        {"Bucket": sbucket, "Key": skey},
        dbucket,
        dkey,
        Config=TransferConfig(
            multipart_threshold=min(part, MAX_SINGLE_COPY), multipart_chunksize=min(part, MAX_SINGLE_COPY)
        ),
    )


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
