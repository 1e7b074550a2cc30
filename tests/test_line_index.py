"""A JSON Lines file planned range by range (conva/batch/line_index.py) reads back exactly as the whole file.

The reference is the whole file split at its newlines, here, with no planner: every row (a line holding
something besides whitespace) must come back from the slices exactly once, in order, numbered by its line.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from conva.batch import line_index
from conva.batch.inputs import plan_input, read_slice
from conva.batch.line_index import index_ranges


def _reference(data: bytes) -> tuple[list[tuple[int, str]], int]:
    """(line number, text) of every row, and the blank lines, by splitting the whole file."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline ending the last line starts no line
        lines.pop()
    rows = [(n, raw.decode().rstrip("\r")) for n, raw in enumerate(lines, start=1) if raw.strip()]
    return rows, len(lines) - len(rows)


def _random_jsonl(rng: random.Random, n: int) -> bytes:
    parts = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1:
            parts.append(b"")  # an empty line
        elif kind < 0.15:
            parts.append(rng.choice([b" ", b"\t \r", b"\x0b\x0c  "]))  # whitespace only: no row either
        elif kind < 0.2:
            parts.append(rng.choice([b" ", b"\t", b"\r  "]) + b'{"prompt": "indented %d"}' % i)  # a row
        elif kind < 0.25:
            parts.append(b'{"prompt": "' + b"x" * rng.randint(50, 300) + b'"}')  # longer than some ranges
        else:
            ending = b"\r" if rng.random() < 0.2 else b""
            parts.append(b'{"prompt": "p%d", "value": "v"}' % i + ending)
    data = b"\n".join(parts)
    return data + (b"\n" if rng.random() < 0.7 else b"")


CASES = [
    (seed, rps, range_bytes) for seed in range(6) for rps in (1, 3, 7) for range_bytes in (5, 37, 256, 10**6)
]


@pytest.mark.parametrize(("seed", "rows_per_shard", "range_bytes"), CASES)
def test_slices_of_any_range_size_read_back_every_row_once_numbered_by_its_line(
    tmp_path, monkeypatch, seed: int, rows_per_shard: int, range_bytes: int
) -> None:
    # Lines also cross the scanner's read chunks (8 MiB in use; a few bytes here).
    monkeypatch.setattr(line_index, "_CHUNK", [2, 11, line_index._CHUNK][seed % 3])
    rng = random.Random(seed)
    data = (b"\n\n" if seed % 2 else b"") + _random_jsonl(rng, rng.randint(0, 60))
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    expected, blank = _reference(data)

    plan = plan_input(str(path), rows_per_shard, range_bytes=range_bytes)
    got = [(r.row, r.raw) for s in plan.slices for r in read_slice(s)]
    assert got == expected
    assert plan.rows == len(expected) and plan.files[0].blank_lines == blank
    assert all(1 <= s.rows <= rows_per_shard for s in plan.slices)
    assert all(a.stop <= b.start for a, b in zip(plan.slices, plan.slices[1:]))  # disjoint, in order
    if range_bytes >= len(data):  # one range: shards of exactly rows_per_shard rows, the last may be short
        assert [s.rows for s in plan.slices[:-1]] == [rows_per_shard] * (len(plan.slices) - 1)
        assert (
            plan.sha256
            == hashlib.sha256(f"p.jsonl\0{hashlib.sha256(data).hexdigest()}\0".encode()).hexdigest()
        )


def test_ranges_own_each_line_once_and_meet_end_to_start(tmp_path) -> None:
    data = b'{"a": 1}\n' * 10 + b"\n" + b'{"a": "' + b"y" * 100 + b'"}\n' + b'{"a": 2}'
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    for range_bytes in range(1, len(data) + 2):
        parts = index_ranges(str(path), len(data), 4, range_bytes)
        assert parts[0].first == 0 and parts[-1].end == len(data)
        assert all(a.end == b.first for a, b in zip(parts, parts[1:]))
        assert sum(p.lines for p in parts) == 13 and sum(p.rows for p in parts) == 12
        assert [(p.start, p.stop) for p in parts][-1][1] == len(data)


def test_a_changed_byte_anywhere_changes_the_identity_and_the_same_bytes_keep_it(tmp_path) -> None:
    rows = b"".join(b'{"prompt": "row %04d"}\n' % i for i in range(400))
    path = tmp_path / "p.jsonl"
    path.write_bytes(rows)
    first = plan_input(str(path), 8, range_bytes=1000).sha256
    assert plan_input(str(path), 8, range_bytes=1000).sha256 == first
    for at in (5, len(rows) // 2, len(rows) - 4):  # the first, a middle and the last range
        changed = bytearray(rows)
        changed[at] = ord("Z") if changed[at] != ord("Z") else ord("Y")
        path.write_bytes(bytes(changed))
        assert plan_input(str(path), 8, range_bytes=1000).sha256 != first


def test_with_metadata_only_the_driver_screens_whole_shards_up_to_its_budget(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(b'{"prompt": "%d"}\n' % i for i in range(1, 51)) + b"not json\n")
    seen: list[int] = []

    def screen(name: str, records: list) -> None:
        assert name == "p.jsonl"
        seen.extend(r.row for r in records)

    plan_input(str(path), 8, screen, metadata_only=True, screen_rows=1)
    assert seen == list(range(1, 9))  # the workers screen the rest: their error rows count at the end
    seen.clear()
    plan_input(str(path), 8, screen, metadata_only=True, range_bytes=100, screen_rows=1)
    assert seen == list(range(1, 8))  # the first range holds 7 lines: its only shard is the first
    seen.clear()
    ranged = plan_input(str(path), 8, screen, metadata_only=True, range_bytes=100, screen_rows=10)
    first, second = ranged.slices[0].rows, ranged.slices[1].rows  # each range's only shard: 7 rows, then 6
    assert first < 10 <= first + second and seen == list(range(1, 1 + first + second))
    seen.clear()
    plan = plan_input(str(path), 8, screen, metadata_only=True)  # a small input: screened whole
    assert seen == list(range(1, 52)) and plan.rows == 51


def test_the_ranges_are_indexed_by_the_map_given(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    data = b"".join(b'{"prompt": "%d"}\n' % i for i in range(100))
    path.write_bytes(data)
    calls: list[tuple[int, int]] = []

    def serial(fn, bounds):
        for bound in bounds:
            calls.append(bound)
            yield fn(bound)

    mapped = plan_input(str(path), 8, map_ranges=serial, range_bytes=300)
    assert calls == [(s, min(s + 300, len(data))) for s in range(0, len(data), 300)]
    threaded = plan_input(str(path), 8, range_bytes=300)
    assert list(mapped.slices) == list(threaded.slices) and mapped.sha256 == threaded.sha256


def test_a_file_on_s3_is_planned_range_by_range_as_the_same_bytes_on_disk(s3_env, tmp_path) -> None:
    from conva.batch.storage import location

    data = _random_jsonl(random.Random(7), 200)
    local = tmp_path / "p.jsonl"
    local.write_bytes(data)
    remote = f"{s3_env.bucket()}/in/p.jsonl"
    location(remote).write_bytes(data)

    on_s3 = plan_input(remote, 5, range_bytes=300)
    on_disk = plan_input(str(local), 5, range_bytes=300)
    assert len(data) > 10 * 300 and (on_s3.rows, on_s3.sha256) == (on_disk.rows, on_disk.sha256)
    assert [(s.first_row, s.rows, s.start, s.stop) for s in on_s3.slices] == [
        (s.first_row, s.rows, s.start, s.stop) for s in on_disk.slices
    ]
    assert [(r.row, r.raw) for s in on_s3.slices for r in read_slice(s)] == _reference(data)[0]
