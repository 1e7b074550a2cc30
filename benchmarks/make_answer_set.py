"""The answer set human readers label to validate the CSR judges: ``conva/demo_data/labels/``.

What it makes:

* ``answers.jsonl``: one generated answer per line, ``id`` (``a0001``… in generation order), ``model``,
  ``value``, ``method``, ``p0`` (ConVA only, else null), ``strength`` (CAA only, else null), ``prompt``,
  ``answer`` (the generated text, stripped) and ``n_tokens`` (new tokens generated). For each model
  (``smollm2``, ``gemma3-270m``), each of the demo study's five values and the first ``--prompts`` demo
  prompts of each value, every method-setting: ``none``; ``prompt`` (the prompting baseline); ConVA
  ungated (``conva_nogate``) at P0 0.99 and 0.99999; CAA at strengths 0.1 and 0.25. Every row is
  **ungated** (CAA and prompt with ``gate_scope="conva"``, so :meth:`SteerSpec.gate_applies` is False),
  so the steering really happens on every prompt. Exact duplicates of (model, value, prompt, answer)
  are dropped, keeping the first; if fewer than ``--min-distinct`` remain, prompts 7, 8, … of every
  value are added (all methods, both models) until enough distinct answers exist.
* ``blind.jsonl``: the same items for the readers, blinded: ``id, value, definition, prompt, answer``
  (no model, method, P0 or strength), shuffled with ``numpy.random.default_rng(0)``; ids join back.

How: in one process with the library's public API. For each model, the value bundles are fitted on the
project's demo pairs as ``examples/demo_study.toml`` does (activations at the last token of the raw
text, no chat template; probes with the default settings; band ``auto``), with no gate (every row here
is ungated, so the gate would not be read). Answers are greedy (:func:`conva.generate`, batched mode),
``--max-new-tokens`` (72) new tokens, chat template on as in the study (Gemma 3 270M, a base model, gets
the plain "Question: ... Answer:" template :func:`conva.load_model` installs as its chat template).

Each (model, prompt range) block of answers is also kept under ``--parts`` and reused by a later run with
the same settings, so the two models can be generated in parallel processes and then merged:

    python -m benchmarks.make_answer_set                      # writes conva/demo_data/labels/

    # or the two models in parallel (one thread each), then the full run merges their cached blocks:
    python -m benchmarks.make_answer_set --models smollm2 --out /tmp/a1 --min-distinct 0 --threads 1 &
    python -m benchmarks.make_answer_set --models gemma3-270m --out /tmp/a2 --min-distinct 0 --threads 1
    python -m benchmarks.make_answer_set
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VALUES = ("achievement", "benevolence", "hedonism", "power", "tradition")
MODELS = ("smollm2", "gemma3-270m")
# (method, p0, strength): the six method-settings, in generation order within each prompt block.
SETTINGS = (
    ("none", None, None),
    ("prompt", None, None),
    ("conva_nogate", 0.99, None),
    ("conva_nogate", 0.99999, None),
    ("caa", None, 0.1),
    ("caa", None, 0.25),
)
OUT = Path(__file__).resolve().parent.parent / "conva" / "demo_data" / "labels"


def fit_bundles(model, tok, model_spec: str) -> dict:
    """Each value's bundle on the demo pairs (last token, raw text, band auto, no gate)."""
    from conva import data as D
    from conva.blocks import find_blocks
    from conva.fit import FitSettings, GateSettings, LayerData, ModelInfo, fit_value
    from conva.models import model_fingerprint, model_name
    from conva.record import record_activations

    n_blocks = len(find_blocks(model))
    info = ModelInfo(model_name(model_spec), model_fingerprint(model), model.config.hidden_size, n_blocks)
    settings = FitSettings(gate=GateSettings(kind="none"), band="auto")
    bundles = {}
    for value in VALUES:
        texts, labels, groups = [], [], []
        for i, pair in enumerate(D.demo_pairs(value)):
            texts += [pair.positive, pair.negative]
            labels += [1, 0]
            groups += [i, i]
        acts = record_activations(model, tok, texts, position="last", chat_template=False)
        data = LayerData(
            lambda l, a=acts: a[:, l], np.asarray(labels), np.asarray(groups), tuple(range(n_blocks))
        )
        bundles[value] = fit_value(value, data, None, info, settings, position="last", chat_template=False)
        print(f"  {model_spec} {value}: band {bundles[value].band}", flush=True)
    return bundles


def generate_block(
    model, tok, bundles, prompt_index: range, max_new_tokens: int, batch_size: int
) -> list[dict]:
    """Every (value, prompt, setting) row for the prompts ``prompt_index`` of each value, generated."""
    from conva import SteerSpec, generate
    from conva import data as D

    prompts, specs, meta = [], [], []
    for value in VALUES:
        value_prompts = D.demo_prompts(value)
        for i in prompt_index:
            prompt = value_prompts[i].prompt
            for method, p0, strength in SETTINGS:
                if method == "none":
                    spec = SteerSpec("none")
                elif method == "conva_nogate":
                    spec = SteerSpec(method, bundles[value], p0=p0)
                else:
                    spec = SteerSpec(method, bundles[value], strength=strength or 0.0, gate_scope="conva")
                assert not spec.gate_applies()
                prompts.append(prompt)
                specs.append(spec)
                meta.append(dict(value=value, method=method, p0=p0, strength=strength, prompt=prompt))
    rows = generate(
        model, tok, prompts, specs, max_new_tokens=max_new_tokens, chat_template=True, batch_size=batch_size
    )
    for m, r in zip(meta, rows):
        m["answer"] = r.text.strip()
        m["n_tokens"] = len(r.tokens)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--prompts", type=int, default=6, help="first N demo prompts of each value")
    ap.add_argument("--min-distinct", type=int, default=320)
    ap.add_argument("--max-new-tokens", type=int, default=72)
    ap.add_argument("--batch-size", type=int, default=36)
    ap.add_argument(
        "--parts", type=Path, default=Path("/tmp/conva_answer_parts"), help="cache of generated blocks"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    from conva import load_model
    from conva.values import definition

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded: dict = {}
    rows: list[dict] = []
    gen_s = 0.0

    def add_block(spec: str, index: range) -> None:
        nonlocal gen_s
        part = args.parts / f"{spec}-p{index.start + 1}-{index.stop}-t{args.max_new_tokens}.jsonl"
        if part.exists():
            block = [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines()]
            rows.extend(dict(model=spec, **r) for r in block)
            print(
                f"  {spec} prompts {index.start + 1}-{index.stop}: {len(block)} answers from {part}",
                flush=True,
            )
            return
        if spec not in loaded:
            model, tok = load_model(spec)
            loaded[spec] = (model, tok, fit_bundles(model, tok, spec))
        model, tok, bundles = loaded[spec]
        t = time.perf_counter()
        block = generate_block(model, tok, bundles, index, args.max_new_tokens, args.batch_size)
        gen_s += time.perf_counter() - t
        args.parts.mkdir(parents=True, exist_ok=True)
        part.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in block), encoding="utf-8")
        rows.extend(dict(model=spec, **r) for r in block)
        print(
            f"  {spec} prompts {index.start + 1}-{index.stop}: {len(block)} answers, {time.perf_counter() - t:.0f} s",
            flush=True,
        )

    for spec in args.models:
        add_block(spec, range(args.prompts))

    def distinct(rs: list[dict]) -> tuple[list[dict], int]:
        seen, kept = set(), []
        for r in rs:
            key = (r["model"], r["value"], r["prompt"], r["answer"])
            if key not in seen:
                seen.add(key)
                kept.append(r)
        return kept, len(rs) - len(kept)

    n_prompts = args.prompts
    kept, dropped = distinct(rows)
    while len(kept) < args.min_distinct:
        for spec in args.models:
            add_block(spec, range(n_prompts, n_prompts + 1))
        n_prompts += 1
        kept, dropped = distinct(rows)

    # ids in generation order, over the rows kept
    out = [
        dict(
            id=f"a{i + 1:04d}",
            **{
                k: r[k]
                for k in ("model", "value", "method", "p0", "strength", "prompt", "answer", "n_tokens")
            },
        )
        for i, r in enumerate(kept)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "answers.jsonl", "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    order = np.random.default_rng(0).permutation(len(out))
    with open(args.out / "blind.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            r = out[i]
            blind = dict(
                id=r["id"],
                value=r["value"],
                definition=definition(r["value"]),
                prompt=r["prompt"],
                answer=r["answer"],
            )
            f.write(json.dumps(blind, ensure_ascii=False) + "\n")
    n_tok = [r["n_tokens"] for r in out]
    print(
        f"{len(out)} answers ({dropped} exact duplicates dropped; prompts per value: {n_prompts}); "
        f"n_tokens median {np.median(n_tok):g}, min {min(n_tok)}; generation {gen_s:.0f} s, total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
