"""The ``llm`` judge's chat function on a local Hugging Face model: no endpoint, no API, greedy and short.

``judge.backend = "local"`` makes the model workers load ``judge.model`` (a spec :func:`conva.models.load_model`
accepts: ``"smollm2"``, ``"gemma3-270m"``, a folder, a repo id) once each and answer the judge's requests
(:data:`conva.judges.Chat`) themselves, so a GPU study needs no outside service. Replies are greedy
(deterministic), at most ``max_tokens`` new tokens, decoded without special tokens.

Each request's messages go through the model's chat template. A base model's plain prompt template (e.g.
Gemma 3 270M's ``Question: … Answer:``) renders the last message alone; then the system message would be
lost, so it is put in front of the user's text instead. A tokenizer without any chat template gets the
messages' texts joined by blank lines.

Example:
    >>> chat = local_chat(*load_model("smollm2"))                                       # doctest: +SKIP
    >>> chat([value_prompt("power", "Should I take the job?", "Take it: status matters.")], 4)  # doctest: +SKIP
    ['Yes']
"""

from __future__ import annotations

from typing import Callable, Sequence, cast

__all__ = ["render", "local_chat", "load_local_chat"]

Messages = list[dict[str, str]]


def render(tok, messages: Messages) -> str:
    """The text a request becomes: the chat template with a generation prompt (see the module docstring)."""
    if not getattr(tok, "chat_template", None):
        return "\n\n".join(m["content"] for m in messages)
    text = cast(str, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    system = [m["content"] for m in messages if m["role"] == "system"]
    if system and not all(s in text for s in system):
        rest = [m for m in messages if m["role"] != "system"]
        merged = [*rest[:-1], {**rest[-1], "content": "\n\n".join([*system, rest[-1]["content"]])}]
        text = cast(str, tok.apply_chat_template(merged, tokenize=False, add_generation_prompt=True))
    return text


def local_chat(model, tok, *, batch_size: int = 8) -> Callable[[Sequence[Messages], int], list[str]]:
    """A :data:`conva.judges.Chat` on ``model``: one greedy reply of at most ``max_tokens`` tokens per request.

    The model is used as it is (no steering hook is installed here; the workers' hooks live only inside
    their ``with`` blocks).
    """

    def chat(requests: Sequence[Messages], max_tokens: int) -> list[str]:
        import torch

        replies: list[str] = []
        device = next(model.parameters()).device
        for start in range(0, len(requests), batch_size):
            texts = [render(tok, m) for m in requests[start : start + batch_size]]
            # The template carries the special tokens; a tokenizer without one gets its own (e.g. BOS).
            special = not getattr(tok, "chat_template", None)
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            replies += [r.strip() for r in tok.batch_decode(new, skip_special_tokens=True)]
        if len(replies) != len(requests):
            raise RuntimeError(f"{len(replies)} replies for {len(requests)} requests")
        return replies

    return chat


def load_local_chat(
    spec: str, *, dtype: str = "float32", device: str = "cpu", batch_size: int = 8
) -> Callable[[Sequence[Messages], int], list[str]]:
    """Load the judge model ``spec`` (:func:`conva.models.load_model`) and return its :func:`local_chat`."""
    from conva.models import load_model

    model, tok = load_model(spec, dtype, device)
    return local_chat(model, tok, batch_size=batch_size)
