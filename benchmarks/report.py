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
    if r.get("load_avg_end"):
        load += f", {r['load_avg_end'][0]:.1f} at end (5-min {r['load_avg_end'][1]:.1f})"
    return f"{m.get('date', '?')} · {cpu}{cores}{load} · {versions or 'torch ' + str(r.get('torch', '?'))}"


def _target(value: float, target: float, unit: str = "") -> str:
    ok = "meets" if value >= target else "**misses**"
    return f"{value:.2f}{unit} ({ok} the target ≥ {target:g}{unit})"


def _target_max(value: float, target: float, unit: str = "") -> str:
    ok = "meets" if value <= target else "**misses**"
    return f"{value:.2f}{unit} ({ok} the target ≤ {target:g}{unit})"


def steer(r: dict) -> str:
    rows = [
        ('paper\'s procedure (`mode="reference"`), batch 1', r["reference_prompts_per_s"], None),
        (f"ConVA single pass, batch {r['batch']}", r["batched_prompts_per_s"], r["steered_tokens_per_s"]),
        (
            f"unsteered, batch {r['batch']}",
            r["batched_prompts_per_s"] / r["steered_over_plain_prompts_per_s"],
            r["plain_tokens_per_s"],
        ),
    ]
    if "fast" in r:
        f = r["fast"]
        rows += [
            (
                f'ConVA single pass, compiled decode (`steer.mode="compiled"`), batch {r["batch"]}',
                f["steered_prompts_per_s"],
                f["steered_tokens_per_s"],
            ),
            (
                f"unsteered, compiled decode, batch {r['batch']}",
                f["plain_prompts_per_s"],
                f["plain_tokens_per_s"],
            ),
        ]
    lines = ["| run | prompts/s | tokens/s |", "|---|---|---|"]
    lines += [f"| {name} | {p:.3f} | {'–' if t is None else f'{t:.1f}'} |" for name, p, t in rows]
    lines += [
        "",
        f"Single pass vs. the paper's procedure: {_target(r['speedup_vs_reference'], 12, '×')}; outputs "
        f"identical for {r['reference_outputs_identical']} prompts. Steered / unsteered (eager): "
        f"{_target(r['steered_over_plain_prompts_per_s'], 0.97)}.",
    ]
    if "fast" in r:
        f = r["fast"]
        lines += [
            f"Compiled decode (the GPU path; on a CPU it has no launch overhead to remove): single pass vs. the "
            f"paper's procedure {f['steered_prompts_per_s'] / r['reference_prompts_per_s']:.2f}×, "
            f"{f['steered_prompts_per_s'] / r['batched_prompts_per_s']:.2f} of the eager single pass; steered / "
            f"unsteered {_target(f['steered_over_plain'], 0.97)}; same tokens as the eager single pass for "
            f"{f['same_tokens_as_eager']} prompts; first call per shape (compiling) "
            f"{max(f['first_call_s'].values()):.0f} s."
        ]
    return "\n".join(lines)


def vllm(r: dict) -> str:
    t = r["tokens_per_s"]
    lines = [
        "| run | tokens/s |",
        "|---|---|",
        f"| vLLM unsteered | {t['vllm_plain']:.1f} |",
        f"| vLLM steered (ConVA, {r['steered_layers']} layers) | {t['vllm_steered']:.1f} |",
    ]
    if "hf_steered" in t:
        lines.append(f"| HF steered (same batch) | {t['hf_steered']:.1f} |")
    spread = r.get("per_repeat_steered_over_plain")
    spread = (
        (
            f" (best of {r['repeats']} each; per repeat {min(spread):.2f}–{max(spread):.2f}, median "
            f"{spread[len(spread) // 2]:.2f})"
        )
        if spread
        else ""
    )
    lines += [
        "",
        f"vLLM steered / unsteered: {_target(r['vllm_steered_over_plain'], 0.97)}{spread}"
        + (
            f"; vLLM steered / HF steered: {r['vllm_over_hf_steered']:.2f}×."
            if "vllm_over_hf_steered" in r
            else "."
        ),
    ]
    return "\n".join(lines)


def vllm_plugin(r: dict) -> str:
    m, st = r["mix"], r["study"]
    t = m["tokens_per_s"]
    lines = [
        f"Mixed batches ({m['batch']} prompts, {m['new_tokens']} new tokens, ConVA on {r['steered_layers']} "
        f"layers, no prefix cache), best of {len(m['runs']['0'])} interleaved runs:",
        "",
        "| steered share | tokens/s | / unsteered |",
        "|---|---|---|",
    ]
    lines += [f"| {f} % | {t[f]:.1f} | {t[f] / t['0']:.2f} |" for f in ("0", "50", "100")]
    sec, up = st["seconds"], st["speedup"]
    lines += [
        "",
        f"Study shape: one prompt of {st['prompt_tokens']} tokens, an unsteered baseline plus "
        f"{st['settings']} P0 settings ({st['requests']} requests, {st['new_tokens']} new tokens), "
        "prefix cache on (reset before each run) vs. off, best of each:",
        "",
        "| case | cache on, s (all runs) | cache off, s (all runs) | speed-up (best / best) |",
        "|---|---|---|---|",
    ]
    runs = st["runs"]
    for case, label in (
        ("gate_open", "gate open: every setting steers (own salt)"),
        ("gate_closed", "gate decided closed: settings run unsteered"),
    ):
        on, off = runs[case]["cache"], runs[case]["no_cache"]
        lines.append(
            f"| {label} | {sec[case]['cache']:.2f} ({min(on):.1f}–{max(on):.1f}) | "
            f"{sec[case]['no_cache']:.2f} ({min(off):.1f}–{max(off):.1f}) | {up[case]:.2f}× |"
        )
    lines += [
        "",
        "Steered requests share no KV (their prompt's KV depends on ε), so the cache pays where requests "
        "run unsteered: baselines and gated-off settings.",
    ]
    return "\n".join(lines)


def extract(r: dict) -> str:
    return "\n".join(
        [
            "| path | texts/s |",
            "|---|---|",
            f"| raw `record_activations`, one process, {r['raw_threads']} threads | {r['raw_texts_per_s']} |",
            f"| raw, 1 thread | {r['raw_1_thread_texts_per_s']} |",
            f"| extract job, {r['ray_actors']} workers × {r['ray_cpus_per_actor']:g} CPU (steady state) | {r['ray_texts_per_s']} |",
            "",
            f"{r['texts']} texts in {r['shards']} shards at steady state (each worker's shards after its first; the "
            f"job took {r['ray_job_wall_seconds']} s, its first shard started {r['ray_startup_seconds']} s in). "
            f"Job / raw (all threads): {r['ratio']:.2f}; per CPU against a 1-thread raw run: "
            f"{_target(r['ratio_per_cpu'], 0.9)}.",
        ]
    )


def fit(r: dict) -> str:
    lines = []
    p = r.get("parallel")
    if p:
        v = p["volume"]
        lines += [
            f"Activations: {p['model']}, {v['texts']:,} texts × {v['layers']} layers × {v['hidden']} "
            f"({v['float32_mb']:,.0f} MB float32, {v['shards']} shards); the `fit` job, one shard per value.",
            "",
            "| workers | fit job wall | fit stage span (first value's start to last value's end) | worker seconds "
            "| one value (min–max) | job start to first value |",
            "|---|---|---|---|---|---|",
        ]
        for run in p["runs"]:
            lines.append(
                f"| {run['workers']} | {run['wall_s']:.1f} s | {run['fit_span_s']:.1f} s | {run['fit_worker_s']:.1f} s "
                f"| {run['value_s_min']:.1f}–{run['value_s_max']:.1f} s | {run['to_first_fit_s']:.1f} s |"
            )
        one, two = p["runs"]
        slow = two["fit_worker_s"] / one["fit_worker_s"]
        lines += [
            "",
            f"Ten values on 2 workers vs. 1: the fit stage {p['speedup']['fit_span']:.2f}× as fast, the whole "
            f"fit job {p['speedup']['job_wall']:.2f}×; bundles byte-identical (tensors and metadata but the "
            f"creation time): {'yes' if p['bundles_identical'] else '**no**'}. A value's fit took "
            f"{slow:.2f}× as long on 2 workers as on 1 (1.00: no CPU contention); at equal speed per value the "
            f"fit stage would be {p['speedup']['fit_span'] * slow:.2f}× as fast.",
            "",
        ]
    m = r.get("synthetic")
    if m:
        cap = (
            f"{m['cap_mb']:,.0f} MB cgroup ({m['cgroup_peak_mb_incl_page_cache']:,.0f} MB charged at peak)"
            if m.get("cap_mb")
            else f"not enforced ({m.get('cap_why_not')})"
        )
        shape = f"{m['texts']:,} × {m['layers']} × {m['hidden']}"
        lines += [
            "A worker's memory: the workers' fit function, ten values one after another in one process under a "
            "memory cap, on synthetic (Gaussian) activations:",
            "",
            "| texts × layers × width | float32 volume | fit (10 values) | per (value, layer) "
            "| RSS after imports → peak | memory cap |",
            "|---|---|---|---|---|---|",
        ]
        if m.get("failed"):
            lines.append(
                f"| {shape} | {m['float32_mb']:,.0f} MB | **failed** (exit {m['returncode']}) | – | – | {cap} |"
            )
        else:
            lines.append(
                f"| {shape} | {m['float32_mb']:,.0f} MB ({m['on_disk_mb']:,.0f} MB on disk) | {m['seconds']:.1f} s "
                f"| {m['seconds'] / (m['values'] * m['layers']) * 1000:.0f} ms "
                f"| {m['rss_after_imports_mb']:,.0f} → {m['peak_rss_mb']:,.0f} MB | {cap} |"
            )
    return "\n".join(lines).rstrip()


def _busy(b: dict) -> str:
    return f"{b['all']:.2f}"


def scaleout(r: dict) -> str:
    shard = r["rows_per_shard"]
    lines = [
        f"| workers | job wall | extract texts/s ({shard['extract']}-text shards) | fit span (4 values) "
        f"| steer prompts/s ({shard['steer']}-prompt shards) | job start to first busy worker | model load "
        "| every worker busy | no worker busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        s = run["stages"]
        lines.append(
            f"| {run['workers']} | {run['wall_s']:.1f} s | {s['extract']['texts_per_s']:.1f} | {s['fit']['span_s']:.1f} s "
            f"| {s['steer']['rows_per_s']:.2f} | {run['to_first_busy_s']:.1f} s | {run['load_s']:.1f} s "
            f"| {_busy(run['busy'])} of the wall | {run['idle_all_s']:.1f} s |"
        )
    for n, e in r["efficiency"].items():
        lines += [
            "",
            f"Whole-job efficiency with {n} workers (one worker's wall / ({n} × this wall)): "
            f"{_target(e['job_wall'], 0.92)}. Per stage (rows per second of the stage's span, per worker, "
            f"against one worker's): extract {e['extract']:.2f}, fit {e['fit']:.2f}, steer {e['steer']:.2f}.",
        ]
        if "shard_slowdown" in e:
            lines.append(
                f"The same shards took {e['shard_slowdown']:.2f}× as long on {n} workers as on one (1.00: no CPU "
                f"contention); at equal shard speed (the workers' mean busy fraction, {n} / 1) the efficiency "
                f"would be {e['at_equal_shard_speed']:.2f}."
            )
    return "\n".join(lines)


def commit(r: dict) -> str:
    lines = [
        "| storage | shards | driver ms per shard (mean) | median | p99 | slowest (a checkpoint) | commits/s "
        "| `finish()` | reopen the complete stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for where in ("local", "s3"):
        if where not in r:
            continue
        runs = r[where]["runs"]
        for i, run in enumerate(runs):
            again = " (again, last)" if i == len(runs) - 1 else ""
            lines.append(
                f"| {'local disk' if where == 'local' else 'S3 (moto, loopback)'} | {run['shards']:,}{again} "
                f"| {run['ms_per_shard']:.2f} | {run['median_ms']:.2f} | {run['p99_ms']:.2f} | {run['max_ms']:.0f} ms "
                f"| {run['commits_per_s']:,.0f} | {run['finish_s'] * 1000:.0f} ms | {run['reopen_s']:.2f} s |"
            )
    lines.append("")
    for where in ("local", "s3"):
        if where in r:
            x = r[where]
            lines.append(
                f"{'Local' if where == 'local' else 'S3'}: cost per shard at {x['largest']:,} shards / at "
                f"{x['smallest']:,} (mean of its two runs): {_target_max(x['ratio'], 1.5)}."
            )
    lines.append(f"Log checkpoint every {r['compact_every']:,} records, included in the per-shard cost.")
    return "\n".join(lines)


def orchestration(r: dict) -> str:
    worker = any("worker_s_per_shard" in x for x in r["runs"])  # runs since 2026-12-05 11:44 have it
    extra_head = " | worker s/shard | efficiency vs. worker time" if worker else ""
    lines = [
        "| output | workers | shards | shard s | ideal s | measured s | efficiency | commits/s "
        f"| driver CPU s | driver CPU ms/shard | driver RSS peak MB | each row once{extra_head} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if worker else ""),
    ]
    for x in r["runs"]:
        store = "local disk" if x["store"] == "local" else "S3 (moto, loopback)"
        measured = x["run_s"] + x["finish_s"]
        once = {True: "yes", False: "**no**", None: "not read"}[x["each_row_once"]]
        extra = (
            f" | {x.get('worker_s_per_shard', float('nan')):.3f} | {x.get('orchestration_efficiency', float('nan')):.2f}"
            if worker
            else ""
        )
        lines.append(
            f"| {store} | {x['workers']} | {x['shards']:,} | {x['shard_s']:g} | {x['ideal_s']:.0f} | {measured:.1f} "
            f"| {x['efficiency']:.2f} | {x['commits_per_s']:,.0f} | {x['driver_cpu_s']:.1f} "
            f"| {x['driver_cpu_ms_per_shard']:.2f} | {x['driver_rss_peak_mb']:.0f} | {once}{extra} |"
        )
    pools = ", ".join(f"{p['workers']} workers {p['startup_s']:.0f} s" for p in r.get("pools", []))
    lines += [
        "",
        f"Pool start-up (not in the measured walls; one pool per worker count, reused): {pools}. "
        f"Load: {r.get('uptime_start', '?')} (start); {r.get('uptime_end', '?')} (end).",
    ]
    return "\n".join(lines)


def orchestration_preflight(r: dict) -> str:
    lines = [
        "| format | file MB | rows | shards | pre-flight | driver wall s | driver CPU s (the RSS sampler's own left out) "
        "| rows screened on the driver | driver RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        fmt = x.get("format", "parquet")
        found = "footer read" if fmt == "parquet" else f"newlines found by {x.get('index', 'driver threads')}"
        if x["metadata_only"]:
            how = f"{found}, first {x['rows_screened_on_driver']:,} rows screened (a job's pre-flight)"
        else:
            how = f"{'every byte hashed' if fmt == 'parquet' else found}, every row screened"
        lines.append(
            f"| {fmt} | {x['file_mb']:,.0f} | {x['rows']:,} | {x['shards']:,} | {how} | {x['wall_s']:.3f} "
            f"| {x['cpu_s']:.3f} "
            f"| {x['rows_screened_on_driver']:,} | {x.get('rss_growth_mb', '-')} |"
        )
    return "\n".join(lines)


def bulk_steer(r: dict) -> str:
    lines = [
        f"Model: {r['model']}, {r['max_new_tokens']} new token per prompt, batches of {r['batch_size']}, "
        f"{r['rows_per_shard']:,}-prompt shards; the Parquet file has row groups of {r['row_group']:,}.",
        "",
        "| workers | prompts | shards | job wall | prompts/s (whole job) | prompts/s (steady, workers) "
        "| driver CPU (of one core; per shard) | driver RSS start → after warm-up → peak → end "
        "| RSS growth after warm-up (USS) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['workers']} | {run['rows']:,} | {run['shards']:,} | {run['wall_s']:,.0f} s | {run['rows_per_s']:,.0f} "
            f"| {run['steady_rows_per_s']:,.0f} | {100 * run['driver_cpu_fraction']:.1f} %; "
            f"{run['driver_cpu_ms_per_shard']:.0f} ms | {run['rss_start_mb']:,.0f} → {run['rss_after_warmup_mb']:,.0f} → "
            f"{run['rss_peak_mb']:,.0f} → {run['rss_end_mb']:,.0f} MB | +{run['rss_growth_after_warmup_mb']:.1f} MB "
            f"(+{run['uss_growth_after_warmup_mb']:.1f} MB) |"
        )
    big = max(r["runs"], key=lambda x: x["rows"])
    sp = r["speedup_2_over_1"]
    lines += [
        "",
        f"Driver RSS growth after the warm-up over {big['rows']:,} prompts: "
        f"{_target_max(big['rss_growth_after_warmup_mb'], 50, ' MB')}. 2 workers / 1 worker: steady "
        f"{sp['steady']:.2f}×, whole job {sp['whole_job']:.2f}×.",
    ]
    if "shard_slowdown" in sp:
        lines[-1] += (
            f" A prompt took {sp['shard_slowdown']:.2f}× as long on the workers with 2 as with 1 (1.00: no CPU "
            f"contention); at equal speed per prompt the steady speed-up would be "
            f"{sp['steady'] * sp['shard_slowdown']:.2f}×."
        )
    if "plan_only" in r:
        p = r["plan_only"]
        lines += [
            "",
            f"The driver's part of a {p['rows']:,}-row file ({p['file_mb']:,.0f} MB of Parquet) alone: pre-flight "
            f"plans it (one streaming pass: sha256 and {p['shards']:,} shards' rows) in {p['seconds']:.1f} s, "
            f"RSS {p['rss_start_mb']:,.0f} → peak {p['rss_peak_mb']:,.0f} MB (+{p['rss_growth_mb']:.1f} MB).",
        ]
    return "\n".join(lines)


def study(r: dict) -> str:
    lines = [
        f"`{r['config']}`" + (f" with {' '.join(r['overrides'])}" if r["overrides"] else "") + ".",
        "",
        "| study wall | start to first busy worker | model load | worker slots busy (one per CPU) "
        "| every worker busy | each worker busy | no worker busy | after the last shard (outputs, report) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['wall_s']:.1f} s | {r['to_first_busy_s']:.1f} s | {r['load_s']:.1f} s "
        f"| {_target(_slots_busy(r), 0.85)} | {r['busy']['all']:.2f} "
        f"| {', '.join(f'{x:.2f}' for x in r['busy']['per_worker'].values())} | {r['idle_all_s']:.1f} s "
        f"| {r['after_last_shard_s']:.1f} s |",
        "",
        "Worker slots busy: the sum of each worker's busy share of the wall over the CPUs (one worker slot each); "
        'where models run one after another, only one model\'s workers exist at a time, so "every worker busy" '
        "cannot exceed 0 and the slots are the measure.",
        "",
        "| stage | shards | first start → last end (s into the study) | span | worker seconds |",
        "|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        lines.append(
            f"| {name} | {s['shards']} | {s['first_start']:.1f} → {s['last_end']:.1f} "
            f"| {s['span_s']:.1f} s | {s['worker_s']:.1f} s |"
        )
    return "\n".join(lines)


def _slots_busy(r: dict) -> float:
    return sum(r["busy"]["per_worker"].values()) / max(1, int(r.get("cores") or 1))


def models(r: dict) -> str:
    lines = [
        f"`{r['config']}` with {' '.join(r['overrides'])}; two models (SmolLM2 under two names), 2 CPUs.",
        "",
        "| way | workers per model | study wall | each model's workers busy from → to (s into the study) "
        "| overlap | worker slots busy (one per CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for way, run in r["runs"].items():
        windows = "; ".join(
            f"{m['first_busy_s']:.0f} → {m['last_busy_s']:.0f}" for m in run["models"].values()
        )
        lines.append(
            f"| {'concurrent' if way == 'concurrent' else 'one after another'} | {run['workers_per_model']} "
            f"| {run['wall_s']:.1f} s | {windows} | {run['models_overlap_s']:.0f} s | {run['slots_busy']:.2f} |"
        )
    lines += ["", f"One after another / concurrent (wall): {r['sequential_over_concurrent']:.2f}."]
    return "\n".join(lines)


def gpu(r: dict) -> str:
    """``benchmarks/gpu.py``'s rows: tokens/s and the ratio each row names (of roofline, vs. plain...)."""
    lines = [
        f"Device: {r.get('device', '?')}, CUDA {r.get('cuda')}, plan {r['plan']['shapes']} "
        f"{r['plan']['dtype']}, batches {r['plan']['batches']}, {r['plan']['new_tokens']} new tokens, "
        f"{r['plan']['steered_layers']} steered layers; wall {r.get('wall_s')} s.",
        "",
        "| shape | what | batch | tokens/s | ratio | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        tok_s = "" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(
            f"| {row['shape']} | {row['what']} | {row['batch'] or ''} | {tok_s} | {ratio} | {row['note']} |"
        )
    return "\n".join(lines)


def probe_accuracy(r: dict) -> str:
    acc = r["test_acc"]
    n = len(next(iter(acc.values())))
    lines = ["| value | best layer | best acc | layers ≥ 0.90 | mean acc 12–20 |", "|---|---|---|---|---|"]
    for value, row in acc.items():
        a = np.asarray(row)
        lines.append(
            f"| {value} | {int(np.argmax(a))} | {a.max():.3f} | {int((a >= 0.9).sum())}/{n} | "
            f"{a[12:21].mean():.3f} |"
        )
    return "\n".join(lines)


def gate(r: dict) -> str:
    """Per model, data, value and setting: the gate's held-out open rates (row counts in brackets)."""
    kinds = ("own", "other", "neutral", "mc")
    lines = [
        "| model | data | value | setting | layer | open: own prompts | other values' prompts | neutral | MC "
        "| steered prompts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by_data in r["models"].items():
        for data, d in by_data.items():
            for value in next(iter(d["settings"].values())):
                for setting, gates in d["settings"].items():
                    g = gates[value]
                    rates = [
                        "-" if g[f"open_{k}"] is None else f"{g[f'open_{k}']:.2f} ({g[f'n_{k}']:.0f})"
                        for k in kinds
                    ]
                    lines.append(
                        f"| {model} | {data} | {value} | {setting} | {g['layer']} | {' | '.join(rates)} "
                        f"| {g['open_steered']:.2f} ({g['n_steered']}) |"
                    )
    return "\n".join(lines)


def scaling(results: dict[str, dict]) -> str | None:
    """The scaling model's figures from the measured components (``scaleout`` and ``commit``), or None.

    Serial fraction ``s``: the part of the 1-worker job's wall time that is not shard work on its worker
    (Ray and pre-flight, the worker's start and model load, the gaps between dependent stages, the end).
    Amdahl: ``E(N) = 1 / (s·N + 1 − s)``. The driver's ceiling: it commits one shard per ``c`` seconds, so
    N workers whose shards take ``t`` seconds each keep it below its limit while ``N < t / c``.
    """
    so, cm = results.get("scaleout"), results.get("commit")
    if not so:
        return None
    one = next(x for x in so["runs"] if x["workers"] == 1)
    work = sum(s["worker_s"] for s in one["stages"].values())
    serial = one["wall_s"] - work
    s = serial / one["wall_s"]

    def amdahl(n):
        return 1 / (s * n + 1 - s)

    gaps = serial - one["to_first_busy_s"] - one["load_s"]
    lines = [
        f"From `scaleout` (1 worker): wall {one['wall_s']:.1f} s = shard work {work:.1f} s + serial {serial:.1f} s "
        f"(until the worker is first busy {one['to_first_busy_s']:.1f} s: pre-flight, the worker's process start; its "
        f"model load {one['load_s']:.1f} s; between and after the shards {gaps:.1f} s), so the serial fraction "
        f"s = {s:.3f}.",
        "",
        "| N workers | 2 | 8 | 64 | 256 |",
        "|---|---|---|---|---|",
        f"| E(N) = 1 / (s·N + 1 − s), this job | {amdahl(2):.2f} | {amdahl(8):.2f} | {amdahl(64):.2f} | {amdahl(256):.2f} |",
    ]
    if "2" in so["efficiency"]:
        lines.append(f"| measured, this job | {so['efficiency']['2']['job_wall']:.2f} | | | |")
    if cm:
        lines += [
            "",
            "The driver's ceiling, from `commit` (cost per shard at the largest size): the most workers it "
            "keeps fed, t / c, for shards of t seconds:",
            "",
            "| storage | c (ms per shard) | t = 1 s | t = 5 s | t = 30 s |",
            "|---|---|---|---|---|",
        ]
        for where, name in (("local", "local disk"), ("s3", "S3 (moto on loopback)")):
            if where in cm:
                c = cm[where]["ms_per_shard_largest"] / 1000
                lines.append(f"| {name} | {c * 1000:.1f} | {1 / c:,.0f} | {5 / c:,.0f} | {30 / c:,.0f} |")
    return "\n".join(lines)


# Order, title, the command that writes the file, and its renderer.
SECTIONS: list[tuple[str, str, str, Callable[[dict], str]]] = [
    (
        "steer",
        "Single-pass ConVA vs. the paper's procedure; steering overhead (HF)",
        "python -m benchmarks steer",
        steer,
    ),
    ("vllm", "vLLM backend: steering overhead and vLLM vs. HF", "python -m benchmarks vllm", vllm),
    (
        "vllm_plugin",
        "vLLM plugin: mixed steered/unsteered batches and the prefix cache on a study-shaped workload",
        "python -m benchmarks vllm_plugin",
        vllm_plugin,
    ),
    ("extract", "Extraction job vs. raw forward passes", "python -m benchmarks extract", extract),
    (
        "fit",
        "Fitting: ten values in parallel on 2 workers vs. 1; a worker's memory",
        "python -m benchmarks fit",
        fit,
    ),
    ("scaleout", "Scale-out: the run job with 1 and 2 workers", "python -m benchmarks scaleout", scaleout),
    ("commit", "The driver's cost per committed shard", "python -m benchmarks commit", commit),
    (
        "orchestration",
        "The orchestration at scale: fake workers (a sleep per shard), 8-64 workers, 1e3-1e5 shards",
        "python -m benchmarks.bench_orchestration",
        orchestration,
    ),
    (
        "orchestration-acceptance",
        "The orchestration at the issue's shape: 64 workers, 1-second shards, 1e3 and 1e4 shards",
        "python -m benchmarks.bench_orchestration --acceptance",
        orchestration,
    ),
    (
        "orchestration-acceptance-s3",
        "The same on the S3 test server: group commits, one PutObject a shard, batched deletes",
        "python -m benchmarks.bench_orchestration --acceptance --stores s3",
        orchestration,
    ),
    (
        "orchestration_preflight",
        "Pre-flight of a prompts file, Parquet and JSON Lines: a job's vs. every row screened",
        "python -m benchmarks.bench_orchestration --preflight",
        orchestration_preflight,
    ),
    (
        "bulk_steer",
        "Bulk steering: a large Parquet prompt file, driver memory and throughput",
        "python -m benchmarks bulk_steer",
        bulk_steer,
    ),
    ("study", "The demo study: how busy the workers are", "python -m benchmarks study", study),
    ("models", "Two models: concurrent vs. one after another", "python -m benchmarks models", models),
    (
        "probe_accuracy",
        "Probe accuracy on SmolLM2 with the paper's pairs",
        "python -m benchmarks probe_accuracy",
        probe_accuracy,
    ),
    (
        "gate",
        "The probe gate's open rates: recall (default) vs. precision, both models, demo and paper data",
        "python -m benchmarks gate",
        gate,
    ),
    (
        "gpu",
        "GPU: the HF backend on random-weight Llama shapes",
        "timeout 330 python -m benchmarks.gpu (device)",
        gpu,
    ),
]


def render(results: Path = RESULTS) -> str:
    """The generated block: one subsection per results file present in ``results``."""
    parts = [
        BEGIN,
        "<!-- generated by `python -m benchmarks` from benchmarks/results/*.json; edits here are "
        "overwritten -->",
    ]
    loaded = {}
    for name, title, command, fn in SECTIONS:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        r = loaded[name] = json.loads(path.read_text())
        parts += [
            "",
            f"### {title}",
            "",
            f"`{command}` · {_when(r)} · raw: `benchmarks/results/{name}.json`",
            "",
            fn(r),
        ]
    model = scaling(loaded)
    if model:
        parts += [
            "",
            "### Scaling model: the serial fraction and the driver's ceiling, from the figures above",
            "",
            model,
        ]
    parts.append(END)
    return "\n".join(parts)


def update(doc: Path = DOC, results: Path = RESULTS) -> None:
    """Replace the generated block of ``doc`` (appended if the markers are missing)."""
    text = doc.read_text() if doc.exists() else "# Benchmark results\n"
    block = render(results)
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.write_text(text)


if __name__ == "__main__":
    update()
    print(f"wrote {DOC}")
