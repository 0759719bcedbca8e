"""Real text for causal language models: the King James Bible, a byte-level BPE, token blocks.

**The text.** Debian's packages ``bible-kjv`` and ``bible-kjv-text`` (public domain, ~4.3 MB of
natural English) ship the program ``bible``; ``bible -f Gen1:1-Rev22:21`` prints the 31,102
verses one per line (``Ge1:1 In the beginning God created …``). `read_kjv` runs it (or reads a
file in the same format) and `parse_bible` validates what it got: 66 books in canonical order
(`KJV_BOOKS`) each with its canonical number of chapters, chapters and verses numbered 1, 2, …
without gaps, 31,102 verses, none empty. Anything else — a truncated, reordered or wrapped text —
is a `DataError` naming the line, never a silently smaller corpus.

**The split** is by book (`split_books`): whole books are held out for validation and test, so
no verse of a held-out book, nor its neighbours, is ever trained on. The defaults mix genres:

| split      | books (default)                 | genres                              |
|------------|---------------------------------|-------------------------------------|
| test       | John, Hosea, Galatians          | gospel, prophet, epistle            |
| validation | Ruth, Ecclesiastes, Joel, James | narrative, wisdom, prophet, epistle |
| train      | the 59 other books              |                                     |

John rather than Mark, Matthew or Luke: the synoptic gospels repeat one another nearly word for
word, so a held-out synoptic gospel would largely be text the model trained on. The other
defaults have no long parallel passage elsewhere in the Bible either.

**Documents** are chapters: a chapter's verses joined with ``"\\n"`` (verse references left
out), each chapter followed by ``<eos>``. Chapters rather than verses because packing puts many
documents in one block anyway (a model attends across ``<eos>``), so the choice only decides what
the separator between verses is: with chapters it is an ordinary newline byte and ``<eos>`` is
0.1 % of the tokens (1,189 chapters), so the metrics measure English rather than how well a model
predicts 31,102 verse ends, and bits per byte hardly depends on how special tokens are counted.

**The tokenizer** is a byte-level BPE (`tokenizers`: ByteLevel pre-tokenizer and decoder, BPE
trainer with all 256 bytes in the initial alphabet, so any text encodes without an unknown
token) trained on the **training split only**, with the special tokens ``<pad>`` = 0,
``<bos>`` = 1, ``<eos>`` = 2 (`PAD_ID`, `BOS_ID`, `EOS_ID`; fixed ids, checked on every load).
`load_or_train_tokenizer` saves ``tokenizer.json`` with ``tokenizer.meta.json`` (a digest of the
training text and the settings) and reuses it only when the digest matches; any difference
retrains it.

**Blocks** (`TokenBlocks`): the token stream of a split packed into blocks of ``block_size``
tokens for a causal LM, items shaped as Hugging Face passes them (``input_ids``,
``attention_mask``, ``labels`` = ``input_ids`` unshifted, ``-100`` on padding). Consecutive
blocks overlap by one token (block k starts at token k·(L − 1)): the model predicts labels[1:],
so every token of the split but the first is a counted target exactly once. Only the last block
is padded. Each block records ``num_bytes``: the UTF-8 bytes its counted targets (labels[1:]
≠ −100) spell, for bits per byte; special tokens spell 0 bytes (their NLL still counts).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.errors import DataError
from kdistill.io import atomic_write_text
from kdistill.registry import close_matches

__all__ = [
    "BOS_ID",
    "DEFAULT_TEST_BOOKS",
    "DEFAULT_VAL_BOOKS",
    "EOS_ID",
    "IGNORE_INDEX",
    "KJV_BOOKS",
    "KJV_DATASET",
    "KJV_VERSES",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "Book",
    "BookInfo",
    "TextSplits",
    "TokenBlocks",
    "chapter_documents",
    "encode_documents",
    "kjv_splits",
    "load_or_train_tokenizer",
    "pack_blocks",
    "parse_bible",
    "read_kjv",
    "resolve_book",
    "split_books",
    "text_blocks",
    "token_byte_lengths",
    "train_bpe",
]

KJV_DATASET = "kjv"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IGNORE_INDEX = -100  # labels not counted (Hugging Face's convention)
KJV_VERSES = 31_102
KJV_RANGE = "Gen1:1-Rev22:21"
DEBIAN_PACKAGES = "bible-kjv bible-kjv-text"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META = "tokenizer.meta.json"
TOKENIZER_FORMAT = 1  # bump when the training recipe below changes


@dataclass(frozen=True)
class BookInfo:
    """A book of the canon: its name, the ``bible`` program's abbreviation, its chapters."""

    name: str
    abbreviation: str
    chapters: int


KJV_BOOKS: tuple[BookInfo, ...] = tuple(
    BookInfo(name, abbreviation, chapters)
    for name, abbreviation, chapters in (
        ("Genesis", "Ge", 50), ("Exodus", "Exo", 40), ("Leviticus", "Lev", 27),
        ("Numbers", "Num", 36), ("Deuteronomy", "Deu", 34), ("Joshua", "Josh", 24),
        ("Judges", "Jdgs", 21), ("Ruth", "Ruth", 4), ("1 Samuel", "1Sm", 31),
        ("2 Samuel", "2Sm", 24), ("1 Kings", "1Ki", 22), ("2 Kings", "2Ki", 25),
        ("1 Chronicles", "1Chr", 29), ("2 Chronicles", "2Chr", 36), ("Ezra", "Ezra", 10),
        ("Nehemiah", "Neh", 13), ("Esther", "Est", 10), ("Job", "Job", 42),
        ("Psalms", "Psa", 150), ("Proverbs", "Prv", 31), ("Ecclesiastes", "Eccl", 12),
        ("Song of Solomon", "SSol", 8), ("Isaiah", "Isa", 66), ("Jeremiah", "Jer", 52),
        ("Lamentations", "Lam", 5), ("Ezekiel", "Eze", 48), ("Daniel", "Dan", 12),
        ("Hosea", "Hos", 14), ("Joel", "Joel", 3), ("Amos", "Amos", 9), ("Obadiah", "Obad", 1),
        ("Jonah", "Jonah", 4), ("Micah", "Mic", 7), ("Nahum", "Nahum", 3),
        ("Habakkuk", "Hab", 3), ("Zephaniah", "Zep", 3), ("Haggai", "Hag", 2),
        ("Zechariah", "Zec", 14), ("Malachi", "Mal", 4),
        ("Matthew", "Mat", 28), ("Mark", "Mark", 16), ("Luke", "Luke", 24), ("John", "John", 21),
        ("Acts", "Acts", 28), ("Romans", "Rom", 16), ("1 Corinthians", "1Cor", 16),
        ("2 Corinthians", "2Cor", 13), ("Galatians", "Gal", 6), ("Ephesians", "Eph", 6),
        ("Philippians", "Phi", 4), ("Colossians", "Col", 4), ("1 Thessalonians", "1Th", 5),
        ("2 Thessalonians", "2Th", 3), ("1 Timothy", "1Tim", 6), ("2 Timothy", "2Tim", 4),
        ("Titus", "Titus", 3), ("Philemon", "Phmn", 1), ("Hebrews", "Heb", 13),
        ("James", "Jas", 5), ("1 Peter", "1Pet", 5), ("2 Peter", "2Pet", 3), ("1 John", "1Jn", 5),
        ("2 John", "2Jn", 1), ("3 John", "3Jn", 1), ("Jude", "Jude", 1),
        ("Revelation", "Rev", 22),
    )
)  # fmt: skip
DEFAULT_TEST_BOOKS = ("John", "Hosea", "Galatians")
DEFAULT_VAL_BOOKS = ("Ruth", "Ecclesiastes", "Joel", "James")

_VERSE_LINE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


# -- reading ----------------------------------------------------------------------------------
@dataclass
class Book:
    """One book: ``chapters[c - 1]`` holds the text of chapter c's verses, in order."""

    name: str
    chapters: list[list[str]]

    @property
    def num_verses(self) -> int:
        return sum(len(chapter) for chapter in self.chapters)


def parse_bible(
    lines: Iterable[str],
    source: str,
    layout: Sequence[BookInfo] = KJV_BOOKS,
    total_verses: int | None = KJV_VERSES,
) -> list[Book]:
    """The books of a text printed like ``bible -f`` (``<abbr><chapter>:<verse> <text>`` per
    line), validated against `layout` (books in order with their chapter counts) and
    `total_verses` (None: not checked).

    Raises DataError naming `source` and the line for: a line in another format, a book out of
    order or missing, a chapter or verse number that is not the next one, an empty verse, a book
    with another number of chapters, another total of verses.
    """
    books: list[Book] = []
    index = -1  # position of the current book in `layout`
    chapter = verse = 0
    number = 0
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        match = _VERSE_LINE.match(line)
        if match is None:
            raise DataError(
                f"{source}, line {number}: expected '<book><chapter>:<verse> <text>' (e.g. "
                f"'Ge1:1 In the beginning…'), got {line[:60]!r}"
            )
        abbreviation, c, v, text = match[1], int(match[2]), int(match[3]), match[4].strip()
        where = f"{source}, line {number} ({abbreviation}{c}:{v})"
        current = layout[index] if index >= 0 else None
        if current is None or abbreviation != current.abbreviation:
            following = layout[index + 1] if index + 1 < len(layout) else None
            if following is None or abbreviation != following.abbreviation:
                expected = f"the next verse of {current.name}" if current else "the first book"
                if following is not None:
                    expected += f" or {following.name} ({following.abbreviation}1:1)"
                raise DataError(
                    f"{where}: books out of order or missing: expected {expected}; the text "
                    f"must hold the {len(layout)} books in canonical order"
                )
            if current is not None:
                _check_chapters(books[-1], current, where)
            index += 1
            books.append(Book(layout[index].name, []))
            chapter = verse = 0
        if c == chapter + 1 and v == 1:
            books[-1].chapters.append([])
            chapter, verse = c, 0
        if c != chapter or v != verse + 1:
            abbr = layout[index].abbreviation
            expected = f"{abbr}{chapter}:{verse + 1} or " if chapter else ""
            raise DataError(
                f"{where}: expected {expected}{abbr}{chapter + 1}:1; verses missing, repeated or "
                "out of order"
            )
        if not text:
            raise DataError(f"{where}: empty verse")
        books[-1].chapters[-1].append(text)
        verse = v
    if not books:
        raise DataError(f"{source}: no verses (an empty text)")
    _check_chapters(books[-1], layout[index], f"{source}, end of text (line {number})")
    if len(books) != len(layout):
        raise DataError(
            f"{source}: the text ends in {books[-1].name} after {len(books)} of {len(layout)} "
            f"books (missing: {layout[len(books)].name} … {layout[-1].name}); truncated?"
        )
    found = sum(book.num_verses for book in books)
    if total_verses is not None and found != total_verses:
        raise DataError(f"{source}: {found} verses, expected {total_verses}")
    return books


def _check_chapters(book: Book, info: BookInfo, where: str) -> None:
    if len(book.chapters) != info.chapters:
        raise DataError(
            f"{where}: {info.name} ends after {len(book.chapters)} chapters, expected "
            f"{info.chapters}; truncated or reordered text"
        )


def read_kjv(program: str | Path = "bible", text_file: str | Path | None = None) -> list[Book]:
    """The 66 books of the King James Bible, validated (`parse_bible`).

    Read from `text_file` when given (the ``bible -f`` format), else from the output of
    ``<program> -f Gen1:1-Rev22:21`` (Debian's ``bible-kjv``; `program` may be a path).
    Raises DataError naming the Debian packages when the program is absent or fails."""
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise DataError(f"KJV text file {path}: no such file")
        return parse_bible(path.read_text(encoding="utf-8").splitlines(), str(path))
    found = shutil.which(str(program))
    if found is None:
        raise DataError(
            f"the KJV text is read from the program {str(program)!r} of Debian's packages "
            f"{DEBIAN_PACKAGES}, which is not found; install them (`make data`, or `sudo apt-get "
            f"install {DEBIAN_PACKAGES}`), or give its path (data.text.program) or a text file "
            "in its format (data.text.text_file)"
        )
    command = [found, "-f", KJV_RANGE]
    try:
        result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DataError(f"`{' '.join(command)}` failed to run: {error}") from None
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()[:200]
        raise DataError(
            f"`{' '.join(command)}` exited with status {result.returncode} ({message}); are both "
            f"Debian packages {DEBIAN_PACKAGES} installed?"
        )
    try:
        text = result.stdout.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"`{' '.join(command)}` printed text that is not UTF-8: {error}") from None
    return parse_bible(text.splitlines(), f"`{' '.join(command)}`")


def resolve_book(name: str, layout: Sequence[BookInfo] = KJV_BOOKS) -> str:
    """The canonical name of the book `name` (a name or the ``bible`` abbreviation, any case);
    ValueError with close names for an unknown one."""
    wanted = " ".join(str(name).split()).casefold()
    for info in layout:
        if wanted in (info.name.casefold(), info.abbreviation.casefold()):
            return info.name
    names = [info.name for info in layout]
    hint = close_matches(str(name), names)
    did_you_mean = f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
    raise ValueError(
        f"unknown book {name!r}{did_you_mean} (books: {', '.join(names)}; the `bible` "
        "program's abbreviations such as 'Ge', 'Psa', '1Sm' work too)"
    )


def split_books(
    books: Sequence[Book],
    val_books: Sequence[str],
    test_books: Sequence[str],
    layout: Sequence[BookInfo] = KJV_BOOKS,
) -> tuple[list[Book], list[Book], list[Book]]:
    """(train, val, test): the books named in `val_books` / `test_books` (names or
    abbreviations) and the rest, each in canonical order. Deterministic; the three are disjoint
    and together hold every book. ValueError for an unknown or repeated book, a book in both
    held-out lists, an empty list, or no book left to train on."""
    held: dict[str, str] = {}
    for split, names in (("val", val_books), ("test", test_books)):
        if not names:
            raise ValueError(f"{split}_books is empty; name at least one book to hold out")
        for raw in names:
            name = resolve_book(raw, layout)
            if name in held:
                where = "twice" if held[name] == split else f"in both {held[name]} and {split}"
                raise ValueError(f"book {name} is named {where}_books; each held-out book once")
            held[name] = split
    present = {book.name for book in books}
    absent = [name for name in held if name not in present]
    if absent:
        raise ValueError(f"held-out book(s) {absent} are not in the text")
    parts: dict[str, list[Book]] = {"train": [], "val": [], "test": []}
    for book in books:
        parts[held.get(book.name, "train")].append(book)
    if not parts["train"]:
        raise ValueError("every book is held out: no book is left for training")
    return parts["train"], parts["val"], parts["test"]


def chapter_documents(books: Sequence[Book]) -> list[str]:
    """One document per chapter: its verses joined with a newline (see the module doc)."""
    return ["\n".join(chapter) for book in books for chapter in book.chapters]


# -- tokenizer --------------------------------------------------------------------------------
def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            f"text data needs the `tokenizers` package ({error}); install it with "
            "pip install 'kdistill[lm]' (or pip install tokenizers)"
        ) from None
    return tokenizers


def _settings(vocab_size: int, min_frequency: int) -> dict[str, Any]:
    return {
        "format": TOKENIZER_FORMAT,
        "model": "BPE",
        "pre_tokenizer": "ByteLevel(add_prefix_space=False)",
        "initial_alphabet": "all 256 bytes",
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "special_tokens": list(SPECIAL_TOKENS),
        "tokenizers": _tokenizers().__version__,
    }


def _check_vocab_size(vocab_size: int) -> None:
    smallest = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be an integer ≥ {smallest} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size!r}"
        )


def train_bpe(texts: Sequence[str], vocab_size: int = 2048, min_frequency: int = 2) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (see the module doc).

    Deterministic for the same texts and settings. Fewer than `vocab_size` tokens when the
    texts hold too few pairs seen `min_frequency` times."""
    _check_vocab_size(vocab_size)
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    _check_special_ids(tokenizer, "the trained tokenizer")
    return tokenizer


def _check_special_ids(tokenizer: Any, source: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise DataError(
                f"{source}: special token {token} has id {got}, expected {expected} "
                f"(ids fixed as {dict(zip(SPECIAL_TOKENS, range(3)))})"
            )


def text_digest(texts: Sequence[str], settings: dict[str, Any]) -> str:
    """sha256 over the settings (JSON) and every text (length-prefixed UTF-8)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def load_or_train_tokenizer(
    folder: str | Path | None,
    texts: Sequence[str],
    vocab_size: int = 2048,
    min_frequency: int = 2,
) -> tuple[Any, str]:
    """(tokenizer, status): the tokenizer saved in `folder` when it was trained on exactly
    `texts` with these settings (status "reused …"), else a new one trained on `texts` and
    saved there (status "trained …", with the reason). `folder` None: trained, not saved.

    The digest of texts and settings (`text_digest`) and the sha256 of ``tokenizer.json`` are
    kept in ``tokenizer.meta.json``; an edited file, other texts, another vocabulary size or
    another `tokenizers` version all retrain. A ``tokenizer.json`` without that record (not one
    kdistill trained) is never overwritten: DataError."""
    settings = _settings(vocab_size, min_frequency)
    digest = text_digest(texts, settings)
    if folder is None:
        return train_bpe(texts, vocab_size, min_frequency), "trained (not saved)"
    folder = Path(folder)
    path, meta_path = folder / TOKENIZER_FILE, folder / TOKENIZER_META
    reason = "none saved"
    if path.exists() and not meta_path.exists():
        raise DataError(
            f"{path} exists but has no {TOKENIZER_META}: it was not trained by kdistill and will "
            "not be overwritten; choose another tokenizer folder or remove it"
        )
    if meta_path.exists():
        reason = _saved_mismatch(path, meta_path, digest, settings)
        if reason is None:
            tokenizer = _tokenizers().Tokenizer.from_file(str(path))
            _check_special_ids(tokenizer, str(path))
            return tokenizer, f"reused {path} (same training text and settings)"
    tokenizer = train_bpe(texts, vocab_size, min_frequency)
    serialized = tokenizer.to_str()
    atomic_write_text(path, serialized)
    meta = {
        "digest": digest,
        "settings": settings,
        "vocab_size": tokenizer.get_vocab_size(),
        "special_ids": dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)))),
        "trained_on": f"{len(texts)} texts, {sum(len(t.encode()) for t in texts)} bytes",
        "tokenizer_sha256": hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return tokenizer, f"trained and saved to {path} ({reason})"


def _saved_mismatch(path: Path, meta_path: Path, digest: str, settings: dict) -> str | None:
    """Why the saved tokenizer cannot be reused, or None when it can."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {meta_path.name}: {error}"
    if not isinstance(meta, dict) or meta.get("digest") != digest:
        saved = meta.get("settings", {}) if isinstance(meta, dict) else {}
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        return f"settings changed: {changed}" if changed else "other training text"
    if not path.exists():
        return f"{path.name} missing"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != meta.get("tokenizer_sha256"):
        return f"{path.name} was modified after training"
    return None


def token_byte_lengths(tokenizer: Any) -> Tensor:
    """int64 `V`: the UTF-8 bytes each token id spells. Byte-level BPE tokens are strings of
    byte symbols, one symbol per byte; special tokens spell 0 bytes. DataError for a token
    that is not made of byte symbols (not a byte-level tokenizer)."""
    alphabet = set(_tokenizers().pre_tokenizers.ByteLevel.alphabet())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = torch.full((max(vocab.values()) + 1,), -1, dtype=torch.int64)
    for token, index in vocab.items():
        if token in SPECIAL_TOKENS:
            lengths[index] = 0
        elif all(symbol in alphabet for symbol in token):
            lengths[index] = len(token)
        else:
            raise DataError(
                f"token {token!r} (id {index}) is not made of byte-level symbols: bits per byte "
                "needs a byte-level BPE (kdistill.data.text.train_bpe)"
            )
    if bool((lengths < 0).any()):
        raise DataError("the tokenizer's ids are not contiguous from 0")
    return lengths


# -- blocks -----------------------------------------------------------------------------------
def encode_documents(tokenizer: Any, documents: Sequence[str]) -> Tensor:
    """int64 `T`: the documents' tokens, each document followed by ``<eos>``.

    Checked: the tokens of each document spell exactly its UTF-8 bytes in total (a tokenizer
    that adds, drops or normalises text fails here with a DataError)."""
    if not documents:
        raise DataError("no documents to encode")
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    lengths = token_byte_lengths(tokenizer)
    parts = []
    for number, (document, encoding) in enumerate(zip(documents, encodings, strict=True)):
        ids = torch.tensor(encoding.ids, dtype=torch.int64)
        spelled = int(lengths[ids].sum()) if len(ids) else 0
        if spelled != len(document.encode("utf-8")) or bool((ids < len(SPECIAL_TOKENS)).any()):
            raise DataError(
                f"document {number}: its {len(ids)} tokens spell {spelled} bytes but the text has "
                f"{len(document.encode('utf-8'))} (or it encodes to a special token); the "
                "tokenizer does not encode text losslessly byte by byte"
            )
        parts += [ids, torch.tensor([EOS_ID])]
    return torch.cat(parts)


def pack_blocks(
    tokens: Tensor,
    block_size: int,
    token_bytes: Tensor,
    name: str = "text",
) -> TokenBlocks:
    """`tokens` (int64 `T`) packed into blocks of `block_size` tokens, consecutive blocks
    overlapping by one token (block k = tokens[k·(L−1) : k·(L−1) + L]); the last block is padded
    with ``<pad>`` (attention_mask 0, labels −100). Every token but the first is a counted target
    (labels[:, 1:] ≠ −100) of exactly one block."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer ≥ 2, got {block_size!r}")
    tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if len(tokens) < 2:
        raise DataError(f"{name}: {len(tokens)} token(s): no next token to predict")
    stride = block_size - 1
    count = math.ceil((len(tokens) - 1) / stride)
    padded_length = (count - 1) * stride + block_size
    padded = torch.full((padded_length,), PAD_ID, dtype=torch.int64)
    padded[: len(tokens)] = tokens
    real = torch.zeros(padded_length, dtype=torch.int64)
    real[: len(tokens)] = 1
    input_ids = padded.unfold(0, block_size, stride).contiguous()
    attention_mask = real.unfold(0, block_size, stride).contiguous()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    num_bytes = _counted_bytes(labels, token_bytes)
    return TokenBlocks(input_ids, attention_mask, labels, num_bytes, token_bytes, name=name)


def _counted_bytes(labels: Tensor, token_bytes: Tensor) -> Tensor:
    """Per block: the bytes of its counted targets labels[:, 1:] ≠ −100 (int64 N)."""
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    return (token_bytes[targets.clamp(min=0)] * counted).sum(dim=1)


def text_blocks(
    documents: Sequence[str], tokenizer: Any, block_size: int, name: str = "text"
) -> TokenBlocks:
    """`encode_documents` then `pack_blocks` with the tokenizer's byte lengths."""
    tokens = encode_documents(tokenizer, documents)
    return pack_blocks(tokens, block_size, token_byte_lengths(tokenizer), name)


class TokenSequences:
    """What token datasets share (`TokenBlocks`, `kdistill.data.completions.PromptCompletions`):
    int64 ``N×L`` ``input_ids`` / ``attention_mask`` / ``labels`` (unshifted, −100 where not
    counted) and ``token_bytes`` (bytes per token id, V = the tokenizer's size)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    token_bytes: Tensor
    name: str
    FINGERPRINTED: tuple[str, ...] = ("input_ids", "attention_mask", "labels", "token_bytes")

    def check_layout(self, where: str, int64_fields: tuple[str, ...]) -> tuple[int, int]:
        """DataError unless every field in `int64_fields` is an int64 tensor and
        ``attention_mask`` / ``labels`` have the ``N×L`` shape of ``input_ids`` (L ≥ 2);
        returns (N, L). `where` names the dataset in the message."""
        for label in int64_fields:
            value = getattr(self, label)
            if not isinstance(value, Tensor) or value.dtype != torch.int64:
                raise DataError(f"{where}: {label} must be an int64 tensor, got {_kind(value)}")
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2 or shape[1] < 2:
            raise DataError(f"{where}: input_ids must be N×L with L ≥ 2, got shape {shape}")
        for label in ("attention_mask", "labels"):
            if tuple(getattr(self, label).shape) != shape:
                raise DataError(
                    f"{where}: {label} has shape {tuple(getattr(self, label).shape)}, input_ids "
                    f"{shape}; they must match"
                )
        return shape

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size (token ids lie in [0, vocab_size))."""
        return len(self.token_bytes)

    @property
    def block_size(self) -> int:
        """The sequences' length L (columns of ``input_ids``)."""
        return int(self.input_ids.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's ``input_ids``: ``(L,)``."""
        return (self.block_size,)

    @property
    def num_counted(self) -> int:
        """Counted next-token targets in all sequences (labels[:, 1:] ≠ −100)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def subset_index(self, indices: Sequence[int] | Tensor) -> Tensor:
        """`indices` as int64, checked to lie in [0, len) (IndexError naming the dataset)."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"{self.name!r}: indices must lie in [0, {len(self)})")
        return index

    def fingerprint(self) -> str:
        """sha256 over the tensors named in `FINGERPRINTED` (a cache key)."""
        digest = hashlib.sha256()
        for label in self.FINGERPRINTED:
            array = getattr(self, label).contiguous().numpy()
            digest.update(f"{label}:{array.dtype.str}:{tuple(array.shape)};".encode())
            digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()


@dataclass(eq=False)
class TokenBlocks(TokenSequences):
    """Token blocks for a causal LM, held in memory (see the module doc).

    ``input_ids``, ``attention_mask``, ``labels``: int64 ``N×L``; ``labels`` equals
    ``input_ids`` where ``attention_mask`` is 1 and is −100 elsewhere. ``num_bytes``: int64
    ``N``, UTF-8 bytes of each block's counted targets. ``token_bytes``: int64 ``V``, bytes each
    token id spells (``V`` = the tokenizer's size, `vocab_size`).

    `get_batch(indices)` gives ``({"input_ids", "attention_mask"}, labels)`` (kdistill's
    `BatchLoader`: the models are called as ``model(**inputs)``, the labels are the target);
    ``dataset[i]`` gives ``{"input_ids", "attention_mask", "labels", "index"}`` (int64 ``L``
    each, ``index`` 0-d) for a torch ``DataLoader``. All tensors are read-only by convention.
    Every invariant is checked at construction (DataError).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    num_bytes: Tensor
    token_bytes: Tensor
    name: str = "text"

    def __post_init__(self) -> None:
        where = f"token blocks {self.name!r}"
        shape = self.check_layout(
            where, ("input_ids", "attention_mask", "labels", "num_bytes", "token_bytes")
        )
        if tuple(self.num_bytes.shape) != shape[:1] or self.token_bytes.dim() != 1:
            raise DataError(
                f"{where}: num_bytes must be N = {shape[0]} and token_bytes 1-D, got "
                f"{tuple(self.num_bytes.shape)} and {tuple(self.token_bytes.shape)}"
            )
        if not bool(((self.attention_mask == 0) | (self.attention_mask == 1)).all()):
            raise DataError(f"{where}: attention_mask must hold only 0 and 1")
        expected = self.input_ids.masked_fill(self.attention_mask == 0, IGNORE_INDEX)
        if not torch.equal(self.labels, expected):
            raise DataError(
                f"{where}: labels must equal input_ids (unshifted) where attention_mask is 1 and "
                f"be {IGNORE_INDEX} elsewhere"
            )
        if len(self.input_ids) and (
            int(self.input_ids.min()) < 0 or int(self.input_ids.max()) >= self.vocab_size
        ):
            raise DataError(
                f"{where}: token ids must lie in [0, {self.vocab_size}) (the tokenizer's size), "
                f"found [{int(self.input_ids.min())}, {int(self.input_ids.max())}]"
            )
        recount = _counted_bytes(self.labels, self.token_bytes)
        if not torch.equal(recount, self.num_bytes):
            raise DataError(f"{where}: num_bytes differs from the bytes its counted labels spell")

    def __repr__(self) -> str:
        return (
            f"TokenBlocks(name={self.name!r}, blocks={len(self)}, block_size={self.block_size}, "
            f"counted_tokens={self.num_counted}, bytes={int(self.num_bytes.sum())}, "
            f"vocab_size={self.vocab_size})"
        )

    def get_batch(self, indices: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        inputs = {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
        }
        return inputs, self.labels[indices]

    def subset(self, indices: Sequence[int] | Tensor, name: str | None = None) -> TokenBlocks:
        """The blocks at `indices`, in that order."""
        index = self.subset_index(indices)
        return TokenBlocks(
            self.input_ids[index],
            self.attention_mask[index],
            self.labels[index],
            self.num_bytes[index],
            self.token_bytes,
            name=name if name is not None else f"{self.name}-subset",
        )


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


# -- the recipe's splits ----------------------------------------------------------------------
@dataclass
class TextSplits:
    """Text split three ways, the tokenizer, and a description: what `kjv_splits` returns
    (`TokenBlocks`) and `kdistill.data.completions.kjv_completion_splits` returns
    (`PromptCompletions`)."""

    train: TokenSequences
    val: TokenSequences
    test: TokenSequences
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def kjv_splits(
    *,
    vocab_size: int = 2048,
    block_size: int = 128,
    val_books: Sequence[str] = DEFAULT_VAL_BOOKS,
    test_books: Sequence[str] = DEFAULT_TEST_BOOKS,
    tokenizer_dir: str | Path | None = None,
    min_frequency: int = 2,
    program: str | Path = "bible",
    text_file: str | Path | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> TextSplits:
    """The KJV as train / val / test token blocks split by book (the recipe's ``data.dataset:
    kjv``): read and validate (`read_kjv`), split (`split_books`), one document per chapter,
    tokenizer trained on the training books only (`load_or_train_tokenizer` in
    `tokenizer_dir`), blocks of `block_size` tokens. `train_limit` / `test_limit`: keep a seeded
    random subset of that many blocks (quick runs); the tokenizer still learns from every
    training book."""
    from kdistill.data.arrays import take

    books = read_kjv(program, text_file)
    train_books, val_books_, test_books_ = split_books(books, val_books, test_books)
    documents = {
        "train": chapter_documents(train_books),
        "val": chapter_documents(val_books_),
        "test": chapter_documents(test_books_),
    }
    tokenizer, status = load_or_train_tokenizer(
        tokenizer_dir, documents["train"], vocab_size, min_frequency
    )
    blocks = {
        split: text_blocks(docs, tokenizer, block_size, name=f"kjv-{split}")
        for split, docs in documents.items()
    }
    full = {split: (data.num_counted, int(data.num_bytes.sum())) for split, data in blocks.items()}
    blocks["train"] = take(blocks["train"], train_limit, seed=seed, stratify=False)
    blocks["test"] = take(blocks["test"], test_limit, seed=seed, stratify=False)
    chosen = {"train": train_books, "val": val_books_, "test": test_books_}
    info = {
        "corpus": "King James Bible (Debian bible-kjv-text), one document per chapter",
        "text_sha256": text_digest(
            [v for book in books for chapter in book.chapters for v in chapter], {}
        ),
        "tokenizer": {
            "status": status,
            "vocab_size": tokenizer.get_vocab_size(),
            "special_ids": dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)))),
        },
        "block_size": block_size,
        "splits": {
            split: {
                "books": [book.name for book in chosen[split]],
                "chapters": len(documents[split]),
                "tokens": full[split][0] + 1,  # every one but the first is a counted target
                "bytes": full[split][1],
                "bytes_per_token": full[split][1] / full[split][0],
                "blocks_used": len(blocks[split]),
            }
            for split in ("train", "val", "test")
        },
    }
    return TextSplits(blocks["train"], blocks["val"], blocks["test"], tokenizer, info)
