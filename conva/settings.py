"""The building blocks of every config section: a frozen, strict pydantic model and three field helpers.

A config key is declared once, as a field of a :class:`Settings` subclass: its type (strict: ``"1"`` is
no integer, ``1`` no boolean; an integer is a number), its bounds (``Field(ge=…, lt=…)``), its default,
and its meaning in the string right under it (an attribute docstring, which pydantic turns into the
field's ``description``). From that one declaration come the validation, ``conva config --explain``, the
CLI help, the JSON schema (``conva config --schema``) and, through the markers below, which keys enter
a stage's config hash.

* :class:`OneOf` — the value must be one of a few names (a tuple, or a function returning the names
  registered now, for registries such as the backends); the schema lists them as an ``enum``.
* :data:`P0` — a target probe probability, strictly between 0 and 1: ``fit.p0``, ``steer.p0``
  (optional) and ``study.p0`` (a list) are all this one type.
* :data:`Items` — a list in the file, a tuple in the model (so a config stays hashable and frozen).
* :data:`RESULT_NEUTRAL` / :data:`STEER_TIME` — markers (``json_schema_extra``) on a field or a section:
  a result-neutral key changes how a job runs, never what it computes, so a rerun may change it freely
  (it is left out of every config hash); a steer-time gate key is read when steering, not when fitting a
  bundle (it is left out of the bundle stage's hash).

Example:
    >>> from typing import Annotated
    >>> class Demo(Settings):
    ...     kind: Annotated[str, OneOf(("a", "b"))] = "a"
    ...     '''Which kind.'''
    ...     p0: P0 = 0.9
    ...     '''The target.'''
    >>> Demo(kind="b").kind, Demo.model_fields["p0"].description
    ('b', 'The target.')
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import core_schema

__all__ = [
    "Settings",
    "OneOf",
    "KeyProblem",
    "P0",
    "Items",
    "RESULT_NEUTRAL",
    "STEER_TIME",
    "marked",
    "choices_of",
]

RESULT_NEUTRAL: dict[str, Any] = {"result_neutral": True}
"""Marks a key (or a whole section) that changes how a job runs but not what it computes."""
STEER_TIME: dict[str, Any] = {"steer_time": True}
"""Marks a ``[gate]`` key read when steering (what the gate gates), not when fitting the bundle's gate."""


class Settings(BaseModel):
    """A config section: frozen, strict, no unknown keys, every field's docstring its description."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)


class KeyProblem(ValueError):
    """A cross-key check of a section failed; ``key`` is the section's key that the message is about."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


@dataclass(frozen=True)
class OneOf:
    """A text value restricted to ``options``: a tuple, or a function giving the names registered now."""

    options: tuple[str, ...] | Callable[[], Iterable[str]]

    def names(self) -> tuple[str, ...]:
        """The allowed values, read now (a registry may have grown since the model was declared)."""
        return tuple(self.options() if callable(self.options) else self.options)

    def check(self, value: str) -> str:
        if value not in self.names():
            raise ValueError(f"{value!r} is not one of {', '.join(self.names())}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out = handler(schema)
        out["enum"] = list(self.names())
        return out


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


T = TypeVar("T")
Items = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]
"""``Items[int]``: ``tuple[int, ...]`` that also takes a list (TOML, YAML and JSON have no tuples)."""


P0 = Annotated[float, Field(gt=0.0, lt=1.0)]
"""A target probe probability P0, strictly between 0 and 1: ``fit.p0``, ``steer.p0`` and ``study.p0`` are
this one type (so one rule and one error message).

Its flow from file to table: ``fit.p0`` is stored in each fitted bundle (``ValueBundle.p0``); ``steer.p0``
(optional) overrides it for a job, and a study's ``study.p0`` grid becomes each steering row's ``p0``
column, which overrides ``[steer]`` (:func:`conva.batch.steer_rows.row_settings`); the row's
:class:`conva.steering.spec.SteerSpec` carries it, and ``SteerSpec.target()`` resolves the effective
value (the row's, else ``steer.p0``, else the bundle's). The generations' ``p0`` column holds that
effective value on a steered ConVA row; on an error row, where no bundle was reached, it holds the P0
asked for (the row's or ``steer.p0``; null when neither is set); on other methods' rows it is null.
"""


def marked(field: FieldInfo | type[BaseModel], marker: dict[str, Any]) -> bool:
    """Whether a field (or a section class) carries ``marker`` in its ``json_schema_extra``."""
    extra = (
        field.json_schema_extra
        if isinstance(field, FieldInfo)
        else field.model_config.get("json_schema_extra")
    )
    return isinstance(extra, dict) and all(extra.get(k) == v for k, v in marker.items())


def choices_of(field: FieldInfo) -> tuple[str, ...]:
    """The values a :class:`OneOf` field (or a list of them) takes now (``()`` for any other field)."""
    todo: list[Any] = [*field.metadata, field.annotation]
    for meta in todo:
        if isinstance(meta, OneOf):
            return meta.names()
        todo += [a for a in typing.get_args(meta) if not isinstance(a, (str, int, float))]
        todo += list(getattr(meta, "__metadata__", ()))
    return ()
