"""mypy over the whole distribution, ``conva`` with ``conva.jobs`` and ``conva.workers``, as it is installed.

In the checkout ``jobs/`` and ``workers/`` are top-level folders that pyproject.toml's package-dir installs
as ``conva.jobs`` and ``conva.workers``; mypy has no such mapping, so checked in place their imports of one
another (``from conva.workers.pool import …``) would not resolve and would silently become ``Any``. This
builds the installed layout from symlinks in a temporary folder, runs mypy on the package ``conva`` there
with pyproject.toml's settings, and prints each error with the checkout's own path. Exit status: mypy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"jobs": "conva/jobs", "workers": "conva/workers"}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="conva-typecheck-") as tmp:
        tree = Path(tmp) / "conva"
        tree.mkdir()
        for entry in (REPO / "conva").iterdir():
            (tree / entry.name).symlink_to(entry)
        for folder in MAPPED:
            (tree / folder).symlink_to(REPO / folder)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--config-file",
                str(REPO / "pyproject.toml"),
                "--cache-dir",
                str(REPO / ".mypy_cache"),
                "-p",
                "conva",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
    out = done.stdout + done.stderr
    for folder, installed in MAPPED.items():
        out = out.replace(installed + "/", folder + "/")
    sys.stdout.write(out)
    return done.returncode


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
