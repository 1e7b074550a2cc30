"""Which config and which code wrote a row: the provenance columns every generation carries.

``config_sha256`` is the sha256 of the job's config in canonical JSON, the same document as the output's
``config.json``: ``conva.batch.store.config_hash(json.load(open("<out>/config.json")))`` equals the column
of every row of the published generation (``config.json`` is written when a generation is published, so
after an interrupted ``--overwrite`` both still describe the old one). ``conva_version`` is the package
version, with the git commit of a checkout.

Example:
    >>> import pyarrow as pa
    >>> from conva.batch.config import Config
    >>> t = with_provenance(pa.table({"row_id": ["a/1"]}), Config())
    >>> t.column_names, t.column("config_sha256")[0].as_py() == config_sha256(Config())
    (['row_id', 'config_sha256', 'conva_version'], True)
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

import pyarrow as pa

from conva.batch.config import Config, config_dict
from conva.batch.schemas import PROVENANCE_SCHEMA
from conva.batch.store import config_hash

__all__ = ["config_sha256", "code_version", "with_provenance"]


def config_sha256(cfg: Config) -> str:
    """The sha256 of ``cfg`` as ``config.json`` holds it (canonical JSON)."""
    return config_hash(config_dict(cfg))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``0.1.0`` for an installed package; ``0.1.0+g1a2b3c4d`` (the commit) when run from a git checkout."""
    try:
        version = metadata.version("conva")
    except metadata.PackageNotFoundError:
        version = "0.1.0"
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=8", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if done.returncode == 0 and done.stdout.strip():
                version += f"+g{done.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def with_provenance(table: pa.Table, cfg: Config) -> pa.Table:
    """``table`` with the provenance columns appended (:data:`conva.batch.schemas.PROVENANCE_SCHEMA`)."""
    values = {"config_sha256": config_sha256(cfg), "conva_version": code_version()}
    for f in PROVENANCE_SCHEMA:
        table = table.append_column(f, pa.array([values[f.name]] * table.num_rows, f.type))
    return table
