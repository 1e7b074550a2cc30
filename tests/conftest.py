"""Shared fixtures: tiny random models for exact math, SmolLM2 for behaviour, real infrastructure on loopback.

Tests split by cost: fast by default, ``@pytest.mark.slow`` for real-model and Ray-cluster tests (CI
runs both). Paths to the paper's data come from ``CONVA_PAPER_DATA`` or ``../shared/data/conva``.
Infrastructure: ``two_nodes`` (a two-node Ray cluster with two filesystems, ``tests/clusters.py``),
``s3`` and ``s3_env`` (an S3 endpoint on loopback, ``tests/s3server.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.clusters import TwoNodeCluster, two_node_cluster
from tests.s3server import S3Server, s3_server

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = Path(os.environ.get("CONVA_PAPER_DATA", REPO.parent / "shared" / "data" / "conva"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real-model or Ray-cluster test (CI runs these too)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each test process has about one core (TEST_WORKERS processes share the machine): torch's default of
        # a thread per core has them fight over every core. Set before the test modules import torch; the
        # jobs and Ray workers they start inherit it. Measured on the 2-core machine, two model-heavy modules
        # side by side (test_smollm2, test_gemma): 221 s with torch's default, 138 s with one thread each.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# Session resources worth starting once: under pytest-xdist every test using one runs on the same worker.
_SHARED_RESOURCES = ("smollm2_server",)
# The longest groups, longest first (seconds each took in a clean clone's `make test` with three workers on the
# 2-core machine, 2026-12-06): `make test` hands groups out in collection order (--no-loadscope-reorder), so
# these start first and the short ones fill the end. With xdist's own order (by test count) a 78 s one-test
# group started last, on a worker that had queued it early: one worker sat idle for its last 102 s, two for 32 s.
_LONGEST_FIRST = (
    "tests/test_reliability.py",  # 291
    "tests/test_two_nodes.py",  # 190
    "tests/test_cli.py",  # 146
    "tests/test_study.py",  # 143
    "tests/test_ray_data_llm.py",  # 135
    "tests/test_s3_jobs.py",  # 96
    "tests/test_ray_jobs.py",  # 87
    "tests/test_vllm.py",  # 83
    "tests/test_benchmarks.py",  # 82
    "tests/test_vllm_plugin.py",  # 80
    "tests/test_gemma.py",  # 62
    "smollm2_server",  # 46
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests for ``pytest -n 3 --dist loadgroup`` (the README's test command): a module's tests run on
    one worker, so its module fixtures (a two-node cluster, a fitted bundle) start once, and the tests of a
    shared session resource (``_SHARED_RESOURCES``) run together; the longest groups come first
    (``_LONGEST_FIRST``; the sort is stable, so every other test keeps its place). Without ``-n`` the marks
    change nothing, and the order only puts those modules first.

    The scheduler reads a test's group from its node id (``<id>@<group>``), which pytest-xdist 3.8's worker
    hook writes to ``item._nodeid``: pytest 9 keeps the id in ``item._id``, so that write is lost and every
    test was scheduled alone (a module's fixtures set up again on the other worker: SmolLM2's 80 s fit
    twice, a second two-node cluster). On a worker, this hook writes the suffix itself, through pytest's id.
    """
    from _pytest.nodeid import coerce_node_id

    suffix = bool(os.environ.get("PYTEST_XDIST_WORKER")) and bool(config.getvalue("loadgroup"))
    for item in items:
        shared = [name for name in _SHARED_RESOURCES if name in getattr(item, "fixturenames", ())]
        group = shared[0] if shared else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
        if suffix and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{group}")
    rank = {group: i for i, group in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], len(rank)))


@pytest.fixture(scope="session")
def paper_data() -> Path:
    if not PAPER_DATA.is_dir():
        pytest.fail(f"the paper's data folder is missing: {PAPER_DATA} (set CONVA_PAPER_DATA)")
    return PAPER_DATA


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama (4 blocks, hidden 256, head_dim 64) with an offline-trained tokenizer."""
    from conva.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny(tiny_path: str):
    from conva.models import load_model

    return load_model(tiny_path)


@pytest.fixture(scope="session")
def tiny_bundles(tiny):
    """Bundles fitted on the tiny model's activations of demo data.

    Returns ``(open_gate, other_value, closed_gate)``: a probe-gated bundle whose gate opens for every
    prompt, another value's bundle, and the first with a gate that never opens.
    """
    from dataclasses import replace

    from conva.batch.config import load_config
    from conva.batch.extraction import extract_table, extraction_rows, fit_bundles
    from conva.fit import ModelInfo
    from conva.models import model_fingerprint

    model, tok = tiny
    cfg = load_config(
        None,
        [
            '--data.values=["power", "benevolence"]',
            "--fit.band=1-3",
            "--fit.p0=0.95",
            "--gate.other_pairs_per_value=8",
        ],
    )
    rows = extraction_rows(cfg)
    layers = list(range(model.config.num_hidden_layers))
    acts = extract_table(model, tok, rows, layers, "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        len(layers), rows.num_rows, -1
    )
    info = ModelInfo("tiny", model_fingerprint(model), model.config.hidden_size, len(layers))
    bundles = fit_bundles(rows, lambda l: matrix[l], layers, cfg, info)
    power, benevolence = bundles["power"], bundles["benevolence"]
    always = replace(power, gate=replace(power.gate, threshold=0.0))
    never = replace(power, gate=replace(power.gate, threshold=2.0))
    return always, benevolence, never


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodeCluster]:
    """A two-node Ray cluster (head without CPUs, worker with 2) where ``head_only`` is the head's alone.

    One per test module (about 15 s to start, 3 s to stop); see ``tests/clusters.py``.
    """
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A ``moto_server`` S3 endpoint on 127.0.0.1 for the whole session (about 1 s to start)."""
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3``, with this test's environment holding exactly its AWS variables (any other AWS_* removed)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``vllm serve``-equivalent OpenAI server with SmolLM2 (as "smollm2") on 127.0.0.1 for the session,
    shared by the LLM judge's test and the plugin's serve tests (about a minute to start on CPU).

    It is deployed as users run it: a multi-process engine with ConVA's plugin loaded through its entry point
    (this checkout on the path), float32, eager, a 1 GiB KV cache, seed 0. Yields ``http://127.0.0.1:<port>``.
    """
    from tests.vllm_server import vllm_server

    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_USAGE_STATS_ENABLED": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    args = [
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "8",
        "--no-enable-chunked-prefill", "--enforce-eager", "--seed", "0",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("smollm2-server") / "server.log"
    with vllm_server(args, env, log, ready="/v1/models", timeout_s=600) as url:
        yield url


@pytest.fixture(scope="session")
def fault_plan(tmp_path_factory) -> Path:
    """The plan file the workers' test hook reads (``tests/faults.py``); set before the session's Ray starts."""
    from conva.workers.hooks import HOOK_ENV
    from tests.faults import PLAN_ENV

    path = tmp_path_factory.mktemp("faults") / "plan.json"
    path.write_text("{}")
    os.environ[PLAN_ENV] = str(path)  # inherited by the raylet, so by every worker
    # By file, not module: a job driven from elsewhere (a `conva` subprocess, `ray job submit`) gives
    # its workers its own sys.path, without this repo's tests package.
    os.environ[HOOK_ENV] = f"{REPO / 'tests' / 'faults.py'}:hook"
    return path


@pytest.fixture(scope="session")
def ray_session(fault_plan, s3):
    """One embedded Ray (loopback only) for every test that runs jobs in-process (~6 s and ~700 MB to start).

    Its workers inherit the environment it starts with: the fault hook, and the AWS variables of the
    session's S3 server on loopback (so a job's workers reach ``s3://`` outputs as the driver does).
    """
    import ray

    from conva.jobs.common import connect_ray

    if ray.is_initialized():  # started by an earlier test without this environment: its workers lack it
        ray.shutdown()
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(s3.env)
    connect_ray()
    yield
    ray.shutdown()


@pytest.fixture
def faults(fault_plan, tmp_path):
    """Write this test's fault plan (``faults(kill_rate=0.2, seed=3)``); it is cleared when the test ends."""
    import json

    def write(**plan: object) -> Path:
        plan.setdefault("marker_dir", str(tmp_path / "markers"))
        fault_plan.write_text(json.dumps(plan))
        return Path(str(plan["marker_dir"]))

    yield write
    fault_plan.write_text("{}")
