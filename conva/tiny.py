"""Tiny random-weight models for tests: real architectures, real tokenizers, no downloads.

:func:`make_tiny_model` writes a standard Hugging Face folder (``config.json``, safetensors weights,
``tokenizer.json`` with a ChatML chat template) that loads with :func:`conva.models.load_model` and in
vLLM. The weights are random but exactly reproducible for a seed; the tokenizer is a byte-level BPE
trained offline on a small built-in English corpus, and is the same for every seed.

Example:
    >>> import tempfile
    >>> from conva.tiny import make_tiny_model
    >>> from conva.models import load_model
    >>> tmp = tempfile.TemporaryDirectory()
    >>> model, tokenizer = load_model(make_tiny_model(tmp.name))
    >>> model.config.num_hidden_layers, len(tokenizer)
    (4, 512)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

__all__ = ["ARCHS", "GEMMA3_WINDOW", "CHAT_TEMPLATE", "make_tiny_model", "make_tiny_tokenizer", "tiny_corpus"]

ARCHS: tuple[str, ...] = ("llama", "qwen2", "gpt2", "gemma3")

_PAD, _BOS, _EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_SPECIALS = [_PAD, _BOS, _EOS]  # ids 0, 1, 2, in this order
_MAX_POSITIONS = 512
GEMMA3_WINDOW = 16  # tokens a tiny Gemma 3's sliding-window layers see: shorter than a chat-templated prompt
_BYTE_ALPHABET = 256
_CORPUS_SEED = 1234  # fixed, so every tiny model shares one tokenizer whatever its weight seed

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = (
    "The teacher",
    "My neighbour",
    "A young doctor",
    "The old farmer",
    "Our team",
    "The engineer",
    "Her brother",
    "A careful student",
    "The city council",
    "Every child",
    "The nurse",
    "His friend",
    "The artist",
    "A stranger",
    "The manager",
    "My grandmother",
    "The scientist",
    "Their family",
)
_VERBS = (
    "wants to help",
    "decided to visit",
    "likes to explore",
    "tries to protect",
    "hopes to win",
    "plans to build",
    "chose to respect",
    "refused to follow",
    "agreed to support",
    "learned to enjoy",
    "promised to save",
    "started to question",
    "needs to control",
    "loves to create",
)
_OBJECTS = (
    "the people in the village",
    "a new garden by the river",
    "the rules of the school",
    "an exciting trip to the mountains",
    "the traditions of their culture",
    "the safety of the town",
    "a successful small business",
    "the forest and the animals",
    "the wealth of the company",
    "a quiet evening with good food",
    "the feelings of other people",
    "an independent way of life",
    "the power to make decisions",
    "the welfare of everyone",
    "a famous prize for science",
)
_ENDINGS = (
    "because it matters to them",
    "every single day",
    "without asking anyone",
    "after a long winter",
    "with great care",
    "before the summer ends",
    "for the whole community",
    "as quickly as possible",
    "in spite of the risk",
    "when nobody is watching",
)
_QUESTIONS = (
    "What is the capital of {place}?",
    "How far is it from {place} to the sea?",
    "Why do people move to {place}?",
    "When did you last travel to {place}?",
    "Is it true that {place} has {n} bridges?",
    "Can you tell me about the history of {place}?",
)
_PLACES = ("France", "Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo")
_VALUE_WORDS = (
    "self-direction",
    "stimulation",
    "hedonism",
    "achievement",
    "power",
    "security",
    "tradition",
    "conformity",
    "benevolence",
    "universalism",
)


def tiny_corpus(n_sentences: int = 400, seed: int = _CORPUS_SEED) -> list[str]:
    """Procedurally generated English sentences for training the tiny tokenizer.

    Example:
        >>> corpus = tiny_corpus(3)
        >>> len(corpus), corpus == tiny_corpus(3)
        (3, True)
    """
    rng = random.Random(seed)
    sentences = []
    for i in range(n_sentences):
        if i % 4 == 3:
            question = rng.choice(_QUESTIONS)
            sentences.append(question.format(place=rng.choice(_PLACES), n=rng.randint(2, 999)))
        elif i % 7 == 6:
            value = rng.choice(_VALUE_WORDS)
            sentences.append(f"The value of {value} guides how {rng.choice(_SUBJECTS).lower()} acts.")
        else:
            parts = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ENDINGS))
            sentences.append(" ".join(parts) + rng.choice((".", "!", ".", "?")))
    return sentences


def make_tiny_tokenizer(vocab: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab`` entries, ChatML specials and chat template.

    Special tokens: ``<|endoftext|>`` (id 0, pad), ``<|im_start|>`` (id 1, bos), ``<|im_end|>``
    (id 2, eos). The result is the same on every call.

    Example:
        >>> tokenizer = make_tiny_tokenizer()
        >>> len(tokenizer), tokenizer.eos_token_id
        (512, 2)
    """
    from transformers import PreTrainedTokenizerFast

    minimum = _BYTE_ALPHABET + len(_SPECIALS)
    if vocab < minimum:
        raise ValueError(f"vocab must be at least {minimum} (bytes + special tokens), got {vocab}")
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab),
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=_MAX_POSITIONS,
    )


def make_tiny_model(
    folder: str | Path,
    *,
    num_layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    seed: int = 0,
    arch: str = "llama",
) -> str:
    """Write a random-weight float32 model and its tokenizer to ``folder``; return the folder's path.

    ``arch`` is ``"llama"``, ``"qwen2"``, ``"gpt2"`` (no grouped-query attention, so ``kv_heads`` is
    ignored there) or ``"gemma3"`` (Gemma 3's block: four norms per block, query/key norms, scaled
    embeddings; layers alternate sliding-window and full attention as in the real models, with a
    window of :data:`GEMMA3_WINDOW` tokens so that test prompts reach past it). The head size is
    ``hidden // heads`` (64 by default; vLLM needs at least 32). Equal arguments give bit-identical
    weights. **Files already in ``folder`` are overwritten.**

    Example:
        >>> import json, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = make_tiny_model(tmp.name, arch="qwen2", seed=1)
        >>> json.loads(Path(folder, "config.json").read_text())["architectures"]
        ['Qwen2ForCausalLM']
        >>> tmp.cleanup()
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_config(
        arch, num_layers=num_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab
    )
    tokenizer = make_tiny_tokenizer(vocab)
    # fork_rng: seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    out = Path(folder)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _tiny_config(
    arch: str, *, num_layers: int, hidden: int, heads: int, kv_heads: int, vocab: int
) -> PretrainedConfig:
    """The architecture's config for the requested shape, with the tiny tokenizer's special ids."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"need hidden % heads == 0 and heads % kv_heads == 0; got {hidden=}, {heads=}, {kv_heads=}"
        )
    ids: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": vocab}
    if arch == "gpt2":
        dropout: dict[str, Any] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(
            n_positions=_MAX_POSITIONS, n_embd=hidden, n_layer=num_layers, n_head=heads, **dropout, **ids
        )
    shape: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": _MAX_POSITIONS,
    }
    if arch == "llama":
        return LlamaConfig(head_dim=hidden // heads, **shape, **ids)
    if arch == "qwen2":
        return Qwen2Config(**shape, **ids)
    if arch == "gemma3":
        # Odd blocks use full attention, even ones a sliding window (the real models: 5 sliding, 1 full).
        types = ["full_attention" if l % 2 else "sliding_attention" for l in range(num_layers)]
        return Gemma3TextConfig(
            head_dim=hidden // heads,
            query_pre_attn_scalar=hidden // heads,
            sliding_window=GEMMA3_WINDOW,
            layer_types=types,
            **shape,
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _train_bpe(vocab: int) -> Tokenizer:
    """Train the byte-level BPE on :func:`tiny_corpus`, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tokenizer
