"""The steering actor: loads the model once (backend by name), steers one shard of prompts per call."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa

from conva.bundle import ValueBundle, load_bundle
from conva.config import Config
from workers.backends import make_steerer
from workers.contract import check_rows
from workers.extraction import _set_threads
from workers.faults import maybe_die

__all__ = ["SteeringWorker", "load_bundles"]

_log = logging.getLogger(__name__)


def load_bundles(bundle_dir: str | Path, values: tuple[str, ...], fingerprint: str | None,
                 hidden_size: int | None) -> dict[str, ValueBundle]:
    """``<bundle_dir>/<value>/`` for each value, verified (and refused if made for another model)."""
    return {v: load_bundle(Path(bundle_dir) / v, fingerprint=fingerprint, hidden_size=hidden_size) for v in values}


class SteeringWorker:
    """Generates steered answers, one shard per :meth:`steer` call; one output row per input row.

    Example (in a Ray job; see :mod:`workers.pool`):
        >>> actors = start_actors(SteeringWorker, cfg)                              # doctest: +SKIP
        >>> table = ray.get(actors[0].steer.remote(0, rows, "runs/demo/bundles"))   # doctest: +SKIP
    """

    def __init__(self, cfg: Config) -> None:
        _set_threads(cfg)
        self.cfg = cfg
        self.steerer = make_steerer(cfg)
        self._bundles: dict[str, dict[str, ValueBundle]] = {}
        _log.info("steering worker pid %d ready (backend %s)", os.getpid(), cfg.steer.backend)

    def steer(self, shard_index: int, rows: pa.Table, bundle_dir: str) -> pa.Table:
        """Generations for one shard. Bundles are read once per folder and checked against the model."""
        maybe_die("steer", shard_index, rows, "prompt")
        if bundle_dir not in self._bundles:
            self._bundles[bundle_dir] = load_bundles(bundle_dir, self.cfg.data.values, self.steerer.fingerprint,
                                                     self.steerer.hidden_size)
        out = self.steerer.steer(rows, self._bundles[bundle_dir])
        return check_rows("steer", shard_index, rows, out)
