"""The deployment files parse, and every job entrypoint and config they name exists in this checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
ENTRYPOINT = re.compile(r"python -m (jobs\.[a-z_]+)((?:\s+--?[\w.-]+(?:[= ][^\s]+)?)*)")


def _strings(node: object):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _entrypoints(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    found = [m.groups() for m in ENTRYPOINT.finditer(text)]  # comments included: they are instructions too
    for doc in yaml.safe_load_all(text):
        for s in _strings(doc):
            found += [m.groups() for m in ENTRYPOINT.finditer(s)]
    return found


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml", "runtime_env.yaml"])
def test_cluster_file_parses(name: str) -> None:
    docs = list(yaml.safe_load_all((CLUSTER / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_every_named_entrypoint_and_config_exists() -> None:
    found = [e for name in ("ray-cluster.yaml", "rayjob.yaml", "runtime_env.yaml") for e in _entrypoints(CLUSTER / name)]
    assert {m for m, _ in found} >= {"jobs.run"}
    for module, args in found:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
        config = re.search(r"--config[= ](\S+)", args)
        assert config and (REPO / config.group(1)).is_file(), (module, args)


def test_rayjob_and_launcher_shapes() -> None:
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m jobs.")
    assert job["spec"]["backoffLimit"] == 0
    spec = job["spec"]["rayClusterSpec"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
