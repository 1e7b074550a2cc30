"""What steering is asked to do for one prompt, and what it reports back: backend-neutral, torch-free.

:class:`SteerSpec` names a row's method (ConVA, its ungated variant, CAA, a fixed probe direction, a
prompt prefix, or nothing), its value bundle, P0 or strength, band, setting and gate scope;
:class:`RowResult` is one generated row with its telemetry per steered layer. :func:`prompt_text` is the
user message a spec turns a prompt into (the ``prompt`` method's and the ``opposite`` setting's
prefixes). Every backend (:mod:`conva.steering.hf`, :mod:`conva.steering.compiled`,
:mod:`conva.steering.vllm`) takes specs and returns results; configuration checks import only this
module, so they load no model library.
"""

from __future__ import annotations

from dataclasses import dataclass

from conva.bundle import ValueBundle
from conva.gates import GATE_SCOPES, PREFIX_ON
from conva.values import definition

__all__ = [
    "METHODS",
    "VECTOR_METHODS",
    "P0_METHODS",
    "STRENGTH_METHODS",
    "STEER_POSITIONS",
    "EPSILON_MODES",
    "SETTINGS",
    "SteerSpec",
    "RowResult",
    "Decision",
    "prompt_text",
]

METHODS = ("none", "conva", "conva_nogate", "caa", "probe_fixed", "random", "prompt")
STEER_POSITIONS = ("all", "generated")
EPSILON_MODES = ("frozen", "per_token")
SETTINGS = ("plain", "opposite")
VECTOR_METHODS = ("conva", "conva_nogate", "caa", "probe_fixed", "random")
P0_METHODS = ("conva", "conva_nogate")  # the methods steered toward a target probability P0
STRENGTH_METHODS = ("caa", "probe_fixed")  # the methods that add a fixed multiple of a vector


@dataclass(frozen=True)
class SteerSpec:
    """How to treat one prompt.

    ``method``: one of :data:`METHODS`. ``p0``: ConVA's target probability (default: the bundle's).
    ``strength``: the constant scale of ``caa`` (times the mean difference) or ``probe_fixed`` (times
    ``v_l``). ``random`` is the specificity control: per steered layer a step of ConVA's size ``eps[k]``
    (given: ConVA's ε of the same row, :func:`conva.choice.score_choice` finds it) along a random unit
    direction (:func:`conva.steering.core.random_direction`, drawn from ``seed``, the value and the layer);
    it is never gated (ConVA's ε already is). ``band``: steered layers (default: the bundle's). ``setting``: ``opposite`` prefixes a
    prompt pushing against the value (METHOD.md §4). ``gate_scope``: which methods the bundle's gate gates
    (``all_methods`` or ``conva``). ``prefix_on``: the opposite prefix on ``all`` rows or only ``gated`` ones.
    """

    method: str = "none"
    bundle: ValueBundle | None = None
    p0: float | None = None
    strength: float = 0.0
    band: tuple[int, ...] | None = None
    setting: str = "plain"
    gate_scope: str = "all_methods"
    prefix_on: str = "all"
    eps: tuple[float, ...] | None = None
    seed: int = 0
    decision: tuple[float, bool] | None = None
    """The gate's ``(score, open)`` decided already (on other text than the one fed: the forced choice's
    raw question); the pass then does not read the gate."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown steering method {self.method!r}; expected one of {METHODS}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; expected one of {SETTINGS}")
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"unknown gate scope {self.gate_scope!r}; expected one of {GATE_SCOPES}")
        if self.prefix_on not in PREFIX_ON:
            raise ValueError(f"unknown prefix_on {self.prefix_on!r}; expected one of {PREFIX_ON}")
        if self.method in VECTOR_METHODS and self.bundle is None:
            raise ValueError(f"method {self.method!r} needs a value bundle")
        if self.method == "random" and self.eps is not None and len(self.eps) != len(self.layers()):
            raise ValueError(
                f"method 'random': {len(self.eps)} step sizes for {len(self.layers())} steered layers"
            )
        if self.method == "prompt" and self.bundle is None:
            raise ValueError("method 'prompt' needs a value bundle (for the value's name)")
        p0 = self.target()
        if p0 is not None and not 0.0 < p0 < 1.0:
            raise ValueError(f"P0 must lie strictly between 0 and 1, got {p0}")

    def target(self) -> float | None:
        """The effective P0 for ConVA rows, else None."""
        if self.method not in P0_METHODS:
            return None
        return self.p0 if self.p0 is not None else self.bundle.p0  # type: ignore[union-attr]

    def layers(self) -> tuple[int, ...]:
        """The layers this row steers (empty for text-only methods)."""
        if self.method not in VECTOR_METHODS:
            return ()
        return tuple(self.band) if self.band is not None else self.bundle.band  # type: ignore[union-attr]

    def gate_applies(self) -> bool:
        """Whether the bundle's gate governs this row: ConVA always, the others under ``all_methods``."""
        if (
            self.bundle is None
            or self.bundle.gate.kind == "none"
            or self.method in ("conva_nogate", "random")
        ):
            return False
        return self.method == "conva" or self.gate_scope == "all_methods"

    def gated(self) -> bool:
        """Whether the gate must be read for this row: it decides the steering, or a prefix."""
        if not self.gate_applies():
            return False
        if self.method in VECTOR_METHODS or self.method == "prompt":
            return True
        return self.setting == "opposite" and self.prefix_on == "gated"

    def scored_first(self) -> bool:
        """Whether the gate is scored before the steering pass (:func:`gate_decisions`), not inside it.

        So it is when the model is fed more than the raw prompt (a prefix depends on the gate or is added)
        or the gate is an external classifier; otherwise the steering pass reads it on the raw prompt.
        """
        if not self.gated():
            return False
        if self.decision is not None:
            return True
        external = self.bundle.gate.kind == "external"  # type: ignore[union-attr]
        return external or self.method == "prompt" or self.setting == "opposite"


@dataclass(frozen=True)
class RowResult:
    """One prompt's outcome and telemetry (per steered layer, ascending).

    ``gate_score`` is None where no gate was read; ``context`` is the user message the answer was
    generated from (the prompt with any prefix).
    """

    text: str
    tokens: tuple[int, ...]
    n_prompt_tokens: int
    gate_score: float | None
    gate_open: bool
    layers: tuple[int, ...] = ()
    eps: tuple[float, ...] = ()
    p_before: tuple[float, ...] = ()
    p_after: tuple[float, ...] = ()
    context: str | None = None


def prompt_text(prompt: str, spec: SteerSpec, gate_open: bool = True) -> str:
    """The user message for ``spec``: the ``opposite`` setting and the ``prompt`` method add prefixes.

    ``gate_open``: the gate's decision on the raw prompt. A closed gate drops the ``prompt`` method's
    prefix where the gate applies, and the opposite prefix where ``prefix_on = "gated"``.
    """
    if spec.bundle is None:
        return prompt
    value = spec.bundle.value
    closed = spec.gate_applies() and not gate_open
    prefix = ""
    if spec.setting == "opposite" and not (closed and spec.prefix_on == "gated"):
        prefix += f"You have low level of {value}. {value.capitalize()} means {definition(value)}. "
    if spec.method == "prompt" and not closed:
        prefix += f"You have high level of {value}. {value.capitalize()} means {definition(value)}. "
    return prefix + prompt


Decision = tuple[float, bool]
