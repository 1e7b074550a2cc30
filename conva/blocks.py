"""Locating a HuggingFace decoder's blocks and hooking their outputs safely.

ConVA reads and edits the residual stream *after* decoder block ``l`` (HF ``hidden_states[l + 1]``).
Every architecture keeps its blocks in a ``ModuleList`` under a different attribute; :func:`find_blocks`
knows the common ones and raises for anything else, so an unknown model fails loudly instead of being
silently left unsteered.

Example:
    >>> blocks = find_blocks(model)            # doctest: +SKIP
    >>> with block_hooks(model, {3: fn}):      # fn(block_index, hidden) -> hidden | None
    ...     model(**batch)                     # hooks are gone after the block, even on error
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["find_blocks", "block_hooks", "hidden_of", "with_hidden", "BlockFn"]

# Attribute paths of the block list, tried in order: Llama/Mistral/Qwen2/Gemma/Phi (model.layers),
# GPT-2/GPT-J/Falcon/Bloom (transformer.h), GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers).
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")

BlockFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the model's decoder blocks in order; raise ``ValueError`` if they cannot be located."""
    for path in _BLOCK_PATHS:
        obj: object = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"cannot locate the decoder blocks of {type(model).__name__}: none of "
        f"{', '.join(_BLOCK_PATHS)} is a ModuleList; this architecture is not supported"
    )


def hidden_of(output: object) -> torch.Tensor:
    # transformers 5.x blocks return a Tensor; 4.x returned a tuple whose first item is the hidden state.
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def with_hidden(output: object, hidden: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])  # type: ignore[index]


@contextmanager
def block_hooks(model: nn.Module, fns: dict[int, BlockFn]) -> Iterator[None]:
    """Run ``fns[l](l, hidden)`` on block ``l``'s output during every forward inside the ``with``.

    A function may return a new hidden tensor (the block's output is replaced) or None (read only).
    Hooks are removed in ``finally``, so an exception inside the block never leaves the model patched.
    Raises ``ValueError`` naming a block index the model does not have.
    """
    blocks = find_blocks(model)
    bad = [l for l in fns if not 0 <= l < len(blocks)]
    if bad:
        raise ValueError(f"block(s) {bad} out of range: {type(model).__name__} has {len(blocks)} blocks")
    handles = []
    try:
        for index, fn in sorted(fns.items()):
            handles.append(blocks[index].register_forward_hook(_adapter(index, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adapter(index: int, fn: BlockFn) -> Callable[[nn.Module, object, object], object]:
    def hook(_module: nn.Module, _args: object, output: object) -> object:
        new = fn(index, hidden_of(output))
        return None if new is None else with_hidden(output, new)

    return hook
