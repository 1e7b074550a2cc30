"""The ``conva`` CLI as its users meet it (issue 16): every command runs as a real subprocess.

* the README's Quickstart, extracted from README.md and run line by line, then its Python snippet;
* bad rows: summarised by reason in ``validate``, refused over ``data.max_error_fraction`` before any
  model loads, and otherwise in the run log's warning and the job's last line;
* neutral prompts: the same rows in JSONL, CSV and Parquet give identical generations;
* interrupts: a real SIGINT mid-steering exits 130 with one line, and the rerun completes, every row once;
* ``validate`` refuses exactly what ``run`` refuses; the help lists every key.

A tiny random model stands in for SmolLM2 (``--model.name``, or ``study.models``, and in the Python
snippet ``load_model``'s argument), and every job gets :data:`SHAPE` appended (two values, one prompt per
value, four new tokens, one worker) to keep the module short. The jobs join the session's Ray
(``RAY_ADDRESS``, as on a cluster) instead of each starting its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conva.batch.config import Config, SteerConfig
from conva.batch.configdoc import bounds_text, default_text, field_docs, sections, type_text
from conva.batch.study import StudyConfig
from conva.jobs import cli
from conva.settings import choices_of
from tests.clusters import session_driver_env

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "examples" / "demo.toml")
SHAPE = [
    '--data.values=["achievement", "power"]',
    "--data.max_prompts_per_value=1",
    "--steer.max_new_tokens=4",
    "--ray.num_workers=1",
    "--ray.rows_per_shard=512",
    "--ray.steer_rows_per_shard=4",
]
STUDY_SHAPE = [*SHAPE, '--study.methods=["conva", "none"]', "--utility.max_items=2", "--study.bootstrap=20"]
ACTIVATE = ". .venv/bin/activate"


@pytest.fixture(scope="module")
def env(ray_session) -> dict[str, str]:
    """The environment of every command: the repo's packages and the session's Ray."""
    return session_driver_env()


@pytest.fixture(scope="module")
def shape(tiny_path) -> dict[str, list[str]]:
    """What every job gets appended: the stand-in model and the small shape (a study names its models itself)."""
    return {
        "job": [f"--model.name={tiny_path}", *SHAPE],
        "study": [f'--study.models=["{tiny_path}"]', *STUDY_SHAPE],
    }


def conva(env: dict, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``conva <args>`` as the console script runs it (``conva.jobs.cli:main``), in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "conva.jobs.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def quickstart() -> tuple[list[str], list[str]]:
    """The README's Quickstart: its shell lines and its Python snippets, as written."""
    section = (REPO / "README.md").read_text().split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    lines = [line for lang, body in blocks if lang == "bash" for line in body.splitlines() if line.strip()]
    return lines, [body for lang, body in blocks if lang == "python"]


@pytest.fixture(scope="module")
def readme(env, shape, tiny_path, tmp_path_factory) -> dict:
    """Every Quickstart line run in order in a fresh folder (``examples/`` as in the repo), then the Python snippet."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "examples").symlink_to(REPO / "examples")
    lines, snippets = quickstart()
    done: dict[str, subprocess.CompletedProcess] = {}
    seconds: dict[str, float] = {}
    for line in lines:
        if line == ACTIVATE:  # the test already runs the venv's Python
            continue
        words = shlex.split(line, comments=True)
        assert words[0] == "conva", f"a Quickstart line that is not a conva command: {line!r}"
        extra = shape["study" if words[1] == "study" else "job"] if "--config" in words else []
        start = time.monotonic()
        done[line] = result = conva(env, cwd, *words[1:], *extra)
        seconds[line] = time.monotonic() - start
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for snippet in snippets:
        code = snippet.replace('load_model("smollm2")', f"load_model({tiny_path!r})")
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{snippet}\n{result.stderr[-3000:]}"
        done[snippet] = result
    print("Quickstart line times:", json.dumps({k[:40]: round(v, 1) for k, v in seconds.items()}, indent=1))
    return {"cwd": cwd, "done": done, "lines": lines, "snippets": snippets}


def _only(done: dict, prefix: str) -> subprocess.CompletedProcess:
    [result] = [r for line, r in done.items() if line.startswith(prefix)]
    return result


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(readme) -> None:
    lines, done, cwd = readme["lines"], readme["done"], readme["cwd"]
    assert lines[0] == ACTIVATE and len(done) == len(lines) - 1 + len(readme["snippets"]) >= 7
    validate = _only(done, "conva validate").stdout.splitlines()
    assert (
        validate[-1].startswith("conva validate: ok: `conva run` would start (")
        and "shards to run" in validate[-1]
    )
    run = _only(done, "conva run").stdout.splitlines()
    assert re.fullmatch(
        r"conva run: done in \d+ s: extract \d+/\d+, fit 2/2, steer 1/1 shards run now; generations: 2 rows read: "
        r"\d steered, \d gated off, 0 neutral, no error rows",
        run[-1],
    ), run
    study = _only(done, "conva study").stdout
    assert re.search(r"\bconva\s+0\.95\s", study) and re.search(r"\bconva\s+0\.999\s", study), study
    assert (cwd / "runs" / "p0_sweep" / "report" / "index.html").is_file()
    assert _only(done, "conva report").stdout.splitlines()[-1] == "report: runs/p0_sweep/report/index.html"
    [snippet] = readme["snippets"]
    assert 'load_bundle("runs/demo/bundles/achievement")' in snippet
    assert (cwd / "runs" / "demo" / "bundles" / "achievement").is_dir()
    printed = done[snippet].stdout.strip()
    assert re.search(r" (True|False) \([-0-9., e]*\)$", printed), (
        printed
    )  # text, gate_open, ε per steered layer


def _key_index(help_text: str) -> dict[str, list[str]]:
    """``conva run --help``'s list of keys: section → its keys, in order."""
    index, section = {}, None
    for line in help_text.split("The keys:", 1)[1].splitlines():
        match = re.match(r"^  \[(\w+)\] (.*)$", line)
        if match:
            section, line = match.group(1), match.group(2)
            index[section] = []
        if section is not None and line.strip():
            index[section] += [k for k in line.replace(",", " ").split()]
    return index


@pytest.mark.slow
def test_help_lists_the_commands_and_every_config_key(readme, env, tmp_path) -> None:
    done = readme["done"]
    top = _only(done, "conva --help").stdout
    for command in ("run", "extract", "fit", "steer", "study", "validate", "report", "config"):
        assert re.search(rf"^  {command} +\S", top, re.M), command
    run_help = conva(env, tmp_path, "run", "--help")
    assert run_help.returncode == 0 and run_help.stdout.startswith("usage: conva run --config FILE"), (
        run_help.stdout
    )
    assert _key_index(run_help.stdout) == {
        name: list(cls.model_fields) for name, cls in sections(Config).items()
    }
    explained = _only(done, "conva config --explain steer").stdout
    blocks = re.split(r"^  (?=\w+ = )", explained, flags=re.M)
    fields = SteerConfig.model_fields
    assert blocks[0].startswith("[steer]") and len(blocks) - 1 == len(fields)
    docs = field_docs(SteerConfig)
    for block, (name, f) in zip(blocks[1:], fields.items()):
        head, *meaning = block.splitlines()
        options = choices_of(f)
        kind = "; ".join(
            part
            for part in (
                type_text(f.annotation) + (f": {' | '.join(options)}" if options else ""),
                bounds_text(f.annotation, f.metadata),
                "result-neutral" if name == "batch_size" else "",
            )
            if part
        )
        assert head == f"{name} = {default_text(f.default)}  ({kind})", (head, name)
        doc = docs[name]
        # A capital first letter, except on a symbol (ε) or a value the key takes (none | ...)
        keep = not doc[:1].isascii() or not doc[:1].islower() or doc.split(" ", 1)[0] in options
        assert " ".join(" ".join(meaning).split()) == (doc if keep else doc[:1].upper() + doc[1:])
    bogus = conva(env, tmp_path, "bogus")
    assert bogus.returncode == 2 and "unknown command 'bogus'" in bogus.stderr


def test_every_key_of_every_section_is_documented() -> None:
    for section, cls in sections(Config, StudyConfig).items():
        docs = field_docs(cls)
        assert list(docs) == list(cls.model_fields) and all(docs.values()), (
            section,
            [n for n, d in docs.items() if not d],
        )


# --- bad rows -------------------------------------------------------------------------------------------------

# Eleven rows: two with a value, one neutral, eight bad, each with the reason it must be counted under.
ROWS: list[tuple[bytes, str | None]] = [
    (b'{"value": "power", "prompt": "Should I seek the promotion?"}', None),
    (b'{"value": "achievement", "prompt": "How do I win the prize?"}', None),
    (b'{"prompt": "What is the capital of France?"}', None),
    (b'{"value": "power"}', "no prompt field: the row has value"),
    (b"not json", "invalid JSON: Expecting value"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"value": "bogus", "prompt": "x"}', "unknown value 'bogus'"),
    (
        b'{"value": "security", "prompt": "Lock the door?"}',
        "no bundle for value 'security' (not in data.values)",
    ),
    (b'{"value": "power", "prompt": ""}', "empty prompt"),
    (b'{"value": "power", "prompt": 5}', "prompt is int, not text"),
    (b'{"value": "achievement", "prompt": "   "}', "prompt is whitespace only"),
]
REASONS = "; ".join(f"1 × {reason} (bad.jsonl row {i})" for i, (_, reason) in enumerate(ROWS, 1) if reason)


def _steer_out(readme, tmp: Path, name: str) -> Path:
    """A fresh output holding the README run's bundles (a steer job reads them from its own output)."""
    out = tmp / name
    out.mkdir()
    shutil.copytree(readme["cwd"] / "runs" / "demo" / "bundles", out / "bundles")
    return out


def _no_job_started(result: subprocess.CompletedProcess) -> bool:
    return not re.search(r"joined Ray|started a local Ray|worker \w+ ready", result.stderr)


@pytest.mark.slow
def test_bad_rows_are_summarised_in_validate_the_log_and_the_last_line(
    readme, env, shape, tmp_path, capsys
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(row + b"\n" for row, _ in ROWS))
    out = _steer_out(readme, tmp_path, "out")
    argv = ["--config", DEMO, *shape["job"], f"--output.dir={out}", f"--data.prompts={bad}"]
    summary = (
        f"data.prompts: 8 of 11 rows (73%) cannot be steered, more than data.max_error_fraction = 0.5 allows: "
        f"{REASONS}. Is it the right file, in the project schema (value, prompt)? Fix the rows, or raise "
        "--data.max_error_fraction (1 never refuses)"
    )
    checked = conva(env, tmp_path, "validate", "--job", "steer", *argv)
    assert (checked.returncode, checked.stderr.strip().splitlines()[-1]) == (
        2,
        f"conva validate: error: {summary}",
    )
    refused = conva(env, tmp_path, "steer", *argv)
    assert (refused.returncode, refused.stderr.strip().splitlines()[-1]) == (
        2,
        f"conva steer: error: {summary}",
    )
    assert _no_job_started(refused) and not (out / "generations").exists()

    done = conva(env, tmp_path, "steer", *argv, "--data.max_error_fraction=0.8")
    assert done.returncode == 0, done.stderr[-3000:]
    counted = re.fullmatch(
        r"conva steer: done in \d+ s: steer 3/3 shards run now; generations: 11 rows read: (\d+) steered, "
        r"(\d+) gated off, 1 neutral, 8 error rows \(see the `error` column: (.*)\); data.prompts files: "
        r"1 read \(bad.jsonl\); 0 skipped",
        done.stdout.strip(),
    )
    assert counted and int(counted[1]) + int(counted[2]) == 2 and counted[3] == REASONS, done.stdout
    log = (out / "run.log").read_text()
    assert (
        "WARNING conva.jobs: generations: 8 of 11 rows written in this run are error rows (see the `error` "
        f"column): {REASONS}\n"
    ) in log
    import pandas as pd

    rows = pd.read_parquet(out / "generations").sort_values("row_id")
    assert list(rows["error"].fillna("-")) == [reason or "-" for _, reason in ROWS]
    assert (rows["method"] == "conva").all()  # error rows and the neutral row keep the configured method
    assert list(rows["value"].fillna("-")) == [
        "power",
        "achievement",
        "-",
        "power",
        "-",
        "-",
        "bogus",
        "security",
        "power",
        "power",
        "achievement",
    ]
    assert str(rows["n_prompt_tokens"].dtype) == "Int32" and rows["n_prompt_tokens"].isna().sum() == 8
    assert str(rows["gate_open"].dtype) == "boolean"

    with bad.open(
        "ab"
    ) as fh:  # an edited input under committed shards is named as such (validate in-process)
        fh.write(b'{"value": "power", "prompt": "One more?"}\n')
    assert cli.main(["validate", "--job", "steer", *argv, "--data.max_error_fraction=0.8"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"conva validate: error: {out / 'generations'}: the input changed since the committed shards (file {bad}). "
        "Rerun with --overwrite to compute the stage again from the new input (the committed output stays readable "
        "until that run is complete), or restore the input"
    )


@pytest.mark.slow
def test_validate_refuses_exactly_what_run_refuses(readme, env, shape, monkeypatch, capsys) -> None:
    cwd = readme["cwd"]
    argv = ["--config", "examples/demo.toml", *shape["job"], "--steer.p0=0.9"]
    checked = conva(env, cwd, "validate", *argv)
    why = (
        f"{cwd / 'runs' / 'demo' / 'generations'} was written with a different config; differing keys: steer.p0. "
        "Rerun with --overwrite to replace it (the old output stays readable until the new run has committed every "
        "shard)."
    )
    assert (checked.returncode, checked.stderr.strip()) == (2, f"conva validate: error: {why}")
    # The run's refusal, in-process (a run refusing a changed config as a subprocess: test_reliability.py)
    from conva.jobs import runner

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(runner, "connect_ray", lambda: pytest.fail("the run started Ray"))
    assert runner.main("run", argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"conva run: error: {why}"
    # With --overwrite both go ahead; validate says what would be replaced, and what is kept
    assert cli.main(["validate", *argv, "--overwrite"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"  activations +(\d+) shards?: \1 committed, 0 to run \(\d+ texts\)", shown[0]), (
        shown
    )
    assert shown[1:3] == [
        "  bundles      2 shards: 2 committed, 0 to run",
        "  generations  1 shard: 0 committed, 1 to run (2 prompts)",
    ]
    assert shown[3] == (
        f"warning: --overwrite replaces {cwd / 'runs' / 'demo' / 'generations'} (1 committed shard "
        "written with another config; differing keys: steer.p0) once the new run has committed all its "
        "shards; until then the old output stays readable"
    )
    assert shown[4].startswith("conva validate: ok: `conva run` would start (1 shard to run; ")


# --- neutral prompts in three formats; a real SIGINT mid-steering ----------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Should I seek the promotion abroad?",
    "How do I bake bread?",
    "Name a prime number.",
]


def _neutral_files(folder: Path) -> None:
    """The same four rows (the second valued, the rest neutral) as JSONL, CSV and Parquet, each spelling "no value"
    as that format can: a missing key, null, an empty string, an empty CSV cell."""
    folder.mkdir()
    jsonl = [
        {"prompt": PROMPTS[0]},
        {"value": "power", "prompt": PROMPTS[1]},
        {"value": None, "prompt": PROMPTS[2]},
        {"value": "", "prompt": PROMPTS[3]},
    ]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    (folder / "b.csv").write_text(
        "value,prompt\n,"
        + PROMPTS[0]
        + "\npower,"
        + PROMPTS[1]
        + "\n,"
        + PROMPTS[2]
        + '\n,"'
        + PROMPTS[3]
        + '"\n'
    )
    pq.write_table(pa.table({"value": [None, "power", "", None], "prompt": PROMPTS}), folder / "c.parquet")


def _spawn(env: dict, cwd: Path, args: list[str], log: Path) -> subprocess.Popen:
    # Its own session, as a shell runs a job in the foreground: Ctrl-C signals the whole group.
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "conva.jobs.cli", *args],
            cwd=cwd,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )


def _in_pty(env: dict, cwd: Path, args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``conva <args>`` with stdout and stderr on a pseudo-terminal, as in a terminal; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen(
        [sys.executable, "-m", "conva.jobs.cli", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    finally:
        reader.join(10)
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _pids(log_text: str) -> list[int]:
    return [int(p) for p in re.findall(r"worker \w+ ready on node \S+ \(pid (\d+)\)", log_text)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
def test_neutral_prompts_and_an_interrupted_run(
    readme, env, shape, tmp_path, faults, capsys, monkeypatch
) -> None:
    from conva.batch import inputs

    folder = tmp_path / "prompts"
    _neutral_files(folder)
    out = _steer_out(readme, tmp_path, "out")
    args = [
        "steer",
        "--config",
        DEMO,
        *shape["job"],
        f"--output.dir={out}",
        f"--data.prompts={folder}",
        "--ray.steer_rows_per_shard=1",
    ]
    assert (
        cli.main(["validate", "--job", *args]) == 0
    )  # in-process: the subprocesses below are the CLI's test
    assert (
        "  data.prompts: 12 rows read: 3 with a value, 9 neutral (no value: generated unsteered, keeping its "
        "method), 0 bad (each becomes an error row)\n"
    ) in capsys.readouterr().out
    # Past the pre-flight's screening budget the driver screens whole shards, each file's first at least:
    # a.jsonl's 4 rows, b.csv's first 2 (the budget is spent), c.parquet's first; the workers screen the rest.
    monkeypatch.setattr(inputs, "SCREEN_ROWS", 6)
    assert cli.main(["validate", "--job", *args]) == 0
    assert (
        "  data.prompts: 7 rows read: 2 with a value, 5 neutral (no value: generated unsteered, keeping its "
        "method), 0 bad (each becomes an error row); the other 5 rows are screened by the workers\n"
    ) in capsys.readouterr().out

    faults(sleep_s=0.5)  # every shard takes half a second: the signal lands mid-steering
    log = tmp_path / "first.log"
    proc = _spawn(env, tmp_path, args, log)
    try:
        deadline = time.monotonic() + 240
        while len(list((out / "generations").glob("part-*.parquet"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert code == 130, stderr[-3000:]
    committed = len(list((out / "generations").glob("part-*.parquet")))
    assert 3 <= committed < 12 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"conva steer: interrupted by SIGINT; committed: generations {committed}/12 shards (kept); rerun the same "
        f"command to resume: conva {shlex.join(args)}"
    )
    assert not (out / "_lease.json").exists()
    assert _pids(stderr) and not any(_alive(p) for p in _pids(stderr))  # the pool was stopped

    faults()
    code, shown = _in_pty(env, tmp_path, args)  # the rerun, as in a terminal: a bar, and log lines above it
    assert code == 0, shown[-3000:]
    assert re.search(
        rf"conva steer: done in \d+ s: steer {12 - committed}/12 shards run now; generations: 12 rows read: "
        r"\d+ steered, \d+ gated off, 9 neutral, no error rows; data.prompts files: 3 read \(a.jsonl, b.csv, "
        r"c.parquet\); 0 skipped",
        shown,
    )
    assert re.search(r"llama: steer: +\d+%\|", shown)
    for line in shown.split("\n"):
        if "conva.jobs:" in line:
            # The bar is cleared before a log line and not redrawn over it: the line's segment holding the
            # log line has no bar of ours before its timestamp, and no bar follows it on the same line. (Ray
            # may put a worker's own output, such as transformers' load bar left without a newline, before or
            # after it: that is Ray's stream, not ours.)
            segments = line.rstrip("\r").split("\r")
            at = next(i for i, seg in enumerate(segments) if "conva.jobs:" in seg)
            stamp = re.search(
                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) conva\.jobs:", segments[at]
            )
            assert stamp and "llama: steer:" not in segments[at][: stamp.start()], repr(line)
            assert not any(re.match(r"llama: steer: +\d+%\|", seg) for seg in segments[at + 1 :]), repr(line)
    log_file = (out / "run.log").read_text()
    assert (
        "steer: shard 12 of 12 committed, " in log_file
        and "rows/s, ETA " in log_file
        and "%|" not in log_file
    )

    rows = pq.read_table(out / "generations").to_pylist()
    ids = sorted(r["row_id"] for r in rows)
    # a row's number is its line (the CSV header is line 1) or its Parquet row
    assert ids == sorted(
        f"{name}/{i:06d}"
        for name, first in (("a.jsonl", 1), ("b.csv", 2), ("c.parquet", 1))
        for i in range(first, first + 4)
    )
    by_file: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["row_id"]):
        by_file.setdefault(r["row_id"].split("/")[0], []).append(
            {k: v for k, v in r.items() if k != "row_id"}
        )
    assert by_file["a.jsonl"] == by_file["b.csv"] == by_file["c.parquet"]
    assert [(r["value"], r["method"], r["error"]) for r in by_file["a.jsonl"]] == [
        (None, "conva", None),
        ("power", "conva", None),
        (None, "conva", None),
        (None, "conva", None),
    ]
    neutral = [r for r in by_file["a.jsonl"] if r["value"] is None]
    assert all(r["eps"] == [] and r["p0"] is None and r["output"] for r in neutral)  # generated, unsteered


# --- the parts, without a job ----------------------------------------------------------------------------------


def _random_file(rng, folder: Path, fmt: str, n: int) -> Path:
    """A prompts file of ``n`` rows in ``fmt`` mixing good, neutral and broken rows (blank lines, bad UTF-8, …)."""
    if fmt == "jsonl":
        pool = [
            b"not json\n",
            b"\n",
            b'{"prompt": "caf\xe9"}\n',
            b"[1]\n",
            *(
                json.dumps({"value": v, "prompt": p}).encode() + b"\n"
                for v in ("power", "", None, "bogus")
                for p in ("a\nb", "x", None, 5)
            ),
        ]
        data = b"".join(rng.choice(pool) for _ in range(n))
        path = folder / f"f{rng.random()}.jsonl"
        path.write_bytes(data.rstrip(b"\n") if rng.random() < 0.3 else data)
    elif fmt == "csv":
        pool = [b'power,"multi\nline"\n', b'"",x\n', b"a,b,c\n", b"\n", b"power,caf\xe9\n", b"power,ok\n"]
        path = folder / f"f{rng.random()}.csv"
        path.write_bytes(b"value,prompt\n" + b"".join(rng.choice(pool) for _ in range(n)))
    else:
        rows = [
            {"value": rng.choice(["power", None, ""]), "prompt": rng.choice(["x", None])}
            for _ in range(max(n, 1))
        ]
        path = folder / f"f{rng.random()}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=rng.randint(1, 5))
    return path


def test_the_planner_screens_every_row_as_the_workers_read_it(tmp_path) -> None:
    import random

    from conva.batch.inputs import plan_input, read_slice

    rng = random.Random(0)
    for trial in range(60):
        path = _random_file(rng, tmp_path, ("jsonl", "csv", "parquet")[trial % 3], rng.randint(0, 25))
        seen: list = []
        plan = plan_input(
            str(path), rng.randint(1, 7), lambda name, records: seen.extend((name, r) for r in records)
        )
        assert seen == [(path.name, r) for s in plan.slices for r in read_slice(s)], path.read_bytes()


def test_a_row_tally_merges_shards_and_says_each_reason_once() -> None:
    from conva.batch.badrows import RowTally

    def shard(rows: list[tuple[int, str | None, str | None]]) -> RowTally:
        t = RowTally()
        t.add_table(
            pa.table(
                {
                    "row_id": [f"p.jsonl/{r:06d}" for r, _, _ in rows],
                    "value": [v for _, v, _ in rows],
                    "error": [e for _, _, e in rows],
                }
            )
        )
        return RowTally.from_json(json.loads(json.dumps(t.to_json())))  # as a shard record carries it

    whole = RowTally()
    for part in (
        shard([(1, "power", None), (2, None, "invalid JSON: Extra data"), (3, None, None)]),
        shard([(4, None, "invalid JSON: Expecting value"), (5, "x", "unknown value 'x'")]),
        shard([(r, None, "invalid JSON: Extra data") for r in range(6, 12)]),
    ):
        whole.merge(part)
    assert (whole.rows, whole.neutral, whole.bad) == (11, 1, 9)
    assert whole.one_line() == (
        "8 × invalid JSON (p.jsonl rows 2, 4, 6, 7, 8, …); 1 × unknown value 'x' (p.jsonl row 5)"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("--steer.p0=abc", "steer.p0: expected a number, got text 'abc'"),
        ("--steer.max_new_tokens=1.5", "steer.max_new_tokens: expected an integer, got number 1.5"),
        (
            "--data.values=power",
            "data.values: expected a list of text, got text 'power' (write a list: "
            "--data.values='[\"power\"]')",
        ),
        ("--fit.band=3", "fit.band: expected text or a list of integers, got integer 3"),
        ('--fit.band=[1, "x"]', "fit.band[1]: expected an integer, got text 'x'"),
        ("--data.max_error_fraction=2", "data.max_error_fraction: must lie in [0, 1], got 2"),
    ],
)
def test_config_errors_name_the_key_in_the_helps_words(override, message) -> None:
    from conva.batch.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(REPO / "examples" / "tiny.toml", [override])
    assert str(err.value) == message


def test_report_messages_and_p0_with_its_digits(tmp_path, capsys) -> None:
    from conva.batch.report import format_summary
    from conva.batch.report import main as report_main

    assert report_main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"conva report: error: {tmp_path / 'nope'} does not exist: point at a "
        "study's output folder or its results.parquet"
    )
    rows = [
        dict(
            model="m",
            method="conva",
            p0=p0,
            band="auto",
            strength=None,
            setting="plain",
            values=1,
            n=4,
            **{
                k: 0.5
                for k in (
                    "csr",
                    "csr_lo",
                    "csr_hi",
                    "ppl_ratio",
                    "ppl_ratio_lo",
                    "ppl_ratio_hi",
                    "ppl_plain_ratio",
                    "utility_ratio",
                    "gate_open_rate",
                    "mc_gate_open_rate",
                )
            },
        )
        for p0 in (0.99, 0.99999)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pooled.parquet")
    table = format_summary(tmp_path).splitlines()
    body = table[next(i for i, line in enumerate(table) if line.startswith("---")) + 1 :]
    assert [line.split()[3] for line in body] == ["0.99", "0.99999"]  # model, setting, method, p0


def test_sigterm_stops_a_job_even_after_ray_took_the_handler() -> None:
    """``ray.init`` installs its own SIGTERM handler (sys.exit); the job's comes back, and a real SIGTERM stops it."""
    from ray._private.utils import set_sigterm_handler

    from conva.jobs import common

    with pytest.raises(KeyboardInterrupt) as caught, common.interrupts():
        set_sigterm_handler(lambda signum, _frame: sys.exit(signum))  # what ray.init does in a driver
        common._reinstall_interrupts()  # what connect_ray does right after ray.init
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    assert isinstance(caught.value, common.Interrupted) and common.interrupted(caught.value).exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is not common._on_signal  # restored when the job ends
