"""A stage's config identity: the canonical hash a generation is keyed on, and the keys two configs differ in.

:func:`config_hash` is also every generation row's ``config_sha256`` (:mod:`conva.batch.provenance`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

_log = logging.getLogger("conva.batch.store")

MISSING = object()  # a key one of two configs lacks


def config_hash(config: dict, ignore_keys: Iterable[str] = ()) -> str:
    """sha256 of the config's canonical JSON (sorted keys), leaving out ``ignore_keys`` (dotted paths).

    >>> config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    True
    """
    return hashlib.sha256(_canonical(drop_keys(normalize(config), ignore_keys)).encode()).hexdigest()


def diff_keys(a: dict, b: dict) -> list[str]:
    """Sorted dotted paths whose values differ (or exist on one side only), compared as canonical JSON.

    >>> diff_keys({"steer": {"p0": 0.9, "layer": 12}}, {"steer": {"p0": 0.8, "layer": 12}, "seed": 0})
    ['seed', 'steer.p0']
    """
    return sorted(_diff(normalize(a), normalize(b), ""))


def normalize(config: dict) -> dict:
    """The config as it reads back from JSON (tuples become lists, paths strings); also a deep copy."""
    return json.loads(_canonical(config))


def _canonical(obj: object) -> str:
    """Canonical JSON: sorted keys, no whitespace; ``os.PathLike`` as str; other non-JSON types refused."""

    def default(value: object) -> str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-serializable")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def drop_keys(config: dict, ignore_keys: Iterable[str]) -> dict:
    """A copy of a normalized config without the dotted ``ignore_keys``."""
    out = normalize(config)
    for key in ignore_keys:
        *parents, last = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _diff(a: object, b: object, prefix: str) -> list[str]:
    """Dotted paths under ``prefix`` where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            k
            for key in a.keys() | b.keys()
            for k in _diff(a.get(key, MISSING), b.get(key, MISSING), f"{prefix}{key}.")
        ]
    same = a is not MISSING and b is not MISSING and _canonical(a) == _canonical(b)
    return [] if same else [prefix.rstrip(".")]
