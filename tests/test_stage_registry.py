"""A new stage is one declaration: registered once, it is run, resumed and explained with no other edit.

The stage here ("lengths") is declared only in this file: one input row per value of ``data.values``
(a generated input, one row per shard), and a worker function writing each value's length. It runs on
real Ray with a real model worker (the tiny model, ``steer.backend = "hf"``), through the same
``run_job`` and ``conva validate`` every built-in stage goes through; its output is checked against an
independent recomputation, a second run does no work and leaves the committed bytes as they were.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conva.batch.config import load_config
from conva.batch.inputs import read_table_slice
from conva.batch.store import ShardRecord, write_table_shard
from conva.jobs.cli import main as cli_main
from conva.jobs.planning import generated
from conva.jobs.registry import StageDecl, declared, job_names, registered, stage_decl
from conva.jobs.runner import run_job
from conva.jobs.stages import StageSpec, shard_config
from conva.models import model_name
from conva.workers.tasks import ShardTask

pytestmark = pytest.mark.slow  # a real (embedded) Ray and a model worker

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.toml"
VALUES = ["power", "security", "achievement"]


def _plan(decl: StageDecl, cfg, screened) -> StageSpec:
    table = pa.table({"row_id": pa.array(range(len(cfg.data.values)), pa.int64()), "value": cfg.data.values})
    inp = generated(table, 1)
    config = {**decl.config(cfg), "shards": shard_config(1, table.num_rows, inp.sha256)}
    return StageSpec(decl.name, decl.folder, config, inp.n_shards, inp)


def _tasks(spec, stages, slices, values):
    return None, lambda ref: ShardTask(spec.name, ref, slice=slices[ref.shard])


def lengths(worker, task: ShardTask) -> ShardRecord:
    """The worker function: each value's length in characters, with the model the worker loaded."""
    rows = read_table_slice(task.input())
    values = rows.column("value").to_pylist()
    out = pa.table(
        {
            "row_id": rows.column("row_id"),
            "value": rows.column("value"),
            "chars": pa.array([len(v) for v in values], pa.int64()),
            "model": pa.array([worker.model_info()["name"]] * len(values), pa.string()),
            "error": pa.array([None] * len(values), pa.string()),
        }
    )
    return write_table_shard(task.ref, out, extra={"errors": 0, "inputs": rows.num_rows})


DECL = StageDecl(
    "lengths", "value_lengths", _tasks, lengths, _plan, keys=("model", "data.values"), input_noun="values"
)


@pytest.fixture
def stage():
    import ray.cloudpickle

    # the worker process imports this test module by value: its functions travel with the task
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with registered(DECL) as decl:
        yield decl
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _committed(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
        if not p.relative_to(folder).parts[0].startswith("_")
    }


def test_a_stage_registered_in_one_place_is_run_resumed_and_explained(
    stage, ray_session, tiny_path, tmp_path, capsys
) -> None:
    argv = [
        f"--model.name={tiny_path}",
        f"--output.dir={tmp_path}",
        f"--data.values={VALUES}".replace("'", '"'),
    ]
    cfg = load_config(TINY, argv)
    assert "lengths" in job_names() and stage_decl("lengths") is stage and declared()[-1] is stage

    [first] = run_job("lengths", cfg)
    assert (first.stage, first.shards, first.processed, first.rows) == ("lengths", 3, 3, 3)
    folder = tmp_path / "value_lengths"
    table = pq.read_table(sorted(folder.glob("*.parquet"))).sort_by("row_id")
    assert table.column("value").to_pylist() == VALUES
    assert table.column("chars").to_pylist() == [len(v) for v in VALUES]
    assert table.column("model").to_pylist() == [model_name(tiny_path)] * 3  # the worker's loaded model
    assert not (tmp_path / "activations").exists()  # the stage needs nothing else: nothing else ran
    committed = _committed(folder)
    assert len(committed) == 3

    [again] = run_job("lengths", cfg)
    assert (again.processed, again.rows) == (0, 0)
    assert _committed(folder) == committed

    capsys.readouterr()
    assert cli_main(["validate", "--config", str(TINY), "--job", "lengths", *argv]) == 0
    out = capsys.readouterr().out
    assert "  value_lengths  3 shards: 3 committed, 0 to run (3 values)" in out.splitlines()
    assert "nothing to run: every shard is committed" in out


def test_a_registered_stage_is_gone_after_its_block_and_names_are_unique() -> None:
    with registered(DECL):
        with pytest.raises(ValueError, match="'lengths' is registered already"):
            from conva.jobs.registry import register_stage

            register_stage(StageDecl("lengths", "x", _tasks, lengths, _plan))
    assert "lengths" not in job_names()
    with pytest.raises(KeyError, match="unknown stage 'lengths'; the stages are extract, fit, steer"):
        stage_decl("lengths")
