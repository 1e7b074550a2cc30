"""Reliability on a real local Ray: dead, hung and failing workers, a killed driver, a second driver, slow starts.

Faults are injected in the workers by the test hook (``tests/faults.py``, installed for the session's Ray
in conftest); production workers run no hook. Every job here extracts the activations of one value with
a tiny random Llama (369 texts, 4 layers); ``_check_rows`` proves every row is there exactly once.
"""

from __future__ import annotations

import hashlib
import json
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
import pyarrow.parquet as pq
import pytest

from conva.batch.config import load_config
from conva.batch.extraction import extract_table, extraction_rows
from conva.batch.lease import LeaseError
from conva.batch.schemas import GENERATION_SCHEMA
from conva.batch.steer_rows import steer_table
from conva.batch.store import shard_ranges
from conva.jobs.runner import main, run_job
from conva.record import format_prompt
from conva.tiny import make_tiny_model
from tests.clusters import session_driver_env
from tests.faults import planned_kill

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"
ROWS = 24  # rows per shard: the 369 extraction texts of one value make 16 shards
LAYERS = 4
# One model worker unless the property needs a second: a survivor beside a killed worker, or a bystander that
# must not be charged with another's death. Each worker start costs about 7 CPU-s here (imports and the model).
TWO_WORKERS = "--ray.num_workers=2"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _argv(model: str, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name={model}",
        f"--output.dir={out}",
        '--data.values=["power"]',
        f"--ray.rows_per_shard={ROWS}",
        "--ray.num_workers=1",
        "--ray.max_restarts=4",
        "--ray.max_task_retries=2",
        *extra,
    ]


def _cfg(model: str, out: Path, *extra: str):
    return load_config(TINY, _argv(model, out, *extra))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path, pattern: str = "*") -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in sorted(folder.glob(pattern)) if p.is_file()}


def _committed(out: Path, stage: str = "activations") -> list[int]:
    return sorted(int(p.name[5:10]) for p in (out / stage).glob("part-*.parquet"))


def _check_rows(cfg, out: Path) -> None:
    """Every input row exactly once per layer, no error rows."""
    ids = extraction_rows(cfg).column("row_id").to_pylist()
    got = pq.read_table(out / "activations", columns=["row_id", "layer", "error"])
    assert got.num_rows == len(ids) * LAYERS
    assert got.column("error").null_count == got.num_rows
    pairs = list(zip(got.column("row_id").to_pylist(), got.column("layer").to_pylist()))
    assert len(set(pairs)) == len(pairs) and {r for r, _ in pairs} == set(ids)


def _check_bit_identical(cfg, out: Path, model: str, shards: list[int]) -> None:
    """The committed shards equal a single-process extraction, bit for bit (one torch thread, as in the workers)."""
    import torch

    from conva.models import load_model

    rows, (m, tok) = extraction_rows(cfg), load_model(model)
    ranges = shard_ranges(rows.num_rows, ROWS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shard in shards:
            start, stop = ranges[shard]
            expected = extract_table(
                m, tok, rows.slice(start, stop - start), range(LAYERS), "last", cfg.extract.batch_size
            )
            got = pq.read_table(out / "activations" / f"part-{shard:05d}.parquet").replace_schema_metadata(
                None
            )
            assert got.equals(expected), f"shard {shard} differs from a clean extraction"
    finally:
        torch.set_num_threads(threads)


def _worker_pids() -> list[int]:
    """Pids of this session's busy model workers (Ray titles them ``ray::ModelWorker.run``)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::ModelWorker.run"):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def _charged(out: Path) -> list[int]:
    """The shards charged with a worker death or timeout, in order, from ``run.log``."""
    return [
        int(s)
        for s in re.findall(
            r"extract: shard (\d+) attempt \w+: worker \w+ \(node [^)]*\) (?:died|was killed)",
            (out / "run.log").read_text(),
        )
    ]


def _reader(folder: Path, stop: threading.Event, seen: list) -> None:
    """A reader polling a stage folder all along a run: every read must see whole, committed files."""
    while not stop.is_set():
        if any(folder.glob("part-*.parquet")):
            rows = pq.read_table(folder, columns=["row_id"]).num_rows
            assert rows % LAYERS == 0
            seen.append(rows)
        time.sleep(0.01)


# --- dead workers: replaced, their shards charged once and rerun ----------------------------------------


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_replaced_and_its_shard_rerun(
    ray_session, model, tmp_path, faults
) -> None:
    out = tmp_path / "out"
    faults(sleep_s=1.0)  # shards slow until the replacement has joined, then fast (see below)
    cfg = _cfg(model, out, TWO_WORKERS)
    n = len(shard_ranges(extraction_rows(cfg).num_rows, ROWS))
    killed: list[int] = []

    def kill_one_when_two_are_committed_then_wait_for_its_replacement() -> None:
        deadline, first_two = time.monotonic() + 180, set()
        while time.monotonic() < deadline:
            busy = set(_worker_pids())
            if not killed:
                first_two |= busy
                if len(first_two) == 2 and busy and len(_committed(out)) >= 2:
                    faults(sleep_s=5.0)  # the survivor crawls until the replacement has started
                    killed.append(min(busy))
                    os.kill(killed[0], signal.SIGKILL)
            elif busy - first_two:  # the replacement has loaded the model and runs a shard
                faults(sleep_s=0.0)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_when_two_are_committed_then_wait_for_its_replacement)
    killer.start()
    [result] = run_job("extract", cfg)
    killer.join()
    assert killed, "no busy worker was found to kill"
    assert result.processed == n and _committed(out) == list(range(n))
    _check_rows(cfg, out)
    log = (out / "run.log").read_text()
    charged = _charged(out)
    assert len(charged) == 1 and f"extract: shard {charged[0]} succeeded on attempt 2" in log
    assert "starting a replacement worker (1 of 4)" in log  # the pool holds its size:
    loads = json.loads(re.findall(r"model loads per worker: (\{.*\})", log)[-1])
    assert len(loads) == 3 and set(loads.values()) == {
        1
    }  # two at the start and the replacement, which worked
    _check_bit_identical(cfg, out, model, [charged[0], 0])  # the rerun shard is what a clean run gives


def _seed_with_kills(n: int, rate: float, kills: int) -> int:
    return next(s for s in range(1000) if sum(planned_kill(s, "extract", i, rate) for i in range(n)) == kills)


@pytest.mark.slow
def test_random_worker_kills_cost_exactly_one_attempt_each_and_readers_never_see_a_bad_file(
    ray_session, model, tmp_path, faults
) -> None:
    out = tmp_path / "out"
    cfg = _cfg(model, out, TWO_WORKERS)
    n, rate = len(shard_ranges(extraction_rows(cfg).num_rows, ROWS)), 0.15
    seed = _seed_with_kills(n, rate, 2)
    doomed = {i for i in range(n) if planned_kill(seed, "extract", i, rate)}
    markers = faults(kill_rate=rate, seed=seed)
    stop, seen = threading.Event(), []
    reader = threading.Thread(target=_reader, args=(out / "activations", stop, seen))
    reader.start()
    try:
        [result] = run_job("extract", cfg)
    finally:
        stop.set()
        reader.join()
    assert seen, "the reader never saw a committed shard"
    assert {int(p.name.split(".")[0].split("-")[2]) for p in markers.iterdir()} == doomed  # each died once
    assert result.processed == n and _committed(out) == list(range(n))
    _check_rows(cfg, out)
    assert sorted(_charged(out)) == sorted(
        doomed
    )  # each death charged to the shard that died, none to a bystander
    assert not list(
        (out / "activations" / "_attempts").rglob("*.parquet")
    )  # nothing of the dead attempts is left


def _pairs_file(path: Path, n: int, poison_at: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            mark = " POISON-ROW" if i == poison_at else ""
            fh.write(
                json.dumps(
                    {
                        "value": "power",
                        "positive": f"I want to lead team {i}{mark}.",
                        "negative": f"I want to help team {i}.",
                    }
                )
                + "\n"
            )
    return path


@pytest.mark.slow
def test_a_poison_row_fails_the_job_naming_its_shard_after_bounded_attempts(
    ray_session, model, tmp_path, faults, capsys
) -> None:
    pairs = _pairs_file(
        tmp_path / "pairs.jsonl", 12, poison_at=7
    )  # 24 texts, 4 a shard: the poison is in shard 3
    faults(crash_on_text="POISON-ROW")
    for retries in (1, 0):
        out = tmp_path / f"out{retries}"
        argv = [
            "--config",
            str(TINY),
            *_argv(
                model,
                out,
                f"--data.pairs={pairs}",
                "--gate.kind=none",
                "--ray.rows_per_shard=4",
                # the retried poison beside a bystander's shards; with no retry, one worker shows the bound
                TWO_WORKERS if retries else "--ray.num_workers=1",
                f"--ray.max_task_retries={retries}",
            ),
        ]
        start = time.monotonic()
        assert main("extract", argv) == 2
        assert time.monotonic() - start < 120  # bounded: never loops
        [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("conva extract: error:")]
        assert (
            "extract shard 3 failed: its worker died (" in line
            and f"on each of {retries + 1} attempts" in line
        ), line
        assert _charged(out) == [3] * (retries + 1)  # only the poison shard is charged, every time
        assert 3 not in _committed(out)


# --- hung shards, transient and persistent errors ----------------------------------------------------------------


@pytest.mark.slow
def test_a_hung_shard_is_killed_at_its_timeout_and_retried(ray_session, model, tmp_path, faults) -> None:
    out = tmp_path / "out"
    # No speculation: a second attempt on an idle worker would finish the hung shard before its timeout.
    cfg = _cfg(model, out, "--ray.shard_timeout_s=4", "--ray.speculate_after=0")
    faults(hang={"stage": "extract", "shard": 5})
    start = time.monotonic()
    [result] = run_job("extract", cfg)
    # The hang sleeps 3600 s: finishing well inside that means the shard was killed, not waited out (96 s
    # measured once with three test processes on two cores, 35 s with two).
    assert time.monotonic() - start < 300
    log = (out / "run.log").read_text()
    assert re.search(
        r"extract: shard 5 attempt \w+ has run \d+ s on worker \w+ .* \(ray.shard_timeout_s=4\); killing", log
    )
    assert _charged(out) == [5] and "extract: shard 5 succeeded on attempt 2" in log
    assert result.processed == result.shards
    _check_rows(cfg, out)


@pytest.mark.slow
def test_transient_errors_and_oom_are_retried_and_a_persistent_one_fails_naming_the_shard(
    ray_session, model, tmp_path, faults, capsys
) -> None:
    # One job for both recoveries: shard 2 fails once (transient), shard 3 twice with an OOM.
    out = tmp_path / "once"
    cfg = _cfg(model, out)
    markers = faults(
        fail=[
            {"stage": "extract", "shard": 2, "times": 1, "error": "OSError"},
            {"stage": "extract", "shard": 3, "times": 2, "error": "OutOfMemoryError"},
        ]
    )
    [result] = run_job("extract", cfg)
    log = (out / "run.log").read_text()
    assert re.search(
        r"extract: shard 2 attempt \w+ failed \(transient, retry 1 of 3 in 1 s\): "
        r"ShardError: OSError: injected OSError at extract shard 2",
        log,
    ), log[-3000:]
    assert "extract: shard 2 succeeded on attempt 2" in log and result.processed == result.shards
    assert (
        "extract: shard 3 attempt" in log
        and "failed (oom, retry 2 of 3 in 2 s, batches 1/4 of the configured size)" in log
    )
    seen = sorted(int(p.name.split("-")[3].split(".")[0]) for p in markers.glob("divisor-extract-00003-*"))
    assert seen == [1, 2, 4]  # each retry ran with half the batch before
    _check_rows(cfg, out)
    faults(fail={"stage": "extract", "shard": 1, "times": 99, "error": "OSError"})
    argv = ["--config", str(TINY), *_argv(model, tmp_path / "always", "--ray.transient_retries=2")]
    assert main("extract", argv) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("conva extract: error:")]
    assert "extract shard 1 failed: 3 attempts failed (transient; ray.transient_retries=2)" in line
    assert "injected OSError at extract shard 1" in line and "node 127.0.0.1" in line
    faults(fail={"stage": "extract", "shard": 0, "times": 1, "error": "ValueError"})
    assert main("extract", ["--config", str(TINY), *_argv(model, tmp_path / "fatal")]) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("conva extract: error:")]
    assert (
        "extract shard 0 failed: attempt" in line and "ValueError: injected ValueError" in line
    )  # never retried


# --- start-up -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_pool_that_cannot_start_says_what_is_missing(ray_session, model, tmp_path, capsys) -> None:
    start = time.monotonic()
    argv = [
        "--config",
        str(TINY),
        *_argv(
            model,
            tmp_path / "out",
            "--ray.num_workers=3",
            "--ray.min_workers=3",
            "--ray.num_cpus_per_worker=1",
            "--ray.startup_timeout_s=3",  # 2 of the 3 workers fit: the third never starts
        ),
    ]
    assert main("extract", argv) == 2
    assert time.monotonic() - start < 60
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("conva extract: error:")]
    assert re.search(
        r"[0-2] of the 3 worker\(s\) needed were ready after \d+ s \(ray.startup_timeout_s\); each asks for "
        r"1 CPU and 0 GPU; free now in the cluster: 0 CPU, 0 GPU \(nodes: 127.0.0.1 \(CPU 2, GPU 0\)\)",
        line,
    ), line
    argv = ["--config", str(TINY), *_argv(model, tmp_path / "gpu", "--ray.num_gpus_per_worker=1")]
    assert main("extract", argv) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("conva extract: error:")]
    assert "ray: no node can host a worker with 1 CPU and 1 GPU (nodes: 127.0.0.1 (CPU 2, GPU 0))" in line


# --- the driver: killed, rerun, a second one ----------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # Its own session: whatever it started is signalled as a group after a kill, and only it.
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env or _env(),
            start_new_session=True,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def killed_driver(ray_session, model, tmp_path_factory, fault_plan):
    """``python -m conva.jobs.extract`` on the session's Ray, SIGKILLed once half its shards are committed, then
    rerun to the end in-process."""
    out = tmp_path_factory.mktemp("killed") / "out"
    argv = ["--config", str(TINY), *_argv(model, out, "--ray.rows_per_shard=12")]
    cfg = load_config(TINY, argv[2:])
    n = len(shard_ranges(extraction_rows(cfg).num_rows, 12))
    fault_plan.write_text(json.dumps({"sleep_s": 0.3}))  # the killed driver's shards only: cleared below
    proc = _spawn(["-m", "conva.jobs.extract", *argv], out.parent / "driver.log", session_driver_env())
    try:
        deadline = time.monotonic() + 180
        while len(_committed(out)) < n // 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        fault_plan.write_text("{}")
        _reap(proc)
    at_kill = _committed(out)
    before = _files(out / "activations", "part-*.parquet")
    [result] = run_job(
        "extract", cfg
    )  # the dead driver's lease is taken over: its pid is gone from this host
    return dict(out=out, argv=argv, cfg=cfg, n=n, at_kill=at_kill, before=before, result=result)


@pytest.mark.slow
def test_a_driver_killed_mid_job_resumes_without_rewriting_committed_shards(killed_driver) -> None:
    k, n, out = killed_driver["at_kill"], killed_driver["n"], killed_driver["out"]
    assert n // 2 <= len(k) < n, f"killed with {len(k)} of {n} shards committed"
    before = killed_driver["before"]
    # rerun: only the shards not published at the kill (a logged commit the driver did not publish is published)
    assert n - len(before) - 1 <= killed_driver["result"].processed <= n - len(before)
    after = _files(out / "activations", "part-*.parquet")
    assert {name: after[name] for name in before} == before  # never rewritten: same mtime, same bytes
    assert _committed(out) == list(range(n))
    _check_rows(killed_driver["cfg"], out)


@pytest.mark.slow
def test_a_finished_rerun_is_a_quick_no_op_and_a_changed_config_is_refused(killed_driver) -> None:
    out, argv = killed_driver["out"], killed_driver["argv"]
    before = _files(out / "activations")
    log_size = (out / "run.log").stat().st_size
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "conva.jobs.extract", *argv],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"finished rerun as a subprocess: exit 0 in {seconds:.1f} s")
    assert seconds < 30  # interpreter and imports only; measured ~8 s on the 2-core machine
    assert _files(out / "activations") == before
    new_log = (out / "run.log").read_text()[log_size:]
    assert "nothing to do" in new_log and "started a local Ray" not in new_log
    refused = subprocess.run(
        [sys.executable, "-m", "conva.jobs.extract", *argv, "--extract.position=mean", "--probe.C=0.5"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "differing keys: extract.position" in line and "--overwrite" in line
    assert _files(out / "activations") == before


@pytest.mark.slow
def test_a_second_driver_on_the_same_output_is_refused(ray_session, model, tmp_path, faults, capsys) -> None:
    out = tmp_path / "out"
    argv = ["--config", str(TINY), *_argv(model, out)]
    faults(sleep_s=0.5)  # the first driver's shards (the second never starts a worker)
    proc = _spawn(["-m", "conva.jobs.extract", *argv], tmp_path / "first.log", session_driver_env())
    try:
        deadline = time.monotonic() + 120
        while len(_committed(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        before = _files(out / "activations")
        with pytest.raises(LeaseError, match=r"being written by another driver \(conva extract, pid \d+"):
            run_job("extract", _cfg(model, out))
        faults(sleep_s=0.0)  # refused: the first driver may finish at full speed
        after = _files(out / "activations")
        assert {
            name: after[name] for name in before
        } == before  # what the first driver committed is untouched
        assert proc.wait(180) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        _reap(proc)
    _check_rows(_cfg(model, out), out)  # the first driver finished undisturbed


# --- no Ray: rows at and over the model's maximum length; determinism --------------------------------------------


def _prompt_with_tokens(tok, n: int) -> str:
    """A prompt whose formatted length is exactly ``n`` tokens, as ``check_prompt`` counts them."""

    def count(p):
        return len(tok(format_prompt(tok, p, True), add_special_tokens=False)["input_ids"])

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

    def rows(prompts):
        return pa.table(
            {
                "row_id": [str(i) for i in range(len(prompts))],
                "value": ["power"] * len(prompts),
                "prompt": prompts,
                "error": pa.nulls(len(prompts), pa.string()),
            }
        )

    bundles = {"power": tiny_bundles[0]}
    got = steer_table(model, tok, rows([clean[0], at, over, clean[1]]), bundles, cfg, "tiny")
    ok = steer_table(model, tok, rows(clean), bundles, cfg, "tiny")
    assert got.schema == GENERATION_SCHEMA == ok.schema  # one schema for ok and error rows
    r = got.to_pylist()
    assert r[1]["error"] is None and r[1]["n_prompt_tokens"] == limit and r[1]["n_output_tokens"] == 4
    assert r[2]["error"] == f"prompt too long: {limit + 1} tokens > limit {limit}" and r[2]["output"] is None

    def strip(row):
        return {k: v for k, v in row.items() if k != "row_id"}

    assert [strip(r[0]), strip(r[3])] == [strip(x) for x in ok.to_pylist()]


def test_rerun_shard_gives_identical_activations_text_and_probes(tiny, tiny_bundles) -> None:
    from conva.batch.extraction import fit_bundles
    from conva.fit import ModelInfo
    from conva.models import model_fingerprint

    model, tok = tiny
    cfg = load_config(None, ['--data.values=["power"]', "--fit.band=1-3", "--steer.max_new_tokens=6"])
    rows = extraction_rows(cfg).slice(0, 40)
    a, b = (extract_table(model, tok, rows, range(LAYERS), "last", 8) for _ in range(2))
    assert a.equals(b)  # bit-identical
    prompts = pa.table(
        {
            "row_id": ["0", "1"],
            "value": ["power"] * 2,
            "prompt": ["Should I lead?", "Is it fair?"],
            "error": pa.nulls(2, pa.string()),
        }
    )
    g1, g2 = (steer_table(model, tok, prompts, {"power": tiny_bundles[0]}, cfg, "tiny") for _ in range(2))
    assert g1.equals(g2) and all(g1.column("output").to_pylist())
    full = extraction_rows(cfg)
    acts = extract_table(model, tok, full, range(LAYERS), "last", 32)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        LAYERS, full.num_rows, -1
    )
    info = ModelInfo("tiny", model_fingerprint(model), model.config.hidden_size, LAYERS)
    f1, f2 = (
        fit_bundles(full, lambda l: matrix[l].copy(), range(LAYERS), cfg, info)["power"] for _ in range(2)
    )
    assert np.max(np.abs(f1.w - f2.w)) <= 1e-6 and np.max(np.abs(f1.b - f2.b)) <= 1e-6
    assert f1.band == f2.band and f1.gate.threshold == f2.gate.threshold
