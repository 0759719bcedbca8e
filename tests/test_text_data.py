"""Text data (`kdistill.data.text`): the KJV reader's validation, the split by book, the byte-level
BPE trained on the training books only and reused only when it matches, and token blocks.

Expected values come from the layout itself (chapters per book, verse numbers), from texts built
in the test, and from hand-packed token lists; one test reads the real KJV through `bible`.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from kdistill.data import ArrayDataset, BatchLoader, as_batch
from kdistill.data.text import (
    BOS_ID,
    DEFAULT_TEST_BOOKS,
    DEFAULT_VAL_BOOKS,
    EOS_ID,
    IGNORE_INDEX,
    KJV_BOOKS,
    KJV_VERSES,
    PAD_ID,
    Book,
    TokenBlocks,
    chapter_documents,
    encode_documents,
    load_or_train_tokenizer,
    pack_blocks,
    parse_bible,
    read_kjv,
    resolve_book,
    split_books,
    text_blocks,
    token_byte_lengths,
    train_bpe,
)
from kdistill.distill.teacher.store import InputSignatures, MemoryTeacherOutputs, input_signatures
from kdistill.errors import CacheError, DataError

WORDS = "and the lord said unto moses go up into the mountain and speak to the people".split()


def fake_kjv_lines() -> list[str]:
    """A text in the `bible -f` format with the real layout: 66 books, their chapter counts,
    31,102 verses (the first 188 chapters get 27 verses, the other 1,001 get 26)."""
    lines, chapter_number = [], 0
    for info in KJV_BOOKS:
        for chapter in range(1, info.chapters + 1):
            verses = 27 if chapter_number < 188 else 26
            chapter_number += 1
            for verse in range(1, verses + 1):
                words = [WORDS[(chapter_number + verse + i) % len(WORDS)] for i in range(6)]
                lines.append(f"{info.abbreviation}{chapter}:{verse} {' '.join(words)}.")
    return lines


@pytest.fixture(scope="module")
def kjv_lines() -> list[str]:
    return fake_kjv_lines()


# -- reader --------------------------------------------------------------------------------------
def test_the_full_layout_parses_into_books_chapters_and_verses(kjv_lines):
    assert len(kjv_lines) == KJV_VERSES  # the fake itself has the real size
    books = parse_bible(kjv_lines, "fake")
    assert [book.name for book in books] == [info.name for info in KJV_BOOKS]
    assert [len(book.chapters) for book in books] == [info.chapters for info in KJV_BOOKS]
    assert sum(book.num_verses for book in books) == KJV_VERSES
    assert books[0].chapters[0][0] == kjv_lines[0].split(" ", 1)[1]
    assert books[-1].chapters[-1][-1] == kjv_lines[-1].split(" ", 1)[1]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda lines: lines[:-1], "31101 verses, expected 31102"),  # last verse lost
        (lambda lines: [x for x in lines if not x.startswith("Rev")], "65 of 66 books"),
        (lambda lines: [x for x in lines if not x.startswith("Ge50:")], "Genesis ends after 49"),
        (lambda lines: [x for x in lines if not x.startswith("Ge2:")], r"expected Ge1:28 or Ge2:1"),
        (lambda lines: [x for x in lines if not x.startswith("Exo")], "books out of order"),
        (
            lambda lines: [x for x in lines if not x.startswith("Exo1:")],
            r"\(Exo2:1\): expected Exo1:1;",
        ),
        (lambda lines: lines[:2] + [lines[3], lines[2]] + lines[4:], "out of order"),
        (lambda lines: lines[:5] + [lines[4]] + lines[5:], "repeated"),
        (lambda lines: ["Ge1:1 "] + lines[1:], "empty verse"),
        (lambda lines: lines[:3] + ["and a wrapped line"] + lines[3:], "line 4: expected"),
        (lambda lines: [], "no verses"),
    ],
    ids=[
        "truncated-verse",
        "truncated-book",
        "missing-chapter-at-end",
        "missing-chapter",
        "missing-book",
        "book-without-its-first-chapter",
        "swapped-verses",
        "repeated-verse",
        "empty-verse",
        "wrapped-line",
        "empty",
    ],
)
def test_a_damaged_text_fails_loudly(kjv_lines, damage, message):
    with pytest.raises(DataError, match=message):
        parse_bible(damage(list(kjv_lines)), "fake")


def test_books_in_another_order_fail(kjv_lines):
    # Leviticus moved before Exodus: every line is well formed, only the order is wrong
    exodus = [x for x in kjv_lines if x.startswith("Exo")]
    leviticus = [x for x in kjv_lines if x.startswith("Lev")]
    rest_start = kjv_lines.index(leviticus[-1]) + 1
    genesis = kjv_lines[: kjv_lines.index(exodus[0])]
    reordered = genesis + leviticus + exodus + kjv_lines[rest_start:]
    assert len(reordered) == len(kjv_lines) and len(genesis) == 50 * 27
    with pytest.raises(DataError, match=r"line 1351 \(Lev1:1\): books out of order.*Exodus"):
        parse_bible(reordered, "fake")


def _fake_program(folder: Path, body: str) -> Path:
    program = folder / "bible"
    program.write_text(f"#!/bin/sh\n{body}\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return program


def test_read_kjv_runs_the_program_or_reads_a_file_and_validates_both(tmp_path, kjv_lines):
    text = tmp_path / "kjv.txt"
    text.write_text("\n".join(kjv_lines) + "\n")
    program = _fake_program(tmp_path, f'[ "$1" = -f ] && [ "$2" = Gen1:1-Rev22:21 ] && cat {text}')
    assert sum(book.num_verses for book in read_kjv(program)) == KJV_VERSES
    assert sum(book.num_verses for book in read_kjv(text_file=text)) == KJV_VERSES
    short = tmp_path / "short.txt"
    short.write_text("\n".join(kjv_lines[:-26]) + "\n")
    with pytest.raises(DataError, match="Revelation ends after 21 chapters"):
        read_kjv(text_file=short)
    with pytest.raises(DataError, match="Revelation ends after 21 chapters"):
        read_kjv(_fake_program(tmp_path, f"cat {short}"))


def test_a_missing_or_failing_program_names_the_debian_packages(tmp_path):
    with pytest.raises(DataError, match="not found; install them.*bible-kjv bible-kjv-text"):
        read_kjv(tmp_path / "no-such-bible")
    failing = _fake_program(tmp_path, "echo 'no data file' >&2; exit 3")
    with pytest.raises(DataError, match="status 3 \\(no data file\\).*bible-kjv bible-kjv-text"):
        read_kjv(failing)
    with pytest.raises(DataError, match="no such file"):
        read_kjv(text_file=tmp_path / "absent.txt")


# -- split by book -------------------------------------------------------------------------------
def tiny_books() -> list[Book]:
    return [
        Book(info.name, [[f"{info.name} {c} verse {v}" for v in (1, 2)] for c in range(1, 3)])
        for info in KJV_BOOKS
    ]


def test_the_split_by_book_is_deterministic_disjoint_and_complete():
    books = tiny_books()
    train, val, test = split_books(books, DEFAULT_VAL_BOOKS, DEFAULT_TEST_BOOKS)
    assert [b.name for b in test] == ["Hosea", "John", "Galatians"]  # canonical order
    assert [b.name for b in val] == ["Ruth", "Ecclesiastes", "Joel", "James"]
    names = [b.name for part in (train, val, test) for b in part]
    assert sorted(names) == sorted(info.name for info in KJV_BOOKS)  # each book exactly once
    assert len(train) == 66 - 7
    again = split_books(books, ["ruth", "Eccl", "JOEL", "Jas"], ["Gal", "John", "hos"])
    assert [[b.name for b in part] for part in again] == [
        [b.name for b in part] for part in (train, val, test)
    ]  # names or abbreviations, any case and order: the same split


def test_the_split_refuses_unknown_repeated_and_overlapping_books():
    books = tiny_books()
    with pytest.raises(ValueError, match="unknown book 'Jonn'; did you mean 'John'"):
        split_books(books, ["Ruth"], ["Jonn"])
    with pytest.raises(ValueError, match="John is named in both val and test_books"):
        split_books(books, ["John"], ["John"])
    with pytest.raises(ValueError, match="Ruth is named twice_books"):
        split_books(books, ["Ruth", "ruth"], ["John"])
    with pytest.raises(ValueError, match="test_books is empty"):
        split_books(books, ["Ruth"], [])
    with pytest.raises(ValueError, match="no book is left for training"):
        split_books(books[:2], ["Genesis"], ["Exodus"])
    assert resolve_book("song of  solomon") == "Song of Solomon"


def test_chapters_are_the_documents():
    books = tiny_books()[:2]
    docs = chapter_documents(books)
    assert len(docs) == 4
    assert docs[0] == "Genesis 1 verse 1\nGenesis 1 verse 2"


# -- tokenizer -----------------------------------------------------------------------------------
TRAIN_TEXTS = ["and the lord spake unto moses saying speak unto the children of israel"] * 30
TEST_ONLY = "zyzzyva"


def test_the_tokenizer_learns_from_the_training_texts_only():
    # a word repeated in the held-out texts becomes one token only when those texts are trained
    # on: the control shows the check can fail
    held_out = [f"{TEST_ONLY} {TEST_ONLY} {TEST_ONLY}"] * 30
    on_train = train_bpe(TRAIN_TEXTS, vocab_size=320)
    leaky = train_bpe(TRAIN_TEXTS + held_out, vocab_size=320)
    assert len(leaky.encode(TEST_ONLY).ids) == 1
    assert len(on_train.encode(TEST_ONLY).ids) > 3
    assert len(on_train.encode(" moses").ids) == 1
    for tokenizer in (on_train, leaky):  # fixed special ids
        assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)


def test_training_is_deterministic():
    assert train_bpe(TRAIN_TEXTS, 300).to_str() == train_bpe(TRAIN_TEXTS, 300).to_str()


def test_a_saved_tokenizer_is_reused_only_when_text_and_settings_match(tmp_path):
    folder = tmp_path / "tok"
    first, status = load_or_train_tokenizer(folder, TRAIN_TEXTS, 300)
    assert status.startswith("trained and saved") and (folder / "tokenizer.json").exists()
    again, status = load_or_train_tokenizer(folder, TRAIN_TEXTS, 300)
    assert status.startswith("reused") and again.to_str() == first.to_str()
    _, status = load_or_train_tokenizer(folder, TRAIN_TEXTS, 280)
    assert "trained" in status and "settings changed: ['vocab_size']" in status
    _, status = load_or_train_tokenizer(folder, TRAIN_TEXTS, 280, min_frequency=3)
    assert "settings changed: ['min_frequency']" in status
    _, status = load_or_train_tokenizer(folder, [*TRAIN_TEXTS, "one more"], 280, 3)
    assert "trained" in status and "other training text" in status
    _, status = load_or_train_tokenizer(folder, [*TRAIN_TEXTS, "one more"], 280, 3)
    assert status.startswith("reused")
    path = folder / "tokenizer.json"
    path.write_text(path.read_text() + "\n")  # edited by hand (still a valid tokenizer)
    _, status = load_or_train_tokenizer(folder, [*TRAIN_TEXTS, "one more"], 280, 3)
    assert "modified after training" in status
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(path, foreign / "tokenizer.json")
    with pytest.raises(DataError, match="not trained by kdistill and will not be overwritten"):
        load_or_train_tokenizer(foreign, TRAIN_TEXTS, 300)


def test_token_byte_lengths_spell_utf8_bytes():
    tokenizer = train_bpe(TRAIN_TEXTS, 300)
    lengths = token_byte_lengths(tokenizer)
    assert lengths[:3].tolist() == [0, 0, 0]  # special tokens spell nothing
    text = "naïve — Ünïcödé ✓ and the lord"
    ids = torch.tensor(tokenizer.encode(text).ids)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids.tolist()) == text


def test_a_tokenizer_that_alters_text_is_refused():
    from tokenizers import pre_tokenizers

    tokenizer = train_bpe(TRAIN_TEXTS, 300)
    assert encode_documents(tokenizer, ["and the", "lord"]).tolist()[-1] == EOS_ID
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # adds a space
    with pytest.raises(DataError, match="document 0: its .* tokens spell 8 bytes but the text"):
        encode_documents(tokenizer, ["and the", "lord"])


# -- blocks --------------------------------------------------------------------------------------
BYTES = torch.tensor([0, 0, 0] + [1, 2, 3] * 10, dtype=torch.int64)  # V = 33


def test_blocks_overlap_by_one_token_and_pad_only_the_last():
    tokens = torch.arange(10, 21)  # 11 tokens, L = 4: blocks start at 0, 3, 6, 9
    blocks = pack_blocks(tokens, 4, BYTES, name="hand")
    assert blocks.input_ids.tolist() == [
        [10, 11, 12, 13],
        [13, 14, 15, 16],
        [16, 17, 18, 19],
        [19, 20, PAD_ID, PAD_ID],
    ]
    assert blocks.attention_mask.tolist() == [[1] * 4] * 3 + [[1, 1, 0, 0]]
    assert blocks.labels[-1].tolist() == [19, 20, IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(blocks.labels[:3], blocks.input_ids[:3])  # unshifted
    # every token but the first is a counted target (labels[:, 1:]) exactly once
    targets = blocks.labels[:, 1:]
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == list(range(11, 21))
    # bytes of the counted targets: token t spells BYTES[t] = 1 + (t mod 3) bytes
    by_hand = [
        sum(1 + t % 3 for t in row[1:] if t != IGNORE_INDEX) for row in blocks.labels.tolist()
    ]
    assert blocks.num_bytes.tolist() == by_hand
    assert blocks.num_counted == 10 and len(blocks) == 4


def test_a_stream_that_fits_exactly_is_not_padded():
    blocks = pack_blocks(torch.arange(3, 10), 4, BYTES)  # 7 tokens = 1 + 2 · 3
    assert len(blocks) == 2 and bool((blocks.attention_mask == 1).all())
    with pytest.raises(DataError, match="no next token"):
        pack_blocks(torch.tensor([5]), 4, BYTES)
    with pytest.raises(ValueError, match="block_size must be an integer ≥ 2"):
        pack_blocks(torch.arange(3, 10), 1, BYTES)


def test_token_blocks_check_their_invariants():
    good = pack_blocks(torch.arange(3, 20), 5, BYTES)
    parts = dict(
        input_ids=good.input_ids,
        attention_mask=good.attention_mask,
        labels=good.labels,
        num_bytes=good.num_bytes,
        token_bytes=good.token_bytes,
    )
    shifted = good.labels.roll(-1, dims=1)  # labels already shifted: a classic off-by-one
    with pytest.raises(DataError, match="labels must equal input_ids \\(unshifted\\)"):
        TokenBlocks(**{**parts, "labels": shifted})
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 10\) \(the tokenizer's"):
        TokenBlocks(**{**parts, "token_bytes": BYTES[:10]})
    with pytest.raises(DataError, match="num_bytes differs"):
        TokenBlocks(**{**parts, "num_bytes": good.num_bytes + 1})
    with pytest.raises(DataError, match="attention_mask must be an int64 tensor"):
        TokenBlocks(**{**parts, "attention_mask": good.attention_mask.bool()})


def test_blocks_feed_kdistill_loaders_and_torch_dataloaders_alike():
    blocks = pack_blocks(torch.arange(3, 30), 5, BYTES)
    batch = next(iter(BatchLoader(blocks, batch_size=3, shuffle=True, seed=1)))
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(batch.target, blocks.labels[batch.index])
    assert torch.equal(batch.inputs["input_ids"], blocks.input_ids[batch.index])
    raw = next(iter(DataLoader(blocks, batch_size=3, shuffle=False)))  # HF-style dict items
    from_torch = as_batch(raw)
    assert torch.equal(from_torch.index, torch.arange(3))
    assert torch.equal(from_torch.target, blocks.labels[:3])
    assert torch.equal(from_torch.inputs["attention_mask"], blocks.attention_mask[:3])
    subset = blocks.subset([2, 0])
    assert torch.equal(subset.labels, blocks.labels[[2, 0]]) and subset.vocab_size == 33
    assert subset.fingerprint() != blocks.fingerprint()
    assert pack_blocks(torch.arange(3, 30), 5, BYTES).fingerprint() == blocks.fingerprint()


def test_stored_teacher_outputs_are_checked_against_token_blocks():
    blocks = pack_blocks(torch.arange(3, 30), 5, BYTES)
    inputs = {"input_ids": blocks.input_ids, "attention_mask": blocks.attention_mask}
    signatures = InputSignatures(input_signatures(inputs), (10,), "stored")
    stored = MemoryTeacherOutputs({"logits": torch.randn(len(blocks), 5, 33)}, signatures)
    index = torch.tensor([4, 1])
    got, _ = stored.lookup(index, blocks.get_batch(index)[0])
    assert torch.equal(got["logits"], stored.outputs["logits"][index])
    other = blocks.get_batch(torch.tensor([4, 2]))[0]  # block 2 where block 1 was computed
    with pytest.raises(CacheError, match="1 of 2 samples of this batch are not the inputs"):
        stored.lookup(index, other)

    class Echo(torch.nn.Module):  # a "teacher" whose output is its token ids as logits
        def forward(self, input_ids, attention_mask):
            return {"logits": torch.nn.functional.one_hot(input_ids, 33).float()}

    predicted = MemoryTeacherOutputs.predict(Echo(), BatchLoader(blocks, batch_size=2))
    assert torch.equal(predicted.outputs["logits"].argmax(-1), blocks.input_ids)
    predicted.lookup(index, blocks.get_batch(index)[0])
    with pytest.raises(CacheError, match="not the inputs"):
        predicted.lookup(index, other)


def test_text_blocks_of_documents_end_each_document_with_eos():
    tokenizer = train_bpe(TRAIN_TEXTS, 300)
    docs = ["and the lord", "spake unto moses"]
    blocks = text_blocks(docs, tokenizer, 4)
    stream = [blocks.input_ids[0, 0].item()] + [
        t for t in blocks.labels[:, 1:].reshape(-1).tolist() if t != IGNORE_INDEX
    ]
    eos = [i for i, t in enumerate(stream) if t == EOS_ID]
    assert len(eos) == 2 and eos[-1] == len(stream) - 1
    assert tokenizer.decode(stream[: eos[0]]) == docs[0]
    assert tokenizer.decode(stream[eos[0] + 1 : eos[1]]) == docs[1]
    # counted targets: every token but the first ("and", 3 bytes); each <eos> spells 0 bytes
    assert tokenizer.decode(stream[:1]) == "and"
    assert int(blocks.num_bytes.sum()) == sum(len(d.encode()) for d in docs) - 3
    assert blocks.num_counted == len(stream) - 1


def test_prepare_of_another_dataset_is_refused_by_the_lm_task():
    from kdistill.tasks import get_task

    data = ArrayDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="task language_modeling: dataset 'dataset' is not tok"):
        get_task("lm").prepare(data)


# -- the real text -------------------------------------------------------------------------------
needs_bible = pytest.mark.skipif(
    shutil.which("bible") is None,
    reason="the `bible` program of Debian's bible-kjv / bible-kjv-text is not installed "
    "(make data installs it)",
)


@needs_bible
def test_the_real_kjv_reads_validates_and_splits_by_book():
    books = read_kjv()
    assert len(books) == 66 and sum(book.num_verses for book in books) == KJV_VERSES
    assert books[0].chapters[0][0] == "In the beginning God created the heaven and the earth."
    assert books[42].name == "John" and books[42].chapters[10][34] == "Jesus wept."
    train, val, test = split_books(books, DEFAULT_VAL_BOOKS, DEFAULT_TEST_BOOKS)
    verses = [sum(b.num_verses for b in part) for part in (train, val, test)]
    assert verses == [KJV_VERSES - 488 - 1225, 488, 1225]


@needs_bible
@pytest.mark.slow
def test_the_real_kjv_becomes_token_blocks_split_by_book(tmp_path):
    from kdistill.data.text import kjv_splits

    splits = kjv_splits(tokenizer_dir=tmp_path)
    assert splits.tokenizer.get_vocab_size() == 2048 == splits.train.vocab_size
    info = splits.info["splits"]
    assert info["train"]["chapters"] + info["val"]["chapters"] + info["test"]["chapters"] == 1189
    for split in ("train", "val", "test"):
        assert 3.0 < info[split]["bytes_per_token"] < 4.5  # English under a 2k byte-level BPE
    first = splits.tokenizer.decode(splits.test.input_ids[0].tolist())
    assert first.startswith("The word of the LORD that came unto Hosea")
    assert splits.val.num_counted + 1 == info["val"]["tokens"]
    again = kjv_splits(tokenizer_dir=tmp_path)
    assert again.info["tokenizer"]["status"].startswith("reused")
    assert torch.equal(again.train.input_ids, splits.train.input_ids)
