"""Recording activations: the residual stream after chosen blocks, at the last token or mean-pooled.

The probe reads the **last token** of the text (METHOD.md §2), so batches are left-padded and position
``-1`` is every row's last real token. Texts are either raw (the paper's choice for probe training) or
wrapped in the model's chat template as a user turn with the generation prompt appended (what a steered
prompt looks like at inference).

Example:
    >>> acts = record_activations(model, tok, ["I worked all night to win."], layers=[3, 5])  # doctest: +SKIP
    >>> acts.shape                                                                           # doctest: +SKIP
    (1, 2, 576)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence, cast

import numpy as np

if TYPE_CHECKING:  # torch and transformers load when a function runs: config checks import this module
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["format_prompt", "tokenize", "with_positions", "record_activations", "max_positions", "POSITIONS"]

POSITIONS = ("last", "mean")


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool) -> str:
    """The string fed to the model: ``text`` itself, or ``text`` as a user turn in the chat template."""
    if not chat_template:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; set chat_template = false")
    messages = [{"role": "user", "content": text}]
    # With tokenize=False the template returns the rendered text (the stubs cover every mode's type).
    return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    chat_template: bool,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Left-padded batch encoding of ``texts`` (chat template applied when asked), on ``device``."""
    if tokenizer.padding_side != "left":
        raise ValueError(
            "the tokenizer must pad on the left (last token at position -1); load it with load_model"
        )
    strings = [format_prompt(tokenizer, t, chat_template) for t in texts]
    # A chat template already contains the BOS/special tokens; adding them again would shift the text.
    enc = tokenizer(strings, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
    return {k: v.to(device) for k, v in enc.items()}


def with_positions(enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``enc`` plus ``position_ids`` that start at 0 on each row's first real token.

    A plain forward pass numbers positions from the left edge, so a left-padded row would start at its
    pad count: harmless under RoPE (relative), wrong for learned absolute positions (GPT-2). ``generate``
    derives the same ids from the attention mask itself.
    """
    positions = (enc["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return {**enc, "position_ids": positions}


def _batches(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def record_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    position: str = "last",
    chat_template: bool = False,
    batch_size: int = 16,
) -> np.ndarray:
    """Residual-stream activations, float32 array ``[len(texts), len(layers), hidden]``.

    ``layers`` are block indices (default: every block); ``position`` is ``last`` (the last token) or
    ``mean`` (the mean over the text's real tokens). Rows keep the order of ``texts``.
    """
    import torch

    from conva.blocks import block_hooks, find_blocks

    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")
    n_blocks = len(find_blocks(model))
    layers = list(range(n_blocks)) if layers is None else [int(l) for l in layers]
    out = np.empty((len(texts), len(layers), model.config.hidden_size), dtype=np.float32)
    device = next(model.parameters()).device
    for rows in _batches(len(texts), batch_size):
        enc = tokenize(tokenizer, [texts[i] for i in rows], chat_template, device)
        captured: dict[int, torch.Tensor] = {}
        mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)

        def capture(layer: int, hidden: torch.Tensor) -> None:
            if position == "last":
                captured[layer] = hidden[:, -1, :].float()
            else:
                captured[layer] = (hidden.float() * mask).sum(1) / mask.sum(1)

        # The base model (no LM head): extraction needs no logits over the vocabulary.
        with torch.inference_mode(), block_hooks(model, {l: capture for l in layers}):
            model.base_model(**with_positions(enc), use_cache=False)
        for j, layer in enumerate(layers):
            out[rows.start : rows.stop, j] = captured[layer].cpu().numpy()
    return out


def max_positions(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions allow (its config's ``max_position_embeddings``; GPT-2's
    ``n_positions``; 2048 where neither is set): longer texts become error rows, not truncated ones."""
    return int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 2048)
    )
