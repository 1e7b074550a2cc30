"""GPU benchmark of the HF backend on random-weight Llama shapes (bf16): extraction, steered generation, roofline.

Per shape (8B-like: 32 layers, d=4096; 1B-like: 16 layers, d=2048), side by side in one run:

1. Extraction: :func:`conva.record.record_activations` (last-token residual of every block, to the CPU)
   vs. plain forward passes of the same batches (B=32 × 256 tokens).
2. Generation, 64-token prompts, 64 new tokens, 16 steered layers (ConVA, every row steered), batch 32
   and 128: HF eager (:func:`conva.steering.hf.generate`) plain and steered, and the fast path
   (:class:`conva.steering.compiled.FastSteering`: static cache, compiled decode with CUDA graphs, steering in the
   graph) plain (no steered layers) and steered. Tokens/s count ``batch × new tokens`` over the whole
   call (prefill included). The fast path's first call (compile) is timed apart.
3. The decode roofline: weight bytes read per step over the card's bandwidth, measured with a large
   device-to-device copy; ``batch / step time`` is the best possible decode rate.

Each item checks a time budget first and is skipped (and says so) once it is spent, so the script ends
in about 5 minutes on an H100. Needs torch + transformers only (no Ray, no vLLM).

Usage (device): ``python -m benchmarks.gpu [--quick]`` (``--quick``: 1B shape only).
CPU check: ``python -m benchmarks.gpu --cpu-smoke`` (tiny shape, batch 8, few tokens, Inductor).
Prints one table; writes JSON to ``$OUT/gpu.json`` if ``$OUT`` is set, else ``benchmarks/results/gpu.json``
(``gpu_cpu_smoke.json`` for the smoke run). Copied into ``benchmarks/results/gpu.json``, a device run's
figures are rendered into ``RESULTS.md`` by ``python -m benchmarks.report`` like every other benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from benchmarks.bench_steer import synthetic_bundle
from benchmarks.common import RESULTS, machine
from conva.record import record_activations
from conva.steering.compiled import FastSteering
from conva.steering.hf import generate
from conva.steering.spec import SteerSpec
from conva.tiny import make_tiny_tokenizer, tiny_corpus


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


SHAPES = {
    "8B": Shape("8B", 32, 4096, 32, 8, 14336, 128256),
    "1B": Shape("1B", 16, 2048, 32, 8, 8192, 128256),
    "tiny": Shape("tiny", 4, 256, 4, 2, 512, 512),
}


@dataclass(frozen=True)
class Plan:
    shapes: tuple[str, ...]
    device: str
    dtype: torch.dtype
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    steered_layers: int
    extract_batch: int
    extract_len: int
    extract_batches: int
    compile: bool
    budget_s: float


def _plan(args: argparse.Namespace) -> Plan:
    if args.cpu_smoke:
        return Plan(("tiny",), "cpu", torch.float32, (8,), 16, 16, 2, 8, 64, 2, not args.no_compile, 600)
    shapes = ("1B",) if args.quick else ("8B", "1B")
    return Plan(
        shapes, "cuda", torch.bfloat16, (32, 128), 64, 64, 16, 32, 256, 4, not args.no_compile, args.budget
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def build_model(shape: Shape, device: str, dtype: torch.dtype):
    """A random-weight Llama of ``shape`` made directly on ``device`` (throughput ignores the weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def prompts_of(tok, n: int, length: int) -> list[str]:
    """``n`` different texts of about ``length`` tokens each (windows over the tiny corpus)."""
    ids = tok(" ".join(tiny_corpus(2000)))["input_ids"]
    return [tok.decode(ids[i * 7 : i * 7 + length]) for i in range(n)]


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight except the input embedding (only B rows of it are read)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


def bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (2 << 30) if device == "cuda" else (64 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = _timed(lambda: [y.copy_(x) for _ in range(10)], device)
    return 2 * n * 10 / t


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan, self.rows, self.extra = plan, [], {}
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.start)

    def row(
        self,
        shape: str,
        what: str,
        batch: int | None,
        tok_s: float | None,
        ratio: float | None = None,
        note: str = "",
    ) -> None:
        self.rows.append(
            {
                "shape": shape,
                "what": what,
                "batch": batch,
                "tokens_per_s": tok_s,
                "ratio": ratio,
                "note": note,
            }
        )

    def skip(self, shape: str, what: str, batch: int | None) -> bool:
        if self.left() > 0:
            return False
        self.row(shape, what, batch, None, None, "skipped: time budget spent")
        return True

    def extraction(self, shape: str, model, tok) -> None:
        p = self.plan
        if self.skip(shape, "extraction / plain forward", p.extract_batch):
            return
        texts = prompts_of(tok, p.extract_batch * p.extract_batches, p.extract_len)
        batches = [texts[i : i + p.extract_batch] for i in range(0, len(texts), p.extract_batch)]
        encs = [tok(b, return_tensors="pt", padding=True).to(p.device) for b in batches]
        n_tok = sum(int(e["attention_mask"].sum()) for e in encs)

        def forward() -> None:
            with torch.inference_mode():
                for e in encs:
                    model.base_model(**e, use_cache=False)

        extract = lambda: record_activations(model, tok, texts, batch_size=p.extract_batch)  # noqa: E731
        forward(), extract()  # warm-up
        t_fwd = min(_timed(forward, p.device)[0] for _ in range(2))
        t_ext = min(_timed(extract, p.device)[0] for _ in range(2))
        self.row(
            shape,
            "plain forward (base model)",
            p.extract_batch,
            n_tok / t_fwd,
            None,
            f"x{p.extract_len} tokens",
        )
        self.row(
            shape,
            "extraction, all layers to CPU",
            p.extract_batch,
            n_tok / t_ext,
            t_fwd / t_ext,
            "ratio: vs plain forward",
        )

    def generation(self, shape: str, model, tok, batch: int, roofline: float) -> None:
        p = self.plan
        if self.skip(shape, "generation", batch):
            return
        bundle = synthetic_bundle(model, p.steered_layers)
        prompts = prompts_of(tok, batch, p.prompt_len)
        steered = [SteerSpec("conva_nogate", bundle, p0=0.999999)] * batch  # ε > 0 on (nearly) every row
        plain = [SteerSpec("none")] * batch
        work = batch * p.new_tokens

        def hf(specs):
            return generate(
                model,
                tok,
                prompts,
                specs,
                max_new_tokens=p.new_tokens,
                chat_template=False,
                batch_size=batch,
            )

        generate(model, tok, prompts[:2], steered[:2], max_new_tokens=4, chat_template=False)  # warm-up
        times = {"plain": [], "steered": []}
        outs = {}
        for _ in range(2):
            for name, specs in (("plain", plain), ("steered", steered)):
                t, outs[name] = _timed(lambda s=specs: hf(s), p.device)
                times[name].append(t)
        hf_plain, hf_steer = work / min(times["plain"]), work / min(times["steered"])
        self.row(shape, "HF eager, plain", batch, hf_plain, hf_plain / roofline, "ratio: of roofline")
        self.row(shape, "HF eager, steered", batch, hf_steer, hf_steer / hf_plain, "ratio: vs HF plain")
        nonzero = sum(e > 0 for r in outs["steered"] for e in r.eps) / max(
            1, sum(len(r.eps) for r in outs["steered"])
        )
        self.extra[f"{shape}_B{batch}_eps_nonzero_share"] = nonzero
        if self.skip(shape, "fast path", batch):
            return
        self._fast(shape, model, tok, batch, prompts, plain, steered, bundle.band, roofline, outs["steered"])

    def _fast(self, shape, model, tok, batch, prompts, plain, steered, band, roofline, hf_rows) -> None:
        p = self.plan
        work = batch * p.new_tokens
        max_len = -(-(p.prompt_len + 8 + p.new_tokens) // 64) * 64
        runners = {
            "plain": FastSteering(model, batch_size=batch, max_len=max_len, layers=(), compile=p.compile),
            "steered": FastSteering(model, batch_size=batch, max_len=max_len, layers=band, compile=p.compile),
        }
        specs = {"plain": plain, "steered": steered}

        def run(name):
            return runners[name].generate(
                tok,
                prompts,
                specs[name],
                max_new_tokens=p.new_tokens,
                chat_template=False,
            )

        for name in runners:
            t_first, _ = _timed(lambda n=name: run(n), p.device)  # compiles
            self.extra[f"{shape}_B{batch}_fast_{name}_first_call_s"] = round(t_first, 2)
            run(name)  # CUDA graphs are recorded on a later call than the compiling one
        times = {"plain": [], "steered": []}
        outs = {}
        for _ in range(2):
            for name in runners:
                t, outs[name] = _timed(lambda n=name: run(n), p.device)
                times[name].append(t)
        fast_plain, fast_steer = work / min(times["plain"]), work / min(times["steered"])
        same = sum(a.tokens == b.tokens for a, b in zip(outs["steered"], hf_rows)) / batch
        eps_diff = max(abs(a - b) for x, y in zip(outs["steered"], hf_rows) for a, b in zip(x.eps, y.eps))
        kind = "compiled" if p.compile else "eager"
        self.row(
            shape, f"fast ({kind}), plain", batch, fast_plain, fast_plain / roofline, "ratio: of roofline"
        )
        self.row(
            shape,
            f"fast ({kind}), steered",
            batch,
            fast_steer,
            fast_steer / fast_plain,
            "ratio: vs fast plain",
        )
        self.row(
            shape,
            f"fast ({kind}), steered / roofline",
            batch,
            None,
            fast_steer / roofline,
            f"rows = HF tokens: {same:.2f}; max |Δε| {eps_diff:.1e}",
        )
        # Non-zero skips mean the decode ran without CUDA graphs (Inductor logs the reason).
        self.extra[f"{shape}_B{batch}_cudagraph_skips_so_far"] = counters["inductor"]["cudagraph_skips"]
        self.extra[f"{shape}_B{batch}_graphs_so_far"] = counters["stats"]["unique_graphs"]
        runners.clear()  # free the compiled graphs before the next shape
        gc.collect()

    def shape(self, name: str) -> None:
        p = self.plan
        if self.skip(name, "build", None):
            return
        spec = SHAPES[name]
        t_build, model = _timed(lambda: build_model(spec, p.device, p.dtype), p.device)
        tok = make_tiny_tokenizer()
        tok.padding_side, tok.model_max_length = "left", 1 << 20  # the corpus is tokenized in one piece
        wbytes = weight_bytes(model)
        bw = self.extra.setdefault("bandwidth_bytes_per_s", bandwidth(p.device))
        self.extra[f"{name}_weight_bytes"], self.extra[f"{name}_build_s"] = wbytes, round(t_build, 1)
        self.extraction(name, model, tok)
        for batch in sorted(p.batches, reverse=True):  # the headline batch first
            roofline = batch / (wbytes / bw)
            self.row(
                name,
                "decode roofline (weights / bandwidth)",
                batch,
                roofline,
                None,
                f"{wbytes / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s",
            )
            self.generation(name, model, tok, batch, roofline)
        del model
        gc.collect()
        torch._dynamo.reset()
        if p.device == "cuda":
            torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    head = f"{'shape':<6} {'what':<40} {'batch':>5} {'tokens/s':>10} {'ratio':>7}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        tok_s = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(
            f"{r['shape']:<6} {r['what']:<40} {r['batch'] or '':>5} {tok_s:>10} {ratio:>7}  {r['note']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 1B shape only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, to check the script")
    ap.add_argument("--no-compile", action="store_true", help="run the fast path's decode step eagerly")
    ap.add_argument(
        "--budget", type=float, default=240.0, help="seconds after which remaining items are skipped"
    )
    args = ap.parse_args()
    plan = _plan(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke on a CPU machine")
    bench = Bench(plan)
    for name in plan.shapes:
        bench.shape(name)
    print(table(bench.rows))
    device = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    plan_json = {**vars(plan), "dtype": str(plan.dtype)}
    report = {
        **machine(),
        "device": device,
        "cuda": torch.version.cuda,
        "plan": plan_json,
        "rows": bench.rows,
        "extra": bench.extra,
        "wall_s": round(time.perf_counter() - bench.start, 1),
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out = out_dir / ("gpu_cpu_smoke.json" if args.cpu_smoke else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
