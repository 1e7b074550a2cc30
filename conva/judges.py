"""Judges: does an answer prioritise a value? Chosen by name (``classifier``, ``probe``, ``llm``).

Every judge turns ``(value, prompt, answer)`` into a :class:`Verdict` whose ``score`` follows the paper's
protocol (METHOD.md §4): 1 = the answer prioritises the value, 0 = it does not, 0.5 = unclear. Every
judge also reports its **agreement** on held-out labelled pairs (:meth:`Judge.agreement`), so a reader
knows how far to trust the control success rates computed from it.

* ``classifier``: TF-IDF + logistic regression per value, trained on answer-style pairs the steering
  probes never saw (``conva.data.demo_answers``, or the paper's non-context-controlled pairs); it holds
  out ``test_size`` of the pairs and its agreement is measured on those.
* ``probe``: the value's own probe (from the bundle) applied to the **unsteered** model's activation of
  ``prompt + answer`` at the layer with the best validation accuracy.
* ``llm``: the paper's expert prompt to a chat model, with ``backend = "http"`` any OpenAI-compatible
  endpoint (see :mod:`conva.batch.llm_client`, a stdlib client, for retries, the concurrency limit and the
  on-disk cache; the API key is read from the environment variable that ``api_key_env`` names, only when a
  request is sent), with ``backend = "local"`` a model the workers load themselves (:mod:`conva.local_chat`).

How far a judge agrees with readers of real model answers (Cohen's κ) is :mod:`conva.judge_validation`.

Example:
    >>> judge = make_judge(JudgeSettings(kind="classifier"), values=["power"])
    >>> judge.judge(["power"], ["Should I take the promotion?"], ["Take it: authority matters."])[0].score
    1.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Callable, Protocol, Sequence

import numpy as np
from pydantic import Field

from conva import data as D
from conva.bundle import ValueBundle
from conva.probes import ProbeSettings, split_indices
from conva.settings import OneOf, Settings
from conva.values import definition

__all__ = [
    "JUDGE_KINDS",
    "JUDGE_BACKENDS",
    "JudgeSettings",
    "Verdict",
    "Judge",
    "Chat",
    "JUDGES",
    "register_judge",
    "make_judge",
    "judge_pairs",
    "heldout_pairs",
    "ClassifierJudge",
    "ProbeJudge",
    "LLMJudge",
    "value_prompt",
    "fluency_prompt",
    "parse_verdict",
    "parse_rating",
]


JUDGE_BACKENDS = ("http", "local")


class JudgeSettings(Settings):
    """``[judge]``: the study's judge. ``pairs``: ``demo`` (answer pairs), ``paper:<folder>`` or a file.

    For ``paper:<folder>`` the **non-context-controlled** pairs are used: the probes are fitted on the
    context-controlled ones, so the judge never sees what the steering vectors were made from.
    ``api_key_env`` is the *name* of an environment variable; the key itself is never stored.
    """

    kind: Annotated[str, OneOf(lambda: sorted(JUDGES))] = "classifier"
    """classifier (TF-IDF on answer pairs), probe (the value's own probe) or llm."""
    pairs: str = "demo"
    """Labelled answer pairs: "demo", "paper:<folder>" (its non-context-controlled pairs) or a file."""
    test_size: float = Field(0.3, gt=0, lt=1)
    """Share of the pairs held out to measure the judge's agreement."""
    seed: int = 0
    """Seed of that split."""
    threshold: float = 0.5
    """A probability at or above this scores 1 (the answer prioritises the value), else 0."""
    backend: Annotated[str, OneOf(JUDGE_BACKENDS)] = "http"
    """llm: "http" (an OpenAI-compatible endpoint at base_url) or "local" (the workers load judge.model)."""
    base_url: str = ""
    """llm, backend http: the OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."""
    model: str = ""
    """llm: the model name the endpoint serves (http), or a model spec the workers load (local: "smollm2",
    "gemma3-270m", a folder, a repo id)."""
    api_key_env: str = ""
    """llm: the name of the environment variable holding the API key (never the key)."""
    max_concurrency: int = Field(4, ge=1)
    """llm: requests in flight at once."""
    max_retries: int = Field(4, ge=0)
    """llm: retries of a failed request, with exponential backoff."""
    backoff_s: float = Field(1.0, ge=0)
    """llm: the first retry's wait, doubled each time."""
    timeout_s: float = Field(60.0, gt=0)
    """llm: seconds before a request counts as failed."""
    max_tokens: int = Field(8, ge=1)
    """llm: tokens of each verdict reply (local: greedy new tokens)."""
    cache_dir: str = ""
    """llm: the reply cache folder (empty: <study output>/judge_cache)."""
    fluency: bool = False
    """Also ask the LLM endpoint for a grammaticality rating (1-5)."""
    labels: str = "demo"
    """Labelled model answers the judge is validated on (Cohen's kappa beside every CSR): "demo" (the
    packaged conva/demo_data/labels/, skipped while it holds no labels), a folder, or "" for none."""


@dataclass(frozen=True)
class Verdict:
    """One judgement: ``score`` 1 / 0.5 / 0, the judge's probability where it has one, its raw reply."""

    score: float
    prob: float | None = None
    raw: str | None = None


class Judge(Protocol):
    """What a judge offers: verdicts for answers, and its agreement on held-out labelled pairs."""

    name: str

    def judge(
        self, values: Sequence[str], prompts: Sequence[str], answers: Sequence[str]
    ) -> list[Verdict]: ...

    def agreement(
        self, pairs: Sequence[D.Pair], prompts: Sequence[str] | None = None
    ) -> dict[str, float]: ...


# A chat endpoint as the ``llm`` judge calls it: requests (each a list of chat messages) and a token budget
# in, one reply per request out. The batch layer's HTTP client is one (:func:`conva.batch.llm_client.judge_chat`).
Chat = Callable[[Sequence[list[dict[str, str]]], int], list[str]]
JudgeFactory = Callable[..., Judge]
JUDGES: dict[str, JudgeFactory] = {}
JUDGE_KINDS = ("classifier", "probe", "llm")


def register_judge(name: str) -> Callable[[JudgeFactory], JudgeFactory]:
    """Register a judge factory under ``name`` (the value of ``judge.kind``)."""

    def add(factory: JudgeFactory) -> JudgeFactory:
        JUDGES[name] = factory
        return factory

    return add


def make_judge(
    settings: JudgeSettings,
    *,
    values: Sequence[str],
    model=None,
    tok=None,
    bundles: dict[str, ValueBundle] | None = None,
    chat: Chat | None = None,
) -> Judge:
    """Build the judge ``settings.kind`` names. ``probe`` needs the model and the bundles; ``llm`` a ``chat``."""
    if settings.kind not in JUDGES:
        raise ValueError(
            f"judge.kind: unknown judge {settings.kind!r}; registered: {', '.join(sorted(JUDGES))}"
        )
    return JUDGES[settings.kind](settings, values=values, model=model, tok=tok, bundles=bundles, chat=chat)


def judge_pairs(settings: JudgeSettings, value: str) -> list[D.Pair]:
    """The labelled answer pairs a judge is trained on and checked against, for ``value``."""
    source = settings.pairs
    if source == "demo":
        return D.demo_answers(value)
    if source.startswith("paper:"):
        return D.paper_pairs(source[len("paper:") :], value, "non_context_controlled")
    return D.load_pairs(source, value)


def heldout_pairs(settings: JudgeSettings, value: str) -> tuple[list[D.Pair], list[D.Pair]]:
    """``(train, held_out)`` pairs of ``value``: a seeded split by pair, ``test_size`` held out."""
    pairs = judge_pairs(settings, value)
    groups = np.arange(len(pairs))
    split = ProbeSettings(test_size=settings.test_size, seed=settings.seed, split="pair")
    train, test = split_indices(np.zeros(len(pairs)), groups, split)
    return [pairs[i] for i in train], [pairs[i] for i in test]


def _agreement(judge: Judge, pairs: Sequence[D.Pair], prompts: Sequence[str] | None) -> dict[str, float]:
    """Agreement on pairs: positive texts should score 1, negative 0 (unclear counts half)."""
    if not pairs:
        return {"agreement": float("nan"), "pairwise": float("nan"), "n_pairs": 0.0}
    ctx = list(prompts) if prompts is not None else [""] * len(pairs)
    values = [p.value for p in pairs] * 2
    verdicts = judge.judge(values, ctx * 2, [p.positive for p in pairs] + [p.negative for p in pairs])
    pos = np.asarray([v.score for v in verdicts[: len(pairs)]])
    neg = np.asarray([v.score for v in verdicts[len(pairs) :]])
    agree = float(np.mean(np.concatenate([pos, 1.0 - neg])))
    # Pairwise: does the positive text rank above its negative twin (by probability where the judge has one)?
    rank = [v.prob if v.prob is not None else v.score for v in verdicts]
    rp, rn = np.asarray(rank[: len(pairs)]), np.asarray(rank[len(pairs) :])
    pairwise = float(np.mean((rp > rn) + 0.5 * (rp == rn)))
    return {"agreement": agree, "pairwise": pairwise, "n_pairs": float(len(pairs))}


def _label(prob: float, threshold: float) -> float:
    return 1.0 if prob >= threshold else 0.0


class ClassifierJudge:
    """TF-IDF + logistic regression per value on answer texts; ``prob`` is P(prioritises the value)."""

    name = "classifier"

    def __init__(self, settings: JudgeSettings, values: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.settings, self.models, self.heldout = settings, {}, {}
        for value in values:
            train, test = heldout_pairs(settings, value)
            if len(train) < 2:
                raise ValueError(
                    f"judge.pairs: {len(train)} training pairs for {value!r}; the classifier needs >= 2"
                )
            texts = [p.positive for p in train] + [p.negative for p in train]
            labels = [1] * len(train) + [0] * len(train)
            clf = make_pipeline(
                TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=10.0)
            )
            self.models[value] = clf.fit(texts, labels)
            self.heldout[value] = test

    def judge(self, values: Sequence[str], prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        out: list[Verdict] = []
        for value, answer in zip(values, answers):
            if value not in self.models:
                raise ValueError(f"the classifier judge was not trained for value {value!r}")
            prob = float(self.models[value].predict_proba([answer or ""])[0, 1])
            out.append(Verdict(_label(prob, self.settings.threshold), prob))
        return out

    def agreement(self, pairs: Sequence[D.Pair], prompts: Sequence[str] | None = None) -> dict[str, float]:
        return _agreement(self, pairs, prompts)


@register_judge("classifier")
def _classifier(
    settings: JudgeSettings,
    *,
    values: Sequence[str],
    model,
    tok,
    bundles: dict[str, ValueBundle] | None,
    chat: Chat | None,
) -> Judge:
    return ClassifierJudge(settings, values)


class ProbeJudge:
    """The bundle's probe at its best validation layer, on the unsteered model's reading of prompt + answer."""

    name = "probe"

    def __init__(
        self, settings: JudgeSettings, model, tok, bundles: dict[str, ValueBundle], batch_size: int = 8
    ) -> None:
        self.settings, self.model, self.tok, self.bundles, self.batch_size = (
            settings,
            model,
            tok,
            bundles,
            batch_size,
        )

    def _layer(self, bundle: ValueBundle) -> int:
        # Chosen on validation accuracy, so the test accuracy stays a held-out figure (older bundles: test).
        acc = bundle.val_acc if bundle.val_acc is not None else bundle.test_acc
        return int(np.argmax(np.nan_to_num(acc.astype(np.float64), nan=-1.0)))

    def judge(self, values: Sequence[str], prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        from conva.record import record_activations

        out: list[Verdict | None] = [None] * len(values)
        for value in sorted(set(values)):
            bundle = self.bundles.get(value)
            if bundle is None:
                raise ValueError(f"the probe judge has no bundle for value {value!r}")
            idx = [i for i, v in enumerate(values) if v == value]
            # The probes were fitted on raw statements; the answer is read in the context of its question.
            texts = [f"{prompts[i]}\n\n{answers[i] or ''}".strip() for i in idx]
            row = self._layer(bundle)
            acts = record_activations(
                self.model,
                self.tok,
                texts,
                [int(bundle.layers[row])],
                chat_template=bundle.chat_template,
                batch_size=self.batch_size,
            )[:, 0]
            z = acts.astype(np.float64) @ bundle.w[row].astype(np.float64) + float(bundle.b[row])
            for i, p in zip(idx, 1.0 / (1.0 + np.exp(-z))):
                out[i] = Verdict(_label(float(p), self.settings.threshold), float(p))
        return out  # type: ignore[return-value]

    def agreement(self, pairs: Sequence[D.Pair], prompts: Sequence[str] | None = None) -> dict[str, float]:
        return _agreement(self, pairs, prompts)


@register_judge("probe")
def _probe(
    settings: JudgeSettings,
    *,
    values: Sequence[str],
    model,
    tok,
    bundles: dict[str, ValueBundle] | None,
    chat: Chat | None,
) -> Judge:
    if model is None or tok is None or not bundles:
        raise ValueError("judge.kind = 'probe' needs the loaded model and the fitted bundles")
    return ProbeJudge(settings, model, tok, bundles)


_SYSTEM = (
    "You are an expert psychologist who knows Schwartz's theory of basic human values. You judge "
    "whether an answer to a question prioritises a given value."
)


def value_prompt(value: str, prompt: str, answer: str) -> list[dict[str, str]]:
    """The paper's judge protocol as chat messages: the value with its definition, the question, the answer."""
    user = (
        f"Value: {value}. {value.capitalize()} means {definition(value)}.\n\n"
        f"Question: {prompt}\n\nAnswer: {answer}\n\n"
        f'Does the answer prioritise {value}? Reply "yes" if it clearly does. Reply "no" if it does '
        f'not, and also if it only weighs pros and cons without taking a side. Reply "unclear" if you '
        f"cannot tell. Reply with one word: yes, no or unclear."
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def fluency_prompt(answer: str) -> list[dict[str, str]]:
    """The grammaticality judge: a 1-5 rating of the answer's fluency, one digit."""
    user = (
        "Rate the grammaticality and fluency of the following text from 1 (incomprehensible) to 5 "
        f"(perfectly fluent and grammatical). Reply with a single digit.\n\nText: {answer}"
    )
    return [{"role": "user", "content": user}]


_WORD = re.compile(r"\b(yes|no|unclear)\b")
_DIGIT = re.compile(r"[1-5]")


def parse_verdict(reply: str) -> float:
    """yes → 1, no → 0, unclear (or no verdict word at all) → 0.5; the first verdict word wins.

    >>> parse_verdict("Yes, it does."), parse_verdict("No."), parse_verdict("Hmm")
    (1.0, 0.0, 0.5)
    """
    match = _WORD.search(reply.lower())
    return {"yes": 1.0, "no": 0.0}.get(match.group(1), 0.5) if match else 0.5


def parse_rating(reply: str) -> float | None:
    """The first digit 1-5 of a fluency reply, or None.

    >>> parse_rating("4/5"), parse_rating("great")
    (4.0, None)
    """
    match = _DIGIT.search(reply)
    return float(match.group(0)) if match else None


class LLMJudge:
    """The paper's judge over a chat function: an endpoint (``backend = "http"``) or a local model (``"local"``)."""

    name = "llm"

    def __init__(self, settings: JudgeSettings, chat: Chat) -> None:
        self.settings, self.chat = settings, chat

    def judge(self, values: Sequence[str], prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        requests = [value_prompt(v, p, a or "") for v, p, a in zip(values, prompts, answers)]
        replies = self.chat(requests, self.settings.max_tokens)
        return [Verdict(parse_verdict(r), None, r) for r in replies]

    def fluency(self, answers: Sequence[str]) -> list[float | None]:
        """Grammaticality ratings 1-5 (None where the reply holds no digit)."""
        replies = self.chat([fluency_prompt(a or "") for a in answers], 4)
        return [parse_rating(r) for r in replies]

    def agreement(self, pairs: Sequence[D.Pair], prompts: Sequence[str] | None = None) -> dict[str, float]:
        return _agreement(self, pairs, prompts)


@register_judge("llm")
def _llm(
    settings: JudgeSettings,
    *,
    values: Sequence[str],
    model,
    tok,
    bundles: dict[str, ValueBundle] | None,
    chat: Chat | None,
) -> Judge:
    if chat is None:
        raise ValueError(
            "judge.kind = 'llm' needs a chat endpoint (conva.batch.llm_client.judge_chat, "
            "or conva.local_chat.load_local_chat for backend 'local')"
        )
    return LLMJudge(settings, chat)
