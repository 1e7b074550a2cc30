"""Derive ``kuberay_v1.7.0_schema.yaml`` (next to this file) from KubeRay's published CRDs, offline.

It reads two local files and fetches nothing. To redo it for another release, from a clone of
ray-project/kuberay::

    git show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > /tmp/rayjobs.yaml
    git show v1.7.0:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > /tmp/rayclusters.yaml
    python tests/data/derive_kuberay_schema.py v1.7.0 COMMIT /tmp/rayjobs.yaml /tmp/rayclusters.yaml \\
        > tests/data/kuberay_v1.7.0_schema.yaml

The output keeps, for the ``v1`` version of each CRD, the OpenAPI schema's structure (property names, types,
nesting, ``required`` lists) and the constraints that a validator can check without Kubernetes (enums,
patterns, minimums, int-or-string); see ``HEADER`` for what is dropped or pruned, and why.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Any

import yaml

# Per schema node, only these keys are kept; descriptions, CEL rules (x-kubernetes-validations) and merge
# hints (x-kubernetes-list-type, -map-type, -list-map-keys) go. Defaults stay: the API server fills them in
# before it checks `required`, so a required field with a default may be left out of a manifest.
KEEP_KEYS = (
    "type",
    "properties",
    "required",
    "default",
    "items",
    "additionalProperties",
    "anyOf",
    "enum",
    "minimum",
    "minItems",
    "maxLength",
    "minLength",
    "pattern",
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
)
# Inside every embedded PodTemplateSpec, only these fields are kept (everything below a kept field is as
# published): what the manifests use, the standard fields for placing GPU pods and pulling images, and the
# container fields KubeRay's own samples use (securityContext, lifecycle for a preStop `ray stop`).
POD_SPEC = (
    "containers",
    "volumes",
    "nodeSelector",
    "tolerations",
    "serviceAccountName",
    "imagePullSecrets",
    "priorityClassName",
    "runtimeClassName",
    "terminationGracePeriodSeconds",
)
CONTAINER = (
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "workingDir",
    "env",
    "envFrom",
    "ports",
    "resources",
    "volumeMounts",
    "securityContext",
    "lifecycle",
)
VOLUME = ("name", "persistentVolumeClaim", "emptyDir", "nfs", "csi", "secret", "configMap")

HEADER = """\
# Derived from KubeRay's published CustomResourceDefinitions:
#   repository  github.com/ray-project/kuberay (Apache License 2.0; this derivative keeps that license)
#   release     {tag}, commit {commit}
#   files       ray-operator/config/crd/bases/ray.io_rayjobs.yaml      -> RayJob
#               ray-operator/config/crd/bases/ray.io_rayclusters.yaml  -> RayCluster
# Made by tests/data/derive_kuberay_schema.py (offline). For each kind, the `v1` openAPIV3Schema with:
{keep_keys}
# - dropped: descriptions, CEL rules (x-kubernetes-validations), list/map merge hints, and `status` (written
#   by the operator, never by a manifest)
{templates}
{pod_spec}
{container}
{volume}
#   (each field kept whole below that level; every `required` field is among those kept). A valid Kubernetes
#   field outside these lists (e.g. a container's livenessProbe) is reported as unknown: add it to the lists
#   in derive_kuberay_schema.py and derive this file again before using it.
"""


def _comment(first: str, names: list[str] | tuple[str, ...]) -> str:
    """``first`` and the comma-separated ``names`` as comment lines of at most 110 characters."""
    indent = "#" + " " * (len(first) - 1)
    return textwrap.fill(
        ", ".join(names), width=110, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False
    )


def _clean(node: dict[str, Any]) -> dict[str, Any]:
    """One schema node with only ``KEEP_KEYS``, its subschemas cleaned the same way."""
    out: dict[str, Any] = {}
    for key in KEEP_KEYS:
        if key not in node:
            continue
        value = node[key]
        if key == "properties":
            value = {name: _clean(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = _clean(value)
        elif key == "anyOf":
            value = [_clean(sub) for sub in value]
        out[key] = value
    return out


def _keep(node: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    """Keep only ``names`` among ``node``'s properties; each must exist, and no required field may go."""
    if missing := set(names) - set(node["properties"]):
        raise SystemExit(f"{where}: not in the published schema: {sorted(missing)}")
    if dropped := set(node.get("required", ())) - set(names):
        raise SystemExit(f"{where}: would drop required fields {sorted(dropped)}")
    node["properties"] = {name: node["properties"][name] for name in names}


def _is_pod_template(node: dict[str, Any]) -> bool:
    props = node.get("properties", {})
    return set(props) == {"metadata", "spec"} and "containers" in props["spec"].get("properties", {})


def _prune_pod_templates(node: dict[str, Any], path: str, found: list[str]) -> None:
    if _is_pod_template(node):
        found.append(path)
        spec = node["properties"]["spec"]
        _keep(spec, POD_SPEC, f"{path}.spec")
        _keep(spec["properties"]["containers"]["items"], CONTAINER, f"{path}.spec.containers[]")
        _keep(spec["properties"]["volumes"]["items"], VOLUME, f"{path}.spec.volumes[]")
        return
    for name, sub in node.get("properties", {}).items():
        _prune_pod_templates(sub, f"{path}.{name}" if path else name, found)
    if isinstance(node.get("items"), dict):
        _prune_pod_templates(node["items"], f"{path}[]", found)


def derive(crd_path: str) -> tuple[str, dict[str, Any], list[str]]:
    """(kind, pruned v1 schema, paths of the pruned pod templates) of one CRD file."""
    with open(crd_path) as handle:
        crd = yaml.safe_load(handle)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _clean(v1["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]
    found: list[str] = []
    _prune_pod_templates(schema, "", found)
    return crd["spec"]["names"]["kind"], schema, found


def main(tag: str, commit: str, *crd_paths: str) -> None:
    schemas, templates = {}, []
    for path in crd_paths:
        kind, schema, found = derive(path)
        schemas[kind] = schema
        templates += [f"{kind}.{p}" for p in found]
    sys.stdout.write(
        HEADER.format(
            tag=tag,
            commit=commit,
            keep_keys=_comment("# - kept per node: ", KEEP_KEYS),
            templates=_comment("# - pruned inside every embedded PodTemplateSpec: ", templates),
            pod_spec=_comment("#     pod spec   keeps ", POD_SPEC),
            container=_comment("#     container  keeps ", CONTAINER),
            volume=_comment("#     volume     keeps ", VOLUME),
        )
    )
    yaml.safe_dump(schemas, sys.stdout, sort_keys=True, width=120, default_flow_style=None)


if __name__ == "__main__":
    main(*sys.argv[1:])
