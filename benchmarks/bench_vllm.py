"""vLLM steering throughput, side by side in one run: steered vs. unsteered vLLM, and vLLM vs. HF steered.

Same prompts, same batch, greedy, ``--new`` tokens; each configuration runs ``--repeats`` times,
interleaved, and the best time counts. Usage: ``python -m benchmarks.bench_vllm [--model smollm2]
[--batch 32] [--new 64] [--layers 16]``. Writes ``benchmarks/results/vllm.json``.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.bench_steer import synthetic_bundle
from benchmarks.common import RESULTS, machine, write_result
from conva.data import demo_prompts
from conva.models import load_model
from conva.steering.hf import generate
from conva.steering.spec import SteerSpec
from conva.steering.vllm import EngineSettings, VLLMSteerer

OUT = RESULTS / "vllm.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF comparison")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    bundle = synthetic_bundle(model, args.layers)
    prompts = [p.prompt for p in demo_prompts()][: args.batch]
    steered = [SteerSpec("conva_nogate", bundle, p0=0.99)] * len(prompts)
    plain = [SteerSpec("none")] * len(prompts)
    engine = VLLMSteerer(args.model, [bundle], settings=EngineSettings(max_num_seqs=args.batch))
    runs = {
        "vllm_plain": lambda: engine.generate(prompts, plain, max_new_tokens=args.new),
        "vllm_steered": lambda: engine.generate(prompts, steered, max_new_tokens=args.new),
    }
    if not args.no_hf:
        runs["hf_steered"] = lambda: generate(
            model, tok, prompts, steered, max_new_tokens=args.new, batch_size=args.batch
        )
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            rows = fn()
            elapsed = time.perf_counter() - start
            rates[name].append(sum(len(r.tokens) for r in rows) / elapsed)
            if elapsed < best.get(name, float("inf")):
                best[name], tokens[name] = elapsed, sum(len(r.tokens) for r in rows)
    rate = {k: tokens[k] / best[k] for k in best}
    # The spread: steered / unsteered of each repeat (the two ran back to back), to read the best-of against.
    pairs = sorted(s / p for s, p in zip(rates["vllm_steered"], rates["vllm_plain"]))
    report = {
        **machine(),
        "model": args.model,
        "batch": args.batch,
        "new_tokens": args.new,
        "steered_layers": args.layers,
        "tokens_per_s": rate,
        "seconds": best,
        "vllm_steered_over_plain": rate["vllm_steered"] / rate["vllm_plain"],
        "per_repeat_steered_over_plain": pairs,
        "repeats": args.repeats,
    }
    if "hf_steered" in rate:
        report["vllm_over_hf_steered"] = rate["vllm_steered"] / rate["hf_steered"]
    write_result(OUT, report)


if __name__ == "__main__":
    main()
