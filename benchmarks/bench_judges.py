"""Every judge against the readers of real model answers: Cohen's κ and AUC with bootstrap 95% intervals.

On the labelled answers (``conva/demo_data/labels/`` or ``--labels FOLDER``: ``answers.jsonl``,
``labels_a.jsonl``, optionally ``labels_b.jsonl``; see :mod:`conva.judge_validation`), for each judge:

* ``classifier``: TF-IDF on the demo answer pairs (the study's default judge), on every model's answers;
* ``probe:<model>``: that model's own probes (bundles fitted here on the demo data, as
  ``examples/demo_study.toml`` fits them, without a gate), on that model's answers only;
* ``llm:<model>``: the paper's expert prompt to a local model (``judge.backend = "local"``: greedy,
  ``--max-tokens`` new tokens), SmolLM2-135M-Instruct and Gemma 3 270M by default, on every model's answers;
* ``reader_b``: reader B held to reader A the same way, on the answers B read: the ceiling.

κ treats the judge's unclear (0.5) as a category of its own, and leaves out the answers reader A called
unclear; the intervals are percentile bootstraps over answers (``--n-boot``, seeded). Figures per model are
given for the judges that read every model's answers.

Usage::

    python -m benchmarks.bench_judges                                  # every judge on the packaged labels
    python -m benchmarks.bench_judges --labels DIR --judges classifier llm --llm-models smollm2

Writes ``benchmarks/results/judges.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, write_result
from conva.judge_validation import (
    LABELS_DIR,
    LabelledAnswer,
    bootstrap_validity,
    load_labelled,
    scoped,
    validity_from_verdicts,
)
from conva.judges import JudgeSettings, LLMJudge, make_judge
from conva.models import model_name

OUT = RESULTS / "judges.json"
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_study.toml"
_READER = {"yes": 1.0, "no": 0.0, "unclear": 0.5}


def fit_demo_bundles(model, tok, spec: str, values: list[str]) -> dict:
    """Each value's bundle for ``model``, fitted in process on the demo study's data and band rule, no gate."""
    from conva.batch.extraction import extract_table, extraction_rows, fit_bundles
    from conva.batch.study import load_study, model_config
    from conva.fit import ModelInfo
    from conva.models import model_fingerprint

    study = load_study(DEMO, [f"--data.values={json.dumps(values)}", "--gate.kind=none"])
    cfg = model_config(study, spec, "/nonexistent")  # only its data, fit and probe sections are read
    rows = extraction_rows(cfg)
    layers = list(range(model.config.num_hidden_layers))
    acts = extract_table(model, tok, rows, layers, cfg.extract.position, cfg.extract.batch_size)
    matrix = np.asarray(acts.column("activation").combine_chunks().flatten()).reshape(
        len(layers), rows.num_rows, -1
    )
    info = ModelInfo(model_name(spec), model_fingerprint(model), model.config.hidden_size, len(layers))
    return fit_bundles(rows, lambda layer: matrix[layer], layers, cfg, info)


def _entry(
    name: str, items: list[LabelledAnswer], scores: list[float], probs: list, n_boot: int, seconds: float
) -> dict:
    """One judge's figures on ``items``: its validity, bootstrap intervals and, over several models, per model."""
    scope = "all models' answers"
    models = sorted({x.model for x in items})
    if len(models) == 1:
        scope = f"{model_name(models[0])} answers only"
    v = validity_from_verdicts(name, scope, items, scores, probs)
    ci = bootstrap_validity(items, scores, probs, n_boot=n_boot, seed=0)
    out = {
        **v.to_dict(),
        "kappa_ci": list(ci["kappa"]),
        "auc_ci": list(ci["auc"]),
        "seconds": round(seconds, 1),
    }
    if len(models) > 1:
        out["by_model"] = {}
        for m in models:
            idx = [i for i, x in enumerate(items) if x.model == m]
            part = validity_from_verdicts(
                name, m, [items[i] for i in idx], [scores[i] for i in idx], [probs[i] for i in idx]
            )
            out["by_model"][model_name(m)] = {"n": part.n, "kappa": part.kappa, "auc": part.auc}
    return out


def _judged(name: str, judge, items: list[LabelledAnswer], n_boot: int, start: float) -> dict:
    verdicts = judge.judge([x.value for x in items], [x.prompt for x in items], [x.answer for x in items])
    if len(verdicts) != len(items):
        raise RuntimeError(f"{name}: {len(verdicts)} verdicts for {len(items)} answers")
    scores, probs = [v.score for v in verdicts], [v.prob for v in verdicts]
    return _entry(name, items, scores, probs, n_boot, time.time() - start)


def run(args: argparse.Namespace) -> dict:
    labelled = load_labelled(args.labels)
    values = sorted({x.value for x in labelled})
    judges: dict[str, dict] = {}
    if "classifier" in args.judges:
        start = time.time()
        judge = make_judge(JudgeSettings(kind="classifier"), values=values)
        judges["classifier"] = _judged("classifier", judge, labelled, args.n_boot, start)
    for spec in args.probe_models if "probe" in args.judges else []:
        items = scoped(labelled, model=spec)
        if not items:
            judges[f"probe:{model_name(spec)}"] = {"skipped": f"no labelled answers of {model_name(spec)}"}
            continue
        from conva.models import load_model

        start = time.time()
        model, tok = load_model(spec)
        mine = sorted({x.value for x in items})
        bundles = fit_demo_bundles(model, tok, spec, mine)
        judge = make_judge(JudgeSettings(kind="probe"), values=mine, model=model, tok=tok, bundles=bundles)
        judges[f"probe:{model_name(spec)}"] = _judged("probe", judge, items, args.n_boot, start)
    for spec in args.llm_models if "llm" in args.judges else []:
        from conva.local_chat import load_local_chat

        start = time.time()
        settings = JudgeSettings(kind="llm", backend="local", model=spec, max_tokens=args.max_tokens)
        judge = LLMJudge(settings, load_local_chat(spec, batch_size=args.batch_size))
        judges[f"llm:{model_name(spec)}"] = _judged("llm", judge, labelled, args.n_boot, start)
    read_b = [x for x in labelled if x.label_b is not None]
    if read_b:
        scores = [_READER[x.label_b or "unclear"] for x in read_b]
        judges["reader_b"] = _entry("reader_b", read_b, scores, [None] * len(read_b), args.n_boot, 0.0)
    return {
        "labels": str(args.labels),
        "n_answers": len(labelled),
        "n_reader_b": len(read_b),
        "models": sorted({model_name(x.model) for x in labelled}),
        "values": values,
        "n_boot": args.n_boot,
        "max_tokens": args.max_tokens,
        "judges": judges,
    }


def table(report: dict) -> str:
    """The results as plain text: one line per judge."""
    lines = [
        f"{'judge':34s} {'n':>4s} {'kappa [95% CI]':>22s} {'AUC [95% CI]':>22s}  yes judge/reader  scope"
    ]
    for name, j in report["judges"].items():
        if "skipped" in j:
            lines.append(f"{name:34s} skipped: {j['skipped']}")
            continue
        k, a = j["kappa_ci"], j["auc_ci"]
        lines.append(
            f"{name:34s} {j['n']:4d} {j['kappa']:6.2f} [{k[0]:5.2f}, {k[1]:5.2f}]    "
            f"{j['auc']:6.2f} [{a[0]:5.2f}, {a[1]:5.2f}]    {j['judge_yes_rate']:.2f}/{j['reader_yes_rate']:.2f}  "
            f"{j['scope']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=Path, default=LABELS_DIR, help="the labelled answers' folder")
    parser.add_argument("--judges", nargs="+", default=["classifier", "probe", "llm"])
    parser.add_argument("--probe-models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--llm-models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--max-tokens", type=int, default=8, help="the local LLM judge's new tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="the local LLM judge's requests at once")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    start = time.time()
    report = {**machine(), "benchmark": "judges", **run(args), "seconds": round(time.time() - start, 1)}
    write_result(args.out, report)
    print(table(report))


if __name__ == "__main__":
    main()
