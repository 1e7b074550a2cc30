"""Render ``benchmarks/results/*.json`` into the generated part of ``benchmarks/RESULTS.md``.

Everything between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is rewritten from the JSON files
(one per benchmark, each carrying its machine, date and versions); the hand-written readings around it are
kept. ``python -m benchmarks`` calls this after running the benchmarks; ``python -m benchmarks.report``
re-renders without running anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import RESULTS

DOC = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _when(r: dict) -> str:
    """Machine, date and versions, whichever layout the file has (older files nest or abbreviate them)."""
    m = r.get("machine") if isinstance(r.get("machine"), dict) else r
    v = m.get("versions") or {}
    versions = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    cpu = m.get("cpu") or (r["machine"] if isinstance(r.get("machine"), str) else "?")
    cores = f", {m['cores']} cores" if m.get("cores") else ""
    load = m.get("load_avg_1m", r.get("load_average_1min"))
    load = f", load {load:.1f} at start" if isinstance(load, (int, float)) else ""
    return f"{m.get('date', '?')} · {cpu}{cores}{load} · {versions or 'torch ' + str(r.get('torch', '?'))}"


def _target(value: float, target: float, unit: str = "") -> str:
    ok = "meets" if value >= target else "**misses**"
    return f"{value:.2f}{unit} ({ok} the target ≥ {target:g}{unit})"


def steer(r: dict) -> str:
    rows = [("paper's procedure (`mode=\"reference\"`), batch 1", r["reference_prompts_per_s"], None),
            (f"ConVA single pass, batch {r['batch']}", r["batched_prompts_per_s"], r["steered_tokens_per_s"]),
            (f"unsteered, batch {r['batch']}", r["batched_prompts_per_s"] / r["steered_over_plain_prompts_per_s"],
             r["plain_tokens_per_s"])]
    if "fast" in r:
        f = r["fast"]
        rows += [(f"ConVA single pass, compiled decode (`steer.mode=\"compiled\"`), batch {r['batch']}",
                  f["steered_prompts_per_s"], f["steered_tokens_per_s"]),
                 (f"unsteered, compiled decode, batch {r['batch']}", f["plain_prompts_per_s"], f["plain_tokens_per_s"])]
    lines = ["| run | prompts/s | tokens/s |", "|---|---|---|"]
    lines += [f"| {name} | {p:.3f} | {'–' if t is None else f'{t:.1f}'} |" for name, p, t in rows]
    lines += ["", f"Single pass vs. the paper's procedure: {_target(r['speedup_vs_reference'], 12, '×')}; outputs "
                  f"identical for {r['reference_outputs_identical']} prompts. Steered / unsteered (eager): "
                  f"{_target(r['steered_over_plain_prompts_per_s'], 0.97)}."]
    if "fast" in r:
        f = r["fast"]
        lines += [f"Compiled decode (the GPU path; on a CPU it has no launch overhead to remove): single pass vs. the "
                  f"paper's procedure {f['steered_prompts_per_s'] / r['reference_prompts_per_s']:.2f}×, "
                  f"{f['steered_prompts_per_s'] / r['batched_prompts_per_s']:.2f} of the eager single pass; steered / "
                  f"unsteered {_target(f['steered_over_plain'], 0.97)}; same tokens as the eager single pass for "
                  f"{f['same_tokens_as_eager']} prompts; first call per shape (compiling) "
                  f"{max(f['first_call_s'].values()):.0f} s."]
    return "\n".join(lines)


def vllm(r: dict) -> str:
    t = r["tokens_per_s"]
    lines = ["| run | tokens/s |", "|---|---|", f"| vLLM unsteered | {t['vllm_plain']:.1f} |",
             f"| vLLM steered (ConVA, {r['steered_layers']} layers) | {t['vllm_steered']:.1f} |"]
    if "hf_steered" in t:
        lines.append(f"| HF steered (same batch) | {t['hf_steered']:.1f} |")
    spread = r.get("per_repeat_steered_over_plain")
    spread = (f" (best of {r['repeats']} each; per repeat {min(spread):.2f}–{max(spread):.2f}, median "
              f"{spread[len(spread) // 2]:.2f})") if spread else ""
    lines += ["", f"vLLM steered / unsteered: {_target(r['vllm_steered_over_plain'], 0.97)}{spread}"
                  + (f"; vLLM steered / HF steered: {r['vllm_over_hf_steered']:.2f}×." if "vllm_over_hf_steered" in r
                     else ".")]
    return "\n".join(lines)


def extract(r: dict) -> str:
    return "\n".join([
        "| path | texts/s |", "|---|---|",
        f"| raw `record_activations`, one process, {r['raw_threads']} threads | {r['raw_texts_per_s']} |",
        f"| raw, 1 thread | {r['raw_1_thread_texts_per_s']} |",
        f"| Ray extract job, {r['ray_actors']} actors × {r['ray_cpus_per_actor']:g} CPU | {r['ray_texts_per_s']} |",
        "", f"{r['texts']} texts in {r['shards']} shards, steady state (actor start-up {r['ray_startup_seconds']} s "
            f"apart). Ray / raw (all threads): {r['ratio']:.2f}; per CPU against a 1-thread raw run: "
            f"{_target(r['ratio_per_cpu'], 0.9)}."])


def fit(r: dict) -> str:
    lines = ["| activations | texts × layers × width | float32 volume | fit wall (10 values) | per (value, layer) "
             "| driver RSS after imports → peak | memory cap (charged peak) |", "|---|---|---|---|---|---|---|"]
    for key in ("model", "synthetic"):
        m = r.get(key)
        if not m:
            continue
        name = f"{m['model']}, {m['pairs'].split(':')[0]} pairs" if key == "model" else "synthetic (Gaussian)"
        shape = f"{m['texts']:,} × {m['layers']} × {m['hidden']}"
        cap = "–"
        if "cap_mb" in m:
            cap = (f"{m['cap_mb']:,.0f} MB cgroup ({m['cgroup_peak_mb_incl_page_cache']:,.0f} MB)"
                   if m["cap_mb"] else f"not enforced ({m['cap_why_not']})")
        if m.get("failed"):
            lines.append(f"| {name} | {shape} | {m['float32_mb']:,.0f} MB | **failed** (exit {m['returncode']}) "
                         f"| – | – | {cap} |")
            continue
        lines.append(f"| {name} | {shape} | {m['float32_mb']:,.0f} MB ({m['on_disk_mb']:,.0f} MB on disk) "
                     f"| {m['seconds']:.1f} s | {m['seconds'] / (m['values'] * m['layers']) * 1000:.0f} ms "
                     f"| {m['rss_after_imports_mb']:,.0f} → {m['peak_rss_mb']:,.0f} MB | {cap} |")
    return "\n".join(lines)


def scaleout(r: dict) -> str:
    e0, s0 = r["runs"][0]["stages"]["extract"], r["runs"][0]["stages"]["steer"]
    shard = (f" ({e0['rows_per_shard']}-text shards)", f" ({s0['rows_per_shard']}-prompt shards)") if "rows_per_shard" in e0 else ("", "")
    lines = [f"| workers | extract texts/s{shard[0]} | steer prompts/s{shard[1]} | fit s (driver) | job wall s | actor start-up s (extract, steer) |",
             "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        s = run["stages"]
        lines.append(f"| {run['workers']} | {s['extract'].get('texts_per_s', s['extract']['rows_per_s']):.1f} | {s['steer']['rows_per_s']:.2f} "
                     f"| {s['fit']['seconds']:.1f} | {run['wall_s']:.1f} "
                     f"| {s['extract']['startup_seconds']:.1f}, {s['steer']['startup_seconds']:.1f} |")
    for n, e in r["efficiency"].items():
        lines += ["", f"Efficiency with {n} workers (throughput per worker / one worker's): extract "
                      f"{e['extract']:.2f}, steer {e['steer']:.2f}, whole job (wall) {e['job_wall']:.2f}."]
    if "driver_commit" in r:
        c = r["driver_commit"]
        lines += ["", f"The driver's commit ceiling: {c['mb_per_s']:,.0f} MB/s of activations = {c['texts_per_s']:,.0f} "
                      f"texts/s of a {c['layers']}-layer × {c['hidden']} model recorded at every layer "
                      f"({c['shards']} shards of {c['shard_mb']:,.0f} MB: Parquet write, fsync, sha256, manifest)."]
    return "\n".join(lines)


def large_input(r: dict) -> str:
    return "\n".join([
        "| prompts | shards | activations through the driver | wall | driver RSS start → first commit → end "
        "| growth over the last 90 % of shards |", "|---|---|---|---|---|---|",
        f"| {r['prompts']:,} | {r['shards']:,} | {r['activation_mb_through_driver']:,.0f} MB | {r['seconds']} s "
        f"({r['rows_per_s']:,} rows/s) | {r['rss_before_job_mb']} → {r['rss_first_commit_mb']} → {r['rss_end_mb']} MB "
        f"| +{r['growth_after_warmup_mb']} MB RSS, +{r['uss_growth_after_warmup_mb']} MB private |"])


def gpu(r: dict) -> str:
    """``benchmarks/gpu.py``'s rows: tokens/s and the ratio each row names (of roofline, vs. plain...)."""
    lines = [f"Device: {r.get('device', '?')}, CUDA {r.get('cuda')}, plan {r['plan']['shapes']} "
             f"{r['plan']['dtype']}, batches {r['plan']['batches']}, {r['plan']['new_tokens']} new tokens, "
             f"{r['plan']['steered_layers']} steered layers; wall {r.get('wall_s')} s.", "",
             "| shape | what | batch | tokens/s | ratio | note |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        tok_s = "" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {row['shape']} | {row['what']} | {row['batch'] or ''} | {tok_s} | {ratio} | {row['note']} |")
    return "\n".join(lines)


def probe_accuracy(r: dict) -> str:
    acc = r["test_acc"]
    n = len(next(iter(acc.values())))
    lines = ["| value | best layer | best acc | layers ≥ 0.90 | mean acc 12–20 |", "|---|---|---|---|---|"]
    for value, row in acc.items():
        a = np.asarray(row)
        lines.append(f"| {value} | {int(np.argmax(a))} | {a.max():.3f} | {int((a >= 0.9).sum())}/{n} | "
                     f"{a[12:21].mean():.3f} |")
    return "\n".join(lines)


# Order, title, the command that writes the file, and its renderer.
SECTIONS: list[tuple[str, str, str, Callable[[dict], str]]] = [
    ("steer", "Single-pass ConVA vs. the paper's procedure; steering overhead (HF)", "python -m benchmarks.bench_steer", steer),
    ("vllm", "vLLM backend: steering overhead and vLLM vs. HF", "python -m benchmarks.bench_vllm", vllm),
    ("extract", "Extraction job vs. raw forward passes", "python benchmarks/bench_extract.py", extract),
    ("fit", "Fitting: ten values, every layer, on the driver", "python -m benchmarks.bench_fit", fit),
    ("scaleout", "Scale-out: the run job with 1 and 2 workers", "python -m benchmarks.bench_scaleout", scaleout),
    ("large_input", "Large input through the sharding and commit path", "python -m benchmarks.bench_large_input",
     large_input),
    ("probe_accuracy", "Probe accuracy on SmolLM2 with the paper's pairs", "python -m benchmarks.probe_accuracy",
     probe_accuracy),
    ("gpu", "GPU: the HF backend on random-weight Llama shapes", "timeout 330 python -m benchmarks.gpu (device)", gpu),
]


def render(results: Path = RESULTS) -> str:
    """The generated block: one subsection per results file present in ``results``."""
    parts = [BEGIN, "<!-- generated by `python -m benchmarks` from benchmarks/results/*.json; edits here are "
                    "overwritten -->"]
    for name, title, command, fn in SECTIONS:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        parts += ["", f"### {title}", "", f"`{command}` · {_when(r)} · raw: `benchmarks/results/{name}.json`", "",
                  fn(r)]
    parts.append(END)
    return "\n".join(parts)


def update(doc: Path = DOC, results: Path = RESULTS) -> None:
    """Replace the generated block of ``doc`` (appended if the markers are missing)."""
    text = doc.read_text() if doc.exists() else "# Benchmark results\n"
    block = render(results)
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    update()
    print(f"wrote {DOC}")
