"""The Ray jobs in one process against one embedded Ray: parity, resume, bad rows, fail-fast, retries.

One Ray is started for the module (``ray.init`` costs ~6 s and ~700 MB here) through the jobs' own
``connect_ray``, so the loopback-only binding it promises is what these tests run on. Every job uses
a tiny random Llama; one value keeps the shard count small.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle
import torch

import jobs  # noqa: F401  (sets the loopback-only Ray environment before ray starts)
from conva.config import load_config
from conva.models import load_model
from conva.pipeline import extract_table, extraction_rows
from conva.store import shard_ranges
from conva.tiny import make_tiny_model
from jobs import stages
from jobs.common import JobError, connect_ray
from jobs.runner import main, run_job
from workers.contract import RowContractError
from workers.pool import ShardFailedError, actor_options, run_shards, stop_actors

pytestmark = pytest.mark.slow  # a real (embedded) Ray and actors: ~2 minutes on the 2-core machine

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"
ROWS_PER_SHARD = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"a": make_tiny_model(root / "a", seed=0), "b": make_tiny_model(root / "b", seed=1)}


def _cfg(model: str, out: Path, *extra: str):
    return load_config(TINY, [f"--model.name={model}", f"--output.dir={out}", '--data.values=["power"]',
                              f"--ray.rows_per_shard={ROWS_PER_SHARD}", *extra])


@pytest.fixture(scope="module")
def ray_session(models):
    connect_ray(_cfg(models["a"], Path("/nonexistent")))
    yield
    ray.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(out: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, _sha(p)) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def extracted(ray_session, models, tmp_path_factory):
    """Two actors extract; the driver stops after 2 commits; the rerun finishes. Returns what each run saw."""
    out = tmp_path_factory.mktemp("extract")
    cfg = _cfg(models["a"], out, "--ray.num_workers=2")
    os.environ[stages.STOP_AFTER_COMMITS_ENV] = "2"
    try:
        with pytest.raises(SystemExit):
            run_job("extract", cfg)
    finally:
        del os.environ[stages.STOP_AFTER_COMMITS_ENV]
    manifest = json.loads((out / "activations" / "_manifest.json").read_text())
    first = _files(out / "activations")
    [result] = run_job("extract", cfg)
    return dict(cfg=cfg, out=out, interrupted=[s["shard"] for s in manifest["shards"]], first=first, result=result)


def test_two_actors_match_single_process_extraction(extracted, models) -> None:
    cfg, out = extracted["cfg"], extracted["out"]
    rows = extraction_rows(cfg)
    model, tok = load_model(models["a"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (one CPU each), so the float sums run in the same order
    try:
        for shard, (start, stop) in enumerate(shard_ranges(rows.num_rows, ROWS_PER_SHARD)):
            expected = extract_table(model, tok, rows.slice(start, stop - start), range(4), "last", cfg.extract.batch_size)
            got = pq.read_table(out / "activations" / f"part-{shard:05d}.parquet")
            assert got.replace_schema_metadata(None).equals(expected), f"shard {shard} differs"
    finally:
        torch.set_num_threads(threads)


def test_resume_processes_only_missing_shards(extracted) -> None:
    n_shards = len(shard_ranges(extraction_rows(extracted["cfg"]).num_rows, ROWS_PER_SHARD))
    assert len(extracted["interrupted"]) == 2 < n_shards
    assert extracted["result"].processed == n_shards - 2
    after = _files(extracted["out"] / "activations")
    for shard in extracted["interrupted"]:  # committed before the stop: never rewritten
        name = f"part-{shard:05d}.parquet"
        assert after[name] == extracted["first"][name]
    table = ds.dataset(extracted["out"] / "activations").to_table(columns=["row_id", "layer"])
    ids = extraction_rows(extracted["cfg"]).column("row_id").to_pylist()
    counts = table.group_by("row_id").aggregate([("layer", "count_distinct"), ("layer", "count")]).to_pylist()
    assert sorted(c["row_id"] for c in counts) == sorted(ids)
    assert all(c["layer_count"] == c["layer_count_distinct"] == 4 for c in counts)


def test_finished_job_rerun_does_nothing(extracted, monkeypatch) -> None:
    monkeypatch.setattr(stages, "start_actors", _no_actors)
    before = _files(extracted["out"] / "activations")
    start = time.monotonic()
    [result] = run_job("extract", extracted["cfg"])
    assert result.processed == 0 and time.monotonic() - start < 3
    assert _files(extracted["out"] / "activations") == before


@pytest.fixture(scope="module")
def fitted(extracted):
    [result] = run_job("fit", extracted["cfg"])
    assert result.processed == 1
    return extracted


PROMPTS = ["Should I take the job abroad even though my family wants me to stay?",
           "Is it right to break a rule to help a friend?", "What is the capital of France?",
           "Should I spend my savings on a long trip?", "How many legs does a spider have?"]
# Each bad row and the reason it must come back with (a substring of the error column).
BAD = [
    ({"value": "power", "prompt": ""}, "empty prompt"),
    ({"value": "power", "prompt": " \t\n "}, "whitespace only"),
    ({"value": "power", "prompt": "word " * 2000}, "tokens > limit"),
    ({"value": "power", "prompt": "x" * 1_000_000}, "characters (limit"),
    ({"value": "power", "prompt": "a\x00b"}, "NUL"),
    ({"value": "power", "prompt": 42}, "prompt is int"),
    ({"value": "power", "prompt": None}, "prompt is NoneType"),
    ({"value": "tradition", "prompt": PROMPTS[0]}, "no bundle for value 'tradition'"),
]
INVALID_UTF8 = b'{"value": "power", "prompt": "caf\xe9 \xff"}\n'


def _write_prompts(path: Path, bad: bool) -> Path:
    with open(path, "wb") as fh:
        for i, prompt in enumerate(PROMPTS):
            fh.write(json.dumps({"value": "power", "prompt": prompt}).encode() + b"\n")
            if bad and i < len(BAD):
                fh.write(json.dumps(BAD[i][0]).encode() + b"\n")
        if bad:
            for row, _ in BAD[len(PROMPTS):]:
                fh.write(json.dumps(row).encode() + b"\n")
            fh.write(INVALID_UTF8)
    return path


def test_bad_rows_become_error_rows_and_the_rest_match_a_clean_run(fitted, tmp_path) -> None:
    cfg = lambda src, *x: _cfg(fitted["cfg"].model.name, fitted["out"], f"--data.prompts={src}",
                               "--steer.batch_size=1", "--ray.steer_rows_per_shard=4", *x)  # extraction: 64
    clean = _write_prompts(tmp_path / "clean.jsonl", bad=False)
    run_job("steer", cfg(clean))
    ok = ds.dataset(fitted["out"] / "generations").to_table()
    bad = _write_prompts(tmp_path / "bad.jsonl", bad=True)
    [result] = run_job("steer", cfg(bad), overwrite=True)
    got = ds.dataset(fitted["out"] / "generations").to_table()
    n_in = len(PROMPTS) + len(BAD) + 1
    assert result.rows == got.num_rows == n_in and len(set(got.column("row_id").to_pylist())) == n_in
    assert result.shards == -(-n_in // 4)  # steering shards follow ray.steer_rows_per_shard, not rows_per_shard
    errors = [r for r in got.to_pylist() if r["error"] is not None]
    reasons = [r["error"] for r in errors]
    assert len(errors) == len(BAD) + 1 and len(set(reasons)) == len(reasons)
    for _, expected in BAD:
        assert sum(expected in e for e in reasons) == 1, (expected, reasons)
    assert sum("invalid UTF-8" in e for e in reasons) == 1
    assert all(r["output"] is None for r in errors)
    drop = ["row_id"]
    good = sorted((r for r in got.drop_columns(drop).to_pylist() if r["error"] is None), key=lambda r: r["prompt"])
    assert good == sorted(ok.drop_columns(drop).to_pylist(), key=lambda r: r["prompt"])


def _no_actors(*_args, **_kwargs):
    raise AssertionError("a worker was started")


def test_bundle_for_another_model_fails_before_any_worker(fitted, models, monkeypatch, capsys) -> None:
    monkeypatch.setattr(stages, "start_actors", _no_actors)
    out = fitted["out"]
    before = _files(out)
    start = time.monotonic()
    code = main("steer", ["--config", str(TINY), f"--model.name={models['b']}", f"--output.dir={out}",
                          '--data.values=["power"]', f"--ray.rows_per_shard={ROWS_PER_SHARD}"])
    assert code == 2 and time.monotonic() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not for the loaded model" in err[0] and "model.name" in err[0]
    assert _files(out) == before


def test_config_change_is_refused_naming_keys(fitted, monkeypatch, capsys) -> None:
    monkeypatch.setattr(stages, "start_actors", _no_actors)
    before = _files(fitted["out"])
    argv = ["--config", str(TINY), f"--model.name={fitted['cfg'].model.name}", f"--output.dir={fitted['out']}",
            '--data.values=["power"]', f"--ray.rows_per_shard={ROWS_PER_SHARD}", "--probe.C=0.5",
            "--extract.position=mean"]
    assert main("fit", argv) == 2  # reads the activations, writes the bundles: both were made differently
    err = capsys.readouterr().err
    assert "differing keys: extract.position, probe.C" in err and "--overwrite" in err
    assert _files(fitted["out"]) == before


def test_embedded_ray_listens_on_loopback_only(ray_session) -> None:
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    pids = {p.pid for p in procs}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids}
    assert listening, "found no Ray sockets to check"
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


class _Flaky:
    """A stand-in worker (no model): dies once on shard 1, always on shard 3 when told, breaks the contract on 5."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def work(self, shard: int, always_die: bool) -> list[int]:
        import os as _os
        from pathlib import Path as _Path

        first = not _Path(f"{self.marker}-{shard}").exists()
        _Path(f"{self.marker}-{shard}").touch()
        if (shard == 1 and first) or (shard == 3 and always_die):
            _os._exit(1)  # the process dies, as an engine crash would take it down
        if shard == 5:
            raise RowContractError("steer shard 5: 4 input rows should give 4 output rows, got 3")
        return [shard]


def test_dead_worker_is_restarted_and_its_shard_retried_a_bounded_number_of_times(ray_session, tmp_path) -> None:
    # By value: the stand-in's worker process then never imports this module (and torch with it).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config(TINY, ["--model.name=x", "--ray.max_restarts=2", "--ray.max_task_retries=1",
                             "--ray.num_cpus_per_worker=0.5"])
    opts = actor_options(cfg)
    # Ray restarts the actor; the driver (run_shards) retries the call, so Ray must not retry it too.
    assert opts == dict(num_cpus=0.5, num_gpus=0.0, max_restarts=2, max_task_retries=0)
    actor = ray.remote(_Flaky).options(**opts).remote(str(tmp_path / "m"))
    try:
        got = dict(run_shards([actor], "work", "test", [0, 1, 2], lambda s: (False,), retries=1))
        assert got == {0: [0], 1: [1], 2: [2]}  # shard 1 killed its worker once and was retried
        with pytest.raises(ShardFailedError, match="test shard 3 failed: its worker died on each of 2 attempt"):
            list(run_shards([actor], "work", "test", [3], lambda s: (True,), retries=1))
    finally:
        stop_actors([actor])
    actor = ray.remote(_Flaky).options(**opts).remote(str(tmp_path / "n"))
    try:
        with pytest.raises(ShardFailedError, match="test shard 5 failed: RowContractError"):
            list(run_shards([actor], "work", "test", [5], lambda s: (False,), retries=1))
    finally:
        stop_actors([actor])
