"""Steering: one backend-neutral core and three backends on top.

* :mod:`conva.steering.spec`: what a row asks for (:class:`SteerSpec`) and what it gets back
  (:class:`RowResult`); torch-free, so configuration checks can import it.
* :mod:`conva.steering.core`: the gate's decisions, the per-row plan, the ε solve inside block hooks.
* Backends, each ``generate(...)``-shaped over the same specs and results:
  :mod:`conva.steering.hf` (HF eager; also the paper's reference procedure),
  :mod:`conva.steering.compiled` (HF with a static KV cache and a compiled decode step),
  :mod:`conva.steering.vllm` (inside a vLLM engine, with its in-graph op in :mod:`conva.steering.vllm_op`).
"""

from conva.steering.spec import EPSILON_MODES, METHODS, SETTINGS, STEER_POSITIONS, RowResult, SteerSpec

__all__ = ["EPSILON_MODES", "METHODS", "SETTINGS", "STEER_POSITIONS", "RowResult", "SteerSpec"]
