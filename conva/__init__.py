"""ConVA: controlled value vector activation (ACL 2025) as a library, with a Ray batch system on top.

Two layers, visible in the tree (ARCHITECTURE.md):

* **The method** (imports no Ray and nothing of the batch layer): ``conva.data`` (value pairs and
  prompts), ``conva.models`` (loading, :class:`~conva.models.ModelInfo`), ``conva.record`` (hidden
  states), ``conva.probes`` / ``conva.gates`` / ``conva.fit`` (probes, band, gate, a value's
  :class:`~conva.bundle.ValueBundle`), ``conva.steering`` (one core, three backends: ``hf``, ``compiled``,
  ``vllm``), ``conva.metrics`` / ``conva.mc`` / ``conva.judges`` (evaluation).
* **The batch plumbing**, ``conva.batch``: config, storage and the commit log, input planning, the
  pipeline's tables, studies, summaries and the report; and the Ray side, ``conva.workers`` (model
  actors) and ``conva.jobs`` (entrypoints, the ``conva`` command).

The names below are the public API the README uses; each is imported when first used, so ``import
conva`` loads neither torch nor transformers::

    from conva import SteerSpec, generate, load_bundle, load_model

    model, tok = load_model("smollm2")
    bundle = load_bundle("runs/demo/bundles/achievement")
    rows = generate(model, tok, ["Should I take the promotion abroad?"], [SteerSpec("conva", bundle, p0=0.99)])
"""

from __future__ import annotations

import importlib
from pathlib import Path

# In a checkout (or a Ray job's uploaded working dir) the Ray-side packages are the top-level folders
# jobs/ and workers/; an installed wheel holds them as conva/jobs and conva/workers (pyproject.toml's
# package-dir). Looking for submodules in the checkout's root too makes ``conva.jobs`` and
# ``conva.workers`` import the same way in both.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "jobs" / "__init__.py").is_file() and (_ROOT / "workers" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821

_PUBLIC = {
    "SteerSpec": "conva.steering.spec",
    "RowResult": "conva.steering.spec",
    "generate": "conva.steering.hf",
    "steer_logits": "conva.steering.hf",
    "load_model": "conva.models",
    "ModelInfo": "conva.fit",
    "ValueBundle": "conva.bundle",
    "load_bundle": "conva.bundle",
    "fit_value": "conva.fit",
    "Band": "conva.probes",
    "Config": "conva.batch.config",
    "load_config": "conva.batch.config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'conva' has no attribute {name!r}")
