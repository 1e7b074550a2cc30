"""Steering speed on the HF backend, measured side by side in one run.

1. ConVA single-pass batched steering vs. the paper's procedure (``reference``: one prompt at a time, one
   forward pass per steered layer), same prompts, prompts/s and the share of identical outputs.
2. Steering overhead: steered vs. unsteered batched generation, same batch, interleaved repeats.
3. The same two on the compiled decode path (``mode="compiled"``, :mod:`conva.steering.compiled`), after one untimed
   call per shape that compiles (its time is reported apart), and its tokens against the eager path's.

Usage: ``python -m benchmarks.bench_steer [--model smollm2] [--batch 32] [--new 100] [--layers 16]
[--ref-prompts 8]``. Writes ``benchmarks/results/steer.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import RESULTS, machine, write_result
from conva.bundle import ValueBundle
from conva.data import demo_prompts
from conva.models import load_model, model_fingerprint
from conva.steering.hf import generate
from conva.steering.spec import SteerSpec

OUT = RESULTS / "steer.json"


def synthetic_bundle(model, n_layers: int, seed: int = 0) -> ValueBundle:
    """Random unit probes over a middle band: throughput does not depend on the probe's values."""
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    start = (n - n_layers) // 2
    band = tuple(range(start, start + n_layers))
    return ValueBundle(
        "achievement",
        "bench",
        model_fingerprint(model),
        d,
        n,
        np.arange(n),
        w,
        np.zeros(n, np.float32),
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        w.copy(),
        band,
        0.99,
    )


def _timed(fn) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ref-prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled decode path")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    bundle = synthetic_bundle(model, args.layers)
    prompts = [p.prompt for p in demo_prompts()][: args.batch]
    steer = [SteerSpec("conva_nogate", bundle, p0=0.99)] * len(prompts)
    plain = [SteerSpec("none")] * len(prompts)

    def run(specs, mode="batched"):
        return generate(
            model,
            tok,
            prompts,
            specs,
            max_new_tokens=args.new,
            batch_size=args.batch,
            mode=mode,
        )

    t_ref, ref = _timed(
        lambda: generate(
            model,
            tok,
            prompts[: args.ref_prompts],
            steer[: args.ref_prompts],
            max_new_tokens=args.new,
            mode="reference",
        )
    )
    times = {"steered": [], "plain": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, specs in (("plain", plain), ("steered", steer)):
            t, outputs[name] = _timed(lambda s=specs: run(s))
            times[name].append(t)
    t_steer, t_plain = min(times["steered"]), min(times["plain"])
    same = sum(a.tokens == b.tokens for a, b in zip(outputs["steered"], ref))
    tokens = {k: sum(len(r.tokens) for r in v) for k, v in outputs.items()}
    report = {
        **machine(),
        "model": args.model,
        "batch": args.batch,
        "new_tokens": args.new,
        "steered_layers": args.layers,
        "reference_prompts_per_s": args.ref_prompts / t_ref,
        "batched_prompts_per_s": len(prompts) / t_steer,
        "speedup_vs_reference": (len(prompts) / t_steer) / (args.ref_prompts / t_ref),
        "reference_outputs_identical": f"{same}/{args.ref_prompts}",
        "steered_tokens_per_s": tokens["steered"] / t_steer,
        "plain_tokens_per_s": tokens["plain"] / t_plain,
        "steered_over_plain_prompts_per_s": t_plain / t_steer,
        "plain_prompts_per_s": len(prompts) / t_plain,
        "times_s": times,
        "reference_s": t_ref,
    }
    if not args.no_compiled:
        first = {
            name: _timed(lambda s=specs: run(s, "compiled"))[0]
            for name, specs in (("plain", plain), ("steered", steer))
        }
        fast = {"steered": [], "plain": []}
        for _ in range(args.repeats):
            for name, specs in (("plain", plain), ("steered", steer)):
                t, outputs[f"fast_{name}"] = _timed(lambda s=specs: run(s, "compiled"))
                fast[name].append(t)
        f_steer, f_plain = min(fast["steered"]), min(fast["plain"])
        report["fast"] = {
            "steered_prompts_per_s": len(prompts) / f_steer,
            "plain_prompts_per_s": len(prompts) / f_plain,
            "steered_tokens_per_s": sum(len(r.tokens) for r in outputs["fast_steered"]) / f_steer,
            "plain_tokens_per_s": sum(len(r.tokens) for r in outputs["fast_plain"]) / f_plain,
            "steered_over_plain": f_plain / f_steer,
            "speedup_vs_reference": (len(prompts) / f_steer) / (args.ref_prompts / t_ref),
            "same_tokens_as_eager": f"{sum(a.tokens == b.tokens for a, b in zip(outputs['fast_steered'], outputs['steered']))}"
            f"/{len(prompts)}",
            "first_call_s": first,
            "times_s": fast,
        }
    write_result(OUT, report)


if __name__ == "__main__":
    main()
