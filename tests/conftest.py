"""Shared fixtures: tiny random models for exact math, SmolLM2 for behaviour.

Tests split by cost: fast by default, ``@pytest.mark.slow`` for real-model and Ray-cluster tests (CI
runs both). Paths to the paper's data come from ``CONVA_PAPER_DATA`` or ``../shared/data/conva``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = Path(os.environ.get("CONVA_PAPER_DATA", REPO.parent / "shared" / "data" / "conva"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real-model or Ray-cluster test (CI runs these too)")


@pytest.fixture(scope="session")
def paper_data() -> Path:
    if not PAPER_DATA.is_dir():
        pytest.fail(f"the paper's data folder is missing: {PAPER_DATA} (set CONVA_PAPER_DATA)")
    return PAPER_DATA


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama (4 blocks, hidden 256, head_dim 64) with an offline-trained tokenizer."""
    from conva.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny(tiny_path: str):
    from conva.models import load_model

    return load_model(tiny_path)


@pytest.fixture(scope="session")
def tiny_bundles(tiny):
    """Bundles fitted on the tiny model's activations of demo data.

    Returns ``(open_gate, other_value, closed_gate)``: a probe-gated bundle whose gate opens for every
    prompt, another value's bundle, and the first with a gate that never opens.
    """
    from dataclasses import replace

    from conva.config import load_config
    from conva.fit import ModelInfo
    from conva.models import model_fingerprint
    from conva.pipeline import extract_table, extraction_rows, fit_bundles

    model, tok = tiny
    cfg = load_config(None, ['--data.values=["power", "benevolence"]', "--fit.band=1-3", "--fit.p0=0.95",
                             "--gate.other_pairs_per_value=8"])
    rows = extraction_rows(cfg)
    layers = list(range(model.config.num_hidden_layers))
    acts = extract_table(model, tok, rows, layers, "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(len(layers), rows.num_rows, -1)
    info = ModelInfo("tiny", model_fingerprint(model), model.config.hidden_size, len(layers))
    bundles = fit_bundles(rows, lambda l: matrix[l], layers, cfg, info)
    power, benevolence = bundles["power"], bundles["benevolence"]
    always = replace(power, gate=replace(power.gate, threshold=0.0))
    never = replace(power, gate=replace(power.gate, threshold=2.0))
    return always, benevolence, never
