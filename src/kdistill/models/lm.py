"""Small causal language models built from Hugging Face `transformers` configs, random init.

| registry name | builds                                  | parameters at vocab 2,048        |
|---------------|-----------------------------------------|----------------------------------|
| `gpt2_lm`     | `GPT2LMHeadModel` from a `GPT2Config`   | (as given)                       |
| `llama_lm`    | `LlamaForCausalLM` from a `LlamaConfig` | (as given)                       |
| `lm_teacher`  | 4 layers × 192, 4 heads                 | 2.22 M (`arch="llama"`: 2.16 M)  |
| `lm_student`  | 2 layers × 96, 2 heads                  | 0.45 M (`arch="llama"`: 0.42 M)  |

Each takes `vocab_size` (the recipe's registry gives it from the data: `Task.model_kwargs`),
ties the output head to the token embedding, sets ``use_cache=False`` (outputs are then
``CausalLMOutput``s holding the logits and, given labels, the loss — nothing else to store or
cache), no dropout unless asked, and the special ids of `kdistill.data.text` (``<pad>`` 0,
``<bos>`` 1, ``<eos>`` 2). Called as HF passes batches: ``model(input_ids=…, attention_mask=…)``.

`transformers` is imported only when one is built; a missing install names the pip command. No
weights are ever downloaded: models are built from configs (`from_config`).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from kdistill.data.text import BOS_ID, EOS_ID, PAD_ID

__all__ = [
    "context_limit",
    "check_vocabulary",
    "embedding_rows",
    "gpt2_lm",
    "llama_lm",
    "lm_student",
    "lm_teacher",
]

_SPECIAL = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(
            f"causal language models need transformers ({error}); install it with "
            "pip install 'kdistill[lm]' (or pip install transformers)"
        ) from None


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _heads_divide(width_name: str, width: int, n_head: int) -> None:
    if width % n_head:
        raise ValueError(
            f"{width_name}={width} must be a multiple of n_head={n_head} (each head gets "
            f"{width_name} / n_head dimensions)"
        )


def gpt2_lm(
    vocab_size: int,
    n_layer: int = 4,
    n_embd: int = 192,
    n_head: int = 4,
    n_positions: int = 256,
    dropout: float = 0.0,
    tie_word_embeddings: bool = True,
) -> nn.Module:
    """A randomly initialised GPT-2 (Radford et al. 2019) ``GPT2LMHeadModel``.

    `vocab_size`: rows of the token embedding and of the logits (``N×L×vocab_size``);
    `n_positions`: the longest sequence (block) it can read; `dropout`: residual, embedding and
    attention dropout. ValueError for non-positive sizes or `n_embd` not divisible by `n_head`.
    """
    _positive(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    _positive(n_positions=n_positions)
    _heads_divide("n_embd", n_embd, n_head)
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=tie_word_embeddings,
        use_cache=False,
        **_SPECIAL,
    )
    model = transformers.GPT2LMHeadModel(config)
    check_vocabulary(model, vocab_size)
    return model


def llama_lm(
    vocab_size: int,
    n_layer: int = 4,
    hidden_size: int = 192,
    n_head: int = 4,
    n_kv_head: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
) -> nn.Module:
    """A randomly initialised Llama-style (Touvron et al. 2023) ``LlamaForCausalLM``: RMSNorm,
    rotary positions, SwiGLU MLP of `intermediate_size` (default ≈ 8/3 · hidden, rounded up to a
    multiple of 8), grouped-query attention with `n_kv_head` key/value heads (default: n_head).
    """
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if intermediate_size is None:
        intermediate_size = -(-8 * hidden_size // 3 // 8) * 8
    _positive(vocab_size=vocab_size, n_layer=n_layer, hidden_size=hidden_size, n_head=n_head)
    _positive(
        n_kv_head=n_kv_head,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    _heads_divide("hidden_size", hidden_size, n_head)
    if n_head % n_kv_head:
        raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        use_cache=False,
        **_SPECIAL,
    )
    model = transformers.LlamaForCausalLM(config)
    check_vocabulary(model, vocab_size)
    return model


def _sized(
    arch: str, vocab_size: int, n_layer: int, width: int, n_head: int, positions: int
) -> nn.Module:
    if arch == "gpt2":
        return gpt2_lm(vocab_size, n_layer, width, n_head, positions)
    if arch == "llama":
        return llama_lm(vocab_size, n_layer, width, n_head, max_position_embeddings=positions)
    raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")


def lm_teacher(
    vocab_size: int,
    arch: str = "gpt2",
    n_layer: int = 4,
    width: int = 192,
    n_head: int = 4,
    n_positions: int = 256,
) -> nn.Module:
    """The teacher size: 4 layers × 192, 4 heads (2.22 M parameters at vocab 2,048, 0.39 M
    of them the tied embedding; 5× the student's, 8× without the embeddings); `arch` "gpt2"
    (`gpt2_lm`) or "llama" (`llama_lm`, width = hidden_size). One training step of 32 × 128
    tokens takes ~1.6 s on one busy core here, 4 × 256 (3.75 M) ~2.6 s."""
    return _sized(arch, vocab_size, n_layer, width, n_head, n_positions)


def lm_student(
    vocab_size: int,
    arch: str = "gpt2",
    n_layer: int = 2,
    width: int = 96,
    n_head: int = 2,
    n_positions: int = 256,
) -> nn.Module:
    """The student size: 2 layers × 96, 2 heads (0.45 M parameters at vocab 2,048, 0.2 M of
    them the tied embedding); `arch` as `lm_teacher`."""
    return _sized(arch, vocab_size, n_layer, width, n_head, n_positions)


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the model's token embedding (``get_input_embeddings()``), None when the model
    does not say (not a Hugging Face model)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def check_vocabulary(model: nn.Module, vocab_size: int, what: str = "model") -> None:
    """ValueError when the model's token embedding has fewer rows than the tokenizer has
    tokens (ids ≥ rows would fail deep inside the embedding). More rows (padding, e.g. 2,056
    for 2,048) are fine. Models that expose no embedding are not checked."""
    rows = embedding_rows(model)
    if rows is not None and rows < vocab_size:
        raise ValueError(
            f"the {what}'s token embedding has {rows} rows but the tokenizer has {vocab_size} "
            f"tokens; build it with vocab_size ≥ {vocab_size} (a registry model gets the "
            "tokenizer's size from the data)"
        )


def context_limit(model: nn.Module) -> int | None:
    """The longest sequence a Hugging Face model's config allows (``n_positions`` or
    ``max_position_embeddings``), or None when the model does not say."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
