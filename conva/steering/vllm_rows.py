"""The engine side of ConVA's vLLM plugin: each runner's steering state and its table of spec rows.

:func:`make_state` is the plugin's :data:`conva.steering.vllm_patch.plugin_factory`: vLLM builds a model
runner in some engine process (the engine core, or a tensor-parallel worker), and it gets an
:class:`~conva.steering.vllm_op.EngineState` sized from the engine's config and ``additional_config``
``conva`` (:mod:`conva.steering.vllm_plugin`'s doc). :class:`Rows` turns the ``conva_*`` keys of each
request into a table row of that state (loading the bundle it names, cached per process), and writes
the request's telemetry (and recorded activations) as files once the engine has computed them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.numpy import save_file

from conva.gates import Gate
from conva.steering.core import plan_rows
from conva.steering.spec import SteerSpec
from conva.steering.vllm_op import PLUGIN_ENGINE, EngineState, SpecRow
from conva.steering.vllm_plugin import PREFIX, chunked, model_shape, plugin_conf, resolve

__all__ = ["Rows", "make_state", "activations_path", "spec_row"]

log = logging.getLogger(__name__)


def activations_path(folder: str, tag: str) -> str:
    """Where the engine writes a ``conva_record`` request's activations.

    A safetensors file with one float32 tensor ``acts`` of shape ``[layers, hidden]`` (no pickle).
    """
    return os.path.join(folder, f"{tag}.acts.safetensors")


@dataclass
class _Sink:
    """Where one request's telemetry goes, and what it reports besides the engine's numbers."""

    folder: str | None
    tag: str
    layers: tuple[int, ...]
    error: str | None = None
    record: tuple[int, ...] = ()


class Rows:
    """The plugin's request source for an :class:`~conva.steering.vllm_op.EngineState`: specs → rows.

    Rows are shared by equal specs and reused least-recently-used once no live request holds them.
    A spec the engine process cannot load (the front end could) runs unsteered, its error reported.
    """

    def __init__(self, state: Any, hidden: int, n_blocks: int, rank: int, all_ranks: bool = False) -> None:
        self.state, self.hidden, self.n_blocks, self.rank = state, hidden, n_blocks, rank
        self.all_ranks = all_ranks  # every tensor-parallel rank writes its own file (``<tag>.rank<r>.json``)
        self.rows: OrderedDict[str, int] = OrderedDict()
        self.refs: dict[int, int] = {}

    def conf(self, extra: Mapping[str, Any]) -> dict[str, Any] | None:
        """The request's spec keys without the prefix (None: an unsteered request)."""
        return {
            k[len(PREFIX) :]: v for k, v in extra.items() if k.startswith(PREFIX) and v is not None
        } or None

    def admit(self, req_id: str, conf: Mapping[str, Any]) -> tuple[int, str, _Sink]:
        """The table row (0: unsteered), tag and telemetry sink of a request with spec keys ``conf``."""
        folder, tag = conf.get("telemetry"), str(conf.get("tag") or req_id)
        try:
            got = resolve(
                {PREFIX + k: v for k, v in conf.items()}, self.hidden, self.n_blocks, self.state.layers
            )
            assert got is not None
            req, spec, digest = got
            record = tuple(req.record or ())
            if record and self.state.cap is None:
                raise ValueError("this engine does not record: build it with additional_config conva.record")
            if not spec.layers():
                return 0, req_id, _Sink(folder, tag, (), record=record)
            key = req.row_key() + digest
            row = self.rows.get(key)
            if row is None:
                tensors = spec_row(spec, self.state, self.hidden, self.n_blocks, req.gate_open is None)
                row = self._free_row()
                self.state.write_row(row, tensors)
                self.rows[key] = row
            self.rows.move_to_end(key)
            self.refs[row] = self.refs.get(row, 0) + 1
            return row, req_id, _Sink(folder, tag, spec.layers(), record=record)
        except (ValueError, RuntimeError) as exc:
            log.error("ConVA request %s runs unsteered: %s", req_id, exc)
            return 0, req_id, _Sink(folder, tag, (), error=str(exc))

    def _free_row(self) -> int:
        if self.state.n_rows < self.state.s0.shape[0]:
            self.state.n_rows += 1
            return self.state.n_rows - 1
        for key, row in self.rows.items():  # least recently used first
            if not self.refs.get(row):
                del self.rows[key]
                return row
        raise RuntimeError(f"all {self.state.n_rows - 1} steering table rows are held by live requests")

    def release(self, row: int) -> None:
        if row:
            self.refs[row] -= 1

    def report(self, sink: _Sink, tel: Any, layers: Sequence[int]) -> None:
        """Write the request's telemetry file (and its activations, when it records) into its folder."""
        if sink.folder is None or (self.rank != 0 and not self.all_ranks):
            return
        from conva.files import atomic_write

        cols = [list(layers).index(l) for l in sink.layers]
        score = None if tel.gate_score != tel.gate_score else float(tel.gate_score)  # NaN: not read
        body = {
            "tag": sink.tag,
            "layers": list(sink.layers),
            "eps": [float(tel.eps[c]) for c in cols],
            "p_before": [float(tel.p_before[c]) for c in cols],
            "p_after": [float(tel.p_after[c]) for c in cols],
            "gate_score": score,
            "gate_open": bool(tel.gate_open),
            "recomputed": int(tel.recomputed),
            "record": list(sink.record),
            "error": sink.error,
        }
        name = sink.tag if self.rank == 0 else f"{sink.tag}.rank{self.rank}"
        if sink.record and tel.activations is not None:
            acts = tel.activations[[list(layers).index(l) for l in sink.record]].astype(np.float32)
            save_file({"acts": np.ascontiguousarray(acts)}, activations_path(sink.folder, name) + ".part")
            os.replace(activations_path(sink.folder, name) + ".part", activations_path(sink.folder, name))
        # The JSON last: a reader that finds it finds the activations too.
        atomic_write(os.path.join(sink.folder, f"{name}.json"), json.dumps(body).encode())


def make_state(runner: Any) -> Any:
    """The steering state of a runner being built in any engine process (None: leave it plain)."""
    cfg = runner.vllm_config
    conf = plugin_conf(cfg)
    if conf.get("enabled", True) is False:
        return None
    if chunked(cfg):
        log.warning(
            "ConVA plugin: chunked prefill is on, so this engine stays plain and refuses ConVA requests"
        )
        return None
    hidden, n_blocks = model_shape(runner.model_config)
    layers = conf.get("layers", list(range(n_blocks)))
    n_slots = 2 * cfg.scheduler_config.max_num_seqs
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError, ImportError):
        rank = 0
    state = EngineState(
        layers,
        hidden,
        n_specs=int(conf.get("max_specs", n_slots)),
        n_slots=n_slots,
        n_tokens=cfg.scheduler_config.max_num_batched_tokens,
        record=bool(conf.get("record", False)),
        device=torch.device(runner.device),
        engine_id=PLUGIN_ENGINE,
    )
    state.requests = Rows(state, hidden, n_blocks, rank, conf.get("telemetry_ranks") == "all")
    return state


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
