"""ConVA through its vLLM plugin, side by side in one run: mixed-batch throughput and the prefix cache.

Two multi-process engines (the engine core in its own process, as ``vllm serve`` runs it), built the same
but for prefix caching. Both load the plugin by its entry point; requests carry their spec in
``extra_args`` (:mod:`conva.steering.vllm_plugin`).

* **Mixed batches** (engine without prefix caching, so repeats do not hit a cache): ``--batch`` distinct
  prompts, 0 %, 50 % and 100 % of them steered (ConVA, ungated), ``--new`` greedy tokens; generated
  tokens per second, best of ``--repeats`` interleaved runs.
* **Study shape**: one long prompt under ``--settings`` steering settings (P0 values) plus an unsteered
  baseline, few new tokens (prefill dominates, as in scoring). Two cases: the gate open for the prompt
  (every setting steers: each has its own cache salt, only the baseline's blocks are shared), and the
  gate decided closed (the settings run unsteered, unsalted, and share the baseline's blocks). Each
  case is timed on the caching engine (its cache reset first) and on the other, interleaved.

Usage: ``python -m benchmarks.bench_vllm_plugin [--model smollm2]``. Writes
``benchmarks/results/vllm_plugin.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from benchmarks.bench_steer import synthetic_bundle  # noqa: E402
from benchmarks.common import RESULTS, machine, write_result  # noqa: E402
from conva.bundle import save_bundle  # noqa: E402
from conva.data import demo_prompts  # noqa: E402
from conva.models import load_model, resolve_model  # noqa: E402
from conva.steering.vllm_plugin import request_args  # noqa: E402

OUT = RESULTS / "vllm_plugin.json"


def _engine(path: str, caching: bool, batch: int) -> Any:
    from vllm import LLM

    return LLM(
        model=path,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        max_num_seqs=max(batch, 32),
        max_num_batched_tokens=8192,
        enable_chunked_prefill=False,
        enable_prefix_caching=caching,
        seed=0,
    )


def _timed(llm: Any, prompts: list[str], extras: list[dict | None], new: int) -> tuple[float, int]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, extra_args=e) for e in extras]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    start = time.perf_counter()
    outs = llm.chat(messages, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--settings", type=int, default=15)
    ap.add_argument("--study-new", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    bundle_obj = synthetic_bundle(model, args.layers)
    del model
    bundle = str(
        save_bundle(bundle_obj, os.path.join(tempfile.mkdtemp(prefix="conva-bench-"), "achievement"))
    )
    path = resolve_model(args.model)
    cached, plain = _engine(path, True, args.batch), _engine(path, False, args.batch)

    prompts = [p.prompt for p in demo_prompts()][: args.batch]
    steer = request_args(bundle=bundle, method="conva_nogate", p0=0.99)
    mix: dict[str, list[float]] = {"0": [], "50": [], "100": []}
    for _ in range(args.repeats):
        for frac in mix:
            k = len(prompts) * int(frac) // 100
            elapsed, n = _timed(plain, prompts, [steer] * k + [None] * (len(prompts) - k), args.new)
            mix[frac].append(n / elapsed)
    rate = {f: max(v) for f, v in mix.items()}

    study_prompt = " ".join(p.prompt for p in demo_prompts()[:24])  # one long prompt
    p0s = [round(0.5 + 0.49 * i / max(args.settings - 1, 1), 3) for i in range(args.settings)]
    cases = {
        "gate_open": [None] + [request_args(bundle=bundle, p0=p, gate_open=1) for p in p0s],
        "gate_closed": [None] + [request_args(bundle=bundle, p0=p, gate_open=0) for p in p0s],
    }
    study: dict[str, dict[str, list[float]]] = {c: {"cache": [], "no_cache": []} for c in cases}
    n_prompt = len(
        cached.chat([[{"role": "user", "content": study_prompt}]], use_tqdm=False)[0].prompt_token_ids
    )
    for _ in range(args.repeats):
        for case, extras in cases.items():
            cached.reset_prefix_cache()
            study[case]["cache"].append(
                _timed(cached, [study_prompt] * len(extras), extras, args.study_new)[0]
            )
            study[case]["no_cache"].append(
                _timed(plain, [study_prompt] * len(extras), extras, args.study_new)[0]
            )
    best = {c: {k: min(v) for k, v in t.items()} for c, t in study.items()}
    write_result(
        OUT,
        {
            **machine(),
            "model": args.model,
            "engine": "vllm.LLM, VLLM_ENABLE_V1_MULTIPROCESSING=1, eager, float32, chunked prefill off",
            "steered_layers": args.layers,
            "mix": {
                "batch": args.batch,
                "new_tokens": args.new,
                "tokens_per_s": rate,
                "runs": mix,
                "steered50_over_plain": rate["50"] / rate["0"],
                "steered100_over_plain": rate["100"] / rate["0"],
            },
            "study": {
                "prompt_tokens": n_prompt,
                "settings": args.settings,
                "requests": args.settings + 1,
                "new_tokens": args.study_new,
                "seconds": best,
                "runs": study,
                "speedup": {c: t["no_cache"] / t["cache"] for c, t in best.items()},
            },
        },
    )


if __name__ == "__main__":
    main()
