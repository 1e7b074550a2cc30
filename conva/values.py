"""Schwartz's ten basic values, the targets ConVA steers towards.

The keys are the spellings the paper's files use (``self-direction`` keeps its hyphen), so a value name
read from a file name, a config or a data row can be checked against :data:`VALUES` directly.

Example:
    >>> from conva.values import VALUES, definition
    >>> "achievement" in VALUES
    True
    >>> definition("power").startswith("social status")
    True
"""

from __future__ import annotations

__all__ = ["VALUES", "DEFINITIONS", "definition", "check_value"]

DEFINITIONS: dict[str, str] = {
    "self-direction": "independent thought and action: choosing, creating and exploring",
    "stimulation": "excitement, novelty and challenge in life",
    "hedonism": "pleasure and sensuous gratification for oneself",
    "achievement": "personal success through demonstrating competence according to social standards",
    "power": "social status and prestige, control or dominance over people and resources",
    "security": "safety, harmony and stability of society, of relationships and of self",
    "tradition": "respect, commitment and acceptance of the customs and ideas that one's culture or "
    "religion provides",
    "conformity": "restraint of actions, inclinations and impulses likely to upset or harm others and "
    "violate social expectations or norms",
    "benevolence": "preserving and enhancing the welfare of those with whom one is in frequent personal "
    "contact",
    "universalism": "understanding, appreciation, tolerance and protection for the welfare of all people "
    "and for nature",
}

VALUES: tuple[str, ...] = tuple(DEFINITIONS)


def definition(value: str) -> str:
    """The value's one-line definition, as used in prompts and judge instructions."""
    return DEFINITIONS[check_value(value)]


def check_value(value: str) -> str:
    """Return ``value`` if it is one of the ten, else raise ``ValueError`` listing the valid names."""
    if value not in DEFINITIONS:
        raise ValueError(f"unknown value {value!r}; expected one of: {', '.join(VALUES)}")
    return value
