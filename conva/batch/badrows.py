"""Bad rows of bulk input, by reason with the first row numbers: for ``validate``, the run log and the job's end.

A row of a user's prompts file (``data.prompts``) becomes one of three things, by the rule the workers
apply (:func:`conva.batch.steer_rows.steering_rows_from_records`, then the tokenizer's length check):

* a **valued** row, steered toward its value with its method;
* a **neutral** row (no value: the field is absent, null or empty, in every format), generated exactly
  as without steering, keeping its method in the output (see the README, "Neutral prompts");
* an **error row**: one output row with its reason in the ``error`` column and no generation.

:class:`RowTally` counts them in constant memory (a count, the first :data:`FIRST_ROWS` row ids and the
first message per reason), so the driver can screen an input of any size while it plans it, and a
worker can report its shard's reasons in the shard's record. Reasons are grouped by their *kind*:
the message without its particulars (:func:`reason_kind`), e.g. every ``invalid JSON: …`` together.

Example:
    >>> import pyarrow as pa
    >>> t = RowTally()
    >>> t.add_table(pa.table({"row_id": ["p.jsonl/000001", "p.jsonl/000002", "p.jsonl/000003"],
    ...                       "value": ["power", None, None], "error": [None, None, "invalid JSON: Extra data"]}))
    >>> (t.rows, t.neutral, t.bad), t.one_line()
    ((3, 1, 1), '1 × invalid JSON: Extra data (p.jsonl row 3)')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

__all__ = ["RowTally", "Reason", "reason_kind", "format_rows", "FIRST_ROWS"]

# Row ids kept per reason: enough to find the pattern in the file, few enough for one log line.
FIRST_ROWS = 5
_NUMBER = re.compile(r"\d+")
_QUOTED = re.compile(r"'[^']*'")
_QUOTED_KEPT = 3
_ROW_ID = re.compile(r"^(?P<name>.+)/(?P<row>\d+)$")


def reason_kind(error: str) -> str:
    """An error message without its particulars: the text before the first ``": "``, quotes and numbers elided.

    >>> reason_kind("invalid JSON: Expecting value"), reason_kind("expected 2 fields, got 3")
    ('invalid JSON', 'expected … fields, got …')
    >>> reason_kind("unknown value 'bogus'")
    "unknown value '…'"
    """
    head = error.split(": ", 1)[0]
    return _NUMBER.sub("…", _QUOTED.sub("'…'", head))


@dataclass
class Reason:
    """Rows of one reason kind: how many, the first few row ids, the first message and whether others differ."""

    count: int = 0
    first: list[str] = field(default_factory=list)
    example: str = ""
    varied: bool = False
    quoted: list[str] = field(default_factory=list)  # the first few distinct quoted particulars ('bogus')

    @property
    def label(self) -> str:
        """The message itself when every row had the same one, else the kind they share (with what it quoted).

        >>> r = Reason(); r.add("p/1", "unknown value 'bogus'"); r.add("p/2", "unknown value 'x'")
        >>> r.label
        "unknown value 'bogus', 'x'"
        """
        if not self.varied:
            return self.example
        kind = reason_kind(self.example)
        if self.quoted and kind.count("'…'") == 1:
            more = ", …" if len(self.quoted) > _QUOTED_KEPT else ""
            return kind.replace("'…'", ", ".join(self.quoted[:_QUOTED_KEPT]) + more)
        return kind

    def add(self, row_id: str, error: str, count: int = 1) -> None:
        quoted = _QUOTED.search(error)
        if quoted and quoted.group() not in self.quoted and len(self.quoted) <= _QUOTED_KEPT:
            self.quoted.append(quoted.group())
        if not self.example:
            self.example = error
        elif error != self.example:
            self.varied = True
        self.count += count
        if len(self.first) < FIRST_ROWS:
            self.first.append(row_id)


@dataclass
class RowTally:
    """Counts of valued, neutral and error rows, and the error rows by reason (constant memory).

    Counted from generations (a table with ``gate_open``), a valued row is either ``gated_off`` (its
    gate stayed shut: generated unsteered) or steered; :attr:`steered` is then what is left.
    """

    rows: int = 0
    neutral: int = 0
    reasons: dict[str, Reason] = field(default_factory=dict)
    gated_off: int = 0
    generated: bool = False  # counted from generations: steered and gated off are known

    @property
    def bad(self) -> int:
        return sum(r.count for r in self.reasons.values())

    @property
    def valued(self) -> int:
        """Rows with a value and no error (steered or gated off)."""
        return self.rows - self.neutral - self.bad

    @property
    def steered(self) -> int:
        return self.valued - self.gated_off

    def too_many_bad(self, max_fraction: float) -> bool:
        """More error rows than ``max_fraction`` of the rows (``data.max_error_fraction``) allows."""
        return self.rows > 0 and self.bad > max_fraction * self.rows

    def counts(self) -> str:
        """``12 rows read: 5 steered, 3 gated off, 2 neutral, 2 error rows`` (steered and gated off once generated)."""
        kinds = (
            [f"{self.steered} steered", f"{self.gated_off} gated off"]
            if self.generated
            else [f"{self.valued} with a value"]
        )
        return f"{self.rows} rows read: " + ", ".join(
            [*kinds, f"{self.neutral} neutral", f"{self.bad or 'no'} error row{'s' if self.bad != 1 else ''}"]
        )

    def add(self, row_id: str, value: str | None, error: str | None) -> None:
        """Count one row: an error row when ``error`` is set, else neutral when it has no value."""
        self.rows += 1
        if error is not None:
            self.reasons.setdefault(reason_kind(error), Reason()).add(row_id, error)
        elif value is None:
            self.neutral += 1

    def add_table(self, table: pa.Table) -> None:
        """Count every row of a steering input or a generations table (``row_id``, ``value``, ``error``)."""
        for row_id, value, error in zip(*(table.column(c).to_pylist() for c in ("row_id", "value", "error"))):
            self.add(row_id, value, error)
        if "gate_open" in table.column_names:  # generations: which valued rows did the gate keep shut?
            self.generated = True
            for value, error, gate_open in zip(
                *(table.column(c).to_pylist() for c in ("value", "error", "gate_open"))
            ):
                self.gated_off += value is not None and error is None and gate_open is False

    def merge(self, other: RowTally) -> None:
        """Add ``other``'s counts (e.g. another shard's); the first rows stay those met first."""
        self.rows += other.rows
        self.neutral += other.neutral
        self.gated_off += other.gated_off
        self.generated = self.generated or other.generated
        for kind, r in other.reasons.items():
            mine = self.reasons.setdefault(kind, Reason())
            for i, row_id in enumerate(r.first):
                mine.add(row_id, r.example, 1 if i < len(r.first) - 1 else r.count - len(r.first) + 1)
            mine.varied = mine.varied or r.varied
            for q in r.quoted:
                if q not in mine.quoted and len(mine.quoted) <= _QUOTED_KEPT:
                    mine.quoted.append(q)

    def to_json(self) -> dict:
        """A small JSON form, for a shard record's ``extra``."""
        return {
            "rows": self.rows,
            "neutral": self.neutral,
            "gated_off": self.gated_off,
            "generated": self.generated,
            "reasons": {
                k: [r.count, r.first, r.example, r.varied, r.quoted] for k, r in self.reasons.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> RowTally:
        reasons = {
            k: Reason(count, list(first), example, varied, list(rest[0]) if rest else [])
            for k, (count, first, example, varied, *rest) in data.get("reasons", {}).items()
        }
        return cls(
            int(data.get("rows", 0)),
            int(data.get("neutral", 0)),
            reasons,
            int(data.get("gated_off", 0)),
            bool(data.get("generated", False)),
        )

    def _ordered(self) -> list[Reason]:
        return sorted(self.reasons.values(), key=lambda r: (-r.count, r.first[0] if r.first else ""))

    def one_line(self) -> str:
        """Every reason on one line, most frequent first: ``2 × missing field 'prompt' (p.jsonl rows 4, 9); …``."""
        return "; ".join(f"{r.count} × {r.label} ({format_rows(r.first, r.count)})" for r in self._ordered())

    def lines(self, indent: str = "    ") -> list[str]:
        """One line per reason, aligned, most frequent first (for ``validate``)."""
        ordered = self._ordered()
        width = max((len(r.label) for r in ordered), default=0)
        count = max((len(str(r.count)) for r in ordered), default=0)
        return [
            f"{indent}{r.count:>{count}}  {r.label:<{width}}  {format_rows(r.first, r.count)}"
            for r in ordered
        ]


def format_rows(row_ids: list[str], count: int) -> str:
    """``["a.jsonl/000004", "a.jsonl/000009"]`` → ``a.jsonl rows 4, 9`` (and ``, …`` when there are more)."""
    groups: dict[str, list[str]] = {}
    for row_id in row_ids:
        m = _ROW_ID.match(row_id)
        name, row = (m.group("name"), str(int(m.group("row")))) if m else ("", row_id)
        groups.setdefault(name, []).append(row)
    parts = [
        f"{name + ' ' if name else ''}row{'s' if len(rows) > 1 else ''} {', '.join(rows)}"
        for name, rows in groups.items()
    ]
    return "; ".join(parts) + (", …" if count > len(row_ids) else "")
