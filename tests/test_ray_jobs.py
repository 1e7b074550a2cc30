"""The Ray jobs in one process against one embedded Ray: parity, resume, one model load, parallel fit, bad rows.

The session's Ray (``ray_session`` in conftest) is started through the jobs' own ``connect_ray``, so the
loopback-only binding it promises is what these tests run on. Every job uses a tiny random Llama; one
value keeps the shard count small.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from conva.batch.config import load_config
from conva.batch.extraction import extract_table, extraction_rows, fit_bundles
from conva.batch.store import ShardRecord, shard_ranges
from conva.bundle import load_bundle
from conva.fit import ModelInfo
from conva.jobs import runner
from conva.jobs.runner import main, run_job
from conva.models import load_model, model_fingerprint
from conva.tiny import make_tiny_model
from conva.workers.calls import ShardCall
from conva.workers.scheduler import _Runner
from conva.workers.tasks import StageRun

pytestmark = pytest.mark.slow  # a real (embedded) Ray and actors

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"
ROWS_PER_SHARD = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"a": make_tiny_model(root / "a", seed=0), "b": make_tiny_model(root / "b", seed=1)}


VALUES = '--data.values=["power", "security"]'


def _cfg(model: str, out: Path, *extra: str):
    return load_config(
        TINY,
        [
            f"--model.name={model}",
            f"--output.dir={out}",
            VALUES,
            f"--ray.rows_per_shard={ROWS_PER_SHARD}",
            *extra,
        ],
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(out: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(out)): (p.stat().st_mtime_ns, _sha(p))
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.log"
    }


def _last(log: str, pattern: str) -> re.Match:
    found = list(re.finditer(pattern, log))
    assert found, f"{pattern!r} not in run.log"
    return found[-1]


@pytest.fixture(scope="module")
def extracted(ray_session, models, tmp_path_factory):
    """Two workers extract; the driver stops after 2 commits; the rerun finishes. Returns what each run saw."""
    out = tmp_path_factory.mktemp("extract")
    cfg = _cfg(models["a"], out, "--ray.num_workers=2")
    commits, tally = [], runner._Tally.__call__

    def stop_after_two(self, stage, record):
        tally(self, stage, record)
        commits.append(record.shard)
        if len(commits) == 2:
            raise KeyboardInterrupt  # the driver is interrupted; its commits so far stay

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner._Tally, "__call__", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            run_job("extract", cfg)
    first = _files(out / "activations")
    [result] = run_job("extract", cfg)
    return dict(cfg=cfg, out=out, interrupted=sorted(commits), first=first, result=result)


def test_two_workers_match_single_process_extraction(extracted, models) -> None:
    cfg, out = extracted["cfg"], extracted["out"]
    rows = extraction_rows(cfg)
    model, tok = load_model(models["a"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (one CPU each), so the float sums run in the same order
    try:
        for shard, (start, stop) in enumerate(shard_ranges(rows.num_rows, ROWS_PER_SHARD)):
            expected = extract_table(
                model, tok, rows.slice(start, stop - start), range(4), "last", cfg.extract.batch_size
            )
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
    table = pq.read_table(extracted["out"] / "activations", columns=["row_id", "layer"])
    ids = extraction_rows(extracted["cfg"]).column("row_id").to_pylist()
    counts = table.group_by("row_id").aggregate([("layer", "count_distinct"), ("layer", "count")]).to_pylist()
    assert sorted(c["row_id"] for c in counts) == sorted(ids)
    assert all(c["layer_count"] == c["layer_count_distinct"] == 4 for c in counts)


def _no(*_args, **_kwargs):
    raise AssertionError("Ray or a worker was started")


def test_finished_job_rerun_starts_nothing(extracted, monkeypatch) -> None:
    monkeypatch.setattr(runner, "connect_ray", _no)
    monkeypatch.setattr(runner, "WorkerPool", _no)
    before = _files(extracted["out"] / "activations")
    start = time.monotonic()
    [result] = run_job("extract", extracted["cfg"])
    assert result.processed == 0 and time.monotonic() - start < 5
    after = _files(extracted["out"] / "activations")
    # Every object but the log is untouched; the log gained only this driver's claim on the stage (an open
    # record, folded into a segment when the stage finished), which fences out any driver that opened it before.
    assert {k: v for k, v in after.items() if not k.startswith("_log/")} == {
        k: v for k, v in before.items() if not k.startswith("_log/")
    }
    added = sorted(set(after) - set(before))
    assert len(added) == 1 and added[0].endswith(".segment.json")
    segment = json.loads((extracted["out"] / "activations" / added[0]).read_text())
    assert [r["op"] for r in segment["records"]] == ["open"]


@pytest.fixture(scope="module")
def fitted(extracted):
    [result] = run_job("fit", extracted["cfg"])
    assert result.processed == 2
    return extracted


def test_the_parallel_fit_gives_the_serial_fits_bundles(fitted, models) -> None:
    """Two values fitted at once on two workers: every tensor equals an in-process, one-after-another fit."""
    cfg, out = fitted["cfg"], fitted["out"]
    table = pq.read_table(out / "activations")
    layers = sorted(set(table.column("layer").to_pylist()))
    rows = extraction_rows(cfg)
    by_id = {r: i for i, r in enumerate(rows.column("row_id").to_pylist())}
    order = np.argsort(
        [by_id[r] for r in table.filter(pc.equal(table["layer"], 0)).column("row_id").to_pylist()]
    )
    matrix = {}
    for layer in layers:
        part = table.filter(pc.equal(table["layer"], layer))
        flat = np.asarray(part.column("activation").combine_chunks().flatten()).reshape(part.num_rows, -1)
        matrix[layer] = flat[order]
    model, _ = load_model(models["a"])
    info = ModelInfo("a", model_fingerprint(model), model.config.hidden_size, len(layers))
    serial = fit_bundles(rows, lambda l: matrix[l], layers, cfg, info)
    for value, expected in serial.items():
        got = load_bundle(out / "bundles" / value, fingerprint=info.fingerprint)
        for name in ("w", "b", "caa", "train_acc", "test_acc"):
            assert np.array_equal(getattr(got, name), getattr(expected, name)), (value, name)
        assert got.band == expected.band and got.gate.layer == expected.gate.layer
        assert got.gate.threshold == expected.gate.threshold and np.array_equal(got.gate.w, expected.gate.w)


PROMPTS = [
    "Should I take the job abroad even though my family wants me to stay?",
    "Is it right to break a rule to help a friend?",
    "What is the capital of France?",
    "Should I spend my savings on a long trip?",
    "How many legs does a spider have?",
]
# Each bad row and the reason it must come back with (a substring of the error column).
BAD = [
    ({"value": "power", "prompt": ""}, "empty prompt"),
    ({"value": "power", "prompt": " \t\n "}, "whitespace only"),
    ({"value": "power", "prompt": "word " * 2000}, "tokens > limit"),
    ({"value": "power", "prompt": "x" * 1_000_000}, "characters (limit"),
    ({"value": "power", "prompt": "a\x00b"}, "NUL"),
    ({"value": "power", "prompt": 42}, "prompt is int"),
    ({"value": "power", "prompt": None}, "prompt is null"),
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
            for row, _ in BAD[len(PROMPTS) :]:
                fh.write(json.dumps(row).encode() + b"\n")
            fh.write(INVALID_UTF8)
    return path


def test_bad_rows_become_error_rows_and_the_rest_match_a_clean_run(fitted, tmp_path) -> None:
    def cfg(src, *x):
        return _cfg(
            fitted["cfg"].model.name,
            fitted["out"],
            f"--data.prompts={src}",
            "--steer.batch_size=1",
            "--ray.steer_rows_per_shard=4",
            *x,
        )

    clean = _write_prompts(tmp_path / "clean.jsonl", bad=False)
    run_job("steer", cfg(clean))
    ok = pq.read_table(fitted["out"] / "generations")
    bad = _write_prompts(tmp_path / "bad.jsonl", bad=True)
    [result] = run_job("steer", cfg(bad), overwrite=True)
    got = pq.read_table(fitted["out"] / "generations")
    n_in = len(PROMPTS) + len(BAD) + 1
    assert result.rows == got.num_rows == n_in and len(set(got.column("row_id").to_pylist())) == n_in
    assert result.shards == -(
        -n_in // 4
    )  # steering shards follow ray.steer_rows_per_shard, not rows_per_shard
    errors = [r for r in got.to_pylist() if r["error"] is not None]
    reasons = [r["error"] for r in errors]
    assert len(errors) == len(BAD) + 1 and len(set(reasons)) == len(reasons)
    for _, expected in BAD:
        assert sum(expected in e for e in reasons) == 1, (expected, reasons)
    assert sum("invalid UTF-8" in e for e in reasons) == 1
    assert all(r["output"] is None for r in errors)
    # The two runs read different files: their configs differ; the code version names the checkout's commit
    drop = ["row_id", "config_sha256", "conva_version"]
    good = sorted(
        (r for r in got.drop_columns(drop).to_pylist() if r["error"] is None), key=lambda r: r["prompt"]
    )
    assert good == sorted(ok.drop_columns(drop).to_pylist(), key=lambda r: r["prompt"])
    log = (fitted["out"] / "run.log").read_text()
    assert f"generations: {len(BAD) + 1} of {n_in} rows written in this run are error rows" in log


def test_bundle_for_another_model_fails_before_any_worker(fitted, models, monkeypatch, capsys) -> None:
    monkeypatch.setattr(runner, "WorkerPool", _no)
    out = fitted["out"]
    before = _files(out)
    start = time.monotonic()
    code = main(
        "steer",
        [
            "--config",
            str(TINY),
            f"--model.name={models['b']}",
            f"--output.dir={out}",
            VALUES,
            f"--ray.rows_per_shard={ROWS_PER_SHARD}",
        ],
    )
    assert code == 2 and time.monotonic() - start < 10
    # Ray forwards an earlier test's worker output ("(ModelWorker pid=...) ...") whenever it arrives
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "(ModelWorker pid=" not in l]
    assert len(err) == 1 and "not for the loaded model" in err[0] and "model.name" in err[0]
    assert _files(out) == before


def test_config_change_is_refused_naming_keys(fitted, monkeypatch, capsys) -> None:
    monkeypatch.setattr(runner, "WorkerPool", _no)
    before = _files(fitted["out"])
    argv = [
        "--config",
        str(TINY),
        f"--model.name={fitted['cfg'].model.name}",
        f"--output.dir={fitted['out']}",
        VALUES,
        f"--ray.rows_per_shard={ROWS_PER_SHARD}",
        "--probe.C=0.5",
        "--extract.position=mean",
    ]
    assert main("fit", argv) == 2  # reads the activations, writes the bundles: both were made differently
    err = capsys.readouterr().err
    assert "differing keys: extract.position, probe.C" in err and "--overwrite" in err
    assert _files(fitted["out"]) == before


@pytest.fixture(scope="module")
def run_job_log(ray_session, models, tmp_path_factory):
    """The whole run job (extract → fit → steer) on two workers, and its run.log."""
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = _cfg(
        models["a"], out, "--ray.num_workers=2", "--ray.rows_per_shard=16", "--ray.steer_rows_per_shard=2"
    )
    results = run_job("run", cfg)
    return dict(cfg=cfg, out=out, results=results, log=(out / "run.log").read_text())


def test_one_pool_loads_the_model_once_per_worker_for_every_stage(run_job_log) -> None:
    log, results = run_job_log["log"], run_job_log["results"]
    assert [r.stage for r in results] == ["extract", "fit", "steer"] and all(
        r.processed == r.shards for r in results
    )
    loads = json.loads(_last(log, r"model loads per worker: (\{.*\})").group(1))
    assert len(loads) == 2 and set(loads.values()) == {1}  # two workers, each loaded the model once
    assert len(re.findall(r"worker \w+ ready on node", log)) == 2  # and no second set of workers was started


def test_no_shard_data_reaches_the_driver(run_job_log) -> None:
    m = _last(run_job_log["log"], r"workers returned (\d+) bytes of shard records for (\d+) shards")
    returned, shards = int(m.group(1)), int(m.group(2))
    assert shards == sum(r.processed for r in run_job_log["results"])
    data = sum(p.stat().st_size for p in run_job_log["out"].rglob("part-*.parquet"))
    assert (
        returned / shards < 3000 and returned < data / 20
    )  # records only: ~1 KB a shard, the data stays put


def test_a_worker_that_returns_data_fails_the_job() -> None:
    run = StageRun("steer", stage=type("S", (), {"name": "generations"})(), make_task=lambda ref: None)
    runner_ = _Runner.__new__(_Runner)
    with pytest.raises(
        TypeError, match="workers must write their shard to the store and return only its ShardRecord"
    ):
        runner_._accept(ShardCall(None, run, 0, "a", 0.0), pa.table({"x": [1]}))
    assert ShardRecord.__dataclass_fields__.keys() >= {"objects", "rows", "attempt"}


def test_embedded_ray_listens_on_loopback_only(ray_session) -> None:
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    pids = {p.pid for p in procs}
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }
    assert listening, "found no Ray sockets to check"
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
