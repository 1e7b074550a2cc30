"""Every row and file accounted for, as a user meets it: ``conva validate`` and a run's last line (subprocesses).

A prompts folder holding what users trip over (a misspelt ``Value`` column, a blank line, a CSV quote
left open, a hidden file, a ``.txt`` and a ``.jsonl.gz``, a subfolder) is counted row by row and file by
file, with exact numbers; a file whose rows name no value is refused; a run whose workers find most
prompts too long exits non-zero after saying what it committed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.toml")


def conva(
    cwd: Path, *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conva.jobs.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _folder(root: Path) -> Path:
    folder = root / "prompts"
    (folder / "sub").mkdir(parents=True)
    (folder / "_old").mkdir()
    (folder / "a.jsonl").write_text(
        '{"value": "power", "prompt": "Should I lead?"}\n'
        "\n"
        '{"Value": "power", "prompt": "Should I rule?"}\n'
        '{"prompt": "What is the capital of France?"}\n'
    )
    (folder / "b.csv").write_text('value,prompt\nsecurity,"Lock the door?\npower,Take the crown?\n')
    (folder / "sub" / "c.jsonl").write_text('{"value": "security", "prompt": "Save money?"}\n')
    (folder / "_old" / "d.jsonl").write_text('{"value": "power", "prompt": "old"}\n')
    (folder / "_hidden.jsonl").write_text('{"value": "power", "prompt": "hidden"}\n')
    (folder / "notes.txt").write_text("not data\n")
    (folder / "e.jsonl.gz").write_bytes(b"\x1f\x8b")
    return folder


def test_validate_counts_every_row_and_file_of_a_folder(tmp_path, tiny_path) -> None:
    folder = _folder(tmp_path)
    done = conva(
        tmp_path,
        "validate",
        "--config",
        TINY,
        f"--model.name={tiny_path}",
        f"--data.prompts={folder}",
        f"--output.dir={tmp_path / 'out'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  data.prompts:"))
    assert lines[start : start + 6] == [
        "  data.prompts: 5 rows read: 3 with a value, 1 neutral (no value: generated unsteered, keeping its "
        "method), 1 bad (each becomes an error row; data.max_error_fraction = 0.5):",
        "      1  no value field, but a field 'Value': the column must be named 'value'  a.jsonl row 3",
        "      (prompts over the token limit are found by the workers, with the tokenizer)",
        "      files: 3 read (a.jsonl, b.csv, sub/c.jsonl); 4 skipped (_hidden.jsonl: hidden: its name starts "
        "with '_' or '.'; _old/: hidden: its name starts with '_' or '.'; e.jsonl.gz: compressed: decompress "
        "it first (shards are byte ranges of a file); notes.txt: not a .jsonl, .json, .csv or .parquet file)",
        "      blank lines: 1 (a.jsonl 1): no rows, but rows keep their line numbers",
        "      warning: 1 CSV row spans several lines (a quoted field holds a newline) starting at b.csv line 2: "
        "if that is not meant, a quote is unclosed",
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"Value": "power", "prompt": "a?"}\n{"Value": "security", "prompt": "b?"}\n',
            "data.prompts: 2 of 2 rows (100%) cannot be steered, more than data.max_error_fraction = 0.5 "
            "allows: 2 × no value field, but a field 'Value': the column must be named 'value' (p.jsonl rows "
            "1, 2).",
        ),
        (
            '{"value": "power", "prompts": "a?"}\n',
            "data.prompts: 1 of 1 rows (100%) cannot be steered, more than data.max_error_fraction = 0.5 "
            "allows: 1 × no prompt field, but a field 'prompts': the column must be named 'prompt' (p.jsonl "
            "row 1).",
        ),
        (
            '{"prompt": "a?"}\n{"prompt": "b?"}\n{"prompt": "c?"}\n',
            "data.prompts: none of its 3 rows names a value (3 neutral, 0 bad): nothing would be steered, and "
            "100% neutral rows is more than data.max_error_fraction = 0.5 allows. Give the rows a `value` column "
            "naming one of data.values (power, security), or set --data.max_error_fraction=1 to generate them "
            "all unsteered",
        ),
    ],
)
def test_a_misspelt_column_or_no_value_at_all_is_refused(tmp_path, tiny_path, content, message) -> None:
    (tmp_path / "p.jsonl").write_text(content)
    done = conva(
        tmp_path,
        "validate",
        "--config",
        TINY,
        f"--model.name={tiny_path}",
        f"--data.prompts={tmp_path / 'p.jsonl'}",
        f"--output.dir={tmp_path / 'out'}",
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"conva validate: error: {message}"), done.stderr


def test_row_ids_are_line_numbers_and_error_rows_keep_what_was_read(tmp_path) -> None:
    import pyarrow.parquet as pq

    from conva.batch.inputs import plan_input, read_slice
    from conva.batch.steer_rows import steering_rows_from_records

    (tmp_path / "p.jsonl").write_text(
        '\n{"value": "power", "prompt": "ok"}\nnot json\n\n{"prompt": 5}\n{"text": "a paper row"}\n'
    )
    (tmp_path / "q.csv").write_text('value,prompt\n\npower,ok\npower,"two\nlines"\na,b,c\n')
    pq.write_table(pa.table({"value": ["power", "power"], "prompt": ["ok", None]}), tmp_path / "r.parquet")
    rows = []
    for name in ("p.jsonl", "q.csv", "r.parquet"):
        plan = plan_input(str(tmp_path / name), rows_per_shard=2)
        for s in plan.slices:
            rows += steering_rows_from_records(s.name, read_slice(s), ["power"]).to_pylist()
    assert [(r["row_id"], r["prompt"], r["error"]) for r in rows] == [
        ("p.jsonl/000002", "ok", None),
        ("p.jsonl/000003", "not json", "invalid JSON: Expecting value"),
        ("p.jsonl/000005", '{"prompt": 5}', "prompt is int, not text"),
        ("p.jsonl/000006", '{"text": "a paper row"}', "no prompt field: the row has text"),
        ("q.csv/000003", "ok", None),
        ("q.csv/000004", "two\nlines", None),
        ("q.csv/000006", "a,b,c", "expected 2 fields, got 3"),
        ("r.parquet/000001", "ok", None),
        ("r.parquet/000002", '{"value": "power", "prompt": null}', "prompt is null"),
    ]


@pytest.mark.slow
def test_a_run_counts_its_rows_and_refuses_what_its_workers_found(tmp_path, tiny_path, ray_session) -> None:
    """Prompts over the token limit are found by the workers: they count toward data.max_error_fraction too."""
    import ray

    long = " ".join(["Should I take the promotion abroad and leave my family behind for it?"] * 8)
    rows = [
        {"value": "power", "prompt": "Should I lead?"},
        {"value": "security", "prompt": long},
        {"value": "power", "prompt": long},
        {"prompt": long},
        {"prompt": "What is the capital of France?"},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = conva(
        tmp_path,
        "run",
        "--config",
        TINY,
        f"--model.name={tiny_path}",
        f"--data.prompts={tmp_path / 'p.jsonl'}",
        f"--output.dir={tmp_path / 'out'}",
        "--steer.max_prompt_tokens=40",
        "--steer.max_new_tokens=2",
        env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    counted = re.fullmatch(
        r"conva run: done in \d+ s: extract \d+/\d+, fit 2/2, steer 1/1 shards run now; generations: 5 rows "
        r"read: (\d) steered, (\d) gated off, 1 neutral, 3 error rows \(see the `error` column: 3 × prompt too "
        r"long: \d+ tokens > limit 40 \(p.jsonl rows 2, 3, 4\)\); data.prompts files: 1 read \(p.jsonl\); 0 skipped",
        done.stdout.strip(),
    )
    assert counted and int(counted[1]) + int(counted[2]) == 1, done.stdout
    assert re.fullmatch(
        r"conva run: error: generations: 3 of 5 rows \(60%\) are error rows, more than data.max_error_fraction "
        r"= 0.5 allows: 3 × prompt too long: \d+ tokens > limit 40 \(p.jsonl rows 2, 3, 4\). The rows are "
        r"committed \(see the `error` column\); fix the input, or raise --data.max_error_fraction",
        done.stderr.strip().splitlines()[-1],
    ), done.stderr[-2000:]
