"""Steered batch generation with Ray Data LLM: a Parquet file of prompts in, a Parquet of generations out.

Each input row has ``row_id``, ``prompt`` and ``p0`` (null: unsteered). Ray Data LLM's vLLM stage passes
each row's ``sampling_params`` (``extra_args`` included) to its engine, where ConVA's plugin steers the
row with the bundle at P0 (:mod:`conva.steering.vllm_plugin`); the postprocess reads the engine's
telemetry file for the row and writes ε, p_before, p_after and the gate's decision beside the output::

    python examples/ray_data_llm.py --model ~/.cache/conva/models/smollm2-135m-instruct-f32 \\
        --bundle runs/demo/bundles/achievement --prompts prompts.parquet --out generations/

On a GPU cluster drop ``--cpu`` (one GPU per engine); ``--telemetry`` must then name a folder the engine
and the postprocess both see (a shared filesystem), as it does on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

__all__ = ["build", "main"]

LIGHT = 0.1  # CPUs a light (non-engine) stage asks Ray for


def _steered(p0: Any) -> bool:
    """Whether a row's P0 asks for steering (null, or NaN after a pandas batch, does not)."""
    return p0 is not None and p0 == p0


def build(
    model: str, bundle: str, telemetry: str, *, max_tokens: int = 32, cpu: bool = True, batch_size: int = 8
) -> Any:
    """The Ray Data LLM processor: chat template, vLLM with the plugin, detokenize, telemetry."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=dict(
            dtype="float32",
            max_model_len=1024,
            enable_chunked_prefill=False,  # ConVA reads ε at the last prompt token: one step per prompt
            enable_prefix_caching=True,  # steered rows get their own cache_salt (the plugin sets it)
            enforce_eager=cpu,
        ),
        placement_group_config={"bundles": [{"CPU": 1}]} if cpu else None,
        concurrency=1,
        batch_size=batch_size,
        # vLLM 0.32's Ray metrics wrapper fails to import its Ray half here; the telemetry files carry ours.
        log_engine_metrics=False,
        # The CPU stages around the engine are light: a tenth of a CPU each, so a 2-core machine runs them all.
        chat_template_stage={"num_cpus": LIGHT},
        tokenize_stage={"num_cpus": LIGHT},
        detokenize_stage={"num_cpus": LIGHT},
    )

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        extra = None
        if _steered(row["p0"]):
            extra = {
                "conva_bundle": bundle,
                "conva_p0": float(row["p0"]),
                "conva_telemetry": telemetry,
                "conva_tag": f"row-{row['row_id']}",
            }
        return dict(
            row_id=row["row_id"],
            prompt_text=row["prompt"],
            p0=row["p0"],
            messages=[{"role": "user", "content": row["prompt"]}],
            sampling_params=dict(temperature=0.0, max_tokens=max_tokens, extra_args=extra),
        )

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = dict(
            row_id=row["row_id"], prompt=row["prompt_text"], p0=row["p0"], output=row["generated_text"]
        )
        tel: dict[str, Any] = {}
        if _steered(row["p0"]):
            with open(os.path.join(telemetry, f"row-{row['row_id']}.json")) as fh:
                tel = json.load(fh)
        for key in ("eps", "p_before", "p_after"):
            out[key] = tel.get(key)
        out["gate_open"] = tel.get("gate_open")
        out["error"] = tel.get("error")
        return out

    return build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": LIGHT},
        postprocess_map_kwargs={"num_cpus": LIGHT},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--bundle", required=True, help="a bundle folder or URI the engine can read")
    parser.add_argument("--prompts", required=True, help="Parquet with row_id, prompt, p0 (null: unsteered)")
    parser.add_argument("--out", required=True, help="output folder (Parquet)")
    parser.add_argument("--telemetry", default=None, help="folder for the engine's telemetry files")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gpu", action="store_true", help="one GPU per engine (default: CPU)")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: cores)"
    )
    args = parser.parse_args(argv)

    import ray

    # The engine holds one CPU for its whole life; on a 2-core machine give Ray a few more logical CPUs
    # (--num-cpus 4), or reading the Parquet file waits for a CPU that never frees.
    ray.init(include_dashboard=False, num_cpus=args.num_cpus)
    telemetry = args.telemetry or tempfile.mkdtemp(prefix="conva-telemetry-")
    processor = build(args.model, args.bundle, telemetry, max_tokens=args.max_tokens, cpu=not args.gpu)
    processor(ray.data.read_parquet(args.prompts, ray_remote_args={"num_cpus": LIGHT})).write_parquet(
        args.out
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
