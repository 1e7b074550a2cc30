"""ConVA as a vLLM general plugin: the request format, and one multi-process engine on the tiny model.

Fast tests check the request format, the cache-salt rules and pre-flight's tensor-parallel check. The
slow tests build one engine, our workers' :class:`~conva.steering.vllm.VLLMSteerer`, with
``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (the engine core in its own process, which loads the plugin by
its entry point) and prefix caching on: parity of tokens and ε with the HF backend, prefix-cache
isolation read from vLLM's ``num_cached_tokens``, and bad specs failing their own request only.
"""

from __future__ import annotations

import os
import shutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed")  # CI installs it: see pyproject

from conva.bundle import load_bundle, save_bundle  # noqa: E402
from conva.record import format_prompt  # noqa: E402
from conva.steering.hf import generate  # noqa: E402
from conva.steering.spec import SteerSpec  # noqa: E402
from conva.steering.vllm_plugin import (  # noqa: E402
    SpecError,
    cache_salt,
    parse_request,
    read_telemetry,
    request_args,
    resolve,
)
from tests import test_vllm, test_vllm_job  # noqa: E402

# The same tiny model, prompts and bundles as the in-process backend's tests.
from tests.test_vllm import (  # noqa: E402
    BAND,
    HIDDEN,
    N_BLOCKS,
    PROMPTS,
    _bundle,
)

# Its fixtures, shared by name (module-scoped here too: this module gets its own instances).
tiny, hf, bundles = test_vllm.tiny, test_vllm.hf, test_vllm.bundles

MAX_NEW = 10


# -- fast: the request format ----------------------------------------------------------------------------


def test_plugin_entry_point_is_installed() -> None:
    """vLLM finds the plugin by its entry point; without it no engine process steers."""
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("conva") == "conva.steering.vllm_plugin:register", (
        "install the project (pip install -e .) so vLLM's engine processes load ConVA's plugin"
    )


def test_parse_request_names_the_bad_key() -> None:
    assert parse_request({"temperature_hint": 1}) is None
    req = parse_request({"conva_bundle": "/b", "conva_p0": 0.9, "conva_band": [1, 2], "conva_gate_open": 0})
    assert req is not None and (req.p0, req.band, req.gate_open) == (0.9, (1, 2), False)
    bad = [
        ({"conva_p0": 0.9}, "conva_bundle"),
        ({"conva_bundle": "/b", "conva_pzero": 0.9}, "unknown key"),
        ({"conva_bundle": "/b", "conva_p0": "high"}, "conva_p0 must be a number"),
        ({"conva_bundle": "/b", "conva_method": "prompt"}, "conva_method must be one of"),
        ({"conva_record": [0, "1"]}, "conva_record must be a non-empty list"),
        ({"conva_record": [0], "conva_method": "caa"}, "conva_method 'caa' needs conva_bundle"),
        ({"conva_bundle": "/b", "conva_eps": 0.5}, "conva_eps must be a non-empty list"),
        ({"conva_bundle": "/b", "conva_band": [1, "2"]}, "conva_band"),
        ({"conva_bundle": "/b", "conva_tag": "../x"}, "conva_tag"),
        ({"conva_bundle": "/b", "conva_gate_open": 2}, "conva_gate_open"),
    ]
    for extra, message in bad:
        with pytest.raises(SpecError, match=message):
            parse_request(extra)
    assert request_args(bundle="/b", p0=0.9, band=(1, 2)) == {
        "conva_bundle": "/b",
        "conva_p0": 0.9,
        "conva_band": [1, 2],
    }


def test_resolve_checks_the_spec_against_the_model(tmp_path: Path) -> None:
    path = str(save_bundle(_bundle("power", 1), tmp_path / "power"))
    req, spec, _ = resolve(request_args(bundle=path, p0=0.9), HIDDEN, N_BLOCKS)  # type: ignore[misc]
    assert (spec.method, spec.target(), spec.layers()) == ("conva", 0.9, BAND)
    with pytest.raises(SpecError, match="P0 must lie strictly between 0 and 1"):
        resolve(request_args(bundle=path, p0=1.0), HIDDEN, N_BLOCKS)
    with pytest.raises(SpecError, match="not a readable bundle"):
        resolve(request_args(bundle=str(tmp_path / "missing")), HIDDEN, N_BLOCKS)
    with pytest.raises(SpecError, match="hidden size 256 and 4 layers; this engine's has 512 and 4"):
        resolve(request_args(bundle=path), 512, N_BLOCKS)
    with pytest.raises(SpecError, match=r"layer\(s\) \[3\] are not steerable"):
        resolve(request_args(bundle=path), HIDDEN, N_BLOCKS, active=[1, 2])


def test_cache_salt_only_for_requests_that_steer(tmp_path: Path) -> None:
    """Unsteered and gated-off requests keep the caller's salt; a steered one's depends on spec and prompt."""
    path = str(save_bundle(_bundle("power", 1), tmp_path / "power"))

    def salt(prompt: list[int], user: str | None = None, **spec: Any) -> str | None:
        req, s, digest = resolve(request_args(bundle=path, **spec), HIDDEN, N_BLOCKS)  # type: ignore[misc]
        return cache_salt(req, s, digest, prompt, user)

    assert salt([1, 2, 3], method="none") is None
    assert salt([1, 2, 3], "mine", gate_open=0) == "mine"
    steered = salt([1, 2, 3])
    assert steered is not None and steered.startswith("conva-")
    assert salt([1, 2, 3]) == steered
    others = {salt([1, 2, 4]), salt([1, 2, 3], p0=0.9), salt([1, 2, 3], "mine"), salt([1, 2, 3], band=[1])}
    assert steered not in others and len(others) == 4


# -- slow: one multi-process engine on the tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def bundle_paths(bundles, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:  # noqa: ANN001
    """test_vllm's two bundles, saved: the first has a probe gate at layer 1 that closes for half the prompts."""
    root = tmp_path_factory.mktemp("bundles")
    power, security = bundles
    return str(save_bundle(power, root / "power")), str(save_bundle(security, root / "security"))


@pytest.fixture(scope="module")
def steerer(tiny: str, bundles) -> Iterator[Any]:  # noqa: ANN001
    """Our workers' engine (:class:`VLLMSteerer`, a client of the plugin) built multi-process: the engine
    core is another process, which loads the plugin by its entry point. Every layer active, recording on,
    prefix caching on, blocks of 32."""
    import vllm.envs

    from conva.steering.vllm import EngineSettings, VLLMSteerer

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    vllm.envs.disable_envs_cache()  # an in-process engine of another test module may have frozen them
    settings = EngineSettings(max_model_len=512, max_num_seqs=16, block_size=32, record=True)
    built = None
    try:
        built = VLLMSteerer(tiny, bundles, layers=range(N_BLOCKS), settings=settings)
        yield built
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
        vllm.envs.disable_envs_cache()
        if built is not None:
            built.close()


@pytest.fixture(scope="module")
def engine(steerer) -> Any:  # noqa: ANN001
    """The multi-process ``vllm.LLM`` itself, for requests sent as ``vllm serve`` or Ray Data LLM send them."""
    return steerer.llm


def _run(engine: Any, hf: Any, prompts: list[str], extras: list[dict | None]) -> list[Any]:
    """Greedy requests on the chat-templated prompts (the HF backend's tokens), one per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = hf[1]
    ids = [tok(format_prompt(tok, p, True), add_special_tokens=False)["input_ids"] for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, extra_args=e) for e in extras]
    return engine.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)


def _tokens(out: Any, eos: int) -> tuple[int, ...]:
    row = list(out.outputs[0].token_ids)
    return tuple(row[: row.index(eos)] if eos in row else row)


@pytest.mark.slow
def test_parity_with_hf_through_the_plugin_in_a_multiprocess_engine(
    engine, hf, bundle_paths, tmp_path
) -> None:  # noqa: ANN001
    """A mixed batch (gated, unsteered, two bundles, three P0, CAA, fixed probe): the HF backend's
    tokens and ε, with the telemetry read from the engine process's files."""
    model, tok = hf
    gated, other = bundle_paths
    tel = str(tmp_path / "telemetry")
    rows: list[tuple[SteerSpec, dict | None]] = []
    for i, (path, spec) in enumerate(
        [
            (gated, dict()),
            (gated, dict()),
            (None, dict()),
            (other, dict()),
            (other, dict(p0=0.9)),
            (gated, dict(p0=0.99)),
            (other, dict(method="caa", strength=4.0)),
            (gated, dict(method="probe_fixed", strength=6.0)),
            (gated, dict(method="conva_nogate")),
        ]
    ):
        if path is None:
            rows.append((SteerSpec("none"), None))
            continue
        b = load_bundle(path)
        rows.append(
            (
                SteerSpec(
                    spec.get("method", "conva"), b, p0=spec.get("p0"), strength=spec.get("strength", 0.0)
                ),
                request_args(bundle=path, telemetry=tel, tag=f"r{i}", **spec),
            )
        )
    prompts = PROMPTS + PROMPTS[:3]
    want = generate(
        model, tok, prompts, [s for s, _ in rows], max_new_tokens=MAX_NEW, batch_size=len(prompts)
    )
    outs = _run(engine, hf, prompts, [e for _, e in rows])
    gates = set()
    for i, (w, out, (spec, extra)) in enumerate(zip(want, outs, rows, strict=True)):
        assert _tokens(out, tok.eos_token_id) == w.tokens, f"row {i}: greedy tokens differ"
        if extra is None:
            assert not os.path.exists(os.path.join(tel, f"r{i}.json"))
            continue
        got = read_telemetry(tel, f"r{i}")
        assert got["error"] is None and tuple(got["layers"]) == w.layers
        assert got["gate_open"] == w.gate_open, f"row {i}: gate"
        if w.gate_score is not None:
            assert abs(got["gate_score"] - w.gate_score) < 1e-4
            gates.add(w.gate_open)
        np.testing.assert_allclose(got["eps"], w.eps, atol=1e-3, err_msg=f"row {i}: eps")
        np.testing.assert_allclose(got["p_before"], w.p_before, atol=1e-4, err_msg=f"row {i}: p_before")
        np.testing.assert_allclose(got["p_after"], w.p_after, atol=1e-4, err_msg=f"row {i}: p_after")
    assert gates == {True, False}, "the batch must hold both open and closed gates"


@pytest.mark.slow
def test_prefix_cache_never_serves_unsteered_kv_to_a_steered_request(
    engine, hf, bundle_paths, tmp_path
) -> None:  # noqa: ANN001
    """vLLM's ``num_cached_tokens``: unsteered repeats hit the cache, a steered request does not hit the
    unsteered prompt's blocks (nor another spec's), its own repeat hits its own, with the same tokens
    and ε; a request whose gate was decided closed shares the unsteered blocks."""
    _, other = bundle_paths
    eos = hf[1].eos_token_id
    prompt = " ".join(PROMPTS)  # several 32-token blocks
    tel = str(tmp_path / "tel")

    def one(extra: dict | None) -> Any:
        return _run(engine, hf, [prompt], [extra])[0]

    plain = [one(None), one(None)]
    assert plain[0].num_cached_tokens == 0 and plain[1].num_cached_tokens >= 32
    steered = [one(request_args(bundle=other, telemetry=tel, tag=f"s{k}")) for k in range(2)]
    assert steered[0].num_cached_tokens == 0, "a steered request reused unsteered KV"
    assert steered[1].num_cached_tokens == plain[1].num_cached_tokens
    assert _tokens(steered[1], eos) == _tokens(steered[0], eos) != _tokens(plain[0], eos)
    assert read_telemetry(tel, "s1")["eps"] == read_telemetry(tel, "s0")["eps"]
    assert one(request_args(bundle=other, p0=0.9)).num_cached_tokens == 0, "another spec reused KV"
    closed = one(request_args(bundle=other, gate_open=0))
    assert closed.num_cached_tokens == plain[1].num_cached_tokens
    assert _tokens(closed, eos) == _tokens(plain[0], eos)


@pytest.mark.slow
def test_a_bad_spec_fails_its_request_and_the_engine_serves_on(engine, hf, bundle_paths, tmp_path) -> None:  # noqa: ANN001
    """Front end: an unknown bundle or a bad P0 raises a ValueError naming it, before the engine sees it.
    Engine process: a bundle gone by the time it loads it runs that request unsteered, the error in
    its telemetry; the other requests of the batch are steered as before."""
    _, other = bundle_paths
    eos = hf[1].eos_token_id
    for extra, message in [
        (request_args(bundle=str(tmp_path / "nowhere")), "not a readable bundle"),
        (request_args(bundle=other, p0=1.5), "P0 must lie strictly between 0 and 1"),
        (request_args(bundle=other, band=[7]), "no probe at layer"),
    ]:
        with pytest.raises(ValueError, match=message):
            _run(engine, hf, PROMPTS[:1], [extra])
    # Loaded (and cached) by the front end, then removed before the engine process reads it.
    gone = str(tmp_path / "gone")
    shutil.copytree(other, gone)
    resolve(request_args(bundle=gone), HIDDEN, N_BLOCKS)
    shutil.rmtree(gone)
    tel = str(tmp_path / "tel")
    extras = [
        request_args(bundle=gone, telemetry=tel, tag="gone"),
        request_args(bundle=other, telemetry=tel, tag="ok"),
        None,
    ]
    outs = _run(engine, hf, [PROMPTS[0]] * 3, extras)
    assert "not a readable bundle" in read_telemetry(tel, "gone")["error"]
    assert read_telemetry(tel, "ok")["error"] is None and max(read_telemetry(tel, "ok")["eps"]) > 0
    assert _tokens(outs[0], eos) == _tokens(outs[2], eos) != _tokens(outs[1], eos)


@pytest.mark.slow
def test_tensor_parallel_ranks_compute_the_same_eps_as_hf(tiny, hf, bundles) -> None:  # noqa: ANN001
    """Tensor parallelism 2 (vLLM's CPU backend, one core per rank) in our workers' engine: the ranks are
    processes of vLLM's multiprocessing executor, which load the plugin by its entry point; every rank writes
    its telemetry, both ranks' ε, p_before, p_after and gate are identical, and tokens and ε match HF's."""
    import json

    import vllm.envs

    from conva.steering.vllm import EngineSettings, VLLMSteerer

    model, tok = hf
    gated, other = bundles
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    # vLLM's CPU backend binds each rank's threads to a NUMA node; this machine has one, so name the cores.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    vllm.envs.disable_envs_cache()
    settings = EngineSettings(
        max_model_len=512, max_num_seqs=8, block_size=32, tensor_parallel_size=2, telemetry_ranks="all"
    )
    specs = [
        SteerSpec("conva", gated),
        SteerSpec("conva", other, p0=0.9),
        SteerSpec("caa", gated, strength=4.0),
        SteerSpec("none"),
    ]
    prompts = PROMPTS[: len(specs)]
    want = generate(model, tok, prompts, specs, max_new_tokens=MAX_NEW, batch_size=len(prompts))
    steerer = VLLMSteerer(tiny, bundles, settings=settings)
    try:
        got = steerer.generate(prompts, specs, max_new_tokens=MAX_NEW)
        rank1 = [
            json.loads((Path(steerer.folder) / f).read_text())
            for f in os.listdir(steerer.folder)
            if f.endswith(".rank1.json")
        ]
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
        vllm.envs.disable_envs_cache()
        steerer.close()
    test_vllm._assert_parity(want, got)  # rank 0's telemetry, read by the steerer
    fields = ("eps", "p_before", "p_after")
    ranks = [(r.gate_open, *(tuple(getattr(r, f)) for f in fields)) for r in got if r.layers]
    assert len(rank1) == len(ranks) == 3
    assert sorted(ranks) == sorted((t["gate_open"], *(tuple(t[f]) for f in fields)) for t in rank1), (
        "the ranks disagree"
    )


@pytest.mark.slow
def test_our_steerer_is_a_plugin_client_in_a_multiprocess_engine(steerer, hf, bundles) -> None:  # noqa: ANN001
    """VLLMSteerer steers only through the plugin's requests: in a multi-process engine its rows equal the
    HF backend's (tokens, ε, p_before, p_after, gate), gates scored before the pass (the opposite setting,
    the prompt method) included, and its recorded activations equal HF's."""
    from conva.record import record_activations

    model, tok = hf
    gated = bundles[0]
    specs = test_vllm._mixed_specs(bundles) + [
        SteerSpec("conva", gated, setting="opposite"),
        SteerSpec("prompt", gated),
        SteerSpec("random", gated, eps=(0.5, 1.0, 2.0), seed=3),
    ]
    prompts = (PROMPTS * 2)[: len(specs)]
    want = generate(model, tok, prompts, specs, max_new_tokens=MAX_NEW, batch_size=len(prompts))
    got = steerer.generate(prompts, specs, max_new_tokens=MAX_NEW)
    test_vllm._assert_parity(want, got)
    assert {r.gate_open for r, s in zip(got, specs) if s.scored_first()} == {True, False}
    assert steerer.recomputed == 0
    np.testing.assert_allclose(
        steerer.record(PROMPTS, [0, 3], chat_template=True),
        record_activations(model, tok, PROMPTS, [0, 3], chat_template=True),
        atol=1e-4,
    )
    leftover = [f for f in os.listdir(steerer.folder) if f != "bundles"]
    assert leftover == [], f"telemetry files left behind: {leftover}"


def test_preflight_accepts_tensor_parallelism_the_workers_gpus_cover(tiny) -> None:  # noqa: ANN001
    """vllm.tensor_parallel_size > 1 passes when ray.num_gpus_per_worker covers it, and fails naming both
    keys when it does not (or when a worker's GPUs would sit idle)."""
    from conva.batch.config import load_config
    from conva.jobs.common import JobError
    from conva.jobs.preflight import check_backend_settings

    def cfg(tp: int, gpus: float):  # noqa: ANN202
        keys = [f"--vllm.tensor_parallel_size={tp}", f"--ray.num_gpus_per_worker={gpus}"]
        return load_config(
            test_vllm_job.REPO / "examples" / "demo.toml",
            [f"--model.name={tiny}", "--steer.backend=vllm", *keys],
        )

    check_backend_settings(cfg(2, 2))
    check_backend_settings(cfg(1, 1))
    with pytest.raises(
        JobError, match=r"vllm.tensor_parallel_size: 2 ranks need ray.num_gpus_per_worker >= 2.*got 1"
    ):
        check_backend_settings(cfg(2, 1))
    with pytest.raises(JobError, match=r"set vllm.tensor_parallel_size = 4 \(now 2\)"):
        check_backend_settings(cfg(2, 4))
