"""The Ray ``run`` job with ``steer.backend = "vllm"`` on SmolLM2: same columns and telemetry as ``hf``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conva.batch.config import load_config
from conva.jobs.runner import run_job

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _cfg(out: Path, *extra: str):
    return load_config(
        REPO / "examples" / "demo.toml",
        [
            f"--output.dir={out}",
            '--data.values=["achievement"]',
            "--data.max_prompts_per_value=6",
            "--steer.max_new_tokens=12",
            "--steer.p0=0.999",
            "--ray.num_workers=1",
            "--vllm.max_num_seqs=8",
            # No gate: every row is steered, so the columns compared below carry ε (a probe gate closed for all
            # six prompts here, leaving ε zero), and extraction is the 92 pair texts alone, not 397 with the
            # gate's texts. The vLLM backend's gate is checked against HF's in test_vllm and test_vllm_plugin.
            "--gate.kind=none",
            *extra,
        ],
    )


def test_run_job_with_vllm_backend_writes_what_hf_writes(tmp_path, ray_session):
    run_job("run", _cfg(tmp_path))
    hf = pq.read_table(tmp_path / "generations").sort_by("row_id")
    run_job("steer", _cfg(tmp_path, "--steer.backend=vllm"), overwrite=True)
    vl = pq.read_table(tmp_path / "generations").sort_by("row_id")
    assert vl.schema == hf.schema and vl.num_rows == hf.num_rows == 6
    assert vl.column("row_id").equals(hf.column("row_id"))
    assert vl.column("error").null_count == 6
    assert vl.column("gate_open").to_pylist() == hf.column("gate_open").to_pylist()
    assert all(max(e) > 0 for e in hf.column("eps").to_pylist())  # every row steered: the comparison bites
    for a, b in zip(vl.column("eps").to_pylist(), hf.column("eps").to_pylist()):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert all(t for t in vl.column("output").to_pylist())
