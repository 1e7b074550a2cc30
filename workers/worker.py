"""The model worker: one Ray actor that owns one model and serves every stage of a job on it.

A :class:`ModelWorker` loads its model once (:meth:`ModelWorker.load`) and keeps it across all the
stages a pool runs on it, extract, fit, steer, evaluate, utility and agreement, so a model is loaded
once per worker per job, however many stages or methods a study has. It processes one shard per
:meth:`ModelWorker.run` call: it reads its own input slice, writes the shard's objects to the output
store and returns only the :class:`~conva.batch.store.ShardRecord` (see :mod:`conva.workers.shards`).

Where the backend is vLLM, extraction and fitting still need the Hugging Face model (vLLM records no
activations before the bands are known); the worker frees it before it builds the engine, so the
weights are never on the accelerator twice.

The class is plain Python; :class:`conva.workers.pool.WorkerPool` makes it a Ray actor with the job's
resources. Example, without Ray::

    >>> worker = ModelWorker(WorkerSpec(cfg))                    # doctest: +SKIP
    >>> worker.load(("hf",)); record = worker.run(task)           # doctest: +SKIP
"""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING

from conva.batch.storage import Location
from conva.batch.store import ShardRecord
from conva.bundle import BUNDLE_FILES, ValueBundle, decode_bundle
from conva.workers.errors import ShardError, classify
from conva.workers.hooks import load_hook
from conva.workers.tasks import ShardTask, WorkerSpec, required

if TYPE_CHECKING:
    from conva.judges import Chat, Judge, LLMJudge
    from conva.workers.backends import Steerer

__all__ = ["ModelWorker", "mark_running", "running_attempt", "set_threads"]

_log = logging.getLogger(__name__)


def set_threads(num_cpus: float) -> None:
    """One torch thread per CPU the actor asked for: actors sharing a node must not oversubscribe it."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


class ModelWorker:
    """Owns one model; runs shards of any stage; exactly one output row per input row (see :mod:`conva.workers.shards`)."""

    def __init__(self, spec: WorkerSpec) -> None:
        set_threads(spec.cfg.ray.num_cpus_per_worker)
        self.spec, self.cfg = spec, spec.cfg
        self.hook = load_hook()
        self.loads = 0
        self._hf: tuple | None = None
        self._steerer: Steerer | None = None
        self._bundles: dict[tuple[str, str], ValueBundle] = {}
        self._judge: Judge | None = None
        self._judge_llm: LLMJudge | None = None
        self._local_chat: Chat | None = None
        self.identity = worker_identity()

    # --- what the pool asks -----------------------------------------------------------------------------

    def ready(self) -> dict:
        """Who this worker is (node, address, pid, id): answered as soon as the actor exists."""
        return dict(self.identity)

    def load(self, parts: tuple[str, ...]) -> dict:
        """Load what the pool's stages need now: ``"hf"`` (the HF model), ``"steer"`` (the steering backend).

        Returns the worker's identity, its model's facts and the load's start and end times (for the
        busy-time accounting). Loading twice is free: each part is loaded once per worker.
        """
        started = time.time()
        info: dict = {}
        if "hf" in parts:
            info = self.model_info()
        if "steer" in parts:
            self.steerer()
        return {
            **self.identity,
            "model": info,
            "loads": self.loads,
            "started": started,
            "finished": time.time(),
        }

    def run(self, task: ShardTask) -> ShardRecord:
        """Run one shard of ``task.stage``; raises :class:`~conva.workers.errors.ShardError` (typed) on failure."""
        from dataclasses import replace

        started = time.time()
        mark_running(self.identity["worker"], task.ref.attempt)
        try:
            if self.hook is not None:
                self.hook(task, self)
            record = required(task.run, f"a shard function (stage {task.stage!r})")(self, task)
        except Exception as err:  # every failure leaves as a typed ShardError the driver can decide on
            where = f"node {self.identity['ip']}, worker {self.identity['worker']}"
            raise ShardError(classify(err), f"{type(err).__name__}: {err}", where) from err
        worker = {**self.identity, "started": started, "finished": time.time(), "loads": self.loads}
        return replace(record, worker=worker)

    # --- the model, loaded once ---------------------------------------------------------------------------

    def hf(self):
        """The Hugging Face model and tokenizer, loaded on first use."""
        if self._hf is None:
            from conva.workers.backends import HFSteerer

            if isinstance(self._steerer, HFSteerer):
                self._hf = (self._steerer.model, self._steerer.tok)
            else:
                self._hf = self._load_hf()
        return self._hf

    def _load_hf(self):
        from conva.models import load_model

        m, t0 = self.cfg.model, time.monotonic()
        # More than one GPU per worker: the model is spread over them (Ray gives one actor's GPUs on one node).
        spread = "auto" if self.cfg.ray.num_gpus_per_worker > 1 else None
        loaded = load_model(m.name, m.dtype, m.device, m.trust_remote_code, device_map=spread)
        self.loads += 1
        _log.info(
            "worker %s (pid %d) loaded %s in %.1f s (load %d)",
            self.identity["worker"],
            os.getpid(),
            m.name,
            time.monotonic() - t0,
            self.loads,
        )
        return loaded

    def model_info(self) -> dict:
        """Name, fingerprint, hidden size, block count and recorded layers of the HF model."""
        from conva.blocks import find_blocks
        from conva.models import model_fingerprint, model_name

        model, _ = self.hf()
        n_blocks = len(find_blocks(model))
        return {
            "name": model_name(self.cfg.model.name),
            "fingerprint": model_fingerprint(model),
            "hidden_size": int(model.config.hidden_size),
            "n_blocks": n_blocks,
            "layers": list(self.cfg.extract.layers) or list(range(n_blocks)),
        }

    def steerer(self):
        """The steering backend (``steer.backend``), built on first use; the HF backend reuses the loaded model."""
        if self._steerer is None:
            from conva.workers.backends import HFSteerer, make_steerer

            if self.cfg.steer.backend == "hf":
                model, tok = self.hf()
                self._steerer = HFSteerer(self.cfg, model=model, tok=tok)
            else:
                self._free_hf()
                self._steerer = make_steerer(self.cfg)
                self.loads += 1
                _log.info(
                    "worker %s built its %s steering backend (load %d)",
                    self.identity["worker"],
                    self.cfg.steer.backend,
                    self.loads,
                )
        return self._steerer

    def _free_hf(self) -> None:
        """Drop the HF model before another backend loads the weights again (never twice on the accelerator)."""
        if self._hf is None:
            return
        self._hf = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def bundles(self, where: dict[str, Location]) -> dict[str, ValueBundle]:
        """The bundles named by ``where`` (value → folder), read once each and checked against the model."""
        steerer = self.steerer()
        out = {}
        for value, folder in sorted(where.items()):
            key = (value, folder.uri)
            if key not in self._bundles:
                files = {name: folder.child(name).read_bytes() for name in BUNDLE_FILES}
                self._bundles[key] = decode_bundle(
                    files, folder.uri, fingerprint=steerer.fingerprint, hidden_size=steerer.hidden_size
                )
            out[value] = self._bundles[key]
        return out

    def judge(self, bundles: dict[str, ValueBundle]):
        """The study's judge, built once (the ``probe`` judge reads the model and the bundles)."""
        if self._judge is None:
            from conva.judges import make_judge

            # Only the probe judge reads the model itself (with the vLLM backend: an HF copy, loaded then).
            settings = required(self.spec.judge, "the study's [judge]")
            kind = settings.kind
            model, tok = self.hf() if kind == "probe" else (None, None)
            self._judge = make_judge(
                settings,
                values=self.cfg.data.values,
                model=model,
                tok=tok,
                bundles=bundles,
                chat=self._chat() if kind == "llm" else None,
            )
        return self._judge

    def fluency_judge(self):
        """The LLM that rates answers' fluency (``fluency.llm``): the study's judge when it is that LLM."""
        from conva.judges import LLMJudge

        if not isinstance(self._judge, LLMJudge):
            settings = required(self.spec.judge, "the study's [judge]")
            self._judge_llm = self._judge_llm or LLMJudge(settings, self._chat())
            return self._judge_llm
        return self._judge

    def _chat(self):
        """The LLM judge's chat function: the HTTP client, or (``judge.backend = "local"``) the judge model
        loaded on this worker once, on the study model's device and dtype (the study model itself when the
        judge names the same model: its steering hooks exist only inside their ``with`` blocks)."""
        settings = required(self.spec.judge, "the study's [judge]")
        if settings.backend != "local":
            from conva.batch.llm_client import judge_chat

            return judge_chat(settings, self.spec.judge_cache)
        if self._local_chat is None:
            from conva.local_chat import load_local_chat, local_chat
            from conva.models import resolve_model

            m = self.cfg.model
            if resolve_model(settings.model) == resolve_model(m.name):
                self._local_chat = local_chat(*self.hf())
            else:
                self._local_chat = load_local_chat(settings.model, dtype=m.dtype, device=m.device)
                self.loads += 1
        return self._local_chat


_RUNNING_KEY = "conva:running:{}"


def mark_running(worker: str, attempt: str) -> None:
    """Note in Ray's GCS which attempt ``worker`` is starting, before it starts.

    If the worker then dies, the pool reads the note (:func:`running_attempt`) to charge the death to
    the shard it was running. Its calls' replies cannot tell: the reply of a call that finished an
    instant before the death may be lost with the process, and that call then fails like the running
    one. One small GCS write per shard; nothing outside Ray (a test calling the class directly).
    """
    import ray
    from ray.experimental.internal_kv import _internal_kv_initialized, _internal_kv_put

    if ray.is_initialized() and _internal_kv_initialized():
        _internal_kv_put(_RUNNING_KEY.format(worker), attempt.encode(), overwrite=True)


def running_attempt(worker: str, forget: bool = True) -> str | None:
    """The attempt ``worker`` last started (:func:`mark_running`), or None; ``forget`` deletes the note."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    key = _RUNNING_KEY.format(worker)
    value = _internal_kv_get(key)
    if forget:
        _internal_kv_del(key)
    return value.decode() if value else None


def worker_identity() -> dict:
    """This process's node, address and pid, and a short id for logs."""
    node, ip = "", "127.0.0.1"
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() or ""
        ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a test calling the class directly)
        pass
    return {"worker": uuid.uuid4().hex[:8], "node": node, "ip": ip, "pid": os.getpid()}
