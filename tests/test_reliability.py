"""Reliability on a real local Ray: dead workers, a killed driver, a crash mid-write, poison rows, bad rows,
reruns, determinism and a large input with a flat driver memory.

What ``test_ray_jobs`` already proves is not repeated here (in-process resume after a stop, a finished
rerun in-process, a changed config refused in-process, the bad-row job, fail-fast pre-flight, bounded
retries of a stand-in worker). Faults are injected through :mod:`workers.faults`: ``CONVA_TEST_FAULTS``
is set before this module's Ray starts, so every worker reads the plan file each test writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import jobs  # noqa: F401  (sets the loopback-only Ray environment before ray starts)
from conva.config import load_config
from conva.pipeline import GENERATION_SCHEMA, extract_table, extraction_rows, steer_table
from conva.record import format_prompt
from conva.store import shard_ranges
from conva.tiny import make_tiny_model
from jobs.runner import main, run_job
from workers.faults import FAULTS_ENV, planned_kill

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"
ROWS = 24  # rows per shard: the 369 extraction rows of one value make 16 shards
LAYERS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _argv(model: str, out: Path, *extra: str) -> list[str]:
    return [f"--model.name={model}", f"--output.dir={out}", '--data.values=["power"]', f"--ray.rows_per_shard={ROWS}",
            "--ray.num_workers=2", "--ray.max_restarts=4", "--ray.max_task_retries=2", *extra]


def _cfg(model: str, out: Path, *extra: str):
    return load_config(TINY, _argv(model, out, *extra))


@pytest.fixture(autouse=True)
def info_logs(caplog) -> None:
    caplog.set_level(logging.INFO)  # as `main` sets it: run.log gets the jobs' INFO lines (commits, attempts)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "plan.json"
    old = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = str(path)  # before Ray starts: the raylet, and so every worker, inherits it
    yield path
    if old is None:
        del os.environ[FAULTS_ENV]
    else:
        os.environ[FAULTS_ENV] = old


@pytest.fixture
def plan(plan_file):
    def write(**faults: object) -> None:
        plan_file.write_text(json.dumps(faults))
    yield write
    plan_file.write_text("{}")


@pytest.fixture(scope="module")
def ray_session(model, plan_file):
    import ray

    from jobs.common import connect_ray

    connect_ray(_cfg(model, Path("/nonexistent")))
    yield
    ray.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path, pattern: str = "*") -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in sorted(folder.glob(pattern)) if p.is_file()}


def _committed(out: Path) -> list[int]:
    try:
        return [s["shard"] for s in json.loads((out / "activations" / "_manifest.json").read_text())["shards"]]
    except (OSError, ValueError):
        return []


def _check_rows(cfg, out: Path) -> None:
    """Every input row exactly once per layer, no error rows."""
    ids = extraction_rows(cfg).column("row_id").to_pylist()
    got = ds.dataset(out / "activations").to_table(columns=["row_id", "layer", "error"])
    assert got.num_rows == len(ids) * LAYERS
    assert got.column("error").null_count == got.num_rows
    pairs = list(zip(got.column("row_id").to_pylist(), got.column("layer").to_pylist()))
    assert len(set(pairs)) == len(pairs) and {r for r, _ in pairs} == set(ids)


def _check_bit_identical(cfg, out: Path, model: str, shards: list[int]) -> None:
    """The committed shards equal a single-process extraction, bit for bit (one torch thread, as in the actors)."""
    import torch

    from conva.models import load_model

    rows, (m, tok) = extraction_rows(cfg), load_model(model)
    ranges = shard_ranges(rows.num_rows, ROWS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shard in shards:
            start, stop = ranges[shard]
            expected = extract_table(m, tok, rows.slice(start, stop - start), range(LAYERS), "last", cfg.extract.batch_size)
            got = pq.read_table(out / "activations" / f"part-{shard:05d}.parquet").replace_schema_metadata(None)
            assert got.equals(expected), f"shard {shard} differs from a clean extraction"
    finally:
        torch.set_num_threads(threads)


def _worker_pids(cls: str, busy: bool = True) -> list[int]:
    """Pids of this session's Ray workers of actor class ``cls`` (Ray titles them ``ray::Class.method``)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith(f"ray::{cls}.") if busy else title.startswith(f"ray::{cls}"):
            found.append(p.pid)
    return found


def _charged(out: Path) -> list[int]:
    """The shards charged with a worker death, in order, from ``run.log``."""
    return [int(s) for s in re.findall(r"died while running shard (\d+)", (out / "run.log").read_text())]


def _log_stats(out: Path) -> tuple[int, int, list[int]]:
    """(attempts, deaths, shards charged with a death) from the last run's summary in ``run.log``."""
    found = re.findall(r"extract: \d+ shards done in (\d+) attempts \((\d+) worker deaths\)", (out / "run.log").read_text())
    assert found, "no attempt summary in run.log"
    attempts, deaths = found[-1]
    return int(attempts), int(deaths), _charged(out)


# --- 1, 2: dead workers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_by_pid_mid_job_is_restarted_and_its_shard_rerun(ray_session, model, tmp_path) -> None:
    out = tmp_path / "out"
    cfg = _cfg(model, out)
    n = len(shard_ranges(extraction_rows(cfg).num_rows, ROWS))
    killed: list[int] = []

    def kill_one_when_two_are_committed() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _worker_pids("ExtractionWorker") if len(_committed(out)) >= 2 else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_when_two_are_committed)
    killer.start()
    [result] = run_job("extract", cfg)
    killer.join()
    assert killed, "no busy worker was found to kill"
    assert result.processed == n and sorted(_committed(out)) == list(range(n))
    _check_rows(cfg, out)
    attempts, deaths, charged = _log_stats(out)
    assert deaths == 1 and attempts == n + 1 and len(charged) == 1
    log = (out / "run.log").read_text()
    assert "is restarting" in log and f"shard {charged[0]} succeeded on attempt 2" in log
    _check_bit_identical(cfg, out, model, [charged[0], 0])  # the rerun shard (9: determinism after a retry)


def _seed_with_kills(n: int, rate: float, kills: int) -> int:
    return next(s for s in range(1000) if sum(planned_kill(s, "extract", i, rate) for i in range(n)) == kills)


@pytest.mark.slow
def test_random_worker_kills_cost_exactly_one_attempt_each(ray_session, model, tmp_path, plan) -> None:
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    cfg = _cfg(model, out)
    n, rate = len(shard_ranges(extraction_rows(cfg).num_rows, ROWS)), 0.15
    seed = _seed_with_kills(n, rate, 2)
    doomed = {i for i in range(n) if planned_kill(seed, "extract", i, rate)}
    plan(kill_rate=rate, seed=seed, marker_dir=str(markers))
    [result] = run_job("extract", cfg)
    assert {int(p.name.split("-")[1]) for p in markers.iterdir()} == doomed  # each doomed shard died once
    assert result.processed == n and sorted(_committed(out)) == list(range(n))
    _check_rows(cfg, out)
    attempts, deaths, charged = _log_stats(out)
    assert attempts == n + len(doomed) and deaths == len(doomed)
    assert sorted(charged) == sorted(doomed)  # each death charged to the shard that died, none to a bystander


# --- 7: a row that kills its worker every time ----------------------------------------------------------


def _pairs_file(path: Path, n: int, poison_at: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            mark = " POISON-ROW" if i == poison_at else ""
            fh.write(json.dumps({"value": "power", "positive": f"I want to lead team {i}{mark}.",
                                 "negative": f"I want to help team {i}."}) + "\n")
    return path


@pytest.mark.slow
def test_poison_row_fails_the_job_naming_its_shard_after_bounded_attempts(ray_session, model, tmp_path, plan,
                                                                          capsys) -> None:
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 12, poison_at=7)  # 24 texts, 4 a shard: the poison is in shard 3
    plan(crash_on_text="POISON-ROW")
    for retries, workers in ((1, 2), (0, 1)):
        out = tmp_path / f"out{retries}"
        argv = ["--config", str(TINY), *_argv(model, out, f"--data.pairs={pairs}", "--gate.kind=none",
                                              "--ray.rows_per_shard=4", f"--ray.max_task_retries={retries}",
                                              f"--ray.num_workers={workers}")]
        start = time.monotonic()
        assert main("extract", argv) == 2
        assert time.monotonic() - start < 120  # bounded: never loops
        [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("jobs.extract: error:")]
        assert f"extract shard 3 failed: its worker died on each of {retries + 1} attempt(s)" in line, line
        assert _charged(out) == [3] * (retries + 1)  # only the poison shard is charged, every time
        assert 3 not in _committed(out)


# --- 3, 4, 5: a killed driver, a crash inside a Parquet write, a finished rerun -------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in (FAULTS_ENV, "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    # Its own session: what is left of its embedded Ray after a kill is signalled as a group, and only it.
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), start_new_session=True,
                                stdout=fh, stderr=subprocess.STDOUT)


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def killed_driver(ray_session, model, tmp_path_factory):
    """``python -m jobs.extract`` SIGKILLed once half its shards are committed, then rerun to the end."""
    out = tmp_path_factory.mktemp("killed") / "out"
    argv = ["--config", str(TINY), *_argv(model, out, "--ray.rows_per_shard=12")]
    cfg = load_config(TINY, argv[2:])
    n = len(shard_ranges(extraction_rows(cfg).num_rows, 12))
    proc = _spawn(["-m", "jobs.extract", *argv], out.parent / "driver.log")
    try:
        deadline = time.monotonic() + 180
        while len(_committed(out)) < n // 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        _reap(proc)
    at_kill = sorted(_committed(out))
    before = _files(out / "activations", "part-*.parquet")
    [result] = run_job("extract", cfg)
    return dict(out=out, argv=argv, cfg=cfg, n=n, at_kill=at_kill, before=before, result=result)


@pytest.mark.slow
def test_driver_killed_mid_job_resumes_without_rewriting_committed_shards(killed_driver) -> None:
    k, n, out = killed_driver["at_kill"], killed_driver["n"], killed_driver["out"]
    assert n // 2 <= len(k) < n, f"killed with {len(k)} of {n} shards committed"
    before = killed_driver["before"]
    # reprocessed: only shards with no file at the kill (a file renamed before its manifest entry is adopted)
    assert killed_driver["result"].processed == n - len(before) <= n - len(k)
    assert n - len(before) <= n - len(k) <= n - n // 2
    after = _files(out / "activations", "part-*.parquet")
    assert {name: after[name] for name in before} == before  # never rewritten: same mtime, same bytes
    manifest = json.loads((out / "activations" / "_manifest.json").read_text())
    assert [s["shard"] for s in manifest["shards"]] == list(range(n))
    _check_rows(killed_driver["cfg"], out)


@pytest.mark.slow
def test_finished_rerun_is_a_quick_no_op_and_a_changed_config_is_refused(killed_driver) -> None:
    out, argv = killed_driver["out"], killed_driver["argv"]
    before = _files(out / "activations")
    log_size = (out / "run.log").stat().st_size
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "jobs.extract", *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"finished rerun as a subprocess: exit 0 in {seconds:.1f} s")
    assert seconds < 30  # interpreter and imports only; measured ~8 s on the 2-core machine
    assert _files(out / "activations") == before
    new_log = (out / "run.log").read_text()[log_size:]
    assert "nothing to do" in new_log and "started a local Ray" not in new_log
    refused = subprocess.run([sys.executable, "-m", "jobs.extract", *argv, "--extract.position=mean", "--probe.C=0.5"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "differing keys: extract.position" in line and "--overwrite" in line
    assert _files(out / "activations") == before


_CRASH_IN_WRITE = """
import os, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from jobs.runner import main

real, writes = pq.write_table, [0]

def write_then_die(table, where, **kwargs):
    writes[0] += 1
    if writes[0] <= 3:
        return real(table, where, **kwargs)
    sink = pa.BufferOutputStream()
    real(table, sink, **kwargs)
    data = sink.getvalue().to_pybytes()
    Path(str(where)).write_bytes(data[: len(data) // 2])  # half a Parquet file, no footer
    os._exit(3)  # the driver dies inside the write: no except, no finally

pq.write_table = write_then_die
sys.exit(main("extract", sys.argv[1:]))
"""


@pytest.mark.slow
def test_crash_inside_a_parquet_write_never_shows_a_bad_file_and_the_rerun_cleans_staging(
        ray_session, model, tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["--config", str(TINY), *_argv(model, out)]
    stage = out / "activations"
    proc = _spawn(["-c", _CRASH_IN_WRITE, *argv], tmp_path / "driver.log")
    reads = 0
    try:
        while proc.poll() is None:  # a reader polling the folder all along: every read must succeed
            if any(stage.glob("part-*.parquet")):
                rows = pq.read_table(stage, columns=["row_id"]).num_rows
                assert rows % LAYERS == 0
                reads += 1
            time.sleep(0.01)
    finally:
        _reap(proc)
    assert proc.returncode == 3 and reads > 0
    staged = list((stage / "_staging").iterdir())
    assert len(staged) == 1 and staged[0].stat().st_size > 0  # the half file, out of readers' sight
    visible = sorted(stage.glob("part-*.parquet"))
    assert [p.name for p in visible] == [f"part-{s:05d}.parquet" for s in sorted(_committed(out))]
    assert len(visible) == 3 and all(pq.ParquetFile(p).metadata.num_rows > 0 for p in visible)
    cfg = _cfg(model, out)
    [result] = run_job("extract", cfg)
    assert not (stage / "_staging").exists() or list((stage / "_staging").iterdir()) == []
    assert result.processed == result.shards - 3
    _check_rows(cfg, out)


# --- 6: rows exactly at and over the model's maximum length (no Ray: the function every backend runs) ------------


def _prompt_with_tokens(tok, n: int) -> str:
    """A prompt whose formatted length is exactly ``n`` tokens, as ``check_prompt`` counts them."""
    count = lambda p: len(tok(format_prompt(tok, p, True), add_special_tokens=False)["input_ids"])
    prompt = "a" + " a" * (n - count("a"))  # the tiny tokenizer has " a" as one token
    assert count(prompt) == n, (count(prompt), n)
    return prompt


def test_prompts_at_and_over_the_length_limit(tiny, tiny_bundles) -> None:
    model, tok = tiny
    cfg = load_config(None, ['--data.values=["power"]', "--steer.max_new_tokens=4", "--steer.batch_size=1"])
    limit = model.config.max_position_embeddings - 4
    assert model.config.max_position_embeddings == 512
    at, over = _prompt_with_tokens(tok, limit), _prompt_with_tokens(tok, limit + 1)
    clean = ["Should I take the job abroad?", "Is it right to break a rule to help a friend?"]
    rows = lambda prompts: pa.table({"row_id": [str(i) for i in range(len(prompts))], "value": ["power"] * len(prompts),
                                     "prompt": prompts, "error": pa.nulls(len(prompts), pa.string())})
    bundles = {"power": tiny_bundles[0]}
    got = steer_table(model, tok, rows([clean[0], at, over, clean[1]]), bundles, cfg, "tiny")
    ok = steer_table(model, tok, rows(clean), bundles, cfg, "tiny")
    assert got.schema == GENERATION_SCHEMA == ok.schema  # one schema for ok and error rows
    r = got.to_pylist()
    assert r[1]["error"] is None and r[1]["n_prompt_tokens"] == limit and r[1]["n_output_tokens"] == 4
    assert r[2]["error"] == f"prompt too long: {limit + 1} tokens > limit {limit}" and r[2]["output"] is None
    strip = lambda row: {k: v for k, v in row.items() if k != "row_id"}
    assert [strip(r[0]), strip(r[3])] == [strip(x) for x in ok.to_pylist()]


# --- 9: determinism (the retried shard of a real job is checked bit for bit above) --------------------------------


def test_rerun_shard_gives_identical_activations_text_and_probes(tiny, tiny_bundles) -> None:
    from conva.fit import ModelInfo
    from conva.models import model_fingerprint
    from conva.pipeline import fit_bundles

    model, tok = tiny
    cfg = load_config(None, ['--data.values=["power"]', "--fit.band=1-3", "--steer.max_new_tokens=6"])
    rows = extraction_rows(cfg).slice(0, 40)
    a, b = (extract_table(model, tok, rows, range(LAYERS), "last", 8) for _ in range(2))
    assert a.equals(b)  # bit-identical
    prompts = pa.table({"row_id": ["0", "1"], "value": ["power"] * 2, "prompt": ["Should I lead?", "Is it fair?"],
                        "error": pa.nulls(2, pa.string())})
    g1, g2 = (steer_table(model, tok, prompts, {"power": tiny_bundles[0]}, cfg, "tiny") for _ in range(2))
    assert g1.equals(g2) and all(g1.column("output").to_pylist())
    full = extraction_rows(cfg)
    acts = extract_table(model, tok, full, range(LAYERS), "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(LAYERS, full.num_rows, -1)
    info = ModelInfo("tiny", model_fingerprint(model), model.config.hidden_size, LAYERS)
    f1, f2 = (fit_bundles(full, lambda l: matrix[l].copy(), range(LAYERS), cfg, info)["power"] for _ in range(2))
    assert np.max(np.abs(f1.w - f2.w)) <= 1e-6 and np.max(np.abs(f1.b - f2.b)) <= 1e-6
    assert f1.band == f2.band and f1.gate.threshold == f2.gate.threshold


# --- 10: a large input through the extraction job's sharding and commit path ---------------------------------


@pytest.mark.slow
def test_large_input_keeps_driver_memory_flat(ray_session, model, tmp_path) -> None:
    from benchmarks.bench_large_input import measure

    figures = measure(20_000, rows_per_shard=100, model=model, work=tmp_path, width=1024)
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=1))
    assert figures["rows_committed"] == 20_000 and figures["shards"] == 200
    # 78 MB of activations pass through the driver. After the first tenth of the shards its private memory
    # stays flat (measured +0.1 MB) and its RSS, which also counts the object store pages it maps, grows by
    # well under half of that (measured 5-17 MB); a driver that kept its results grew RSS by 75 MB.
    assert figures["activation_mb_through_driver"] == 78.1
    assert figures["uss_growth_after_warmup_mb"] < 10, figures
    assert figures["growth_after_warmup_mb"] < 35, figures
