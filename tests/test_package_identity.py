"""Every public class has exactly one identity, in a checkout and in a built wheel installed into a fresh venv.

``jobs/`` and ``workers/`` are the packages ``conva.jobs`` and ``conva.workers`` (pyproject.toml's
package-dir; in a bare checkout, such as a ``ray job submit --working-dir .`` upload, the finder in
``conva/__init__.py``). If any module imported them under their folder names (``workers.errors``), the
same class would exist twice — ``except conva.workers.ShardError`` would miss a ``workers.errors.ShardError``
— and an installed wheel, which has no top-level ``workers``, would fail to import. The probe below imports
every module of the distribution, touches every lazy export, and checks that no class is reachable under two
objects and that no top-level ``jobs``/``workers`` module was ever imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, inspect, json, pkgutil, sys
import conva

skip = {"conva.steering.vllm", "conva.steering.vllm_op"}  # need the optional vLLM engine; checked by test_vllm
modules = {}
for pkg in ("conva", "conva.jobs", "conva.workers"):
    root = importlib.import_module(pkg)
    modules[pkg] = root
    for info in pkgutil.walk_packages(root.__path__, pkg + "."):
        if info.name not in skip and not info.name.endswith("__main__"):
            modules[info.name] = importlib.import_module(info.name)
lazy = {}
for pkg in ("conva", "conva.workers"):
    for name in getattr(modules[pkg], "__all__", []):
        lazy[f"{pkg}.{name}"] = getattr(modules[pkg], name)
seen = {}
for mod in list(modules.values()) + [None]:
    items = vars(mod).items() if mod is not None else lazy.items()
    for _, obj in items:
        if inspect.isclass(obj) and obj.__module__.split(".")[0] in ("conva", "jobs", "workers"):
            seen.setdefault(f"{obj.__module__}.{obj.__qualname__}", set()).add(id(obj))
print(json.dumps({
    "conva_file": conva.__file__,
    "modules": len(modules),
    "classes": len(seen),
    "twice": sorted(k for k, ids in seen.items() if len(ids) > 1),
    "foreign": sorted(k for k in seen if k.split(".")[0] != "conva"),
    "top_level": sorted(m for m in sys.modules if m.split(".")[0] in ("jobs", "workers")),
}))
"""


def _probe(python: str, cwd: Path, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clean(report: dict) -> None:
    assert report["modules"] > 60 and report["classes"] > 60, report
    assert report["twice"] == [], f"classes with two identities: {report['twice']}"
    assert report["foreign"] == [], (
        f"classes defined under a folder name, not the package: {report['foreign']}"
    )
    assert report["top_level"] == [], f"top-level jobs/workers modules imported: {report['top_level']}"


@pytest.mark.slow
def test_one_identity_per_class_in_a_checkout() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    report = _probe(sys.executable, REPO, env)
    assert Path(report["conva_file"]).resolve() == REPO / "conva" / "__init__.py"
    _clean(report)


@pytest.mark.slow
def test_one_identity_per_class_in_an_installed_wheel(tmp_path: Path) -> None:
    # Built from a copy, so setuptools' build/ and egg-info folders never land in the checkout.
    source = tmp_path / "source"
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("conva", "jobs", "workers"):
        shutil.copytree(REPO / part, source / part, ignore=junk)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, source / part)
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            wheels,
            source,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("conva-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    # The fresh venv gets the dependencies from this one's site-packages through a .pth line (a path added
    # that way has its own .pth files, such as this checkout's editable finder, left unprocessed).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    report = _probe(str(venv / "bin" / "python"), tmp_path, env)
    assert Path(report["conva_file"]).resolve() == (site / "conva" / "__init__.py").resolve()
    assert (site / "conva" / "workers" / "pool.py").is_file() and not (site / "workers").exists()
    _clean(report)
