"""The config explained by its own models: every key with its type, default and meaning (``conva config --explain``).

A key's meaning is written once, as the docstring right under its field in the section's model
(:class:`conva.settings.Settings`, which pydantic turns into the field's ``description``; Sphinx and
editors show it too). This module renders the help from ``model_fields``, so the help, the JSON schema
and the code cannot drift apart; ``tests/test_cli.py`` fails on an undocumented key. pydantic's
validation errors are put in the same words (:func:`error_message`: the dotted key, the type it expects
and what it got, its bounds, or the keys a section knows).

Example:
    >>> from conva.batch.config import SteerConfig
    >>> field_docs(SteerConfig)["p0"]
    "Target probability P0 for conva; unset: each bundle's fit.p0."
    >>> type_text(float | None)
    'number, optional'
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from conva.settings import RESULT_NEUTRAL, STEER_TIME, KeyProblem, choices_of, marked

__all__ = [
    "field_docs",
    "type_text",
    "default_text",
    "default_of",
    "bounds_rule",
    "bounds_text",
    "error_message",
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


def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Field name → its meaning (the docstring under the field, one line; "" if none)."""
    return {name: " ".join((f.description or "").split()) for name, f in cls.model_fields.items()}


def type_text(hint: object) -> str:
    """An annotation in a config writer's words: ``float | None`` → ``number, optional``."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return type_text(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(type_text(a) for a in options)
        return text + ", optional" if len(options) < len(typing.get_args(hint)) else text
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        while typing.get_origin(item) is Annotated:
            item = typing.get_args(item)[0]
        inner = (
            typing.get_args(item) if typing.get_origin(item) in (typing.Union, types.UnionType) else (item,)
        )
        return "list of " + " or ".join(_PLURAL.get(a, getattr(a, "__name__", str(a))) for a in inner)
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _bounds(hint: Any, metadata: list[Any]) -> dict[str, float]:
    """A key's bounds (``{"gt": 0, "lt": 1}``): its field's own, and those inside its type (an optional
    value's, a list's items')."""
    todo: list[Any] = [*metadata, hint]
    found: dict[str, float] = {}
    for m in todo:
        if isinstance(m, FieldInfo):
            todo += m.metadata
        elif typing.get_args(m):
            todo += [a for a in typing.get_args(m) if a is not Ellipsis]
            todo += list(getattr(m, "__metadata__", ()))
        else:
            found.update(
                {k: v for k in ("gt", "ge", "lt", "le") if isinstance(v := getattr(m, k, None), (int, float))}
            )
    return found


def bounds_rule(hint: Any, metadata: list[Any]) -> str:
    """A key's bounds as a rule: ``must lie strictly between 0 and 1``, ``must be at least 1`` ("" if none)."""
    b = _bounds(hint, metadata)
    low = ("gt", b["gt"]) if "gt" in b else ("ge", b["ge"]) if "ge" in b else None
    high = ("lt", b["lt"]) if "lt" in b else ("le", b["le"]) if "le" in b else None
    if low and high:
        if (low[0], high[0]) == ("gt", "lt"):
            return f"must lie strictly between {low[1]:g} and {high[1]:g}"
        return f"must lie in {bounds_text(hint, metadata)[3:]}"
    if low:
        if low == ("gt", 0):
            return "must be positive"
        if low == ("ge", 0):
            return "must be 0 or more"
        return f"must be at least {low[1]:g}" if low[0] == "ge" else f"must be above {low[1]:g}"
    if high:
        return f"must be at most {high[1]:g}" if high[0] == "le" else f"must be below {high[1]:g}"
    return ""


def bounds_text(hint: Any, metadata: list[Any]) -> str:
    """A key's bounds in the help's short form: ``in (0, 1)``, ``>= 1``, ``> 0`` ("" if none)."""
    b = _bounds(hint, metadata)
    low = f"({b['gt']:g}" if "gt" in b else f"[{b['ge']:g}" if "ge" in b else None
    high = f"{b['lt']:g})" if "lt" in b else f"{b['le']:g}]" if "le" in b else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">" if low[0] == "(" else ">=") + f" {low[1:]}"
    if high:
        return ("<" if high[-1] == ")" else "<=") + f" {high[:-1]}"
    return ""


def _union(hint: Any) -> tuple[Any, ...]:
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()


def default_text(value: object) -> str:
    """A default as it would be written in TOML (``unset`` for None)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)


def sections(*roots: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Section name → its model, for each root config model in order (e.g. the job's
    :class:`conva.batch.config.Config`, then a study's :class:`conva.batch.study.StudyConfig`). A root's
    field whose type is an earlier root (a study's ``job``) is that root's sections, so it is left out."""
    found: dict[str, type[BaseModel]] = {}
    for root in roots:
        for name, f in root.model_fields.items():
            section = f.annotation
            if isinstance(section, type) and issubclass(section, BaseModel) and section not in roots:
                found[name] = section
    return found


def section_summary(cls: type) -> str:
    """The first line of a section class's docstring, without its ``[section]:`` label."""
    doc = cls.__doc__ or ""
    first = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return re.sub(r"^``\[\w+\]``:?\s*", "", first)


def default_of(field: FieldInfo) -> object:
    """A field's default (its factory's product where it has one)."""
    return field.get_default(call_default_factory=True)


def explain(roots: tuple[type[BaseModel], ...], section: str | None = None) -> str:
    """Every key of ``section`` (or of every section of ``roots``) with its type, the values it takes
    (a :class:`~conva.settings.OneOf` key), its default and its meaning."""
    known = sections(*roots)
    if section is not None and section not in known:
        raise UnknownSectionError(f"unknown section {section!r}; the sections are {', '.join(known)}")
    out = []
    for name, cls in known.items():
        if section is not None and name != section:
            continue
        summary = section_summary(cls)
        out.append(f"[{name}]" + (f"  {summary}" if summary else ""))
        docs = field_docs(cls)
        for key, f in cls.model_fields.items():
            options = choices_of(f)
            rule = bounds_text(f.annotation, f.metadata)
            kind = (
                type_text(f.annotation)
                + (f": {' | '.join(options)}" if options else "")
                + (f"; {rule}" if rule else "")
            )
            kind += "; result-neutral" if marked(f, RESULT_NEUTRAL) or marked(cls, RESULT_NEUTRAL) else ""
            kind += "; read when steering" if marked(f, STEER_TIME) else ""
            out.append(f"  {key} = {default_text(default_of(f))}  ({kind})")
            doc = _sentence(docs[key], options)
            out += textwrap.wrap(doc, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _sentence(doc: str, options: tuple[str, ...]) -> str:
    """``doc`` with a capital first letter, unless it starts with a symbol (``ε``) or a value (``none | …``)."""
    first = doc.split(" ", 1)[0]
    if not doc[:1].isascii() or not doc[:1].islower() or first in options:
        return doc
    return doc[:1].upper() + doc[1:]


def key_index(*roots: type[BaseModel]) -> str:
    """Every section of ``roots`` with its keys, one line each (for ``--help``)."""
    lines = []
    for name, cls in sections(*roots).items():
        keys = ", ".join(cls.model_fields)
        lines += textwrap.wrap(
            f"[{name}] {keys}", _WIDTH - 4, initial_indent="  ", subsequent_indent="      "
        )
    return "\n".join(lines)


# --- pydantic's errors in the words of `conva config --explain` ------------------------------------------------


def _given(value: Any) -> str:
    """What a config value is, in the words of ``conva config --explain``: ``text 'abc'``, ``a list [1, 2]``."""
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    return f"{type_text(type(value))} {value!r}" if type(value) in (str, int, float, bool) else repr(value)


def _article(words: str) -> str:
    return words if words in ("text", "true or false") else ("an " if words[0] in "aeiou" else "a ") + words


def _strip(hint: Any) -> Any:
    """An annotation without its ``Annotated`` metadata."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, Any, list[Any]]:
    """Follow an error's ``loc`` down ``root``: the dotted key there (``fit.band[1]``), its annotation and
    its metadata (bounds, choices). The name pydantic gives a union's option is passed over; an item below
    it belongs to the union's list option."""
    key, meta = "", []
    hint: Any = None
    cls: Any = root
    for i, part in enumerate(loc):
        if isinstance(part, int):
            item = _strip(hint)
            hint = typing.get_args(item)[0] if typing.get_origin(item) is tuple else hint
            meta, key = list(getattr(hint, "__metadata__", ())), key + f"[{part}]"
        elif isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            f = cls.model_fields[part]
            hint, meta, key = f.annotation, list(f.metadata), key + ("." if key else "") + part
            cls = hint
        elif _union(hint) and i + 1 < len(loc):
            hint = next((o for o in _union(hint) if typing.get_origin(_strip(o)) is tuple), hint)
    return key, hint, meta


def _wanted(hint: Any) -> str:
    """The type a key expects, with its article: ``an integer``, ``text or a list of integers``."""
    options = [o for o in _union(hint) if o is not type(None)] or [hint]
    return " or ".join(_article(type_text(o)) for o in options)


def error_message(root: type[BaseModel], errors: list[Any], prefix: str) -> str:
    """A :class:`conva.batch.config.ConfigError` message for pydantic's ``errors`` validating ``root``: the
    first problem, in the help's words, its key prefixed with ``prefix`` (e.g. ``judge.``)."""
    first = errors[0]
    key, hint, meta = _walk(root, first["loc"])
    kind, value, where = first["type"], first["input"], prefix + key
    if kind == "extra_forbidden":
        parent_key, parent, _ = _walk(root, first["loc"][:-1])
        known = sorted(parent.model_fields) if parent_key else sorted(root.model_fields)
        section = (prefix + parent_key).rstrip(".") or "the top"
        unknown = prefix + (f"{parent_key}." if parent_key else "") + str(first["loc"][-1])
        return f"unknown key {unknown!r} (known under {section}: {', '.join(known)})"
    if kind in ("model_type", "dict_type"):
        return f"{where or 'config'}: expected a table of keys, got {type(value).__name__}"
    if kind in ("value_error", "assertion_error"):
        err = first.get("ctx", {}).get("error")
        if isinstance(err, KeyProblem):
            return f"{where}.{err}" if where else str(err)
        return f"{where}: {err}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{where}: {bounds_rule(hint, meta)}, got {value!r}"
    if kind == "too_short":
        return f"{where}: list at least {first['ctx']['min_length']} item(s)"
    # A wrong type. A union reports each option it tried: a list goes by the list option's own error on
    # its bad item, anything else by the whole union.
    field_loc = first["loc"][: key.count(".") + 1]
    field_key, field_hint, _ = _walk(root, field_loc)
    if _union(field_hint):
        items = [
            e
            for e in errors
            if e["loc"][: len(field_loc)] == field_loc and len(e["loc"]) > len(field_loc) + 1
        ]
        if isinstance(value, (list, tuple)) and items:
            item_key, item_hint, _ = _walk(root, items[0]["loc"])
            return f"{prefix}{item_key}: expected {_wanted(item_hint)}, got {_given(items[0]['input'])}"
        return f"{prefix}{field_key}: expected {_wanted(field_hint)}, got {_given(value)}"
    hint_text = ""
    if typing.get_origin(_strip(hint)) is tuple and isinstance(value, str):
        hint_text = f" (write a list: --{where}='[\"{value}\"]')"
    return f"{where}: expected {_wanted(hint)}, got {_given(value)}{hint_text}"
