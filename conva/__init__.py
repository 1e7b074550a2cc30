"""ConVA: controlled value vector activation (ACL 2025) as a library, with a Ray batch system on top.

Two layers, visible in the tree (ARCHITECTURE.md):

* **The method** (imports no Ray and nothing of the batch layer): ``conva.data`` (value pairs and
  prompts), ``conva.models`` (loading, :class:`~conva.models.ModelInfo`), ``conva.record`` (hidden
  states), ``conva.probes`` / ``conva.gates`` / ``conva.fit`` (probes, band, gate, a value's
  :class:`~conva.bundle.ValueBundle`), ``conva.steering`` (one core, three backends: ``hf``, ``compiled``,
  ``vllm``), ``conva.metrics`` / ``conva.mc`` / ``conva.judges`` (evaluation).
* **The batch plumbing**, ``conva.batch``: config, storage and the commit log, input planning, the
  stages' tables, studies, summaries and the report; and the Ray side, ``conva.workers`` (model
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
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``conva.jobs`` and ``conva.workers`` in a checkout, where they are the top-level folders
    ``jobs/`` and ``workers/`` (an installed wheel holds them inside ``conva/``, per pyproject.toml's
    package-dir, and never reaches this finder). Only these two names: nothing else of the checkout's
    root becomes part of the package."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name not in ("conva.jobs", "conva.workers"):
            return None
        folder = _ROOT / name.rpartition(".")[2]
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutFinder())

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
