"""One view of the tokenizers the token kinds take: a `tokenizers.Tokenizer` (kdistill's BPE,
a ``tokenizer.json``), a Hugging Face ``transformers`` tokenizer (``AutoTokenizer``, with its
chat template), or any object with ``encode(text) -> ids`` and a ``vocab_size``.

`TextTokenizer` gives what the readers need: `encode` (no special tokens added; special-token
text in a document is parsed as the tokenizer does), the end / start / padding ids, the
vocabulary size, and the bytes each token spells (`token_bytes`, for bits per byte) — computed
for byte-level BPEs (GPT-2's, kdistill's), where every non-special token is a string of byte
symbols; for any other tokenizer `token_bytes` is all zeros and `byte_level` False (bits per
byte is then NaN: the bytes a SentencePiece token spells depend on its neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdistill.errors import DataError

__all__ = ["TextTokenizer", "as_text_tokenizer"]

_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|eos|>", "<|end_of_text|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


@dataclass
class TextTokenizer:
    raw: Any
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    token_bytes: Tensor  # int64 V: bytes per token id (zeros unless byte_level)
    byte_level: bool
    has_chat_template: bool

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        raw = self.raw
        if hasattr(raw, "encode_batch"):  # tokenizers.Tokenizer
            return [list(e.ids) for e in raw.encode_batch(list(texts), add_special_tokens=False)]
        if _is_transformers(raw):
            return [list(raw.encode(t, add_special_tokens=False)) for t in texts]
        return [list(raw.encode(t)) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.raw.decode(list(ids))

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The conversation as text: the tokenizer's chat template when it has one, else
        ``"<role>: <content>\\n"`` per message (and ``"assistant: "`` as generation prompt)."""
        if self.has_chat_template:
            return self.raw.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def _is_transformers(raw: Any) -> bool:
    return hasattr(raw, "convert_ids_to_tokens") and hasattr(raw, "all_special_ids")


def _byte_lengths(vocab: dict[str, int], special: set[int], size: int) -> tuple[Tensor, bool]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    lengths = torch.zeros(size, dtype=torch.int64)
    for token, index in vocab.items():
        if index in special or index >= size:
            continue
        if not token or not all(symbol in alphabet for symbol in token):
            return torch.zeros(size, dtype=torch.int64), False
        lengths[index] = len(token)
    return lengths, True


def _find(lookup, names: Sequence[str]) -> int | None:
    for name in names:
        found = lookup(name)
        if found is not None:
            return int(found)
    return None


def as_text_tokenizer(tokenizer: Any) -> TextTokenizer:
    """`tokenizer` as a `TextTokenizer` (see the module doc); DataError for another object."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if _is_transformers(tokenizer):
        size = len(tokenizer)
        special = set(int(i) for i in tokenizer.all_special_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.get_vocab(with_added_tokens=True)
            if backend is not None
            else tokenizer.get_vocab()
        )
        lengths, byte_level = _byte_lengths(vocab, special, size)
        return TextTokenizer(
            tokenizer,
            size,
            tokenizer.eos_token_id,
            tokenizer.bos_token_id,
            tokenizer.pad_token_id,
            lengths,
            byte_level,
            bool(getattr(tokenizer, "chat_template", None)),
        )
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        decoder = tokenizer.get_added_tokens_decoder()
        special = {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
        lengths, byte_level = _byte_lengths(vocab, special, size)
        lookup = tokenizer.token_to_id
        return TextTokenizer(
            tokenizer,
            size,
            _find(lookup, _EOS_NAMES),
            _find(lookup, _BOS_NAMES),
            _find(lookup, _PAD_NAMES),
            lengths,
            byte_level,
            False,
        )
    if callable(getattr(tokenizer, "encode", None)) and isinstance(
        getattr(tokenizer, "vocab_size", None), int
    ):
        size = int(tokenizer.vocab_size)
        return TextTokenizer(
            tokenizer,
            size,
            getattr(tokenizer, "eos_token_id", None),
            getattr(tokenizer, "bos_token_id", None),
            getattr(tokenizer, "pad_token_id", None),
            torch.zeros(size, dtype=torch.int64),
            False,
            False,
        )
    raise DataError(
        f"a tokenizer must be a tokenizers.Tokenizer, a transformers tokenizer, or have "
        f"encode(text) and an int vocab_size; got {type(tokenizer).__name__}"
    )
