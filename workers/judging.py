"""The study actor: loads the model once and, per call, steers, judges or scores multiple choice on one shard.

One actor set serves a model's three study stages (steer → evaluate → utility), so the model is loaded
once per actor. Judges run here (the ``probe`` judge needs the model; the others are cheap to build in
each actor, and the ``llm`` judge's disk cache is shared between actors by request hash).
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa

from conva import data as D
from conva.bundle import ValueBundle
from conva.config import Config
from conva.judges import JudgeSettings, LLMJudge, heldout_pairs, make_judge
from conva.mc import score_mc
from conva.metrics import answer_perplexities
from conva.models import load_model
from conva.pipeline import row_spec
from conva.study import FluencySection, UtilitySection
from workers.backends import make_steerer
from workers.contract import check_rows
from workers.extraction import _set_threads
from workers.steering import load_bundles

__all__ = ["StudyWorker", "JUDGED_SCHEMA", "UTILITY_SCHEMA", "AGREEMENT_SCHEMA"]

_log = logging.getLogger(__name__)

JUDGED_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("judge", pa.string()), ("judge_score", pa.float64()), ("judge_prob", pa.float64()),
    ("judge_raw", pa.string()), ("ppl", pa.float64()), ("ppl_plain", pa.float64()), ("fluency", pa.float64()),
    ("error", pa.string()),
])
UTILITY_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("cell_id", pa.string()), ("model", pa.string()), ("value", pa.string()),
    ("method", pa.string()), ("item", pa.int32()), ("answer", pa.string()), ("pred", pa.string()),
    ("correct", pa.bool_()), ("gate_open", pa.bool_()), ("gate_score", pa.float64()),
])
AGREEMENT_SCHEMA = pa.schema([
    ("model", pa.string()), ("judge", pa.string()), ("value", pa.string()), ("agreement", pa.float64()),
    ("pairwise", pa.float64()), ("n_pairs", pa.int32()),
])


class StudyWorker:
    """Steers, judges and scores multiple choice for one model; exactly one output row per input row.

    Example (in a Ray job; see :mod:`jobs.study`):
        >>> actor = ray.remote(StudyWorker).remote(cfg, judge, fluency, utility, "runs/s/judge_cache")  # doctest: +SKIP
        >>> ray.get(actor.steer.remote(0, rows, "runs/s/models/m/bundles"))                            # doctest: +SKIP
    """

    def __init__(self, cfg: Config, judge: JudgeSettings, fluency: FluencySection, utility: UtilitySection,
                 cache_dir: str) -> None:
        _set_threads(cfg)
        self.cfg, self.judge_settings, self.fluency, self.utility_settings = cfg, judge, fluency, utility
        self.cache_dir = cache_dir
        self.steerer = make_steerer(cfg)
        self.name = getattr(self.steerer, "name", cfg.model.name)
        if hasattr(self.steerer, "model"):
            self.model, self.tok = self.steerer.model, self.steerer.tok
        else:  # e.g. vLLM: perplexity, MC logits and the probe judge read an HF copy of the model
            m = cfg.model
            self.model, self.tok = load_model(m.name, m.dtype, m.device, m.trust_remote_code)
        self._bundles: dict[str, dict[str, ValueBundle]] = {}
        self._judge = None
        _log.info("study worker pid %d ready (%s, judge %s)", os.getpid(), self.name, judge.kind)

    def _bundles_for(self, bundle_dir: str) -> dict[str, ValueBundle]:
        if bundle_dir not in self._bundles:
            self._bundles[bundle_dir] = load_bundles(bundle_dir, self.cfg.data.values, self.steerer.fingerprint,
                                                     self.steerer.hidden_size)
        return self._bundles[bundle_dir]

    def _get_judge(self, bundle_dir: str):
        if self._judge is None:
            self._judge = make_judge(self.judge_settings, values=self.cfg.data.values, model=self.model, tok=self.tok,
                                     bundles=self._bundles_for(bundle_dir), cache_dir=self.cache_dir)
        return self._judge

    def steer(self, shard_index: int, rows: pa.Table, bundle_dir: str) -> pa.Table:
        """Generations for one shard of the study's steering table (per-row overrides applied)."""
        out = self.steerer.steer(rows, self._bundles_for(bundle_dir))
        return check_rows("steer", shard_index, rows, out)

    def evaluate(self, shard_index: int, generations: pa.Table, bundle_dir: str) -> pa.Table:
        """Judge score, perplexity under the unsteered model (given the answer's own context, and given the
        plain prompt) and (optionally) an LLM fluency rating per row."""
        rows = generations.to_pylist()
        good = [i for i, r in enumerate(rows) if r["error"] is None and r["output"] is not None]
        values, prompts, contexts, answers = ([rows[i][k] for i in good] for k in ("value", "prompt", "context", "output"))
        verdicts = self._get_judge(bundle_dir).judge(values, prompts, answers) if good else []
        ppl, plain = [None] * len(good), [None] * len(good)
        if good and self.fluency.perplexity:
            if any(c is None for c in contexts):
                _log.warning("evaluate shard %d: the backend recorded no generation context for %d rows; their "
                             "ppl is left empty (ppl_plain is scored)", shard_index, sum(c is None for c in contexts))
            ppl, plain = answer_perplexities(self.model, self.tok, prompts, contexts, answers,
                                             chat_template=self.cfg.steer.chat_template, batch_size=self.fluency.batch_size)
        rating = self._fluency(answers) if good and self.fluency.llm else [None] * len(good)
        done = {i: (v, p, q, f) for i, v, p, q, f in zip(good, verdicts, ppl, plain, rating)}
        out = []
        for i, r in enumerate(rows):
            v, p, q, f = done.get(i, (None, None, None, None))
            out.append(dict(row_id=r["row_id"], judge=self.judge_settings.kind, judge_score=v and v.score,
                            judge_prob=v and v.prob, judge_raw=v and v.raw, ppl=p, ppl_plain=q, fluency=f,
                            error=None if i in done else (r["error"] or "no output")))
        return check_rows("evaluate", shard_index, generations, pa.Table.from_pylist(out, schema=JUDGED_SCHEMA))

    def _fluency(self, answers: list[str]) -> list[float | None]:
        judge = self._judge if isinstance(self._judge, LLMJudge) else LLMJudge(self.judge_settings, self.cache_dir)
        return judge.fluency(answers)

    def utility(self, shard_index: int, rows: pa.Table, bundle_dir: str) -> pa.Table:
        """Multiple-choice answers by the letter logits with each row's steering and gate active."""
        bundles, records = self._bundles_for(bundle_dir), rows.to_pylist()
        specs = [row_spec(self.cfg, bundles.get(r["value"]) if r["value"] else None, r) for r in records]
        scored = score_mc(self.model, self.tok, [r["prompt"] for r in records], [r["answer"] for r in records], specs,
                          chat_template=self.cfg.steer.chat_template, positions=self.cfg.steer.positions,
                          batch_size=self.utility_settings.batch_size)
        out = [dict(row_id=r["row_id"], cell_id=r["cell_id"], model=self.name, value=r["value"], method=r["method"],
                    item=r["item"], answer=r["answer"], pred=s.pred, correct=s.correct, gate_open=s.gate_open,
                    gate_score=s.gate_score) for r, s in zip(records, scored)]
        return check_rows("utility", shard_index, rows, pa.Table.from_pylist(out, schema=UTILITY_SCHEMA))

    def agreement(self, bundle_dir: str) -> pa.Table:
        """The judge's agreement per value on its held-out labelled pairs (the same split for every judge)."""
        judge, out = self._get_judge(bundle_dir), []
        for value in self.cfg.data.values:
            _, test = heldout_pairs(self.judge_settings, value)
            stats = judge.agreement(test, _pair_prompts(self.judge_settings, value, test))
            out.append(dict(model=self.name, judge=self.judge_settings.kind, value=value, agreement=stats["agreement"],
                            pairwise=stats["pairwise"], n_pairs=int(stats["n_pairs"])))
        return pa.Table.from_pylist(out, schema=AGREEMENT_SCHEMA)


def _pair_prompts(settings: JudgeSettings, value: str, pairs: list[D.Pair]) -> list[str] | None:
    """The question each demo answer pair answers (row ``i`` of the answers answers prompt ``i``); else None."""
    if settings.pairs != "demo":
        return None
    prompts = {p.row: p.prompt for p in D.demo_prompts(value)}
    return [prompts.get(p.row, "") for p in pairs]
