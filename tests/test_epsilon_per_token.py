"""ε recomputed at every generated token (``epsilon="per_token"``), checked against a decode loop written here.

The reference below uses none of the library's steering code: its own forward hooks on the decoder
blocks, its own closed form for ε, and its own greedy loop over HF's KV cache. At the prefill each
steered layer ``l`` (ascending, the earlier layers' steps already in the residual stream) reads the last
prompt token, takes ``ε_l = max(0, (logit(P0) − b_l − w_lᵀe_l)/‖w_l‖)`` and adds ``ε_l·w_l/‖w_l‖`` to
every prompt position; at each decode step the same is done for the one new token, with its own ε. The
library's single pass must give the same tokens and the same last-step ε.
"""

from __future__ import annotations

import math

import pytest
import torch

from conva.blocks import find_blocks
from conva.steering.hf import generate
from conva.steering.spec import SteerSpec

PROMPTS = [
    "Should I take the job abroad even though my family wants me to stay?",
    "Is it right to break a rule?",
]
NEW = 6


def _reference(model, tok, prompt: str, bundle, p0: float) -> tuple[list[int], list[float]]:
    """Greedy tokens and the last step's ε per band layer, by hand."""
    s0 = math.log(p0 / (1 - p0))
    band = list(bundle.band)
    rows = bundle.rows(tuple(band))
    w = {l: torch.from_numpy(bundle.w[r]).double() for l, r in zip(band, rows)}
    b = {l: float(bundle.b[r]) for l, r in zip(band, rows)}
    eps: dict[int, float] = {}

    def hook(layer: int):
        def add(_module, _args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            e = h[0, -1].double()
            norm = float(w[layer].norm())
            eps[layer] = max(0.0, (s0 - b[layer] - float(w[layer] @ e)) / norm)
            steered = h + (eps[layer] * w[layer] / norm).to(
                h.dtype
            )  # every position of this forward's tokens
            return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

        return add

    blocks = find_blocks(model)
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id}
    handles = [blocks[l].register_forward_hook(hook(l)) for l in band]
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        tokens: list[int] = []
        with torch.inference_mode():
            out = model(
                input_ids=ids, use_cache=True
            )  # the prefill: ε at the last prompt token, added everywhere
            for step in range(NEW):
                nxt = int(out.logits[0, -1].argmax())
                if nxt in stops:
                    break
                tokens.append(nxt)
                if step < NEW - 1:  # the new token alone, with the cache of every earlier (steered) position
                    position = torch.tensor([[ids.shape[1] + step]])
                    out = model(
                        input_ids=torch.tensor([[nxt]]),
                        past_key_values=out.past_key_values,
                        position_ids=position,
                        use_cache=True,
                    )
    finally:
        for handle in handles:
            handle.remove()
    return tokens, [eps[l] for l in band]


@pytest.mark.parametrize("p0", [0.9, 0.999])
def test_per_token_epsilon_matches_a_decode_loop_written_here(tiny, tiny_bundles, p0) -> None:
    model, tok = tiny
    bundle = tiny_bundles[0]  # its gate opens for every prompt
    steered = 0
    for prompt in PROMPTS:
        want_tokens, want_eps = _reference(model, tok, prompt, bundle, p0)
        [row] = generate(
            model, tok, [prompt], [SteerSpec("conva", bundle, p0=p0)], max_new_tokens=NEW, epsilon="per_token"
        )
        assert list(row.tokens) == want_tokens
        if len(want_tokens) == NEW:  # the telemetry holds the ε of the last forward pass the library ran
            assert row.eps == pytest.approx(want_eps, abs=1e-4)
        steered += sum(e > 0 for e in want_eps)
    assert steered > 0  # the check is not vacuous: some layer was below P0 and got a step
