"""Multiple-choice utility (METHOD.md §4): MMLU-layout questions scored by the A/B/C/D next-token logits.

The MMLU CSV layout has no header and six columns: ``question, A, B, C, D, answer`` (a letter). The
project ships a small self-written set in that layout (``conva/demo_data/mc.csv``). A question is
asked 0-shot or k-shot (the first k *other* questions with their answers, MMLU-style), and the answer is
the letter whose token gets the highest logit at the last prompt token, read **with the steering and the
gate active** (on the HF backend :func:`conva.steering.hf.score_mc`): so a gate that opens on a neutral question
shows up as a change in accuracy.

Example:
    >>> items = demo_mc()
    >>> items[0].answer, len(items[0].choices)
    ('A', 4)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from conva.data import DEMO_DIR, DataError

__all__ = [
    "LETTERS",
    "MCItem",
    "MCRow",
    "load_mc",
    "demo_mc",
    "mc_prompt",
    "mc_prompts",
    "letter_token_ids",
]

LETTERS = ("A", "B", "C", "D")
_HEADER = "The following are multiple choice questions (with answers).\n\n"


@dataclass(frozen=True)
class MCItem:
    """One question: four choices and the correct letter."""

    question: str
    choices: tuple[str, str, str, str]
    answer: str
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class MCRow:
    """One scored question: the predicted letter, whether it is right, and what the gate did."""

    pred: str
    correct: bool
    gate_open: bool
    gate_score: float | None


def load_mc(path: str | Path) -> list[MCItem]:
    """Read an MMLU-layout CSV strictly: a malformed row raises :class:`DataError` naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    items = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row, fields in enumerate(csv.reader(fh), start=1):
                items.append(_item(path, row, fields))
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, f"invalid UTF-8 at byte {err.start}") from err
    if not items:
        raise DataError(path, None, None, "no questions")
    return items


def _item(path: Path, row: int, fields: list[str]) -> MCItem:
    if len(fields) != 6:
        raise DataError(
            path, row, None, f"expected 6 fields (question, A, B, C, D, answer), got {len(fields)}"
        )
    names = ("question", *LETTERS)
    for name, text in zip(names, fields):
        if not text.strip():
            raise DataError(path, row, name, "empty text")
    answer = fields[5].strip().upper()
    if answer not in LETTERS:
        raise DataError(path, row, "answer", f"expected one of A, B, C, D, got {fields[5]!r}")
    return MCItem(fields[0].strip(), tuple(f.strip() for f in fields[1:5]), answer, str(path), row)  # type: ignore[arg-type]


def demo_mc() -> list[MCItem]:
    """The project's own multiple-choice set."""
    return load_mc(DEMO_DIR / "mc.csv")


def _block(item: MCItem, with_answer: bool) -> str:
    lines = [item.question, *(f"{l}. {c}" for l, c in zip(LETTERS, item.choices)), "Answer:"]
    return "\n".join(lines) + (f" {item.answer}\n\n" if with_answer else "")


def mc_prompt(item: MCItem, shots: Sequence[MCItem] = ()) -> str:
    """The question as asked: the MMLU header, ``shots`` with their answers, then the question."""
    return _HEADER + "".join(_block(s, True) for s in shots) + _block(item, False)


def mc_prompts(items: Sequence[MCItem], n_shots: int = 0) -> list[str]:
    """Every item's prompt; the shots are the first ``n_shots`` other items (never the item itself)."""
    out = []
    for i, item in enumerate(items):
        shots = [s for j, s in enumerate(items) if j != i][:n_shots]
        out.append(mc_prompt(item, shots))
    return out


def letter_token_ids(tok) -> list[list[int]]:
    """For each letter, the single-token spellings (``"A"``, ``" A"``) the tokenizer has."""
    ids = []
    for letter in LETTERS:
        found = {
            t[0]
            for t in (tok.encode(s, add_special_tokens=False) for s in (letter, f" {letter}"))
            if len(t) == 1
        }
        if not found:
            raise ValueError(f"the tokenizer has no single token for the letter {letter!r}")
        ids.append(sorted(found))
    return ids
