"""The config's data sources read into the method's types: pairs, prompts and multiple-choice questions.

``data.pairs`` / ``data.prompts`` / ``data.neutral`` name ``"demo"``, ``"paper:<folder>"`` or a file; these
functions turn such a name into :class:`conva.data.Pair` s, :class:`conva.data.Prompt` s and
:class:`conva.mc.MCItem` s, for the extraction input, the gate's texts and a study's utility questions.
"""

from __future__ import annotations

from conva import data as D
from conva.batch.config import Config
from conva.mc import MCItem, demo_mc, load_mc

__all__ = [
    "load_pair_source",
    "load_prompt_source",
    "value_prompts",
    "load_mc_source",
    "gate_questions",
    "utility_questions",
]


def load_pair_source(source: str, value: str, kind: str) -> list[D.Pair]:
    """Pairs for ``value`` from ``demo``, ``paper:<folder>`` or a project-schema file/folder."""
    if source == "demo":
        return D.demo_pairs(value)
    if source.startswith("paper:"):
        return D.paper_pairs(source[len("paper:") :], value, kind)
    return D.load_pairs(source, value)


def load_prompt_source(source: str, value: str | None) -> list[D.Prompt]:
    """Prompts for ``value`` (neutral ones for None) from ``demo``, ``paper:<folder>`` or a file/folder."""
    if source == "demo":
        return D.demo_prompts(value) if value is not None else D.demo_neutral()
    if source.startswith("paper:"):
        return D.paper_prompts(source[len("paper:") :], value) if value else []
    return D.load_prompts(source, value)


def value_prompts(cfg: Config, value: str) -> tuple[list[D.Prompt], list[D.Prompt]]:
    """A value's prompts from ``data.prompts``, split apart: ``(to steer, for the gate)``.

    With a probe gate, the last ``gate.value_prompts`` prompts of each value train the gates (positives of
    the value's own, negatives of the others') and are never steered; the rest are steered, capped at
    ``data.max_prompts_per_value``.
    """
    prompts = load_prompt_source(cfg.data.prompts, value)
    k = cfg.gate.value_prompts if cfg.gate.kind == "probe" else 0
    if k and not (
        cfg.data.prompts == "demo" or cfg.data.prompts.startswith("paper:") or D.is_folder(cfg.data.prompts)
    ):
        raise ValueError(
            "gate.value_prompts takes each value's prompts from data.prompts, which must then be "
            f"'demo', 'paper:<folder>' or a folder (got the file {cfg.data.prompts!r})"
        )
    if k >= len(prompts) > 0 or (k and not prompts):
        raise ValueError(
            f"gate.value_prompts = {k} would leave none of {value!r}'s {len(prompts)} prompts to steer"
        )
    steer, gate = prompts[: len(prompts) - k], prompts[len(prompts) - k :] if k else []
    cap = cfg.data.max_prompts_per_value
    return (steer[:cap] if cap else steer), gate


def load_mc_source(source: str) -> list[MCItem]:
    """Multiple-choice questions from ``demo`` (the project's set) or an MMLU-layout CSV."""
    return demo_mc() if source == "demo" else load_mc(source)


def gate_questions(cfg: Config) -> list[MCItem]:
    """The multiple-choice questions the probe gate reads as unrelated inputs: the last ``gate.mc_questions``.

    The study's utility asks only the questions before them (:func:`utility_questions`), so its gate
    open rate on multiple choice is measured on questions the gate never saw.
    """
    k = cfg.gate.mc_questions
    if cfg.gate.kind != "probe" or not cfg.gate.mc or not k:
        return []
    items = load_mc_source(cfg.gate.mc)
    if k >= len(items):
        raise ValueError(
            f"gate.mc_questions = {k} would take all {len(items)} questions of {cfg.gate.mc!r} "
            "(the utility asks the questions before the gate's)"
        )
    return items[len(items) - k :]


def utility_questions(cfg: Config, source: str, max_items: int = 0) -> list[MCItem]:
    """The questions of ``source`` a study's utility asks: none the gate reads, at most ``max_items`` (0: all)."""
    items = load_mc_source(source)
    if source == cfg.gate.mc:
        items = items[: len(items) - len(gate_questions(cfg))]
    return items[:max_items] if max_items else items
