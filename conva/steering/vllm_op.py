"""ConVA inside a vLLM engine: the steering op and its fixed-address buffers.

The math is :mod:`conva.steering`'s (``_Steering``), moved into the engine so that one engine step
steers every request of the batch with its own bundle:

* A ``torch.library.custom_op`` (``conva::steer``, with a fake implementation) is called from a
  patched decoder-layer ``forward`` after each *active* layer (:mod:`conva.steering.vllm_patch`). Being an op, it is traced into the
  compiled graph; a Python forward hook is silently dropped under ``enforce_eager=False``
  (ENVIRONMENT.md). The op only does fixed-shape gathers, scatters and ``torch.where`` over buffers
  allocated once, so it is also safe to capture in a CUDA graph.
* Per-spec tables (direction, probe, intercept, ‖w‖, P0, gate) are loaded once into rows of those
  buffers; row 0 means "no steering". Per-request state (gate, ε per layer, telemetry) lives in slots;
  slot 0 is the unsteered slot whose ε is always 0.
* Before each step the host fills, from the runner's persistent batch, which slot each token belongs
  to, whether it is steered (positions ``all``/``generated``), and which token of each slot drives ε
  (the last prompt token at prefill; the newest token per step in ``per_token`` mode).

vLLM layers return ``(hidden, residual)``; the residual stream is their **sum** (HF
``hidden_states[l+1]``), so probes read the sum and the delta is added to ``hidden`` only.

One way a state reaches a runner: the vLLM plugin (:mod:`conva.steering.vllm_plugin`, loaded by vLLM
in every engine process) installs the patches (:mod:`conva.steering.vllm_patch`); every runner built
in any engine process then makes its own state, whose table rows the requests' specs load on demand
(``requests``: :class:`conva.steering.vllm_rows.Rows`). Our own workers
(:class:`conva.steering.vllm.VLLMSteerer`) are clients of that plugin like ``vllm serve``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["PLUGIN_ENGINE", "SpecRow", "EngineState", "Telemetry"]

_STATES: dict[int, "EngineState"] = {}
_IDS = itertools.count(1)


class _Current:
    """The steering state of the runner whose forward runs now (forwards of one process run one at a time)."""

    state: "EngineState | None" = None


CURRENT = _Current()
PLUGIN_ENGINE = 0  # the op's engine id of a plugin-built state: one per process, a constant in every graph


@dataclass(frozen=True)
class SpecRow:
    """One steering spec's tensors over the engine's active layers (float32, CPU).

    ``cols`` are the active-layer columns this spec steers; the other columns stay zero. Built from
    :func:`conva.steering.core.plan_rows` so the math is the HF backend's.
    """

    dirs: torch.Tensor  # [U, d]
    w: torch.Tensor  # [U, d]
    b: torch.Tensor  # [U]
    wnorm: torch.Tensor  # [U]
    compute: torch.Tensor  # [U] bool
    fixed: torch.Tensor  # [U]
    has_probe: torch.Tensor  # [U] bool
    s0: float
    gate_col: int = -1
    gate_w: torch.Tensor | None = None  # [d]
    gate_b: float = 0.0
    gate_thr: float = 0.0


@dataclass
class _Request:
    """Host-side record of one steered (or recorded) request while it is alive in the runner."""

    slot: int
    row: int
    tag: str
    positions: str
    per_token: bool
    started: bool = False
    sink: Any = None  # the plugin's report target for this request's telemetry (None: keep it here)
    recomputed: int = 0  # times re-run from its first token after a preemption


class _Step:
    """Host-side arrays of one engine step, copied into the state's device buffers by ``fill``."""

    def __init__(self, n_tokens: int, n_slots: int) -> None:
        self.t_slot, self.t_on = np.zeros(n_tokens, np.int64), np.zeros(n_tokens, np.float32)
        self.t_own = np.zeros(n_tokens, bool)
        self.s_tok = np.zeros(n_slots, np.int64)
        self.s_first, self.s_comp = np.zeros(n_slots, bool), np.zeros(n_slots, bool)


@dataclass
class Telemetry:
    """What the engine measured for one request (columns = active layers)."""

    gate_score: float
    gate_open: bool
    eps: np.ndarray
    p_before: np.ndarray
    p_after: np.ndarray
    activations: np.ndarray | None = None  # [U, d] when recording
    recomputed: int = 0  # times the request was re-run from its first token after a preemption


class EngineState:
    """The fixed-address buffers of one engine and the host logic that fills them each step.

    ``layers``: the active decoder layers (ascending); only these call the op. ``n_specs``: table rows
    besides row 0. ``n_slots``: concurrent steered requests besides slot 0. ``n_tokens``: the most
    tokens one step may hold (``max_num_batched_tokens``). ``record``: keep the residual stream of the
    last prompt token at every active layer (activation extraction). ``requests``: the plugin's source
    of table rows (``conf``/``admit``/``release``/``report``). ``engine_id``: :data:`PLUGIN_ENGINE` for
    the plugin's state, the op's engine argument then (the same constant in every process, so a cached
    compiled graph fits any of them; the op finds the state through the runner running the forward);
    None (op-level tests): the op looks the state up by its own id.
    """

    def __init__(
        self,
        layers: Sequence[int],
        hidden: int,
        *,
        n_specs: int,
        n_slots: int,
        n_tokens: int,
        record: bool = False,
        device: str | torch.device = "cpu",
        requests: Any = None,
        engine_id: int | None = None,
    ) -> None:
        self.id = next(_IDS)
        self.op_id = self.id if engine_id is None else engine_id
        self.requests = requests
        self.layers = tuple(sorted(int(l) for l in layers))
        self.col = {l: j for j, l in enumerate(self.layers)}
        self.hidden, self.device = hidden, torch.device(device)
        U, R, S, d = len(self.layers), n_specs + 1, n_slots + 1, hidden
        f32: dict[str, Any] = dict(dtype=torch.float32, device=self.device)
        i64: dict[str, Any] = dict(dtype=torch.int64, device=self.device)
        boolean: dict[str, Any] = dict(dtype=torch.bool, device=self.device)
        self.dirs, self.w = torch.zeros(U, R, d, **f32), torch.zeros(U, R, d, **f32)
        self.b, self.wnorm, self.fixed = (
            torch.zeros(U, R, **f32),
            torch.ones(U, R, **f32),
            torch.zeros(U, R, **f32),
        )
        self.compute, self.has_probe = torch.zeros(U, R, **boolean), torch.zeros(U, R, **boolean)
        self.s0, self.gate_col = torch.zeros(R, **f32), torch.full((R,), -1, **i64)
        self.gate_w, self.gate_b, self.gate_thr = (
            torch.zeros(R, d, **f32),
            torch.zeros(R, **f32),
            torch.zeros(R, **f32),
        )
        self.s_row, self.s_tok = torch.zeros(S, **i64), torch.zeros(S, **i64)
        self.s_first, self.s_comp = torch.zeros(S, **boolean), torch.zeros(S, **boolean)
        self.open, self.gate_score = torch.ones(S, **boolean), torch.full((S,), float("nan"), **f32)
        self.eps = torch.zeros(S, U, **f32)
        self.p_before, self.p_after = (
            torch.full((S, U), float("nan"), **f32),
            torch.full((S, U), float("nan"), **f32),
        )
        self.cap = torch.zeros(S, U, d, **f32) if record else None
        self.t_slot, self.t_on = torch.zeros(n_tokens, **i64), torch.zeros(n_tokens, **f32)
        self.t_own = torch.zeros(n_tokens, **boolean)  # token's ε from its own state (per-token recompute)
        self.n_rows, self.n_tokens = 1, n_tokens
        self._free = list(range(S - 1, 0, -1))
        self._alive: dict[str, _Request | None] = {}
        self._step_slots: list[tuple[int, _Request]] = []
        self.telemetry: dict[str, Telemetry] = {}
        self.bound = False
        # Without CUDA graphs the op runs as Python every step and may skip work the host knows is
        # not needed; a captured graph replays whatever ran at capture, so there it always does all.
        self.host_skips = self.device.type == "cpu"
        self._any_comp = self._any_steer = self._any_own = False
        self.recomputed = 0  # requests re-run from their first token after a preemption
        _STATES[self.id] = self

    # -- tables ---------------------------------------------------------------------------------

    def add_row(self, row: SpecRow) -> int:
        """Load one spec's tensors into the next free table row; return the row index (≥ 1)."""
        r = self.n_rows
        if r >= self.s0.shape[0]:
            raise ValueError(
                f"the engine holds at most {self.s0.shape[0] - 1} steering specs; raise max_specs"
            )
        self.write_row(r, row)
        self.n_rows += 1
        return r

    def write_row(self, r: int, row: SpecRow) -> None:
        """**Overwrite** table row ``r`` (≥ 1) with ``row``'s tensors; no live request may use it."""
        with torch.no_grad():
            for name in ("dirs", "w", "b", "wnorm", "compute", "fixed", "has_probe"):
                getattr(self, name)[:, r].copy_(getattr(row, name))
            self.s0[r], self.gate_col[r] = row.s0, row.gate_col
            if row.gate_w is not None:
                self.gate_w[r].copy_(row.gate_w)
                self.gate_b[r], self.gate_thr[r] = row.gate_b, row.gate_thr
            else:
                self.gate_w[r].zero_()
                self.gate_b[r], self.gate_thr[r] = 0.0, 0.0

    def close(self) -> None:
        _STATES.pop(self.id, None)

    # -- per step (host) ------------------------------------------------------------------------

    def _admit(self, req_id: str, sampling_params: Any) -> _Request | None:
        """A request's slot, if its ``extra_args`` carry the plugin's ``conva_*`` keys (None: unsteered)."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        conf = self.requests.conf(extra) if self.requests is not None else None
        if conf is None:
            return None
        if not self._free:
            raise RuntimeError("no free ConVA steering slot: more steered requests alive than n_slots")
        row, tag, sink = self.requests.admit(req_id, conf)
        slot = self._free.pop()
        req = _Request(
            slot,
            int(row),
            str(tag),
            conf.get("positions", "all"),
            conf.get("epsilon", "frozen") == "per_token",
            sink=sink,
        )
        if not 0 <= req.row < self.n_rows:
            raise RuntimeError(f"request {req_id} names steering row {req.row}, the engine has {self.n_rows}")
        self.s_row[slot] = req.row
        self.eps[slot].zero_()
        self.p_before[slot].fill_(float("nan"))
        self.p_after[slot].fill_(float("nan"))
        score = conf.get("gate_score")  # external gates are scored on the host before submission
        self.gate_score[slot] = float("nan") if score is None else float(score)
        self.open[slot] = bool(conf.get("gate_open", True))
        return req

    def _release(self, req_id: str) -> None:
        """Free a finished request's slot (and its table row's claim)."""
        req = self._alive.pop(req_id, None)
        if req is not None:
            self.s_row[req.slot] = 0
            self._free.append(req.slot)
            self.requests.release(req.row)
            self.telemetry.pop(req.tag, None)

    def fill(self, runner: Any, num_scheduled: np.ndarray) -> None:
        """Fill the per-step buffers from the runner's batch (called after ``_prepare_inputs``)."""
        # Free the slots of requests the runner no longer holds (finished or aborted). Sweeping is
        # sturdier than finished_req_ids, which an idle engine may deliver in a step without inputs.
        for req_id in [r for r in self._alive if r not in runner.requests]:
            self._release(req_id)
        batch, n = runner.input_batch, runner.input_batch.num_reqs
        step = _Step(int(num_scheduled[:n].sum()), self.s_row.shape[0])
        self._step_slots = []
        start = 0
        for i, req_id in enumerate(batch.req_ids[:n]):
            k = int(num_scheduled[i])
            if req_id not in self._alive:
                self._alive[req_id] = self._admit(req_id, runner.requests[req_id].sampling_params)
            req = self._alive[req_id]
            if req is not None:
                done = int(batch.num_computed_tokens_cpu[i])
                self._place(req, runner.requests[req_id].num_prompt_tokens, done, k, start, step)
            start += k
        total = step.t_slot.shape[0]
        for name in ("t_slot", "t_on", "t_own"):
            getattr(self, name)[:total].copy_(torch.from_numpy(getattr(step, name)))
            getattr(self, name)[total:].zero_()
        for name in ("s_tok", "s_first", "s_comp"):
            getattr(self, name).copy_(torch.from_numpy(getattr(step, name)))
        self._any_comp, self._any_own = bool(step.s_comp.any()), bool(step.t_own.any())
        self._any_steer = bool(step.t_on[step.t_slot > 0].any())

    def _place(self, req: _Request, n_prompt: int, done: int, k: int, start: int, step: _Step) -> None:
        last = n_prompt - 1
        if done <= last and done + k <= last:
            # ε needs the last prompt token; a chunk before it would run with ε unknown.
            raise RuntimeError(
                f"steered request {req.tag} was split by chunked prefill ({n_prompt} prompt tokens, "
                f"{k} scheduled); steering needs the whole prompt in one step"
            )
        step.t_slot[start : start + k] = req.slot
        pos = np.arange(done, done + k)
        step.t_on[start : start + k] = 1.0 if req.positions == "all" else (pos >= last).astype(np.float32)
        if not req.started:
            step.s_tok[req.slot], step.s_first[req.slot], step.s_comp[req.slot] = (
                start + last - done,
                True,
                True,
            )
            req.started = True
            self._step_slots.append((req.slot, req))
        elif done <= last:
            # Preempted, now recomputed: the runner re-runs the prompt and the tokens generated so far
            # in one step. Frozen ε: the slot still holds it. Per-token ε: the prompt's ε again at the
            # last prompt token, and each generated token its own from its own state, as when it was
            # decoded (the slot holds only the newest token's). Telemetry keeps the pre-preemption values
            # (reported again, with the count of recomputes).
            self.recomputed += 1
            req.recomputed += 1
            self._step_slots.append((-req.slot, req))  # negative: report, but keep the reported ε
            if req.per_token:
                step.s_tok[req.slot], step.s_comp[req.slot] = start + last - done, True
                step.t_own[start + last + 1 - done : start + k] = True
        elif req.per_token and done >= n_prompt:
            # Per-token ε: the newest token of this step drives it (HF: h[:, -1] at each decode step).
            step.s_tok[req.slot], step.s_comp[req.slot] = start + k - 1, True
            self._step_slots.append((req.slot, req))

    def after_forward(self) -> None:
        """Copy the telemetry of the slots that computed ε this step; clear the per-step buffers."""
        self.s_first.zero_()
        self.s_comp.zero_()
        self.t_slot.zero_()
        self.t_own.zero_()
        self._any_comp = self._any_steer = self._any_own = False
        if not self._step_slots:
            return
        slots = torch.tensor([abs(s) for s, _ in self._step_slots], device=self.device)
        score, is_open = self.gate_score[slots].cpu().numpy(), self.open[slots].cpu().numpy()
        eps, pb, pa = (t[slots].cpu().numpy() for t in (self.eps, self.p_before, self.p_after))
        cap = self.cap[slots].cpu().numpy() if self.cap is not None else None
        for k, (mark, req) in enumerate(self._step_slots):
            old = self.telemetry.get(req.tag)
            if old is None:
                self.telemetry[req.tag] = Telemetry(
                    float(score[k]), bool(is_open[k]), eps[k], pb[k], pa[k], None if cap is None else cap[k]
                )
            elif mark > 0:  # per-token mode: ε of the latest step, like the HF backend's final ``scale``
                old.eps = eps[k]
            tel = self.telemetry[req.tag]
            tel.recomputed = req.recomputed
            self.requests.report(
                req.sink, tel, self.layers
            )  # it goes out; per-token ε is kept for the next step
            if not req.per_token:
                self.telemetry.pop(req.tag)
        self._step_slots = []

    # -- the op (device) ------------------------------------------------------------------------

    def steer(self, hidden: torch.Tensor, residual: torch.Tensor, col: int) -> torch.Tensor:
        """Gate, ε and steering at active-layer column ``col``; returns the new ``hidden``."""
        T = hidden.shape[0]
        if T > self.n_tokens:
            raise RuntimeError(f"a step of {T} tokens exceeds the steering buffers ({self.n_tokens})")
        if self.host_skips and not self._any_comp:
            return self._apply(hidden, residual, col)  # e.g. frozen-ε decode steps: ε is already stored
        row = self.s_row
        h_s, r_s = hidden.index_select(0, self.s_tok), residual.index_select(0, self.s_tok)
        e = (h_s + r_s).float()  # [S, d] the residual stream at each slot's driving token
        if self.cap is not None:
            self.cap[:, col] = torch.where(self.s_first[:, None], e, self.cap[:, col])
        self._gate(e, row, col)
        z, scale = self._scale(e, row, col)
        scale = torch.where(self.open, scale, torch.zeros_like(scale))
        self.eps[:, col] = torch.where(self.s_comp, scale, self.eps[:, col])
        probe = self.s_first & self.has_probe[col].index_select(0, row)
        w, dirs = self.w[col].index_select(0, row), self.dirs[col].index_select(0, row)
        after = (h_s + (scale[:, None] * dirs).to(hidden.dtype) + r_s).float()
        self.p_before[:, col] = torch.where(probe, torch.sigmoid(z), self.p_before[:, col])
        p_after = torch.sigmoid((after * w).sum(-1) + self.b[col].index_select(0, row))
        self.p_after[:, col] = torch.where(probe, p_after, self.p_after[:, col])
        return self._apply(hidden, residual, col)

    def _scale(self, e: torch.Tensor, row: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe logit and scale (ε where the spec computes it, else its constant) of states ``e``."""
        z = (e * self.w[col].index_select(0, row)).sum(-1) + self.b[col].index_select(0, row)
        eps = torch.clamp((self.s0.index_select(0, row) - z) / self.wnorm[col].index_select(0, row), min=0.0)
        return z, torch.where(
            self.compute[col].index_select(0, row), eps, self.fixed[col].index_select(0, row)
        )

    def _gate(self, e: torch.Tensor, row: torch.Tensor, col: int) -> None:
        here = self.s_first & (self.gate_col.index_select(0, row) == col)
        z = (e * self.gate_w.index_select(0, row)).sum(-1) + self.gate_b.index_select(0, row)
        score = torch.sigmoid(z)
        self.gate_score.copy_(torch.where(here, score, self.gate_score))
        self.open.copy_(torch.where(here, score >= self.gate_thr.index_select(0, row), self.open))

    def _apply(self, hidden: torch.Tensor, residual: torch.Tensor, col: int) -> torch.Tensor:
        T = hidden.shape[0]
        if self.host_skips and not self._any_steer:
            return hidden.clone()  # an op's output may not alias its input
        t_slot = self.t_slot[:T]
        row = self.s_row.index_select(0, t_slot)
        scale = self.eps[:, col].index_select(0, t_slot)
        if not (self.host_skips and not self._any_own):
            # Tokens recomputed after a preemption under per-token ε: each its own. With CUDA graphs
            # (no host skips) this runs every step: one more [T, d] gather and dot per active layer.
            _, own = self._scale((hidden + residual).float(), row, col)
            own = torch.where(self.open.index_select(0, t_slot), own, torch.zeros_like(own))
            scale = torch.where(self.t_own[:T], own, scale)
        scale = scale * self.t_on[:T]
        delta = (scale[:, None] * self.dirs[col].index_select(0, row)).to(hidden.dtype)
        # Unsteered tokens (slot 0, gate closed, ε = 0) keep their exact bits.
        return torch.where((scale != 0)[:, None], hidden + delta, hidden)


# -- the custom op ----------------------------------------------------------------------------------


@torch.library.custom_op("conva::steer", mutates_args=())
def _steer_op(hidden: torch.Tensor, residual: torch.Tensor, engine: int, col: int) -> torch.Tensor:
    state = _STATES[engine] if engine != PLUGIN_ENGINE else CURRENT.state  # by id: op-level tests
    if state is None:  # a plugin engine's forward outside a step (none in vLLM 0.32): leave it alone
        return hidden.clone()
    return state.steer(hidden, residual, col)


@_steer_op.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, engine: int, col: int) -> torch.Tensor:
    return torch.empty_like(hidden)
