"""The Ray Data LLM example on SmolLM2: a Parquet of prompts in, every row out exactly once, steered rows
with the engine's telemetry (ε, P0 reached), unsteered rows without, steered answers differing.

Runs ``examples/ray_data_llm.py`` as a user would, in its own process with its own local Ray (so this
test does not share the session's Ray); the engine runs in a Ray Data actor and loads the plugin by its
entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed")

from tests.test_vllm_serve import _smollm2_bundle  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Should I take the job offer abroad or stay near my family?",
    "What is the capital of France?",
    "How do I become rich quickly?",
]


def test_ray_data_llm_example_writes_every_row_once_with_telemetry(tmp_path: Path) -> None:
    bundle = _smollm2_bundle(tmp_path / "achievement")
    cells = [(q, p0) for q in QUESTIONS for p0 in (None, 0.95)]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(
        pa.table(
            {
                "row_id": list(range(len(cells))),
                "prompt": [q for q, _ in cells],
                "p0": pa.array([p for _, p in cells], pa.float64()),
            }
        ),
        prompts,
    )
    from conva.models import resolve_model

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine as Ray Data LLM runs it
    out = tmp_path / "generations"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "ray_data_llm.py"), "--model", resolve_model("smollm2"),
         "--bundle", bundle, "--prompts", str(prompts), "--out", str(out), "--telemetry", str(tmp_path / "tel"),
         "--max-tokens", "12", "--num-cpus", "4"],
        env=env, check=True, timeout=900, capture_output=True,
    )  # fmt: skip
    rows = pq.read_table(out).sort_by("row_id").to_pylist()
    assert [r["row_id"] for r in rows] == list(range(len(cells)))
    for r, (q, p0) in zip(rows, cells):
        assert r["prompt"] == q and r["output"]
        if p0 is None:
            assert r["eps"] is None and r["gate_open"] is None
        else:
            assert r["error"] is None and r["gate_open"] is True and len(r["eps"]) == 11
            assert max(r["eps"]) > 0 and min(r["p_after"]) >= p0 - 1e-4
    by_prompt = {q: [r["output"] for r in rows if r["prompt"] == q] for q in QUESTIONS}
    assert any(plain != steered for plain, steered in by_prompt.values())
