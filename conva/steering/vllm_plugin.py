"""ConVA as a vLLM general plugin: per-request steering in any vLLM engine (``vllm serve``, Ray Data LLM,
``vllm.LLM`` with a multi-process engine core), from one request format in ``SamplingParams.extra_args``.

Installed with the project (entry point ``vllm.general_plugins: conva``), vLLM calls :func:`register` in
every process it starts (front end, engine core, workers). There it patches the decoder layers and the
model runner (:mod:`conva.steering.vllm_patch`); each runner then makes its own steering state, and loads
the bundles the requests name into it (cached per process), so nothing lives only in the driver.

**The request format** (flat keys, because ``vllm serve`` takes ``vllm_xargs`` of scalars and lists):

==================  ===============================================================================
``conva_bundle``    path or URI (``s3://…``) of a bundle folder (:func:`conva.bundle.save_bundle`); required
                    unless the request only records
``conva_method``    ``conva`` (default), ``conva_nogate``, ``caa``, ``probe_fixed``, ``random`` or ``none``
``conva_p0``        ConVA's target probability, 0 < P0 < 1 (default: the bundle's)
``conva_strength``  the constant scale of ``caa`` / ``probe_fixed``
``conva_eps``       ``random``: the step size per steered layer; ``conva_seed``: its directions' seed
``conva_record``    layers whose residual stream at the last prompt token the engine writes to
                    ``<tag>.acts.safetensors`` (tensor ``acts``, float32 ``[len(layers), hidden]``; the engine needs
                    ``additional_config`` ``conva.record``)
``conva_band``      the steered layers (default: the bundle's band)
``conva_gate``      ``bundle`` (default: the bundle's probe gate, read in the pass) or ``off``
``conva_gate_open`` the gate decided before the request (1/0; 0 leaves the request unsteered)
``conva_gate_score`` its score, reported back as is
``conva_positions`` ``all`` (default) or ``generated``; ``conva_epsilon``: ``frozen`` or ``per_token``
``conva_telemetry`` a folder: the engine writes ``<tag>.json`` there (ε, p_before, p_after, gate,
                    recomputes after a preemption)
``conva_tag``       the telemetry file's name (default: vLLM's request id); letters, digits, ``._-``
==================  ===============================================================================

Validated in the front end when the request is added (:func:`resolve`): an unknown bundle, a bad P0,
a layer the model lacks fails that request (``vllm serve``: HTTP 400 naming the problem; ``LLM``: a
``ValueError``), never the engine.

**Telemetry** goes out through a file per request, written by the engine process once ε is computed
(before the request's first token is returned): vLLM 0.32 carries no per-request field from the model
runner to the client (``kv_transfer_params`` exists only with a KV connector), and a file works alike
in every engine mode. Its folder must be visible to the caller (local or shared). Under tensor
parallelism the residual stream after each layer's all-reduce is whole on every rank, so every rank
computes the same ε; rank 0 writes.

**Prefix caching** stays on. A steered request gets a ``cache_salt`` from its spec *and its prompt*
(:func:`cache_salt`): with positions ``all`` the prompt's KV is steered by ε of the last prompt token,
so even a shared prefix's KV differs between prompts under one spec. Unsteered requests and requests
whose gate was decided closed keep the caller's salt and share cache with each other.

**Engine requirements**: chunked prefill off (ε needs the whole prompt in one step); without that the
plugin leaves the engine plain and refuses ConVA requests, naming the flag. ``additional_config``
``{"conva": {"layers": [...], "max_specs": N}}`` narrows the layers that call the op (default: all)
and sizes the table; ``{"conva": {"enabled": false}}`` leaves an engine plain;
``{"conva": {"telemetry_ranks": "all"}}`` has every tensor-parallel rank write its telemetry
(``<tag>.rank<r>.json`` besides rank 0's ``<tag>.json``), to check that they agree;
``{"conva": {"record": true}}`` keeps buffers for ``conva_record``. The engine side (one table of spec
rows per runner, the telemetry files) is :mod:`conva.steering.vllm_rows`.

Example (``vllm serve MODEL --no-enable-chunked-prefill`` then)::

    {"model": "MODEL", "prompt": "...", "max_tokens": 32,
     "vllm_xargs": {"conva_bundle": "/runs/demo/bundles/achievement", "conva_p0": 0.95,
                    "conva_telemetry": "/tmp/conva", "conva_tag": "q1"}}
"""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from conva.bundle import BUNDLE_FILES, ValueBundle, decode_bundle
from conva.gates import Gate
from conva.steering.spec import EPSILON_MODES, STEER_POSITIONS, SteerSpec
from conva.steering.vllm_engine import SUPPORTED_VLLM, check_vllm_version

__all__ = [
    "PREFIX",
    "PLUGIN_METHODS",
    "SpecError",
    "SteerRequest",
    "register",
    "parse_request",
    "request_args",
    "resolve",
    "cache_salt",
    "load_bundle_uri",
    "read_telemetry",
    "registered",
]

PREFIX = "conva_"
PLUGIN_METHODS = ("none", "conva", "conva_nogate", "caa", "probe_fixed", "random")
_TAG = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_REGISTERED = False


class SpecError(ValueError):
    """A request's ConVA spec that cannot be used; fails that request only."""


@dataclass(frozen=True)
class SteerRequest:
    """One request's ConVA spec as sent in ``extra_args`` (module doc), parsed and type-checked."""

    bundle: str | None
    method: str = "conva"
    p0: float | None = None
    strength: float = 0.0
    eps: tuple[float, ...] | None = None
    seed: int = 0
    band: tuple[int, ...] | None = None
    gate: str = "bundle"
    gate_open: bool | None = None
    gate_score: float | None = None
    positions: str = "all"
    epsilon: str = "frozen"
    telemetry: str | None = None
    tag: str | None = None
    record: tuple[int, ...] | None = None

    def row_key(self) -> str:
        """What shapes the spec's table row: equal keys share one row in an engine."""
        keep = ("bundle", "method", "p0", "strength", "eps", "seed", "band", "gate")
        return json.dumps([getattr(self, k) for k in keep] + [self.gate_open is None])


def request_args(**spec: Any) -> dict[str, Any]:
    """``extra_args`` for a spec given by field name: ``request_args(bundle=path, p0=0.95)``.

    Example:
        >>> request_args(bundle="/b/achievement", p0=0.9, band=(1, 2))
        {'conva_bundle': '/b/achievement', 'conva_p0': 0.9, 'conva_band': [1, 2]}
    """
    parse_request({PREFIX + k: v for k, v in spec.items()})  # refuse a bad spec here already
    return {PREFIX + k: list(v) if isinstance(v, tuple) else v for k, v in spec.items() if v is not None}


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecError(f"{PREFIX}{key} must be a number, got {value!r}")
    return float(value)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise SpecError(f"{PREFIX}{key} must be one of {tuple(allowed)}, got {value!r}")
    return str(value)


def parse_request(extra: Mapping[str, Any]) -> SteerRequest | None:
    """The ConVA spec among ``extra_args`` (keys ``conva_*``), or None if there is none.

    Raises :class:`SpecError` naming the key on an unknown key or a value of the wrong kind.
    """
    # A null value is an absent key: Arrow batches (Ray Data LLM) fill the keys other rows set with nulls.
    conf = {k[len(PREFIX) :]: v for k, v in extra.items() if k.startswith(PREFIX) and v is not None}
    if not conf:
        return None
    known = {f.name for f in fields(SteerRequest)}
    unknown = sorted(set(conf) - known)
    if unknown:
        raise SpecError(
            f"unknown key(s) {[PREFIX + k for k in unknown]}; known: {sorted(PREFIX + k for k in known)}"
        )
    record = _layers("record", conf.get("record"))
    if record is not None and "bundle" not in conf:  # a request that only records: no steering
        conf.setdefault("method", "none")
        if conf["method"] != "none":
            raise SpecError(f"{PREFIX}method {conf['method']!r} needs {PREFIX}bundle")
    elif not isinstance(conf.get("bundle"), str) or not conf["bundle"]:
        raise SpecError(f"{PREFIX}bundle (a bundle's path or URI) is required, got {conf.get('bundle')!r}")
    band = _layers("band", conf.get("band"))
    eps = conf.get("eps")
    if eps is not None and (not isinstance(eps, (list, tuple)) or not eps):
        raise SpecError(f"{PREFIX}eps must be a non-empty list of step sizes, got {eps!r}")
    gate_open = conf.get("gate_open")
    if gate_open is not None and gate_open not in (0, 1):  # True/False, or 1/0 from vllm_xargs
        raise SpecError(f"{PREFIX}gate_open must be 1 (open) or 0 (closed), got {gate_open!r}")
    tag = conf.get("tag")
    if tag is not None and (not isinstance(tag, str) or not _TAG.match(tag)):
        raise SpecError(f"{PREFIX}tag must be 1-128 letters, digits, '.', '_' or '-', got {tag!r}")
    telemetry = conf.get("telemetry")
    if telemetry is not None and (not isinstance(telemetry, str) or not telemetry):
        raise SpecError(f"{PREFIX}telemetry must be a folder path, got {telemetry!r}")
    return SteerRequest(
        bundle=conf.get("bundle"),
        method=_choice("method", conf.get("method", "conva"), PLUGIN_METHODS),
        p0=None if conf.get("p0") is None else _number("p0", conf["p0"]),
        strength=_number("strength", conf.get("strength", 0.0)),
        eps=None if eps is None else tuple(_number("eps", e) for e in eps),
        seed=int(_number("seed", conf.get("seed", 0))),
        band=band,
        gate=_choice("gate", conf.get("gate", "bundle"), ("bundle", "off")),
        gate_open=None if gate_open is None else bool(gate_open),
        gate_score=None if conf.get("gate_score") is None else _number("gate_score", conf["gate_score"]),
        positions=_choice("positions", conf.get("positions", "all"), STEER_POSITIONS),
        epsilon=_choice("epsilon", conf.get("epsilon", "frozen"), EPSILON_MODES),
        telemetry=telemetry,
        tag=tag,
        record=record,
    )


def _layers(key: str, value: Any) -> tuple[int, ...] | None:
    if value is not None and (
        not isinstance(value, (list, tuple))
        or not value
        or any(isinstance(l, bool) or not isinstance(l, numbers.Integral) for l in value)
    ):
        raise SpecError(f"{PREFIX}{key} must be a non-empty list of layer indices, got {value!r}")
    return None if value is None else tuple(int(l) for l in value)


@functools.lru_cache(maxsize=32)
def load_bundle_uri(uri: str) -> tuple[ValueBundle, str]:
    """The verified bundle at a local path or URI, and a digest of its tensors (cached per process)."""
    import pyarrow.fs as pafs

    try:
        # pyarrow's filesystems directly (the method layer does not import the batch layer's storage): a local
        # path, file://, s3:// (credentials and endpoint from the usual AWS environment), gs://, hdfs://.
        fs, root = pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
        files = {}
        for name in BUNDLE_FILES:
            with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as stream:
                files[name] = stream.read()
    except (OSError, ValueError) as exc:
        raise SpecError(
            f"{PREFIX}bundle {uri!r}: not a readable bundle ({type(exc).__name__}: {exc})"
        ) from exc
    digest = hashlib.sha256(files["vectors.safetensors"] + files["meta.json"]).hexdigest()[:16]
    return decode_bundle(files, uri), digest


def resolve(
    extra: Mapping[str, Any], hidden: int, n_blocks: int, active: Sequence[int] | None = None
) -> tuple[SteerRequest, SteerSpec, str] | None:
    """Parse and check a request's spec against the model: the request, its :class:`SteerSpec` and
    its bundle's digest, or None without a spec. ``active``: the layers that call the op (None: all).

    Raises :class:`SpecError` (a ``ValueError``) naming the problem.
    """
    req = parse_request(extra)
    if req is None:
        return None
    active_layers = active if active is not None else range(n_blocks)
    outside = sorted(set(l for l in req.record or () if l not in active_layers))
    if outside:
        raise SpecError(f"{PREFIX}record: layer(s) {outside} are not active in this engine")
    if req.bundle is None:  # it only records
        return req, SteerSpec("none"), ""
    try:
        bundle, digest = load_bundle_uri(req.bundle)
        if bundle.hidden_size != hidden or bundle.n_blocks != n_blocks:
            raise SpecError(
                f"{PREFIX}bundle {req.bundle!r} was made for a model with hidden size {bundle.hidden_size} and "
                f"{bundle.n_blocks} layers; this engine's has {hidden} and {n_blocks}"
            )
        if req.gate == "off":
            bundle = replace(bundle, gate=Gate())
        spec = SteerSpec(
            req.method, bundle, p0=req.p0, strength=req.strength, band=req.band, eps=req.eps, seed=req.seed
        )
        if spec.layers():
            bundle.rows(spec.layers())  # every steered layer has a probe
    except SpecError:
        raise
    except ValueError as exc:  # SteerSpec's and the bundle's own checks (P0 range, missing probes)
        raise SpecError(f"{PREFIX}bundle {req.bundle!r}: {exc}") from exc
    needed = set(spec.layers())
    if (
        spec.gate_applies()
        and bundle.gate.kind == "probe"
        and req.gate_open is None
        and bundle.gate.layer is not None
    ):
        needed.add(int(bundle.gate.layer))
    if spec.gate_applies() and bundle.gate.kind == "external" and req.gate_open is None:
        raise SpecError(
            f"{PREFIX}bundle {req.bundle!r} has an external classifier gate: score the prompt first and "
            f"send {PREFIX}gate_open (or {PREFIX}gate='off')"
        )
    outside = sorted(l for l in needed if l not in active_layers)
    if outside:
        raise SpecError(
            f"layer(s) {outside} are not steerable in this engine (active: {list(active or range(n_blocks))})"
        )
    return req, spec, digest


def steers(req: SteerRequest, spec: SteerSpec) -> bool:
    """Whether the request can change the model's states (its KV): a vector method, gate not decided closed."""
    return bool(spec.layers()) and req.gate_open is not False


def cache_salt(
    req: SteerRequest, spec: SteerSpec, digest: str, prompt_ids: Sequence[int], salt: str | None
) -> str | None:
    """The request's prefix-cache salt: the caller's ``salt`` unless the request steers; then a digest of
    the spec, the bundle's tensors, the prompt and ``salt`` (module doc: why the prompt is in it)."""
    if not steers(req, spec):
        return salt
    shape = {k: v for k, v in asdict(req).items() if k not in ("telemetry", "tag", "gate_score")}
    text = json.dumps([shape, digest, list(map(int, prompt_ids)), salt], sort_keys=True)
    return "conva-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def read_telemetry(folder: str, tag: str) -> dict[str, Any]:
    """The telemetry file the engine wrote for request ``tag`` (``FileNotFoundError`` if none)."""
    with open(os.path.join(folder, f"{tag}.json")) as fh:
        return json.load(fh)


def plugin_conf(vllm_config: Any) -> dict[str, Any]:
    conf = (getattr(vllm_config, "additional_config", None) or {}).get("conva") or {}
    if not isinstance(conf, dict):
        raise ValueError(f"additional_config['conva'] must be a mapping, got {conf!r}")
    return conf


def chunked(vllm_config: Any) -> bool:
    return bool(vllm_config.scheduler_config.enable_chunked_prefill)


def model_shape(model_config: Any) -> tuple[int, int]:
    text = model_config.hf_text_config
    return int(text.hidden_size), int(text.num_hidden_layers)


# -- the front end: validate and salt each request as it is added ------------------------------------------


def _wrap_process_inputs(orig: Any) -> Any:
    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *a: Any, **k: Any) -> Any:
        request = orig(self, request_id, prompt, params, *a, **k)
        sp = request.sampling_params
        extra = (sp.extra_args if sp is not None else None) or {}
        if not any(key.startswith(PREFIX) for key in extra):
            return request
        try:
            cfg = self.vllm_config
            conf = plugin_conf(cfg)
            if parse_request(extra) is not None and (conf.get("enabled", True) is False or chunked(cfg)):
                raise SpecError(
                    "this engine does not steer: ConVA needs chunked prefill off "
                    "(vllm serve --no-enable-chunked-prefill; LLM(enable_chunked_prefill=False)) and "
                    "additional_config conva.enabled not false"
                )
            hidden, n_blocks = model_shape(self.model_config)
            got = resolve(extra, hidden, n_blocks, conf.get("layers"))
            if got is None:  # every conva_* key null: an unsteered request
                return request
            if got[0].record and not conf.get("record"):
                raise SpecError(
                    f"{PREFIX}record: this engine does not record (additional_config conva.record)"
                )
            n_prompt, budget = (
                len(request.prompt_token_ids or ()),
                cfg.scheduler_config.max_num_batched_tokens,
            )
            if n_prompt > budget:
                raise SpecError(f"a steered prompt must fit one step: {n_prompt} tokens > {budget}")
        except (SpecError, OSError) as exc:
            raise _request_error()(f"ConVA request spec: {exc}", parameter="extra_args") from exc
        req, spec, digest = got
        request.cache_salt = cache_salt(req, spec, digest, request.prompt_token_ids or (), request.cache_salt)
        return request

    process_inputs._conva_wrapped = True  # type: ignore[attr-defined]
    return process_inputs


@functools.cache
def _request_error() -> Any:
    """vLLM's validation error (``vllm serve`` answers it with HTTP 400) that is also a ``ValueError``."""
    from vllm.exceptions import VLLMValidationError

    return type("ConvaRequestError", (VLLMValidationError, SpecError), {"__module__": __name__})


def _wrap_compute_hash(orig: Any) -> Any:
    def compute_hash(self: Any, *a: Any, **k: Any) -> str:
        # vLLM keys its compile cache on this; the op in the layers is not in its factors.
        conf = plugin_conf(self)
        mark = json.dumps(["conva-plugin", SUPPORTED_VLLM, conf.get("enabled", True), conf.get("layers")])
        return hashlib.sha256((orig(self, *a, **k) + mark).encode()).hexdigest()[:10]

    compute_hash._conva_wrapped = True  # type: ignore[attr-defined]
    return compute_hash


def register() -> None:
    """The entry point vLLM calls in each of its processes: check the version, install the patches.

    Idempotent. Raises ``RuntimeError`` on an unsupported vLLM (leave the plugin out with
    ``VLLM_PLUGINS`` naming the others, or ``CONVA_VLLM_PLUGIN=0``).
    """
    global _REGISTERED
    if _REGISTERED or os.environ.get("CONVA_VLLM_PLUGIN", "1") == "0":
        return
    try:
        check_vllm_version()
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}. Disable ConVA's vLLM plugin with CONVA_VLLM_PLUGIN=0") from exc
    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    from conva.steering import vllm_patch
    from conva.steering.vllm_rows import make_state

    vllm_patch.install_patches()
    vllm_patch.plugin_factory = make_state
    if not getattr(InputProcessor.process_inputs, "_conva_wrapped", False):
        InputProcessor.process_inputs = _wrap_process_inputs(InputProcessor.process_inputs)  # type: ignore[method-assign]
    if not getattr(VllmConfig.compute_hash, "_conva_wrapped", False):
        VllmConfig.compute_hash = _wrap_compute_hash(VllmConfig.compute_hash)  # type: ignore[method-assign]
    _REGISTERED = True


def registered() -> bool:
    """Whether :func:`register` installed the plugin in this process."""
    return _REGISTERED
