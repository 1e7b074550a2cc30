"""Compiled steered greedy generation on the HF backend (the fast path on a GPU): static KV cache, compiled decode, steering in the graph.

The same ConVA math as :func:`conva.steering.hf.generate`, laid out for a GPU:

- **Prefill** (eager, once per batch): :class:`conva.steering.core.Steering`'s hooks run unchanged, so every ε
  is found exactly as there (ascending layers, each from the last prompt token after the earlier
  layers' steering; closed gates give 0) and the prompt's keys/values land in a ``StaticCache``.
- **Decode** (one token for all rows per step): a step function over fixed-shape buffers, compiled
  with ``torch.compile(fullgraph=True)`` (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA).
  Greedy argmax, the EOS bookkeeping and the position update stay on the device; the host only
  launches steps, a fixed ``max_new_tokens - 1`` of them, and trims after the first EOS at the end.

How the steering gets into the graph: for the decode loop only, each steered block's **instance
``forward`` is replaced** by a wrapper that calls the class's forward and then applies a pure tensor
op reading preallocated, static-address buffers (``torch.where(on, h + Δ, h)`` with ``Δ = (ε·dir)``
precomputed in the model's dtype for frozen ε; the closed-form ε from ``h[:, -1]`` for per-token ε).
The wrapper is ordinary code on the call path, so Dynamo traces it into the graph like the block
itself. Forward *hooks* are not used for this: Dynamo does not guard on a module's hook dicts
(``skip_nnmodule_hook_guards``), so a hook added or removed after compilation is silently ignored
or kept, the failure mode ENVIRONMENT.md records for vLLM. The wrappers are installed in a ``with``
block around each decode loop and removed in ``finally``; the same wrapper and buffer objects are
reused for every batch, so the compiled step (guarded on them) is reused rather than recompiled.
New per-batch values are copied *into* the buffers, never rebound.

Rows are bit-identical to unsteered where their scale is 0 (``torch.where``, as in ``conva.steering.core``).
Greedy tokens equal ``conva.steering.hf.generate``'s up to floating-point ties: the static cache attends
over padded, masked key slots, which can change the last bits of a logit.

Example:
    >>> rows = generate_compiled(model, tok, ["Should I take the job?"], [spec], max_new_tokens=64)  # doctest: +SKIP
    >>> fast = FastSteering(model, batch_size=32, max_len=256, layers=bundle.band)              # doctest: +SKIP
    >>> rows = fast.generate(tok, prompts, specs, max_new_tokens=64)                            # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, cast

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from conva.blocks import find_blocks, hidden_of, with_hidden
from conva.record import format_prompt
from conva.steering.core import Steering, eos_ids, prepare, row_results, steered
from conva.steering.spec import EPSILON_MODES, RowResult, SteerSpec, prompt_text

__all__ = ["FastSteering", "generate_compiled"]

_BATCH_MULTIPLE = 8  # batches are padded with dummy rows up to this multiple: fewer shapes to compile
_LEN_MULTIPLE = 64  # cache lengths are rounded up to this multiple
_RUNNERS_PER_MODEL = 4


class _Buffers:
    """Per-row steering state on the device, allocated once per shape and filled in place per batch."""

    def __init__(
        self, rows: int, n_layers: int, hidden: int, dtype: torch.dtype, device: torch.device, per_token: bool
    ) -> None:
        B, U, d = rows, n_layers, hidden
        f32: dict[str, Any] = dict(dtype=torch.float32, device=device)
        self.on = torch.zeros(B, U, dtype=torch.bool, device=device)  # frozen: rows steered at column j
        self.delta = torch.zeros(B, U, d, dtype=dtype, device=device)  # frozen: (ε·dir) in the model's dtype
        self.scale = torch.zeros(B, U, **f32)
        # Per-token ε: the plan's tensors, read at every step (empty when ε is frozen).
        shape = (B, U, d) if per_token else (0,)
        self.dirs, self.w = torch.zeros(shape, **f32), torch.zeros(shape, **f32)
        self.b, self.wnorm, self.fixed = (
            torch.zeros(B, U, **f32),
            torch.ones(B, U, **f32),
            torch.zeros(B, U, **f32),
        )
        self.compute = torch.zeros(B, U, dtype=torch.bool, device=device)
        self.s0, self.open = torch.zeros(B, **f32), torch.zeros(B, dtype=torch.bool, device=device)
        for t in vars(self).values():
            torch._dynamo.mark_static_address(t)

    def load(self, steering: Steering, cols: list[int], per_token: bool) -> None:
        """Copy one batch's prefill result (rows ``< B`` of the plan) into the buffers; the rest is zeroed."""
        p, n, dev = steering.plan, steering.scale.shape[0], self.delta.device
        for t in (
            self.on,
            self.delta,
            self.scale,
            self.fixed,
            self.compute,
            self.s0,
            self.open,
            self.dirs,
            self.w,
            self.b,
        ):
            t.zero_()
        self.wnorm.fill_(1.0)
        scale = steering.scale.to(dev)
        for j, c in enumerate(cols):
            dirs = p.dirs[:, j].to(dev)
            # The same expression as conva.steering.core.Steering.__call__, so the added delta is bit-identical.
            self.delta[:n, c] = (scale[:, j, None] * dirs).to(self.delta.dtype)
            self.on[:n, c] = scale[:, j] != 0
            self.scale[:n, c] = scale[:, j]
            if per_token:
                self.dirs[:n, c], self.w[:n, c] = dirs, p.w[:, j].to(dev)
                self.b[:n, c], self.wnorm[:n, c] = p.b[:, j].to(dev), p.wnorm[:, j].to(dev)
                self.fixed[:n, c], self.compute[:n, c] = p.fixed[:, j].to(dev), p.compute[:, j].to(dev)
        self.s0[:n], self.open[:n] = p.s0.to(dev), p.open.to(dev)


def _frozen(buf: _Buffers, j: int, h: torch.Tensor) -> torch.Tensor:
    return torch.where(buf.on[:, j, None, None], h + buf.delta[:, j, None, :], h)


def _per_token(buf: _Buffers, j: int, h: torch.Tensor) -> torch.Tensor:
    # conva.steering.core.Steering.set_scale and __call__, as tensor ops (no .cpu(), no Python branches).
    e = h[:, -1, :].float()
    z = (e * buf.w[:, j]).sum(-1) + buf.b[:, j]
    eps = torch.clamp((buf.s0 - z) / buf.wnorm[:, j], min=0.0)
    scale = torch.where(buf.compute[:, j], eps, buf.fixed[:, j])
    scale = torch.where(buf.open, scale, torch.zeros_like(scale))
    buf.scale[:, j].copy_(scale)  # telemetry: the last step's ε, as conva.steering.core reports it
    delta = (scale[:, None] * buf.dirs[:, j]).to(h.dtype)
    return torch.where((scale != 0)[:, None, None], h + delta[:, None, :], h)


def _wrapped_forward(block: torch.nn.Module, j: int, buf: _Buffers, epsilon: str) -> Callable[..., object]:
    original = type(block).forward
    apply = _frozen if epsilon == "frozen" else _per_token

    def forward(*args: object, **kwargs: object) -> object:  # the block's own signature, passed through
        out = original(block, *args, **kwargs)
        return with_hidden(out, apply(buf, j, hidden_of(out)))

    return forward


def _static_cache(config: PretrainedConfig, max_len: int) -> StaticCache:
    """A static KV cache of ``max_len`` tokens that a compiled decode step can reuse at every position.

    transformers' sliding-window static layer (Gemma 3) tracks its length in a Python int that the
    compiled step is guarded on: it would recompile at every token. Where the window covers the whole
    cache, sliding-window attention **is** causal attention, so those layers get plain static layers,
    which track their length in a tensor; the model still builds its sliding-window mask, which then
    masks nothing more. A cache longer than the window is refused.
    """
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if window and types and "sliding_attention" in types:
        if max_len > window:
            raise ValueError(
                f"the compiled mode needs prompt + new tokens <= the model's sliding window ({window}); "
                f"this batch needs {max_len}: use mode 'batched'"
            )
        config = copy.copy(config)  # shallow: the model's own config is untouched
        config.layer_types = ["full_attention"] * len(types)
    return StaticCache(config=config, max_cache_len=max_len)


class FastSteering:
    """A model prepared for fast steered generation at a fixed batch size and cache length.

    ``layers``: the blocks any batch may steer (the union of the specs' bands; empty: an unsteered
    runner). :func:`generate_compiled` picks them, and the shapes, per batch.
    ``compile``: compile the decode step (CUDA graphs on CUDA, Inductor on CPU); False runs the same
    code eagerly. The model is only patched inside :meth:`generate`. Holds a KV cache of
    ``batch_size × max_len`` tokens on the model's device.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        batch_size: int,
        max_len: int,
        layers: Sequence[int] = (),
        epsilon: str = "frozen",
        compile: bool = True,
    ) -> None:
        if epsilon not in EPSILON_MODES:
            raise ValueError(f"unknown epsilon mode {epsilon!r}; expected one of {EPSILON_MODES}")
        blocks = find_blocks(model)
        self.layers = sorted(set(int(l) for l in layers))
        bad = [l for l in self.layers if not 0 <= l < len(blocks)]
        if bad:
            raise ValueError(f"steered layer(s) {bad} out of range for a model of {len(blocks)} blocks")
        param = next(model.parameters())
        self.model, self.batch_size, self.max_len, self.epsilon = model, batch_size, max_len, epsilon
        self.device = param.device
        self.buffers = _Buffers(
            batch_size,
            len(self.layers),
            model.config.hidden_size,
            param.dtype,
            param.device,
            epsilon == "per_token",
        )
        self._forwards = {
            l: _wrapped_forward(blocks[l], j, self.buffers, epsilon) for j, l in enumerate(self.layers)
        }
        self._cache = _static_cache(model.config, max_len)
        self._mask = torch.ones(batch_size, max_len, dtype=torch.long, device=param.device)
        self._tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=param.device)
        self._positions = torch.zeros(batch_size, 1, dtype=torch.long, device=param.device)
        self._unfinished = torch.ones(batch_size, dtype=torch.bool, device=param.device)
        # transformers < 5.19 addresses the static cache by an explicit cache_position; 5.19 tracks it itself.
        self._cache_position = torch.zeros(1, dtype=torch.long, device=param.device)
        self._pass_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        for t in (self._mask, self._tokens, self._positions, self._unfinished, self._cache_position):
            torch._dynamo.mark_static_address(t)
        self._eos: torch.Tensor | None = None
        self._pad: torch.Tensor | None = None
        self._graphs = compile and param.device.type == "cuda"
        step = self._step
        if compile:
            mode = "reduce-overhead" if param.device.type == "cuda" else None
            step = torch.compile(step, mode=mode, fullgraph=True, dynamic=False)
        self._compiled = step

    @contextmanager
    def _patched(self) -> Iterator[None]:
        """Install the steering wrappers on the steered blocks; removed on exit, also after an error."""
        blocks = find_blocks(self.model)
        try:
            for l, fwd in self._forwards.items():
                blocks[l].forward = fwd
            yield
        finally:
            for l in self._forwards:
                blocks[l].__dict__.pop("forward", None)

    def _forward_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"past_key_values": self._cache, "use_cache": True, "logits_to_keep": 1}
        if self._pass_cache_position:
            kwargs["cache_position"] = self._cache_position
        return kwargs

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, unfinished: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for all rows: greedy token, pad after EOS (as HF generate does), EOS flags."""
        logits = self.model(
            input_ids=tokens, attention_mask=self._mask, position_ids=positions, **self._forward_kwargs()
        ).logits
        nxt = logits[:, -1, :].float().argmax(-1)
        # _decode sets _pad and _eos before the first step (no assert: this step may run under torch.compile).
        nxt = torch.where(unfinished, nxt, self._pad)  # type: ignore[arg-type]
        return nxt, unfinished & ~torch.isin(nxt, self._eos)  # type: ignore[arg-type]

    @torch.no_grad()
    def generate(
        self,
        tok: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        specs: Sequence[SteerSpec],
        *,
        max_new_tokens: int,
        chat_template: bool = True,
        positions: str = "all",
    ) -> list[RowResult]:
        """Greedy steered generation of one batch (at most ``batch_size`` prompts), one row per prompt."""
        n = len(prompts)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"{n} prompts for a batch of {self.batch_size}")
        if len(specs) != n:
            raise ValueError(f"{n} prompts but {len(specs)} steering specs")
        # Dummy rows fill the fixed batch; an empty user turn is a valid, short prompt.
        pad_p, pad_s = (
            list(prompts) + [""] * (self.batch_size - n),
            list(specs) + [SteerSpec()] * (self.batch_size - n),
        )
        texts, enc, plan = prepare(self.model, tok, pad_p, pad_s, chat_template)
        missing = sorted(set(plan.layers) - set(self.layers))
        if missing:
            raise ValueError(
                f"layers {missing} are steered but this FastSteering was built for {self.layers}"
            )
        P = enc["input_ids"].shape[1]
        if P + max_new_tokens > self.max_len:
            raise ValueError(
                f"{P} prompt + {max_new_tokens} new tokens exceed the cache length {self.max_len}"
            )
        steering = Steering(plan, positions, "frozen")  # the prefill is the same in both ε modes
        first = self._prefill(enc, steering)
        self.buffers.load(steering, [self.layers.index(l) for l in plan.layers], self.epsilon == "per_token")
        new = self._decode(
            first, enc["attention_mask"], max_new_tokens, eos_ids(self.model, tok), tok.pad_token_id
        )
        if self.epsilon == "per_token":
            steering.scale = self.buffers.scale[:, [self.layers.index(l) for l in plan.layers]].float().cpu()
        stops = set(eos_ids(self.model, tok))
        tokens, outs = [], []
        for row in new[:n].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            tokens.append(tuple(row[:cut]))
            outs.append(cast(str, tok.decode(row[:cut], skip_special_tokens=True)))  # one row: one text
        n_prompt = enc["attention_mask"].sum(1).tolist()[:n]
        return row_results(steering, list(specs), outs, tokens, n_prompt, texts[:n])

    def _prefill(self, enc: dict[str, torch.Tensor], steering: Steering) -> torch.Tensor:
        """Eager steered forward of the prompts into the static cache; returns the first greedy token."""
        mask = enc["attention_mask"]
        P = mask.shape[1]
        self._cache.reset()
        self._mask.fill_(1)
        self._mask[:, :P] = mask
        # Position ids as HF generate makes them for left padding: count real tokens only.
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kwargs = self._forward_kwargs()
        if self._pass_cache_position:
            kwargs["cache_position"] = torch.arange(P, device=self.device)
        with steered(self.model, steering):
            out = self.model(
                input_ids=enc["input_ids"], attention_mask=self._mask, position_ids=pos, **kwargs
            )
        logits = out.logits
        return logits[:, -1, :].float().argmax(-1)

    def _decode(
        self, first: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: list[int], pad: int
    ) -> torch.Tensor:
        """The fixed-length greedy loop; nothing is read back to the host until it ends."""
        if self._eos is None or self._pad is None or self._eos.tolist() != eos or int(self._pad) != pad:
            self._eos = torch.tensor(eos, dtype=torch.long, device=self.device)
            self._pad = torch.tensor(pad, dtype=torch.long, device=self.device)
        out = torch.empty(self.batch_size, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = first
        self._tokens.copy_(first[:, None])
        self._positions.copy_(mask.long().sum(1, keepdim=True))  # the first new token's position
        self._unfinished.copy_(~torch.isin(first, self._eos))
        self._cache_position.fill_(mask.shape[1])
        with self._patched():
            for t in range(1, max_new_tokens):
                if self._graphs:
                    # The previous replay's outputs were copied out: let CUDA graphs reuse their memory.
                    torch.compiler.cudagraph_mark_step_begin()
                nxt, unfinished = self._compiled(self._tokens, self._positions, self._unfinished)
                out[:, t] = nxt
                self._tokens.copy_(nxt[:, None])
                self._unfinished.copy_(unfinished)
                del nxt, unfinished
                self._positions.add_(1)
                self._cache_position.add_(1)
        return out.cpu()


_RUNNERS: "weakref.WeakKeyDictionary[PreTrainedModel, OrderedDict[tuple, FastSteering]]" = (
    weakref.WeakKeyDictionary()
)


def _runner(model: PreTrainedModel, key: tuple, make: Callable[[], FastSteering]) -> FastSteering:
    """Reuse a compiled runner for this model and shape; keep the few most recently used."""
    runners = _RUNNERS.setdefault(model, OrderedDict())
    if key not in runners:
        runners[key] = make()
        while len(runners) > _RUNNERS_PER_MODEL:
            runners.popitem(last=False)
    runners.move_to_end(key)
    return runners[key]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def generate_compiled(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    specs: Sequence[SteerSpec],
    *,
    max_new_tokens: int,
    chat_template: bool = True,
    compile: bool = True,
    positions: str = "all",
    epsilon: str = "frozen",
    batch_size: int = 128,
) -> list[RowResult]:
    """Steered greedy generation like :func:`conva.steering.hf.generate` (batched mode), on the fast path.

    Same arguments and :class:`RowResult` telemetry. Batches are padded to a multiple of 8 rows and
    the cache to a multiple of 64 tokens; a runner (cache, buffers, compiled step) is kept per model
    and shape, so the first call of a shape compiles and later ones reuse it. With ``epsilon="per_token"``
    the reported ε is the last decode step's, taken over a fixed ``max_new_tokens - 1`` steps (HF
    generate stops early once every row has ended, so its last step can differ).
    """
    if len(prompts) != len(specs):
        raise ValueError(f"{len(prompts)} prompts but {len(specs)} steering specs")
    results: list[RowResult] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p, chunk_s = list(prompts[start : start + batch_size]), list(specs[start : start + batch_size])
        layers = tuple(sorted({l for s in chunk_s for l in s.layers()}))
        rows = _round_up(len(chunk_p), _BATCH_MULTIPLE)
        # The longest prompt (a dummy row's empty prompt included; every prefix as if its gate opened: an
        # upper bound), rounded up: few distinct shapes.
        texts = [prompt_text(p, s) for p, s in zip(chunk_p + [""], chunk_s + [SteerSpec()])]
        strings = [format_prompt(tok, t, chat_template) for t in texts]
        longest = max(len(ids) for ids in tok(strings, add_special_tokens=not chat_template)["input_ids"])
        length = _round_up(longest + max_new_tokens, _LEN_MULTIPLE)
        key = (rows, length, layers, epsilon, compile)
        fast = _runner(
            model,
            key,
            lambda: FastSteering(
                model, batch_size=rows, max_len=length, layers=layers, epsilon=epsilon, compile=compile
            ),
        )
        results += fast.generate(
            tok,
            chunk_p,
            chunk_s,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            positions=positions,
        )
    return results
