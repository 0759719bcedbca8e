"""Prompt → completion text: each KJV verse split in two, the model completes the second half.

**The rule.** A verse of n words (split on white space) gives the prompt = its first ⌊n / 2⌋
words and the completion = the other ⌈n / 2⌉ words (`split_verse`); a verse of one word has no
prompt and is left out (the KJV has none). The two halves are encoded separately — the prompt as
it is, the completion with the space that joins it to the prompt (``" " + completion``, the way
the byte-level BPE saw it inside the verse) — and put together as

    <start> prompt-tokens completion-tokens <eos> <pad> …

``<start>`` is ``<bos>`` by default (`start_id`; the LM recipes' teachers were trained on
chapters that follow an ``<eos>``, so ``start_id=EOS_ID`` gives them the context they know).
``<eos>`` ends the completion by default (`end_id`); an LM trained on ``kjv`` chapters ends a
verse with a newline, not ``<eos>``, so ``end_token="newline"`` ends each completion with the
newline token instead (what such a teacher predicts, and where its generations stop).
``labels`` are ``input_ids`` on the completion tokens and the ``<eos>`` and −100 on the start
token, the prompt and the padding; ``attention_mask`` is 1 up to the ``<eos>`` and 0 on the
padding, which is on the right. So with the causal shift the counted targets are exactly the
completion tokens and the ``<eos>`` that ends them. A sequence longer than `max_length` tokens is
left out, and the number left out is reported (`info["dropped"]`).

**The split** is the LM data's: whole books held out (`kdistill.data.text.split_books`, the same
validation and test books), the tokenizer trained on the training books only.

`PromptCompletions` is the dataset: kdistill's `BatchLoader` calls `get_batch`, which trims the
batch to its longest sequence (right padding: the dropped columns are padding in every row).
`prompt_lengths` (start token + prompt) says where each completion starts; on-policy training
(`kdistill.onpolicy`) replaces the completions by the student's samples, and sequence-level KD by
the teacher's (`with_sequences`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.data.text import (
    BOS_ID,
    DEFAULT_TEST_BOOKS,
    DEFAULT_VAL_BOOKS,
    EOS_ID,
    IGNORE_INDEX,
    PAD_ID,
    SPECIAL_TOKENS,
    Book,
    TextSplits,
    TokenSequences,
    chapter_documents,
    load_or_train_tokenizer,
    read_kjv,
    split_books,
    text_digest,
    token_byte_lengths,
)
from kdistill.errors import DataError

__all__ = [
    "KJV_COMPLETIONS_DATASET",
    "PromptCompletions",
    "encode_completions",
    "end_token_id",
    "kjv_completion_splits",
    "sequences_from_parts",
    "split_verse",
]

KJV_COMPLETIONS_DATASET = "kjv_completions"


def split_verse(text: str) -> tuple[str, str]:
    """(prompt, completion) of a verse: its first ⌊n/2⌋ words and the other ⌈n/2⌉ (n words split
    on white space, joined by one space). ValueError for fewer than 2 words."""
    words = text.split()
    if len(words) < 2:
        raise ValueError(f"a verse needs at least 2 words to split, got {text!r}")
    half = len(words) // 2
    return " ".join(words[:half]), " ".join(words[half:])


def sequences_from_parts(
    prompts: Sequence[Tensor], completions: Sequence[Tensor], width: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels), int64 ``N×W``, right-padded: row i is
    ``prompts[i]`` then ``completions[i]`` then ``<pad>``; labels −100 on the prompt and the
    padding, the completion tokens elsewhere; attention 1 on prompt + completion.
    `width`: W (default: the longest row). A completion holds what is counted (its ``<eos>``
    included when it has one); a row with an empty completion counts nothing."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    longest = max(lengths, default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest sequence ({longest} tokens)")
    n = len(prompts)
    input_ids = torch.full((n, width), PAD_ID, dtype=torch.int64)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((n, width), dtype=torch.int64)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, c = len(prompt), len(completion)
        input_ids[row, :p] = prompt.to(torch.int64).cpu()
        input_ids[row, p : p + c] = completion.to(torch.int64).cpu()
        labels[row, p : p + c] = completion.to(torch.int64).cpu()
        attention_mask[row, : p + c] = 1
    return input_ids, attention_mask, labels


@dataclass(eq=False)
class PromptCompletions(TokenSequences):
    """Prompt → completion sequences for a causal LM, right-padded (see the module doc).

    ``input_ids``, ``attention_mask``, ``labels``: int64 ``N×L``; ``prompt_lengths``: int64
    ``N``, the tokens before the completion (start token + prompt); ``token_bytes``: int64 ``V``
    (bytes per token id, `vocab_size` = V). Invariants, checked at construction (DataError):
    attention is 1 on a prefix of each row and 0 after (right padding); labels are −100 on the
    first ``prompt_lengths[i]`` tokens and on the padding, and equal ``input_ids`` on the rest of
    the real tokens (the completion); every row has a prompt of at least one token.

    `get_batch(indices)` gives ``({"input_ids", "attention_mask"}, labels)`` trimmed to the
    batch's longest row; ``dataset[i]`` a dict of ``L``-long tensors plus ``index``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    prompt_lengths: Tensor
    token_bytes: Tensor
    name: str = "completions"
    texts: list[tuple[str, str]] = field(default_factory=list)  # (prompt, completion) per row
    end_id: int = EOS_ID  # the token that ends a completion (generation stops there)
    FINGERPRINTED = ("input_ids", "attention_mask", "labels", "prompt_lengths", "token_bytes")

    def __post_init__(self) -> None:
        where = f"prompt/completion data {self.name!r}"
        shape = self.check_layout(
            where, ("input_ids", "attention_mask", "labels", "prompt_lengths", "token_bytes")
        )
        if tuple(self.prompt_lengths.shape) != shape[:1]:
            raise DataError(
                f"{where}: prompt_lengths must be N = {shape[0]}, got "
                f"{tuple(self.prompt_lengths.shape)}"
            )
        if self.texts and len(self.texts) != shape[0]:
            raise DataError(f"{where}: {len(self.texts)} texts for {shape[0]} sequences")
        real = self.attention_mask
        if not bool(((real == 0) | (real == 1)).all()):
            raise DataError(f"{where}: attention_mask must hold only 0 and 1")
        lengths = real.sum(dim=1)
        positions = torch.arange(shape[1])
        if not torch.equal(real, (positions < lengths[:, None]).long()):
            raise DataError(f"{where}: attention_mask must be 1 then 0 in each row (right padding)")
        if bool((self.prompt_lengths < 1).any()) or bool((self.prompt_lengths > lengths).any()):
            raise DataError(f"{where}: every prompt must hold 1 … (sequence length) tokens")
        counted = (positions >= self.prompt_lengths[:, None]) & (real == 1)
        expected = self.input_ids.masked_fill(~counted, IGNORE_INDEX)
        if not torch.equal(self.labels, expected):
            raise DataError(
                f"{where}: labels must be −100 on each prompt and the padding and equal "
                "input_ids on the completion"
            )
        if bool((self.input_ids.masked_fill(real == 0, 0) >= self.vocab_size).any()) or bool(
            (self.input_ids < 0).any()
        ):
            raise DataError(f"{where}: token ids must lie in [0, {self.vocab_size})")

    def __repr__(self) -> str:
        return (
            f"PromptCompletions(name={self.name!r}, sequences={len(self)}, "
            f"max_length={self.block_size}, counted_tokens={self.num_counted}, "
            f"vocab_size={self.vocab_size})"
        )

    @property
    def num_bytes(self) -> Tensor:
        """int64 N: UTF-8 bytes the counted targets of each sequence spell."""
        targets = self.labels[:, 1:]
        return (self.token_bytes[targets.clamp(min=0)] * (targets != IGNORE_INDEX)).sum(dim=1)

    def prompts(self) -> list[Tensor]:
        """Each sequence's start token + prompt (int64 tensors)."""
        return [self.input_ids[i, : int(n)] for i, n in enumerate(self.prompt_lengths)]

    def get_batch(self, indices: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        mask = self.attention_mask[indices]
        width = max(int(mask.sum(dim=1).max()) if len(mask) else 2, 2)
        inputs = {"input_ids": self.input_ids[indices, :width], "attention_mask": mask[:, :width]}
        return inputs, self.labels[indices, :width]

    def subset(self, indices: Sequence[int] | Tensor, name: str | None = None) -> PromptCompletions:
        index = self.subset_index(indices)
        return PromptCompletions(
            self.input_ids[index],
            self.attention_mask[index],
            self.labels[index],
            self.prompt_lengths[index],
            self.token_bytes,
            name=name if name is not None else f"{self.name}-subset",
            texts=[self.texts[i] for i in index.tolist()] if self.texts else [],
            end_id=self.end_id,
        )

    def with_sequences(self, completions: Sequence[Tensor], name: str) -> PromptCompletions:
        """The same prompts with other completions (`completions[i]`: int64 tokens that follow
        prompt i, counted; its ``<eos>`` included when it has one): sequence-level KD data."""
        if len(completions) != len(self):
            raise DataError(f"{name}: {len(completions)} completions for {len(self)} prompts")
        input_ids, attention_mask, labels = sequences_from_parts(self.prompts(), completions)
        if input_ids.shape[1] < 2:
            input_ids, attention_mask, labels = sequences_from_parts(
                self.prompts(), completions, width=2
            )
        return PromptCompletions(
            input_ids,
            attention_mask,
            labels,
            self.prompt_lengths.clone(),
            self.token_bytes,
            name,
            end_id=self.end_id,
        )


def encode_completions(
    tokenizer: Any,
    verses: Sequence[str],
    max_length: int,
    name: str,
    start_id: int = BOS_ID,
    end_id: int = EOS_ID,
) -> tuple[PromptCompletions, int]:
    """The verses as `PromptCompletions` (the module doc's rule and layout) and the number of
    verses left out for being longer than `max_length` tokens (with start token and ``<eos>``).
    DataError when a half does not encode losslessly (a tokenizer that normalises text)."""
    if start_id not in range(len(SPECIAL_TOKENS)):
        raise ValueError(f"start_id must be a special token id (0 … 2), got {start_id}")
    halves = [split_verse(verse) for verse in verses]
    prompts = tokenizer.encode_batch([p for p, _ in halves], add_special_tokens=False)
    completions = tokenizer.encode_batch([" " + c for _, c in halves], add_special_tokens=False)
    token_bytes = token_byte_lengths(tokenizer)
    kept_prompts, kept_completions, texts = [], [], []
    dropped = 0
    for (prompt, completion), p, c in zip(halves, prompts, completions, strict=True):
        p_ids = torch.tensor(p.ids, dtype=torch.int64)
        c_ids = torch.tensor(c.ids, dtype=torch.int64)
        for text, ids in ((prompt, p_ids), (" " + completion, c_ids)):
            spelled = int(token_bytes[ids].sum()) if len(ids) else 0
            if spelled != len(text.encode("utf-8")) or bool((ids < len(SPECIAL_TOKENS)).any()):
                raise DataError(
                    f"{name}: {text[:40]!r} encodes to tokens spelling {spelled} bytes, not "
                    f"{len(text.encode('utf-8'))}; the tokenizer does not encode text losslessly"
                )
        if 1 + len(p_ids) + len(c_ids) + 1 > max_length:
            dropped += 1
            continue
        kept_prompts.append(torch.cat([torch.tensor([start_id]), p_ids]))
        kept_completions.append(torch.cat([c_ids, torch.tensor([end_id])]))
        texts.append((prompt, completion))
    if not kept_prompts:
        raise DataError(f"{name}: no verse fits in max_length={max_length} tokens")
    input_ids, attention_mask, labels = sequences_from_parts(kept_prompts, kept_completions)
    lengths = torch.tensor([len(p) for p in kept_prompts], dtype=torch.int64)
    data = PromptCompletions(
        input_ids,
        attention_mask,
        labels,
        lengths,
        token_bytes,
        name=name,
        texts=texts,
        end_id=end_id,
    )
    return data, dropped


def end_token_id(tokenizer: Any, end_token: str) -> int:
    """The id that ends a completion: ``"eos"`` → ``<eos>``; ``"newline"`` → the tokenizer's
    single token for ``"\n"`` (DataError when it encodes to several)."""
    if end_token == "eos":
        return EOS_ID
    if end_token != "newline":
        raise ValueError(f"end_token must be 'eos' or 'newline', got {end_token!r}")
    ids = tokenizer.encode("\n", add_special_tokens=False).ids
    if len(ids) != 1:
        raise DataError(f"the tokenizer encodes a newline as {len(ids)} tokens, not one")
    return int(ids[0])


def _verses(books: Sequence[Book]) -> list[str]:
    return [verse for book in books for chapter in book.chapters for verse in chapter]


def kjv_completion_splits(
    *,
    vocab_size: int = 2048,
    max_length: int = 128,
    val_books: Sequence[str] = DEFAULT_VAL_BOOKS,
    test_books: Sequence[str] = DEFAULT_TEST_BOOKS,
    tokenizer_dir: str | Path | None = None,
    min_frequency: int = 2,
    program: str | Path = "bible",
    text_file: str | Path | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    val_limit: int | None = None,
    start_id: int = BOS_ID,
    end_token: str = "eos",
    seed: int = 0,
) -> TextSplits:
    """The KJV as prompt → completion verses, split by book like `kjv_splits` (same books, the
    same tokenizer: trained on the training books' chapters with the same settings, so a
    tokenizer folder of an LM run is reused). `*_limit`: a seeded random subset of that many
    sequences (original order kept)."""
    books = read_kjv(program, text_file)
    train_books, val_books_, test_books_ = split_books(books, val_books, test_books)
    tokenizer, status = load_or_train_tokenizer(
        tokenizer_dir, chapter_documents(train_books), vocab_size, min_frequency
    )
    end_id = end_token_id(tokenizer, end_token)
    chosen = {"train": train_books, "val": val_books_, "test": test_books_}
    limits = {"train": train_limit, "val": val_limit, "test": test_limit}
    data, info_splits = {}, {}
    for split, split_books_ in chosen.items():
        encoded, dropped = encode_completions(
            tokenizer,
            _verses(split_books_),
            max_length,
            f"kjv-completions-{split}",
            start_id,
            end_id,
        )
        full = len(encoded)
        limit = limits[split]
        if limit is not None and limit < len(encoded):
            generator = torch.Generator().manual_seed(seed)
            picked = torch.randperm(len(encoded), generator=generator)[:limit].sort().values
            encoded = encoded.subset(picked, name=f"{encoded.name}-take{limit}")
        data[split] = encoded
        info_splits[split] = {
            "books": [book.name for book in split_books_],
            "verses": full + dropped,
            "dropped": dropped,
            "sequences_used": len(encoded),
            "counted_tokens": encoded.num_counted,
        }
    info = {
        "corpus": "King James Bible (Debian bible-kjv-text), one sequence per verse",
        "rule": "prompt = first floor(n/2) words of a verse of n words, completion = the rest; "
        "<start> prompt completion <eos>, labels on completion + <eos>, right padding",
        "start_token": SPECIAL_TOKENS[start_id],
        "end_token": end_token,
        "max_length": max_length,
        "text_sha256": text_digest(_verses(books), {}),
        "tokenizer": {"status": status, "vocab_size": tokenizer.get_vocab_size()},
        "splits": info_splits,
    }
    return TextSplits(data["train"], data["val"], data["test"], tokenizer, info)
