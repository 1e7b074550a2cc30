"""Is the judge valid? Its agreement with readers' labels of real model answers (Cohen's κ, AUC).

A CSR is only as good as its judge (METHOD.md §4). A judge's held-out agreement on labelled *statement*
pairs (:meth:`conva.judges.Judge.agreement`) says little about how it reads a small model's *answers*, so
the judge is held to a labelled set of answers the study's models gave (``conva/demo_data/labels/``,
rubric in its ``RUBRIC.md``):

* ``answers.jsonl``: ``id, model, value, method, p0, strength, prompt, answer, n_tokens``;
* ``labels_a.jsonl``: reader A's label of every answer, ``{"id", "label": "yes"|"no"|"unclear", "note"}``;
* ``labels_b.jsonl`` (optional): a second reader's independent labels of a subset.

:func:`validate_judge` gives a :class:`JudgeValidity`. How the labels count:

* an answer reader A labelled **unclear** (unreadable text) is **excluded** and counted (``n_unclear``);
* the judge's verdict is yes (score 1), no (score 0) or **unclear (score 0.5, e.g. an LLM reply with no
  verdict word)**: unclear is a third category of its own in κ, so it never agrees with a reader's yes or
  no. The judge said neither, and the CSR counts it 0.5, right for neither label; folding it into "no"
  would reward a judge that cannot answer whenever the reader says no (most answers). It is counted
  (``judge_unclear``);
* AUC ranks the answers by the judge's probability (its score where it has none: 1 / 0.5 / 0);
* the ceiling ``kappa_ab`` holds reader B to reader A exactly as a judge is held: on the answers B also
  read and A labelled yes or no, B's unclear being a third category.

A judge with κ below :data:`KAPPA_VALID` (0.4, the lower edge of "moderate" agreement) is reported as
not valid. Model-specific judges (``probe``: one model's own probes) are validated on that model's
answers only; ``scope`` says which answers a validity covers.

Example:
    >>> labelled = load_labelled()                                         # doctest: +SKIP
    >>> v = validate_judge(make_judge(JudgeSettings(), values=VALUES5), labelled)  # doctest: +SKIP
    >>> v.kappa, v.auc, v.n, v.valid                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from conva.metrics import cohen_kappa, roc_auc
from conva.models import model_name

__all__ = [
    "LABELS_DIR",
    "LABELS",
    "KAPPA_VALID",
    "MODEL_SPECIFIC_JUDGES",
    "LabelledAnswer",
    "JudgeValidity",
    "labels_folder",
    "load_labelled",
    "scoped",
    "validate_judge",
    "validate_per_value",
    "labelled_for",
    "labels_digest",
    "validity_from_verdicts",
    "bootstrap_validity",
    "kappa_note",
]

LABELS_DIR = Path(__file__).resolve().parent / "demo_data" / "labels"
LABELS = ("yes", "no", "unclear")
KAPPA_VALID = 0.4
MODEL_SPECIFIC_JUDGES = ("probe",)


class _Judges(Protocol):
    def judge(self, values: Sequence[str], prompts: Sequence[str], answers: Sequence[str]) -> list: ...


@dataclass(frozen=True)
class LabelledAnswer:
    """One model answer with reader A's label (``label``) and reader B's (``label_b``, None where B did not read it)."""

    id: str
    model: str
    value: str
    method: str
    p0: float | None
    strength: float | None
    prompt: str
    answer: str
    n_tokens: int
    label: str
    label_b: str | None = None


@dataclass(frozen=True)
class JudgeValidity:
    """A judge against reader A on labelled answers; NaN where a figure is undefined (e.g. one class only).

    ``n``: answers compared (reader A said yes or no); ``n_unclear``: answers A called unclear (excluded);
    ``judge_unclear``: of the ``n``, those the judge gave no verdict (0.5); ``kappa_ab`` on ``n_ab`` answers.
    """

    judge: str
    scope: str
    n: int
    n_unclear: int
    kappa: float
    auc: float
    judge_yes_rate: float
    reader_yes_rate: float
    judge_unclear: int
    kappa_ab: float
    n_ab: int

    @property
    def valid(self) -> bool:
        """κ at or above :data:`KAPPA_VALID` (False where κ is NaN)."""
        return self.kappa >= KAPPA_VALID

    def to_dict(self) -> dict:
        return {**asdict(self), "valid": self.valid}


def labels_folder(spec: str) -> Path | None:
    """The folder ``judge.labels`` names: ``"demo"`` → the packaged set, ``""`` → none, else the path."""
    if spec == "":
        return None
    return LABELS_DIR if spec == "demo" else Path(spec)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{i}: not JSON ({err})") from None
    return rows


def _labels(path: Path, ids: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for row in _read_jsonl(path):
        key, label = str(row.get("id")), row.get("label")
        if label not in LABELS:
            raise ValueError(f"{path}: {key}: label {label!r} is not one of {', '.join(LABELS)}")
        if key not in ids:
            raise ValueError(f"{path}: {key} labels no answer of answers.jsonl")
        if key in out:
            raise ValueError(f"{path}: {key} is labelled twice")
        out[key] = label
    return out


def load_labelled(folder: str | Path = LABELS_DIR) -> list[LabelledAnswer]:
    """The labelled answers of ``folder``: ``answers.jsonl`` joined with ``labels_a.jsonl`` (and ``labels_b.jsonl``).

    Every answer needs reader A's label; ``labels_b.jsonl`` is optional. Raises ``FileNotFoundError``
    when either required file is missing and ``ValueError`` naming the file and id of a bad row.
    """
    folder = Path(folder)
    answers = _read_jsonl(folder / "answers.jsonl")
    ids = [str(a["id"]) for a in answers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{folder / 'answers.jsonl'}: ids repeat")
    a = _labels(folder / "labels_a.jsonl", set(ids))
    missing = [i for i in ids if i not in a]
    if missing:
        raise ValueError(
            f"{folder / 'labels_a.jsonl'}: no label for {len(missing)} answers, e.g. {missing[0]}"
        )
    b_path = folder / "labels_b.jsonl"
    b = _labels(b_path, set(ids)) if b_path.is_file() else {}
    return [
        LabelledAnswer(
            id=i,
            model=str(r["model"]),
            value=str(r["value"]),
            method=str(r.get("method") or ""),
            p0=r.get("p0"),
            strength=r.get("strength"),
            prompt=str(r["prompt"]),
            answer=str(r["answer"] or ""),
            n_tokens=int(r.get("n_tokens") or 0),
            label=a[i],
            label_b=b.get(i),
        )
        for i, r in zip(ids, answers)
    ]


def _same_model(a: str, b: str) -> bool:
    # A spec ("smollm2"), a folder or a repo id all name a model by model_name's reading of it.
    return model_name(a).lower() == model_name(b).lower()


def scoped(
    labelled: Sequence[LabelledAnswer], values: Sequence[str] | None = None, model: str | None = None
) -> list[LabelledAnswer]:
    """The answers of ``values`` (all where None) and of ``model`` alone (every model's where None)."""
    return [
        x
        for x in labelled
        if (values is None or x.value in values) and (model is None or _same_model(x.model, model))
    ]


def _verdict_label(score: float) -> str:
    return "yes" if score == 1.0 else "no" if score == 0.0 else "unclear"


def validity_from_verdicts(
    judge: str,
    scope: str,
    labelled: Sequence[LabelledAnswer],
    scores: Sequence[float],
    probs: Sequence[float | None],
) -> JudgeValidity:
    """:class:`JudgeValidity` from a judge's ``scores`` (1 / 0.5 / 0) and ``probs`` for ``labelled``, item by item."""
    if not len(labelled) == len(scores) == len(probs):
        raise ValueError(f"{len(labelled)} answers, {len(scores)} scores and {len(probs)} probabilities")
    keep = [i for i, x in enumerate(labelled) if x.label != "unclear"]
    reader = [labelled[i].label for i in keep]
    mine = [_verdict_label(float(scores[i])) for i in keep]
    rank = [float(scores[i]) if probs[i] is None else float(probs[i]) for i in keep]  # type: ignore[arg-type]
    both = [x for x in labelled if x.label != "unclear" and x.label_b is not None]
    nan = float("nan")
    return JudgeValidity(
        judge=judge,
        scope=scope,
        n=len(keep),
        n_unclear=len(labelled) - len(keep),
        kappa=cohen_kappa(mine, reader),
        auc=roc_auc([r == "yes" for r in reader], rank),
        judge_yes_rate=float(np.mean([m == "yes" for m in mine])) if keep else nan,
        reader_yes_rate=float(np.mean([r == "yes" for r in reader])) if keep else nan,
        judge_unclear=sum(m == "unclear" for m in mine),
        kappa_ab=cohen_kappa([x.label for x in both], [x.label_b for x in both]),
        n_ab=len(both),
    )


def validate_judge(
    judge: _Judges,
    labelled: Sequence[LabelledAnswer],
    *,
    kind: str | None = None,
    values: Sequence[str] | None = None,
    model: str | None = None,
) -> JudgeValidity:
    """Judge every labelled answer of ``values`` and hold the verdicts to reader A's labels.

    ``kind`` defaults to ``judge.name``. A model-specific judge (:data:`MODEL_SPECIFIC_JUDGES`) needs
    ``model`` and is validated on that model's answers only; any other judge on every model's answers
    (``model`` is then ignored). ``scope`` in the result says which.
    """
    return validate_per_value(judge, labelled, kind=kind, values=values, model=model)["*"]


def validate_per_value(
    judge: _Judges,
    labelled: Sequence[LabelledAnswer],
    *,
    kind: str | None = None,
    values: Sequence[str] | None = None,
    model: str | None = None,
) -> dict[str, JudgeValidity]:
    """:func:`validate_judge` over all of ``values`` (key ``"*"``) and for each value alone, judging each answer once.

    Keys: ``"*"`` and every value of ``values`` (where None: every value with labelled answers).
    """
    kind = kind or str(getattr(judge, "name", "judge"))
    if kind in MODEL_SPECIFIC_JUDGES:
        if model is None:
            raise ValueError(
                f"the {kind} judge reads one model's activations: name the model to validate it on"
            )
        items, scope = scoped(labelled, values, model), f"{model_name(model)} answers only"
    else:
        items, scope = scoped(labelled, values), "all models' answers"
    verdicts = (
        judge.judge([x.value for x in items], [x.prompt for x in items], [x.answer for x in items])
        if items
        else []
    )
    if len(verdicts) != len(items):
        raise ValueError(f"the judge gave {len(verdicts)} verdicts for {len(items)} answers")
    scores, probs = [v.score for v in verdicts], [v.prob for v in verdicts]
    out = {"*": validity_from_verdicts(kind, scope, items, scores, probs)}
    for value in values if values is not None else sorted({x.value for x in items}):
        idx = [i for i, x in enumerate(items) if x.value == value]
        out[value] = validity_from_verdicts(
            kind, scope, [items[i] for i in idx], [scores[i] for i in idx], [probs[i] for i in idx]
        )
    return out


def labels_digest(spec: str) -> str:
    """sha256 of the labelled answers' files ``judge.labels`` names ("" when there are none): the agreement
    stage's config carries it, so new or corrected labels re-run that stage and nothing else."""
    folder = labels_folder(spec)
    if folder is None:
        return ""
    digest = hashlib.sha256()
    for name in ("answers.jsonl", "labels_a.jsonl", "labels_b.jsonl"):
        path = folder / name
        digest.update(f"{name}:".encode() + (path.read_bytes() if path.is_file() else b"-") + b";")
    return digest.hexdigest()


def labelled_for(spec: str) -> list[LabelledAnswer] | None:
    """The labelled answers ``judge.labels`` names, or None: none asked for (``""``), or ``"demo"`` while the
    packaged folder holds no labels yet."""
    folder = labels_folder(spec)
    if folder is None or (spec == "demo" and not (folder / "labels_a.jsonl").is_file()):
        return None
    return load_labelled(folder)


def bootstrap_validity(
    labelled: Sequence[LabelledAnswer],
    scores: Sequence[float],
    probs: Sequence[float | None],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of κ and AUC over answers (resampled with replacement, seeded).

    Resamples where a figure is undefined (one class only) are left out of its interval; ``(nan, nan)``
    when none is defined.
    """
    rng = np.random.default_rng(seed)
    n, kappas, aucs = len(labelled), [], []
    for _ in range(n_boot if n else 0):
        idx = rng.integers(0, n, size=n)
        v = validity_from_verdicts(
            "", "", [labelled[i] for i in idx], [scores[i] for i in idx], [probs[i] for i in idx]
        )
        kappas.append(v.kappa)
        aucs.append(v.auc)
    alpha = (1.0 - level) / 2.0

    def interval(xs: list[float]) -> tuple[float, float]:
        ok = [x for x in xs if math.isfinite(x)]
        if not ok:
            return float("nan"), float("nan")
        return float(np.quantile(ok, alpha)), float(np.quantile(ok, 1.0 - alpha))

    return {"kappa": interval(kappas), "auc": interval(aucs)}


def kappa_note(kappa: float | None) -> str:
    """How a report prints a judge's κ beside a CSR: ``κ=0.62``, ``κ=0.10 < 0.4: not valid``, or not validated."""
    if kappa is None or not math.isfinite(kappa):
        return "judge not validated on labelled answers"
    if kappa < KAPPA_VALID:
        return f"judge κ={kappa:.2f} < {KAPPA_VALID:g}: not valid"
    return f"judge κ={kappa:.2f}"
