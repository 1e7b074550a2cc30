"""The extraction actor: loads the model once, records activations for one shard of texts per call."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa

from conva.blocks import find_blocks
from conva.config import Config
from conva.models import load_model, model_fingerprint, model_name
from conva.pipeline import extract_table
from workers.contract import check_rows
from workers.faults import maybe_die

__all__ = ["ExtractionWorker", "MODEL_META_KEY"]

# Every activation shard carries the model it was recorded with, so `fit` can stamp the bundles with the
# right fingerprint without loading the model on the driver.
MODEL_META_KEY = b"conva.model"

_log = logging.getLogger(__name__)


def _set_threads(cfg: Config) -> None:
    """One torch thread per CPU the actor asked for: actors sharing a node must not oversubscribe it."""
    import torch

    torch.set_num_threads(max(1, int(cfg.ray.num_cpus_per_worker)))


class ExtractionWorker:
    """Records residual-stream activations, one shard per :meth:`extract` call.

    Example (in a Ray job; see :mod:`workers.pool`):
        >>> actors = start_actors(ExtractionWorker, cfg)                     # doctest: +SKIP
        >>> table = ray.get(actors[0].extract.remote(0, rows))                # doctest: +SKIP
    """

    def __init__(self, cfg: Config) -> None:
        _set_threads(cfg)
        self.cfg = cfg
        m = cfg.model
        self.model, self.tok = load_model(m.name, m.dtype, m.device, m.trust_remote_code)
        n_blocks = len(find_blocks(self.model))
        self.layers = list(cfg.extract.layers) or list(range(n_blocks))
        self.meta = {
            "name": model_name(m.name), "fingerprint": model_fingerprint(self.model),
            "hidden_size": int(self.model.config.hidden_size), "n_blocks": n_blocks, "layers": self.layers,
        }
        _log.info("extraction worker pid %d loaded %s (%s)", os.getpid(), self.meta["name"], self.meta["fingerprint"])

    def info(self) -> dict:
        """The loaded model: name, fingerprint, hidden size, block count, recorded layers."""
        return dict(self.meta)

    def extract(self, shard_index: int, rows: pa.Table) -> pa.Table:
        """Activations of one shard: ``len(layers)`` output rows per input row, layer-major.

        Raises :class:`~workers.contract.RowContractError` if any row id is missing or repeated.
        """
        maybe_die("extract", shard_index, rows, "text")
        e = self.cfg.extract
        out = extract_table(self.model, self.tok, rows, self.layers, e.position, e.batch_size)
        check_rows("extract", shard_index, rows, out, per_row=len(self.layers))
        return out.replace_schema_metadata({MODEL_META_KEY: json.dumps(self.meta).encode()})
