"""Shared fixtures: tiny random models for exact math, SmolLM2 for behaviour.

Tests split by cost: fast by default, ``@pytest.mark.slow`` for real-model and Ray-cluster tests (CI
runs both). Paths to the paper's data come from ``CONVA_PAPER_DATA`` or ``../shared/data/conva``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
