"""Jobs fail fast, before Ray or any worker starts, with one line naming the key, and write nothing.

No Ray here: every case must fail in the pre-flight checks (``connect_ray`` and ``start_actors`` are
replaced by functions that fail the test if reached).
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pyarrow as pa
import pytest

from conva.jobs import cli, runner
from conva.jobs.runner import main
from conva.tiny import make_tiny_model
from conva.workers.backends import BACKENDS, check_backend, make_steerer, register_backend
from conva.workers.contract import RowContractError, check_rows

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.toml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def fail(*_a, **_k):
        raise AssertionError("Ray or a worker was started")

    monkeypatch.setattr(runner, "connect_ray", fail)
    monkeypatch.setattr(runner, "WorkerPool", fail)


def _fails(capsys, job: str, *argv: str) -> str:
    start = time.monotonic()
    assert main(job, ["--config", TINY, *argv]) == 2
    assert time.monotonic() - start < 20
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_model_path(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    line = _fails(capsys, "run", f"--model.name={tmp_path / 'no-such-model'}", f"--output.dir={out}")
    assert "model.name" in line and "no-such-model" in line
    assert not out.exists()


def test_unreadable_inputs(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    line = _fails(
        capsys,
        "extract",
        f"--model.name={tiny}",
        f"--output.dir={out}",
        f"--data.pairs={tmp_path / 'nope.jsonl'}",
    )
    assert line.startswith("conva extract: error: data.pairs:") and "no such file" in line
    broken = tmp_path / "prompts.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    line = _fails(capsys, "run", f"--model.name={tiny}", f"--output.dir={out}", f"--data.prompts={broken}")
    assert "data.prompts:" in line and "Parquet" in line
    line = _fails(
        capsys,
        "run",
        f"--model.name={tiny}",
        f"--output.dir={out}",
        f"--data.prompts={tmp_path / 'gone.jsonl'}",
    )
    assert "data.prompts:" in line and "gone.jsonl" in line
    assert not out.exists()


def test_output_folder_not_writable(tiny, tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _fails(capsys, "run", f"--model.name={tiny}", f"--output.dir={blocker / 'out'}")
    assert "output.dir" in line and "not writable" in line
    assert blocker.read_text() == "not a folder"


def test_steer_or_fit_without_the_earlier_stage(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert "run `conva extract` first" in _fails(capsys, "fit", f"--model.name={tiny}", f"--output.dir={out}")
    assert "run `conva fit` first" in _fails(capsys, "steer", f"--model.name={tiny}", f"--output.dir={out}")
    assert not out.exists()


def test_validate_names_the_bad_key(tiny, tmp_path, capsys) -> None:
    assert (
        cli.main(["validate", "--config", TINY, f"--model.name={tiny}", f"--output.dir={tmp_path / 'o'}"])
        == 0
    )
    assert "conva validate: ok" in capsys.readouterr().out
    for arg, key in [
        ("--steer.p0=2", "steer.p0"),
        ("--ray.max_restarts=-1", "ray.max_restarts"),
        ("--steer.bogus=1", "steer.bogus"),
        ("--model.name=/no/such", "model.name"),
    ]:
        argv = ["validate", "--config", TINY, f"--model.name={tiny}", arg]
        assert cli.main(argv) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_usage(capsys) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in ("run", "extract", "fit", "steer", "study", "validate", "report", "config"):
        assert any(line.split()[:1] == [command] for line in err.splitlines()), command


def test_vllm_backend_absent_fails_clearly(tiny, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "conva.steering.vllm", types.ModuleType("conva.steering.vllm"))
    with pytest.raises(NotImplementedError, match="steer.backend: 'vllm' is not available"):
        check_backend("vllm")
    line = _fails(
        capsys, "run", f"--model.name={tiny}", f"--output.dir={tmp_path / 'o'}", "--steer.backend=vllm"
    )
    assert "steer.backend" in line


def test_backend_registry_builds_by_name(monkeypatch) -> None:
    monkeypatch.setitem(BACKENDS, "fake", lambda cfg: ("built", cfg))
    cfg = types.SimpleNamespace(steer=types.SimpleNamespace(backend="fake"))
    assert make_steerer(cfg) == ("built", cfg)  # type: ignore[arg-type]
    from conva.batch import registry

    monkeypatch.setattr(
        registry, "BACKEND_NAMES", dict(registry.BACKEND_NAMES)
    )  # the name goes with the test
    assert register_backend("fake2")(len) is len and BACKENDS.pop("fake2") is len
    assert "fake2" in registry.backend_names()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        check_backend("nope")


def test_row_contract() -> None:
    rows = pa.table({"row_id": ["a", "b", "c"]})
    assert check_rows("steer", 0, rows, rows) is rows
    with pytest.raises(RowContractError, match="steer shard 7: .*missing: b"):
        check_rows("steer", 7, rows, pa.table({"row_id": ["a", "c"]}))
    with pytest.raises(RowContractError, match="unexpected: a"):
        check_rows("steer", 0, rows, pa.table({"row_id": ["a", "a", "b", "c"]}))
    with pytest.raises(RowContractError, match="unexpected: z"):
        check_rows("steer", 0, rows, pa.table({"row_id": ["a", "b", "c", "z"]}))
    doubled = pa.table({"row_id": ["a", "b", "c"] * 2})
    assert check_rows("extract", 0, rows, doubled, per_row=2) is doubled
    with pytest.raises(RowContractError, match="duplicate input row ids"):
        check_rows("steer", 0, pa.table({"row_id": ["a", "a"]}), pa.table({"row_id": ["a", "a"]}))


def test_a_relative_output_is_made_absolute_here_and_refused_under_ray_job_submit(
    tiny, tmp_path, monkeypatch, capsys
) -> None:
    from conva.batch.config import load_config
    from conva.jobs.common import output_location

    monkeypatch.chdir(tmp_path)
    cfg, out = output_location(load_config(TINY, [f"--model.name={tiny}", "--output.dir=runs/x"]))
    assert out.uri == cfg.output.dir == str(tmp_path / "runs" / "x")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_1"}}')
    line = _fails(capsys, "run", f"--model.name={tiny}", "--output.dir=runs/x")
    assert "output.dir: 'runs/x' is relative; under `ray job submit`" in line and "every node" in line
    assert not (tmp_path / "runs").exists()


def test_an_s3_output_whose_bucket_is_missing_fails_before_anything(tiny, s3_env, capsys) -> None:
    line = _fails(capsys, "run", f"--model.name={tiny}", "--output.dir=s3://no-such-bucket/runs/x")
    assert line == "conva run: error: output.dir: the bucket of s3://no-such-bucket/runs/x does not exist"


def test_multi_gpu_workers_are_planned_and_refused_where_they_cannot_work(tiny, tmp_path, capsys) -> None:
    from conva.batch.config import load_config
    from conva.jobs.preflight import check_gpu_fit, model_bytes

    line = _fails(
        capsys,
        "run",
        f"--model.name={tiny}",
        f"--output.dir={tmp_path / 'o'}",
        "--steer.backend=vllm",
        "--ray.num_gpus_per_worker=2",
    )
    assert "tensor parallelism" in line and 'steer.backend = "hf"' in line
    cfg = load_config(TINY, [f"--model.name={tiny}", "--model.device=cuda", "--ray.num_gpus_per_worker=2"])
    weights = model_bytes(cfg)
    stored = sum(p.stat().st_size for p in Path(tiny).glob("*.safetensors"))
    assert weights == stored  # float32 on disk, float32 asked for
    half = load_config(TINY, [f"--model.name={tiny}", "--model.dtype=bfloat16"])
    assert model_bytes(half) == stored // 2
    gib = 2**30
    need = weights * 1.2
    check_gpu_fit(
        cfg, {"10.0.0.1": [int(need / 2) + 1, int(need / 2) + 1]}
    )  # two GPUs together hold it: fine
    with pytest.raises(Exception, match=r"ray.num_gpus_per_worker: .* gets 2 GPU\(s\) of .* GiB"):
        check_gpu_fit(cfg, {"10.0.0.1": [int(need / 2) - 1] * 2})
    one = load_config(TINY, [f"--model.name={tiny}", "--model.device=cuda", "--ray.num_gpus_per_worker=1"])
    with pytest.raises(Exception, match="node 10.0.0.2"):
        check_gpu_fit(one, {"10.0.0.1": [8 * gib], "10.0.0.2": [int(need) - 1]})
    check_gpu_fit(one, {"10.0.0.1": []})  # a node whose GPUs are unknown is not refused


def test_a_worker_given_several_gpus_spreads_its_model_and_records_the_same_activations(
    tiny, monkeypatch
) -> None:
    """A worker with k > 1 GPUs loads with ``device_map="auto"`` (spread over the GPUs Ray gives it, all on one
    node); on this CPU machine every block lands on the CPU, and the activations are those of a plain load."""
    from conva import models
    from conva.batch.config import load_config
    from conva.batch.extraction import extract_table, extraction_rows
    from conva.workers.tasks import WorkerSpec
    from conva.workers.worker import ModelWorker

    asked, real = [], models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda *a, **k: asked.append(k.get("device_map")) or real(*a, **k)
    )
    rows = extraction_rows(load_config(TINY, [f"--model.name={tiny}", '--data.values=["power"]'])).slice(0, 8)
    got = {}
    for gpus in ("0.5", "2"):
        cfg = load_config(TINY, [f"--model.name={tiny}", f"--ray.num_gpus_per_worker={gpus}"])
        model, tok = ModelWorker(WorkerSpec(cfg)).hf()
        got[gpus] = extract_table(model, tok, rows, range(4), "last", 8)
    assert asked == [None, "auto"] and got["0.5"].equals(got["2"])
