"""A saved Hugging Face teacher of the user's own: a tiny GPT-2 (built from a config) with the
byte-level BPE it was "trained" with, both written by `save_pretrained` into one folder."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the cat dog sat ran on a mat log red blue big small and then it was".split()


def generated_text(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(lines)]


def train_tokenizer(texts: list[str], vocab_size: int = 300, reverse: bool = False):
    """A byte-level BPE (tokenizers) with <pad> <bos> <eos>; `reverse`: the same tokens, the
    ids of the merges given in the reverse order (same size, other ids)."""
    import tokenizers as tk

    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    if reverse:
        vocab = tokenizer.get_vocab()
        order = sorted(vocab, key=vocab.get)
        fixed, rest = order[:3], order[3:]
        remapped = {token: index for index, token in enumerate(fixed + rest[::-1])}
        import json

        state = json.loads(tokenizer.to_str())
        state["model"]["vocab"] = remapped
        tokenizer = tk.Tokenizer.from_str(json.dumps(state))
    return tokenizer


def save_teacher(folder: Path, tokenizer, seed: int = 0, tied: bool = True) -> Path:
    """A 1-layer GPT-2 sized for `tokenizer`, random weights (seeded), with the tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return folder
