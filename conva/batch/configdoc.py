"""The config explained by its own classes: every key with its type, default and meaning (``conva config --explain``).

A key's meaning is written once, beside its field in the section's dataclass: the string right under
the field (an attribute docstring, which Sphinx and editors show too) or, for a short meaning, the
comment at the end of the field's line. This module reads both from the source, so the help, the
README's pointer and the code cannot drift apart; ``tests/test_cli.py`` fails on an undocumented key.

Example:
    >>> from conva.batch.config import SteerConfig
    >>> field_docs(SteerConfig)["p0"]
    "Target probability P0 for conva; unset: each bundle's fit.p0."
    >>> type_text(float | None)
    'number, optional'
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from functools import cache

__all__ = [
    "field_docs",
    "type_text",
    "default_text",
    "sections",
    "explain",
    "key_index",
    "section_summary",
    "UnknownSectionError",
]

_WIDTH = 100
_WORDS: dict[object, str] = {
    str: "text",
    int: "integer",
    float: "number",
    bool: "true or false",
    dict: "table",
}
_PLURAL: dict[object, str] = {
    str: "text",
    int: "integers",
    float: "numbers",
    bool: "booleans",
    dict: "tables",
}


class UnknownSectionError(ValueError):
    """``--explain`` was given a section no config has."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its meaning: the string under the field, else the comment closing its line ("" if neither)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)  # the source of a class is one class statement
    body = node.body
    docs = {}
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
        else:
            docs[stmt.target.id] = comments.get(stmt.end_lineno or stmt.lineno, "")
    return docs


def type_text(hint: object) -> str:
    """An annotation in a config writer's words: ``float | None`` → ``number, optional``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(type_text(a) for a in options)
        return text + ", optional" if len(options) < len(typing.get_args(hint)) else text
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = (
            typing.get_args(item) if typing.get_origin(item) in (typing.Union, types.UnionType) else (item,)
        )
        return "list of " + " or ".join(_PLURAL.get(a, getattr(a, "__name__", str(a))) for a in inner)
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def default_text(value: object) -> str:
    """A default as it would be written in TOML (``unset`` for None)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)


def sections(*roots: type) -> dict[str, type]:
    """Section name → its dataclass, for each root config class in order (e.g. the job's
    :class:`conva.batch.config.Config`, then a study's :class:`conva.batch.study.StudyConfig`). A root's
    field whose type is an earlier root (a study's ``job``) is that root's sections, so it is left out."""
    found: dict[str, type] = {}
    for root in roots:
        hints = typing.get_type_hints(root)
        found.update({f.name: hints[f.name] for f in dataclasses.fields(root) if hints[f.name] not in roots})
    return found


def section_summary(cls: type) -> str:
    """The first line of a section class's docstring, without its ``[section]:`` label."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # the docstring dataclasses make up
        return ""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r"^``\[\w+\]``:?\s*", "", first)


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    # mypy cannot narrow ``default_factory`` away from ``MISSING`` (a sentinel instance, not an enum);
    # every field reaching here has a default or a factory.
    return f.default_factory()  # type: ignore[operator]


def explain(roots: tuple[type, ...], choices: dict[str, tuple[str, ...]], section: str | None = None) -> str:
    """Every key of ``section`` (or of every section of ``roots``) with its type, default, ``choices``
    (dotted key → the values it takes) and meaning."""
    known = sections(*roots)
    if section is not None and section not in known:
        raise UnknownSectionError(f"unknown section {section!r}; the sections are {', '.join(known)}")
    out = []
    for name, cls in known.items():
        if section is not None and name != section:
            continue
        summary = section_summary(cls)
        out.append(f"[{name}]" + (f"  {summary}" if summary else ""))
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            options = choices.get(f"{name}.{f.name}")
            kind = type_text(hints[f.name]) + (f": {' | '.join(options)}" if options else "")
            out.append(f"  {f.name} = {default_text(_default(f))}  ({kind})")
            doc = _sentence(docs[f.name], options or ())
            out += textwrap.wrap(doc, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _sentence(doc: str, options: tuple[str, ...]) -> str:
    """``doc`` with a capital first letter, unless it starts with a symbol (``ε``) or a value (``none | …``)."""
    first = doc.split(" ", 1)[0]
    if not doc[:1].isascii() or not doc[:1].islower() or first in options:
        return doc
    return doc[:1].upper() + doc[1:]


def key_index(*roots: type) -> str:
    """Every section of ``roots`` with its keys, one line each (for ``--help``)."""
    lines = []
    for name, cls in sections(*roots).items():
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        lines += textwrap.wrap(
            f"[{name}] {keys}", _WIDTH - 4, initial_indent="  ", subsequent_indent="      "
        )
    return "\n".join(lines)
