"""Steering backends, chosen by name in ``steer.backend``: a small registry the vLLM backend plugs into.

A backend is a factory ``(cfg) -> Steerer``. A :class:`Steerer` owns a loaded model and turns one
shard of steering rows into generation rows (``conva.batch.schemas.GENERATION_SCHEMA``), one per input row.
It also scores text on the same model: answer perplexity under the unsteered model and multiple
choice with each row's steering and gate, so a worker needs no second copy of the model for them.

To add a backend, register a factory::

    @register_backend("mine")
    def _mine(cfg: Config) -> Steerer: ...

``vllm`` imports vLLM only when built; pre-flight (:func:`check_backend`) fails with a clear message
where vLLM is missing or of an untested version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import pyarrow as pa

from conva.batch.config import Config
from conva.batch.registry import register_backend_name
from conva.batch.steer_rows import steer_table
from conva.bundle import ValueBundle
from conva.choice import ChoiceRow, score_choice
from conva.mc import MCRow
from conva.metrics import perplexity
from conva.models import load_model, model_fingerprint, model_name
from conva.steering.spec import SteerSpec

if TYPE_CHECKING:
    from conva.steering.vllm import VLLMSteerer

__all__ = [
    "Steerer",
    "HFSteerer",
    "VLLMBackendSteerer",
    "BACKENDS",
    "register_backend",
    "make_steerer",
    "check_backend",
]


class Steerer(Protocol):
    """A loaded model that steers shards and scores text. ``fingerprint``/``hidden_size`` check bundles.

    ``bundles`` are the bundles the model must be able to steer (a vLLM engine is built from their
    layers on first use); :meth:`perplexity` and :meth:`score_mc` return one entry per prompt, in order.
    """

    fingerprint: str
    hidden_size: int

    def steer(
        self, rows: pa.Table, bundles: dict[str, ValueBundle], batch_size: int | None = None
    ) -> pa.Table: ...

    def perplexity(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        batch_size: int = 8,
    ) -> list[float]:
        """Each answer's perplexity given its prompt under the unsteered model (:func:`conva.metrics.perplexity`)."""
        ...

    def score_mc(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        specs: Sequence[SteerSpec],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        positions: str = "all",
        batch_size: int = 8,
    ) -> list[MCRow]:
        """Multiple choice with each row's steering and gate active (:func:`conva.steering.hf.score_mc`)."""
        ...

    def score_choice(
        self,
        prompts: Sequence[str],
        sides: Sequence[str],
        specs: Sequence[SteerSpec],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        positions: str = "all",
        batch_size: int = 16,
    ) -> list[ChoiceRow]:
        """Forced choice (:func:`conva.choice.score_choice`): each yes/no prompt's log-odds of the value's side."""
        ...


BACKENDS: dict[str, Callable[[Config], Steerer]] = {}


def register_backend(name: str) -> Callable[[Callable[[Config], Steerer]], Callable[[Config], Steerer]]:
    """Register a steering backend factory under ``name`` (the value of ``steer.backend``); the config accepts
    the name from then on (:mod:`conva.batch.registry`)."""

    def add(factory: Callable[[Config], Steerer]) -> Callable[[Config], Steerer]:
        register_backend_name(name)
        BACKENDS[name] = factory
        return factory

    return add


def make_steerer(cfg: Config) -> Steerer:
    """Build the backend ``cfg.steer.backend`` names (loads the model)."""
    name = cfg.steer.backend
    if name not in BACKENDS:
        raise ValueError(
            f"steer.backend: unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}"
        )
    return BACKENDS[name](cfg)


class HFSteerer:
    """The Hugging Face backend: ``conva.batch.steer_rows.steer_table`` on a model loaded with ``load_model``.

    ``model``/``tok``: an already loaded model to steer (a model worker shares its extraction model).
    """

    def __init__(self, cfg: Config, model=None, tok=None) -> None:
        # torch loads only where a model does: pre-flight imports this module.
        from conva.blocks import find_blocks

        m = cfg.model
        self.cfg = cfg
        if model is None:
            model, tok = load_model(m.name, m.dtype, m.device, m.trust_remote_code)
        self.model, self.tok = model, tok
        self.name = model_name(m.name)
        self.fingerprint = model_fingerprint(self.model)
        self.hidden_size = int(self.model.config.hidden_size)
        self.n_blocks = len(find_blocks(self.model))

    def steer(
        self, rows: pa.Table, bundles: dict[str, ValueBundle], batch_size: int | None = None
    ) -> pa.Table:
        cfg = (
            self.cfg
            if batch_size is None
            else self.cfg.model_copy(
                update={"steer": self.cfg.steer.model_copy(update={"batch_size": batch_size})}
            )
        )
        return steer_table(self.model, self.tok, rows, bundles, cfg, self.name)

    def perplexity(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        batch_size: int = 8,
    ) -> list[float]:
        return perplexity(
            self.model, self.tok, prompts, answers, chat_template=chat_template, batch_size=batch_size
        )

    def score_mc(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        specs: Sequence[SteerSpec],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        positions: str = "all",
        batch_size: int = 8,
    ) -> list[MCRow]:
        from conva.steering.hf import score_mc

        return score_mc(
            self.model,
            self.tok,
            prompts,
            answers,
            specs,
            chat_template=chat_template,
            positions=positions,
            batch_size=batch_size,
        )

    def score_choice(
        self,
        prompts: Sequence[str],
        sides: Sequence[str],
        specs: Sequence[SteerSpec],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        positions: str = "all",
        batch_size: int = 16,
    ) -> list[ChoiceRow]:
        from conva.steering.hf import choice_logprobs

        def logprobs(p: list[str], s: list[SteerSpec], ids: list[int]):
            return choice_logprobs(
                self.model, self.tok, p, s, ids, chat_template=chat_template, positions=positions
            )

        return score_choice(logprobs, self.tok, prompts, sides, specs, batch_size=batch_size)


register_backend("hf")(HFSteerer)


class VLLMBackendSteerer:
    """The vLLM backend: ConVA inside a vLLM engine (:mod:`conva.steering.vllm`), same row contract as HF.

    The engine steers through ConVA's vLLM plugin, the one mechanism ``vllm serve`` and Ray Data LLM use;
    ``vllm.tensor_parallel_size`` splits the model over the worker's GPUs (``ray.num_gpus_per_worker``).

    The engine is built on the first call, once the bundles are known: their bands and gate layers are
    the layers whose steering op is traced into the engine's graph (a later spec that steers other
    layers is refused, naming them). Perplexity and multiple choice are scored by the same engine (prompt
    logprobs; the letters' logprobs under each row's steering); the engine batches requests itself, so
    ``batch_size`` does not apply there. The fingerprint that bundles are checked against is read from
    the weight files (:func:`conva.fingerprint.file_fingerprint`).
    """

    def __init__(self, cfg: Config) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from conva.fingerprint import file_fingerprint
        from conva.models import resolve_model
        from conva.steering.vllm import check_vllm_version

        check_vllm_version()
        self.cfg, self.path = cfg, resolve_model(cfg.model.name)
        self.name = model_name(cfg.model.name)
        self.hidden_size = int(AutoConfig.from_pretrained(self.path).hidden_size)
        fingerprint = file_fingerprint(cfg.model.name, cfg.model.dtype)
        if fingerprint is None:
            raise ValueError(
                f"model.name: cannot read {cfg.model.name!r}'s fingerprint from its safetensors files, "
                "which the vllm backend needs to check bundles; use a local safetensors folder"
            )
        self.fingerprint: str = fingerprint
        self.tok = AutoTokenizer.from_pretrained(self.path, padding_side="left")
        self.engine: VLLMSteerer | None = None

    def _engine(self, bundles: dict[str, ValueBundle]):
        from conva.steering.vllm import EngineSettings, VLLMSteerer

        if self.engine is None:
            v, m = self.cfg.vllm, self.cfg.model
            settings = EngineSettings(
                dtype=m.dtype,
                enforce_eager=v.enforce_eager,
                max_num_seqs=v.max_num_seqs,
                max_model_len=v.max_model_len or None,
                max_specs=v.max_specs,
                kv_cache_gib=v.kv_cache_gib,
                gpu_memory_utilization=v.gpu_memory_utilization,
                # Its ranks run on this worker's GPUs (ray.num_gpus_per_worker, checked in pre-flight).
                tensor_parallel_size=v.tensor_parallel_size,
            )
            self.engine = VLLMSteerer(self.path, list(bundles.values()), settings=settings)
        return self.engine

    def steer(
        self, rows: pa.Table, bundles: dict[str, ValueBundle], batch_size: int | None = None
    ) -> pa.Table:
        """Generations for one shard; ``batch_size`` is the engine's business (its scheduler batches)."""
        engine, s = self._engine(bundles), self.cfg.steer

        def run(prompts, specs):
            return engine.generate(
                prompts,
                specs,
                max_new_tokens=s.max_new_tokens,
                chat_template=s.chat_template,
                positions=s.positions,
                epsilon=s.epsilon,
            )

        return steer_table(
            None,
            self.tok,
            rows,
            bundles,
            self.cfg,
            self.name,
            generate_fn=run,
            max_length=min(engine.max_len, engine.budget + 1),
        )

    def perplexity(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        batch_size: int = 8,
    ) -> list[float]:
        return self._engine(bundles).perplexity(prompts, answers, chat_template=chat_template)

    def score_mc(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        specs: Sequence[SteerSpec],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        positions: str = "all",
        batch_size: int = 8,
    ) -> list[MCRow]:
        return self._engine(bundles).score_mc(
            prompts, answers, specs, chat_template=chat_template, positions=positions
        )

    def score_choice(
        self,
        prompts: Sequence[str],
        sides: Sequence[str],
        specs: Sequence[SteerSpec],
        bundles: dict[str, ValueBundle],
        *,
        chat_template: bool = True,
        positions: str = "all",
        batch_size: int = 16,
    ) -> list[ChoiceRow]:
        """Forced choice on this engine: the yes/no spellings' logprobs under each row's spec (one step each)."""
        engine = self._engine(bundles)

        def logprobs(p: list[str], s: list[SteerSpec], ids: list[int]):
            return engine.choice_logprobs(p, s, ids, chat_template=chat_template, positions=positions)

        return score_choice(logprobs, self.tok, prompts, sides, specs, batch_size=batch_size)


register_backend("vllm")(VLLMBackendSteerer)


@register_backend("fake")
def _fake(cfg: Config) -> Steerer:
    """The simulation backend has no steerer: its pool runs ``workers/fake.py``'s workers, which never ask."""
    raise RuntimeError('steer.backend = "fake" simulates the orchestration; its workers steer nothing')


def check_backend(name: str) -> None:
    """Raise if backend ``name`` cannot be built here (without loading any model): for pre-flight checks."""
    if name not in BACKENDS:
        raise ValueError(
            f"steer.backend: unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}"
        )
    if name == "vllm":
        try:
            from conva.steering.vllm import check_vllm_version

            check_vllm_version()
        except (ImportError, RuntimeError) as err:
            raise NotImplementedError(f"steer.backend: 'vllm' is not available here: {err}") from err
