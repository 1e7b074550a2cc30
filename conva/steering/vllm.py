"""The ``vllm`` steering backend: ConVA in one pass inside a vLLM engine, per request, graph-safe.

Same math and telemetry as :func:`conva.steering.hf.generate` (the HF backend): at each steered layer the
engine reads the residual stream (``hidden + residual``) at each request's last prompt token, after
the earlier layers' steering, solves ε_l in closed form and adds ε_l·v_l to that request's tokens.

**One mechanism**: :class:`VLLMSteerer` is a client of ConVA's vLLM plugin
(:mod:`conva.steering.vllm_plugin`), exactly like ``vllm serve`` or a Ray Data LLM pipeline. Its engine
is built with the plugin loaded; every steered request carries the plugin's ``conva_*`` keys in
``SamplingParams.extra_args`` (its bundle written once to this steerer's folder and named by path); ε,
p_before, p_after and the gate's decision come back through the plugin's telemetry files, activations
through its ``conva_record`` requests. So the same code runs in an in-process engine (the default here:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set when unset, faster to start on CPU), a multi-process engine
and tensor-parallel workers (``tensor_parallel_size``; those processes load the plugin by its entry point).
Installing, supported versions: :mod:`conva.steering.vllm_engine`.

Guards: chunked prefill is off and longer prompts than the step budget are refused (ε needs the last
prompt token in the same step as the rest of the prompt). Prefix caching is on: the plugin salts a
steered request's cache by its spec and prompt, so unsteered KV never serves it. A preempted request is
recomputed with its own ε (per-token: each generated token's own).

Besides steered generation, the engine scores text: :meth:`VLLMSteerer.perplexity` (prompt
logprobs of answers under the unsteered model, as :func:`conva.metrics.perplexity`) and
:meth:`VLLMSteerer.score_mc` (multiple choice with each row's steering and gate, as
:func:`conva.steering.hf.score_mc`), so no second (Hugging Face) copy of the model is needed for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np

from conva.bundle import ValueBundle
from conva.mc import LETTERS, MCRow, letter_token_ids
from conva.metrics import answer_ids
from conva.record import format_prompt
from conva.steering.core import decide_first
from conva.steering.spec import EPSILON_MODES, STEER_POSITIONS, RowResult, SteerSpec, prompt_text
from conva.steering.vllm_engine import (
    SUPPORTED_VLLM,
    EngineSettings,
    check_vllm_version,
    engine_kwargs,
    set_env,
)

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
]


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
        set_env(settings)
        self.path, self.settings = resolve_model(model), settings
        config = AutoConfig.from_pretrained(self.path)
        self.hidden, self.n_blocks = config.hidden_size, config.num_hidden_layers
        self.max_len = (
            min(getattr(config, "max_position_embeddings", 4096), 4096)
            if settings.max_model_len is None
            else settings.max_model_len
        )
        self._layers = tuple(_active_layers(bundles, layers))
        conva = {"layers": list(self._layers), "max_specs": settings.max_specs, "record": settings.record}
        conva["telemetry_ranks"] = settings.telemetry_ranks
        kwargs = engine_kwargs(self.path, settings, self.max_len, conva)
        # Telemetry files of the engine's processes, activations, and the bundles the requests name.
        self.folder = tempfile.mkdtemp(prefix="conva-vllm-")
        try:
            self.llm: LLM = LLM(**kwargs)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.budget = kwargs["max_num_batched_tokens"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, padding_side="left")
        self.stop_ids = _stop_ids(self.path, self.tokenizer)
        self._bundles: dict[int, tuple[ValueBundle, str]] = {}
        self.recomputed = 0  # requests the engine re-ran from their first token after a preemption

    @property
    def layers(self) -> tuple[int, ...]:
        """The active decoder layers: the only ones a spec may steer, gate or record."""
        return self._layers

    def bundle_path(self, bundle: ValueBundle) -> str:
        """The folder the engine loads ``bundle`` from, written into this steerer's folder on first use and
        named by its content (equal bundles, even as other objects, share one folder and engine row)."""
        if id(bundle) not in self._bundles:
            from conva.bundle import encode_bundle, save_bundle

            digest = hashlib.sha256(b"".join(v for _, v in sorted(encode_bundle(bundle).items()))).hexdigest()
            path = os.path.join(self.folder, "bundles", f"{bundle.value}-{digest[:16]}")
            if not os.path.exists(path):
                save_bundle(bundle, path)
            self._bundles[id(bundle)] = (bundle, path)  # the bundle is kept, so its id is not reused
        return self._bundles[id(bundle)][1]

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
        if not self.settings.record:
            raise ValueError("this engine was built without record=True")
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise ValueError(
                f"layer(s) {missing} are not active in this engine (active: {list(self.layers)})"
            )
        from safetensors.numpy import load_file
        from vllm import SamplingParams

        from conva.steering.vllm_plugin import request_args
        from conva.steering.vllm_rows import activations_path

        ids = [self._encode(t, chat_template) for t in texts]
        tags = [uuid.uuid4().hex for _ in texts]
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=1,
                detokenize=False,
                extra_args=request_args(record=tuple(layers), telemetry=self.folder, tag=tag),
            )
            for tag in tags
        ]
        self._run(ids, params)
        rows = []
        for tag in tags:
            self._telemetry(tag)
            path = activations_path(self.folder, tag)
            rows.append(load_file(path)["acts"])
            os.remove(path)
        return np.stack(rows).astype(np.float32)

    def close(self) -> None:
        """Release the engine and its steering buffers.

        vLLM then tears down its process-wide parallel state, so another engine still open in this
        process fails on its next step: close engines only when done with all of them.
        """
        try:
            self.llm.llm_engine.engine_core.shutdown()  # a multi-process engine's core and workers
        finally:
            del self.llm
            shutil.rmtree(self.folder, ignore_errors=True)

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
        if probe_first and not self.settings.record:
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
        """The request's ``SamplingParams``: greedy, with the plugin's ``conva_*`` keys if it steers."""
        from vllm import SamplingParams

        from conva.steering.vllm_plugin import request_args

        extra = None
        if spec.layers():
            assert spec.bundle is not None  # a vector method has its bundle (SteerSpec checks)
            extra = request_args(
                bundle=self.bundle_path(spec.bundle),
                method=spec.method,
                p0=spec.p0,
                strength=spec.strength,
                eps=spec.eps,
                seed=spec.seed,
                band=spec.band,
                # Decided before the pass (gate_open below), or not this row's business: not read in it.
                gate="bundle" if spec.gate_applies() else "off",
                positions=positions,
                epsilon=epsilon,
                telemetry=self.folder,
                tag=tag,
            )
            if gate is not None and spec.gate_applies():
                extra.update(conva_gate_score=float(gate[0]), conva_gate_open=int(gate[1]))
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
        tel = self._telemetry(tag)
        return RowResult(
            text,
            tokens,
            n_prompt,
            tel["gate_score"],
            tel["gate_open"],
            tuple(tel["layers"]),
            tuple(tel["eps"]),
            tuple(tel["p_before"]),
            tuple(tel["p_after"]),
        )

    def _telemetry(self, tag: str) -> dict[str, Any]:
        """The plugin's telemetry of request ``tag`` (its file removed); raises if the engine failed it."""
        path = os.path.join(self.folder, f"{tag}.json")
        try:
            with open(path) as fh:
                tel: dict[str, Any] = json.load(fh)
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"the vLLM engine wrote no ConVA telemetry for request {tag}: its processes do not run "
                "ConVA's plugin (is it installed, and not disabled by VLLM_PLUGINS or CONVA_VLLM_PLUGIN?)"
            ) from exc
        os.remove(path)
        if tel["error"] is not None:
            raise RuntimeError(f"the vLLM engine could not steer request {tag}: {tel['error']}")
        self.recomputed += tel["recomputed"]
        return tel


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
            "generate_vllm needs a VLLMSteerer: a plain vllm.LLM sends no ConVA spec with its requests "
            "(send the plugin's conva_* extra_args yourself: conva.steering.vllm_plugin)"
        )
    kw = dict(max_new_tokens=max_new_tokens, chat_template=chat_template, positions=positions)
    return engine.generate(prompts, specs, epsilon=epsilon, **kw)  # type: ignore[arg-type]


def _stop_ids(path: str, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The HF backend's stop tokens: the generation config's eos ids plus the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return frozenset(i for i in ids + [tokenizer.eos_token_id] if i is not None)
