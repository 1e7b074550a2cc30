"""The value vector bundle: everything needed to steer one model towards one value, on disk.

A bundle is a directory of two files, loaded without pickle:

* ``vectors.safetensors``: ``w`` float32 ``[L, d]`` (probe weights; ``v_l = w_l / ‖w_l‖``), ``b`` float32
  ``[L]`` (intercepts), ``layers`` int64 ``[L]`` (block indices probed), ``train_acc`` / ``val_acc`` /
  ``test_acc`` float32 ``[L]`` (``val_acc`` chose the band; older bundles lack it), ``caa`` float32
  ``[L, d]`` (mean positive − negative activation, for the CAA baseline) and, for a probe gate,
  ``gate_w`` float32 ``[d]``.
* ``meta.json``: format version, model name and fingerprint, hidden size and block count, value, site,
  position, chosen band, default P0, the gate (kind, layer, intercept, threshold, its calibrate and test
  figures, whether it met its target), the probes that did not converge, dataset hash, creation time and
  the sha256 of every tensor.

Loading checks shapes, finiteness and the tensor hashes (a tampered bundle is refused), and, when given,
that the bundle was made for the model at hand.

Example:
    >>> save_bundle(bundle, "out/bundles/power")                                  # doctest: +SKIP
    >>> b = load_bundle("out/bundles/power", fingerprint=model_fingerprint(model))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from conva.files import atomic_write
from conva.gates import Gate
from conva.values import check_value

__all__ = [
    "FORMAT_VERSION",
    "BUNDLE_FILES",
    "BundleError",
    "ValueBundle",
    "encode_bundle",
    "decode_bundle",
    "save_bundle",
    "load_bundle",
]

FORMAT_VERSION = 1
BUNDLE_FILES = ("meta.json", "vectors.safetensors")


class BundleError(ValueError):
    """A bundle that cannot be used: unreadable, tampered with, or made for another model."""


@dataclass(frozen=True)
class ValueBundle:
    """Probes, band, gate and provenance for one (model, value). Arrays are float32 unless noted."""

    value: str
    model_name: str
    fingerprint: str
    hidden_size: int
    n_blocks: int
    layers: np.ndarray  # int64 [L]
    w: np.ndarray  # [L, d]
    b: np.ndarray  # [L]
    train_acc: np.ndarray
    test_acc: np.ndarray
    caa: np.ndarray  # [L, d]
    band: tuple[int, ...]
    p0: float
    gate: Gate = field(default_factory=Gate)
    position: str = "last"
    chat_template: bool = False
    dataset_hash: str = ""
    created: str = ""
    extra: dict = field(default_factory=dict)
    val_acc: np.ndarray | None = None  # [L]: the accuracy the band was chosen on (None in older bundles)

    def rows(self, layers: tuple[int, ...] | None = None) -> np.ndarray:
        """Row indices into ``w``/``b`` of ``layers`` (default: the band), in that order."""
        wanted = self.band if layers is None else layers
        index = {int(l): i for i, l in enumerate(self.layers)}
        missing = [l for l in wanted if l not in index]
        if missing:
            raise BundleError(f"bundle for {self.value!r} has no probe at layer(s) {missing}")
        return np.asarray([index[l] for l in wanted], dtype=np.int64)

    def with_band(self, band: tuple[int, ...]) -> "ValueBundle":
        """A copy steering ``band`` instead (every layer of it must have been probed)."""
        self.rows(band)
        return replace(self, band=tuple(band))


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _tensors(bundle: ValueBundle) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {
        "w": bundle.w.astype(np.float32),
        "b": bundle.b.astype(np.float32),
        "layers": bundle.layers.astype(np.int64),
        "train_acc": bundle.train_acc.astype(np.float32),
        "test_acc": bundle.test_acc.astype(np.float32),
        "caa": bundle.caa.astype(np.float32),
    }
    if bundle.val_acc is not None:
        tensors["val_acc"] = bundle.val_acc.astype(np.float32)
    if bundle.gate.w is not None:
        tensors["gate_w"] = bundle.gate.w.astype(np.float32)
    return tensors


def _meta(bundle: ValueBundle, tensors: dict[str, np.ndarray]) -> dict:
    g = bundle.gate
    return {
        "format_version": FORMAT_VERSION,
        "model_name": bundle.model_name,
        "fingerprint": bundle.fingerprint,
        "hidden_size": bundle.hidden_size,
        "n_blocks": bundle.n_blocks,
        "value": bundle.value,
        "site": "residual stream after block (HF hidden_states[l+1])",
        "position": bundle.position,
        "chat_template": bundle.chat_template,
        "band": list(bundle.band),
        "p0": bundle.p0,
        "test_acc": [round(float(a), 6) for a in bundle.test_acc],
        "gate": {
            "kind": g.kind,
            "threshold": g.threshold,
            "layer": g.layer,
            "b": g.b,
            "model": g.model,
            "labels": list(g.labels),
            "target": g.target,
            "target_value": g.target_value,
            "heldout": g.heldout,
            "calibration": g.calibration,
            "target_met": g.target_met,
        },
        "dataset_hash": bundle.dataset_hash,
        "created": bundle.created,
        "extra": bundle.extra,
        "tensor_sha256": {k: _sha(v) for k, v in sorted(tensors.items())},
    }


def encode_bundle(bundle: ValueBundle) -> dict[str, bytes]:
    """The bundle's two files as bytes, keyed by name (:data:`BUNDLE_FILES`): what any storage writes."""
    tensors = _tensors(bundle)
    meta = json.dumps(_meta(bundle, tensors), indent=2, sort_keys=True)
    return {"meta.json": meta.encode("utf-8"), "vectors.safetensors": save_safetensors(tensors)}


def save_bundle(bundle: ValueBundle, path: str | Path) -> Path:
    """Write ``bundle`` to the local directory ``path`` (created; **existing files there are replaced**)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(encode_bundle(bundle).items(), reverse=True):  # meta.json last
        atomic_write(path / name, data)
    return path


def _check_tensors(path: str | Path, meta: dict, t: dict[str, np.ndarray]) -> None:
    for name in ("w", "b", "layers", "train_acc", "test_acc", "caa"):
        if name not in t:
            raise BundleError(f"{path}: tensor {name!r} is missing")
    n, d = meta["n_blocks"], meta["hidden_size"]
    L = t["layers"].shape[0] if t["layers"].ndim == 1 else -1
    shapes = {"w": (L, d), "b": (L,), "train_acc": (L,), "test_acc": (L,), "caa": (L, d)}
    if "val_acc" in t:
        shapes["val_acc"] = (L,)
    if "gate_w" in t:
        shapes["gate_w"] = (d,)
    for name, shape in shapes.items():
        if t[name].shape != shape:
            raise BundleError(f"{path}: tensor {name!r} has shape {t[name].shape}, expected {shape}")
    for name, arr in t.items():
        # A held-out accuracy is NaN when nothing was held out; every other value must be finite.
        bad = np.isinf(arr) if name.endswith("_acc") else ~np.isfinite(arr)
        if np.any(bad):
            raise BundleError(f"{path}: tensor {name!r} holds NaN or infinite values")
    if L == 0 or np.any((t["layers"] < 0) | (t["layers"] >= n)):
        raise BundleError(f"{path}: layers {t['layers'].tolist()} do not fit a model of {n} blocks")
    expected = meta.get("tensor_sha256", {})
    for name, arr in t.items():
        if expected.get(name) != _sha(arr):
            raise BundleError(
                f"{path}: tensor {name!r} does not match the hash in meta.json (tampered or torn)"
            )


def load_bundle(
    path: str | Path, *, fingerprint: str | None = None, hidden_size: int | None = None
) -> ValueBundle:
    """Read and verify a bundle from a local directory; with ``fingerprint``/``hidden_size``, refuse one made for another model."""
    path = Path(path)
    try:
        files = {name: (path / name).read_bytes() for name in BUNDLE_FILES}
    except OSError as exc:
        raise BundleError(f"{path}: not a readable bundle ({type(exc).__name__}: {exc})") from exc
    return decode_bundle(files, str(path), fingerprint=fingerprint, hidden_size=hidden_size)


def _decode_gate(g: dict, weights: np.ndarray | None) -> Gate:
    """The gate stored in a bundle's ``meta.json`` (``weights``: its probe's ``gate_w`` tensor, if any)."""
    return Gate(
        g["kind"],
        g["threshold"],
        g["layer"],
        weights,
        g["b"],
        g["model"],
        tuple(g["labels"]),
        g["target"],
        g["target_value"],
        g["heldout"],
        g.get("calibration", {}),
        g.get("target_met"),
    )


def decode_bundle(
    files: dict[str, bytes], where: str, *, fingerprint: str | None = None, hidden_size: int | None = None
) -> ValueBundle:
    """A verified bundle from its files' bytes (``where`` names it in errors); see :func:`load_bundle`."""
    try:
        meta = json.loads(files["meta.json"])
        tensors = load_safetensors(files["vectors.safetensors"])
    except (KeyError, ValueError, SafetensorError) as exc:  # a torn or foreign file (a pickle) is refused
        raise BundleError(f"{where}: not a readable bundle ({type(exc).__name__}: {exc})") from exc
    path = where
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    _check_tensors(path, meta, tensors)
    if hidden_size is not None and hidden_size != meta["hidden_size"]:
        raise BundleError(f"{path}: made for hidden size {meta['hidden_size']}, the model has {hidden_size}")
    if fingerprint is not None and fingerprint != meta["fingerprint"]:
        raise BundleError(
            f"{path}: made for model {meta['model_name']!r} (fingerprint {meta['fingerprint']}), "
            f"not for the loaded model (fingerprint {fingerprint})"
        )
    gate = _decode_gate(meta["gate"], tensors.get("gate_w"))
    bundle = ValueBundle(
        value=check_value(meta["value"]),
        model_name=meta["model_name"],
        fingerprint=meta["fingerprint"],
        hidden_size=meta["hidden_size"],
        n_blocks=meta["n_blocks"],
        layers=tensors["layers"],
        w=tensors["w"],
        b=tensors["b"],
        train_acc=tensors["train_acc"],
        test_acc=tensors["test_acc"],
        caa=tensors["caa"],
        band=tuple(meta["band"]),
        p0=float(meta["p0"]),
        gate=gate,
        position=meta["position"],
        chat_template=bool(meta["chat_template"]),
        dataset_hash=meta["dataset_hash"],
        created=meta["created"],
        extra=meta.get("extra", {}),
        val_acc=tensors.get("val_acc"),
    )
    bundle.rows()  # the band must be among the probed layers
    return bundle
