"""Token kinds: language modelling (target ``tokens``: `TokenBlocks`) and prompt → completion
(target ``completions``: `PromptCompletions`), in Hugging Face's and TRL's conventions.

Language modelling:

- ``text``: plain UTF-8 text files ``root/train.txt``, ``root/test.txt`` (optional
  ``root/val.txt``), or one ``file:`` split by documents at stated ``fractions: {val: f, test:
  f}`` (contiguous: the first documents train, then val, then test — no shuffling, so a
  document's neighbours stay in its split). Documents are separated by a blank line
  (``documents: paragraph``, the default), one per line (``line``) or one per file (``file``).
- ``jsonl``: ``root/train.jsonl`` … (or ``train:``, ``test:``, ``val:`` files), one JSON object
  per line with the document under ``text`` (``field:``).
- ``factory``: ``(train, test)`` (or with val) of `TokenBlocks`, or of token-id sequences (one
  document each).

Each document's tokens are followed by the tokenizer's end-of-sequence token and the stream is
packed into blocks of ``block_size`` (`kdistill.data.text.pack_blocks`). The tokenizer is the one
given (`read(..., tokenizer=)`: the teacher's); without one, kdistill's byte-level BPE is trained
on the training documents (``vocab_size``, ``min_frequency``, kept in ``tokenizer_dir``).

Prompt → completion (``jsonl``): each line ``{"prompt": str, "completion": str}`` (TRL's
prompt-completion convention: the loss on the completion and the end token that closes it) or
``{"messages": [{"role", "content"}, …]}`` (conversational): rendered with the tokenizer's chat
template when it has one (else ``"role: content\\n"`` lines), one sequence per assistant turn —
the conversation up to that turn is the prompt, the turn is the completion — so the loss is on
assistant turns only, each counted once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdistill.data.completions import PromptCompletions, sequences_from_parts
from kdistill.data.kinds.base import (
    DataSplits,
    FileKind,
    existing_dir,
    existing_file,
    need,
    register_kind,
)
from kdistill.data.kinds.classification import FactoryKind, split_digest
from kdistill.data.kinds.tokenizer import TextTokenizer, as_text_tokenizer
from kdistill.data.text import TokenBlocks, pack_blocks
from kdistill.errors import ConfigError, DataError

__all__ = ["completion_sequences", "document_blocks", "split_documents"]

SPLITS = ("train", "val", "test")
DOCUMENT_MODES = ("paragraph", "line", "file")


# -- reading files ----------------------------------------------------------------------------
def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: byte {error.start} is not UTF-8 ({error.reason}); save the text as UTF-8"
        ) from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error})") from None


def split_documents(text: str, mode: str) -> list[str]:
    """The documents of a text: blank-line separated paragraphs, non-empty lines, or the whole
    text; each stripped of surrounding white space, empty ones dropped."""
    if mode == "paragraph":
        parts = re.split(r"\n[ \t\r]*\n", text)
    elif mode == "line":
        parts = text.splitlines()
    elif mode == "file":
        parts = [text]
    else:
        raise ConfigError(f"data.documents: one of {list(DOCUMENT_MODES)}, got {mode!r}")
    return [part.strip() for part in parts if part.strip()]


def jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-empty line of a JSON-lines file."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {line[:60]!r}")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records (an empty file)")
    return records


def _string(record: Mapping[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: no {key!r} field (the record has {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _split_files(spec: Mapping[str, Any], kind: str, suffix: str, layout: str) -> dict[str, Path]:
    """{split: file} from ``root`` (root/train<suffix> …) or from ``train:``/``test:``/``val:``."""
    if spec.get("root") is not None:
        root = existing_dir(spec["root"], "root", kind, layout)
        found = {s: root / f"{s}{suffix}" for s in SPLITS if (root / f"{s}{suffix}").is_file()}
        for split in ("train", "test"):
            if split not in found:
                raise DataError(
                    f"{root / (split + suffix)}: no such file; data kind {kind} reads {layout}"
                )
        return found
    found = {}
    for split in SPLITS:
        if spec.get(split) is None:
            if split == "val":
                continue
            need(spec, split, kind, f"a {suffix} file (or root: a folder holding train{suffix})")
        found[split] = existing_file(spec[split], split, kind, layout)
    return found


# -- tokens -----------------------------------------------------------------------------------
def _tokenizer_for(
    spec: Mapping[str, Any], tokenizer: Any, train_texts: Sequence[str]
) -> tuple[TextTokenizer, str]:
    if tokenizer is not None:
        return as_text_tokenizer(tokenizer), "given"
    from kdistill.data.text import load_or_train_tokenizer

    trained, status = load_or_train_tokenizer(
        spec.get("tokenizer_dir"),
        list(train_texts),
        int(spec.get("vocab_size", 2048)),
        int(spec.get("min_frequency", 2)),
    )
    return as_text_tokenizer(trained), status


def _check_lossless(tok: TextTokenizer, text: str, ids: Sequence[int], where: str) -> None:
    """A byte-level tokenizer's tokens must spell exactly the text's bytes (no special token,
    nothing dropped or normalised)."""
    if not tok.byte_level:
        return
    spelled = int(tok.token_bytes[torch.tensor(ids, dtype=torch.int64)].sum()) if ids else 0
    wanted = len(text.encode("utf-8"))
    if spelled != wanted:
        raise DataError(
            f"{where}: its {len(ids)} tokens spell {spelled} bytes but the text has {wanted}: "
            "the text holds a special token's text (e.g. <|endoftext|>) or the tokenizer "
            "normalises it; remove it from the text"
        )


def document_blocks(
    documents: Sequence[tuple[str, str]], tok: TextTokenizer, block_size: int, name: str
) -> TokenBlocks:
    """(where, text) documents → `TokenBlocks`: each document's tokens then ``eos``, packed."""
    if tok.eos_id is None:
        raise DataError(
            f"{name}: the tokenizer has no end-of-sequence token to separate documents; give one "
            "with an eos token (or a tokenizers.Tokenizer holding <eos>)"
        )
    if not documents:
        raise DataError(f"{name}: no documents")
    encoded = tok.encode([text for _, text in documents])
    stream: list[int] = []
    for (where, text), ids in zip(documents, encoded, strict=True):
        _check_lossless(tok, text, ids, where)
        stream += list(ids) + [tok.eos_id]
    return pack_blocks(torch.tensor(stream, dtype=torch.int64), block_size, tok.token_bytes, name)


def _block_size(spec: Mapping[str, Any]) -> int:
    size = spec.get("block_size", 128)
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ConfigError(f"data.block_size: tokens per block, an integer ≥ 2, got {size!r}")
    return size


def _fractions(spec: Mapping[str, Any]) -> dict[str, float]:
    given = spec.get("fractions")
    if not isinstance(given, Mapping) or "test" not in given:
        raise ConfigError(
            "data.fractions: one file is split by documents at stated fractions: give "
            "fractions: {test: 0.1} (and val: 0.1 for a validation split)"
        )
    unknown = sorted(set(given) - {"val", "test"})
    if unknown:
        raise ConfigError(f"data.fractions: only val and test, got {unknown}")
    fractions = {k: float(v) for k, v in given.items()}
    if any(not 0 < v < 1 for v in fractions.values()) or sum(fractions.values()) >= 1:
        raise ConfigError(
            f"data.fractions: each in (0, 1), together below 1 (the rest trains), got {fractions}"
        )
    return fractions


def split_by_fractions(
    documents: list[tuple[str, str]], fractions: Mapping[str, float], where: str
) -> dict[str, list[tuple[str, str]]]:
    """Contiguous split: train first, then val, then test; each held-out split gets
    ``round(f · n)`` documents (at least 1)."""
    n = len(documents)
    counts = {k: max(1, round(fractions[k] * n)) for k in ("val", "test") if k in fractions}
    train = n - sum(counts.values())
    if train < 1:
        raise DataError(
            f"{where}: {n} documents cannot be split at {dict(fractions)} and leave one to train "
            "on (separate documents with a blank line, or choose documents: line)"
        )
    out = {"train": documents[:train]}
    start = train
    for split in ("val", "test"):
        if split in counts:
            out[split] = documents[start : start + counts[split]]
            start += counts[split]
    return out


class TextKind(FileKind):
    name = "text"
    target = "tokens"
    layout = (
        "root/train.txt, root/test.txt (optional root/val.txt), or one file: split by documents "
        "at fractions: {val: f, test: f}; documents separated by a blank line"
    )
    options = ("root", "file", "fractions", "documents", "block_size", "vocab_size",
               "min_frequency", "tokenizer_dir")  # fmt: skip
    fingerprinted = ("fractions", "documents", "block_size")

    def check(self, spec: Mapping[str, Any]) -> None:
        _block_size(spec)
        split_documents("", spec.get("documents", "paragraph"))
        if (spec.get("root") is None) == (spec.get("file") is None):
            raise ConfigError(
                "data: data kind text reads root: (a folder holding train.txt and test.txt) or "
                "file: (one text split at fractions), one of the two"
            )
        if spec.get("file") is not None:
            _fractions(spec)
        self.files(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        if spec.get("file") is not None:
            return [existing_file(spec["file"], "file", self.name, self.layout)]
        return list(_split_files(spec, self.name, ".txt", self.layout).values())

    def documents(self, spec: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
        mode = spec.get("documents", "paragraph")
        if spec.get("file") is not None:
            path = existing_file(spec["file"], "file", self.name, self.layout)
            docs = split_documents(read_text(path), mode)
            numbered = [(f"{path}, document {i + 1}", d) for i, d in enumerate(docs)]
            return split_by_fractions(numbered, _fractions(spec), str(path))
        out = {}
        for split, path in _split_files(spec, self.name, ".txt", self.layout).items():
            docs = split_documents(read_text(path), mode)
            if not docs:
                raise DataError(f"{path}: no text")
            out[split] = [(f"{path}, document {i + 1}", d) for i, d in enumerate(docs)]
        return out

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        return _token_splits(self, spec, self.documents(spec), tokenizer)


def _token_splits(
    kind: FileKind, spec: Mapping[str, Any], documents: dict, tokenizer: Any
) -> DataSplits:
    fingerprint = kind.fingerprint(spec)
    tok, status = _tokenizer_for(spec, tokenizer, [t for _, t in documents["train"]])
    size = _block_size(spec)
    blocks = {
        split: document_blocks(docs, tok, size, f"{kind.name}-{split}")
        for split, docs in documents.items()
    }
    info = {
        "kind": kind.name,
        "files": [str(p) for p in kind.files(spec)],
        "tokenizer": {"status": status, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "bits_per_byte": "computed" if tok.byte_level else "n/a (tokenizer not byte-level)",
        "block_size": size,
        "splits": {
            split: {
                "documents": len(documents[split]),
                "blocks": len(b),
                "tokens": b.num_counted + 1,
            }
            for split, b in blocks.items()
        },
    }
    return DataSplits(
        blocks["train"], blocks["test"], blocks.get("val"), fingerprint, info, tok.raw
    )


class JsonlTextKind(FileKind):
    name = "jsonl"
    target = "tokens"
    layout = (
        "root/train.jsonl, root/test.jsonl (optional val.jsonl) or train:/test:/val: files; "
        'one {"text": …} per line'
    )
    options = ("root", "train", "test", "val", "field", "block_size", "vocab_size",
               "min_frequency", "tokenizer_dir")  # fmt: skip
    fingerprinted = ("field", "block_size")

    def check(self, spec: Mapping[str, Any]) -> None:
        _block_size(spec)
        self.files(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        return list(_split_files(spec, self.name, ".jsonl", self.layout).values())

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        key = str(spec.get("field", "text"))
        documents = {}
        for split, path in _split_files(spec, self.name, ".jsonl", self.layout).items():
            documents[split] = [
                (f"{path}, line {n}", _string(record, key, f"{path}, line {n}"))
                for n, record in jsonl_records(path)
            ]
        return _token_splits(self, spec, documents, tokenizer)


class TokenFactoryKind(FactoryKind):
    target = "tokens"
    layout = (
        "factory: package.module:function returning (train, test) TokenBlocks, or sequences of "
        "token ids (one document each; eos appended)"
    )
    options = ("factory", "kwargs", "block_size", "vocab_size", "eos_id")

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        path = str(spec["factory"])
        sources = dict(zip(SPLITS, self.call(spec)))
        tok = as_text_tokenizer(tokenizer) if tokenizer is not None else None
        splits = {}
        for split, source in sources.items():
            if source is None:
                continue
            if isinstance(source, TokenBlocks):
                splits[split] = source
                continue
            vocab = tok.vocab_size if tok else spec.get("vocab_size")
            eos = tok.eos_id if tok else spec.get("eos_id")
            if vocab is None or eos is None:
                raise ConfigError(
                    f"data: {path} returns token sequences; their vocabulary size and end token "
                    "come from the tokenizer, or give data.vocab_size and data.eos_id"
                )
            token_bytes = tok.token_bytes if tok else torch.zeros(int(vocab), dtype=torch.int64)
            stream: list[int] = []
            for index in range(len(source)):
                ids = torch.as_tensor(source[index]).reshape(-1)
                if ids.is_floating_point() or ids.dtype == torch.bool:
                    raise DataError(
                        f"{path} {split}, sequence {index}: token ids must be integers, got "
                        f"{ids.dtype}"
                    )
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= int(vocab)):
                    raise DataError(
                        f"{path} {split}, sequence {index}: token ids must lie in [0, {vocab}), "
                        f"found [{int(ids.min())}, {int(ids.max())}]"
                    )
                stream += ids.tolist() + [int(eos)]
            splits[split] = pack_blocks(
                torch.tensor(stream, dtype=torch.int64),
                _block_size(spec),
                token_bytes,
                f"factory-{split}",
            )
        extra = {"factory": path, "kwargs": spec.get("kwargs") or {}, "target": self.target}
        info = {"kind": self.name, **extra}
        return DataSplits(
            splits["train"], splits["test"], splits.get("val"),
            split_digest(self.name, extra, *splits.values()), info, tokenizer,
        )  # fmt: skip


# -- completions ------------------------------------------------------------------------------
def _messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for number, message in enumerate(messages):
        spot = f"{where}: messages[{number}]"
        if not isinstance(message, Mapping):
            raise DataError(f'{spot}: expected {{"role": …, "content": …}}, got {message!r}')
        _string(message, "role", spot)
        _string(message, "content", spot)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; the loss is on assistant turns")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def completion_pairs(
    records: Sequence[tuple[str, Mapping[str, Any]]], tok: TextTokenizer
) -> list[tuple[str, str, str, bool]]:
    """(where, prompt text, completion text, is chat) per sequence (one per assistant turn)."""
    pairs = []
    for where, record in records:
        if "messages" in record:
            messages = _messages(record, where)
            for turn, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = tok.chat(messages[:turn], add_generation_prompt=True)
                full = tok.chat(messages[: turn + 1], add_generation_prompt=False)
                if not full.startswith(prompt):
                    raise DataError(
                        f"{where}: the chat template renders messages[:{turn + 1}] without "
                        f"messages[:{turn}] + the generation prompt as its start; the "
                        "assistant turn cannot be told apart from the prompt"
                    )
                pairs.append((f"{where}, turn {turn}", prompt, full[len(prompt) :], True))
        elif "prompt" in record or "completion" in record:
            pairs.append(
                (
                    where,
                    _string(record, "prompt", where),
                    _string(record, "completion", where),
                    False,
                )
            )
        else:
            raise DataError(
                f'{where}: expected {{"prompt", "completion"}} or {{"messages"}} (TRL\'s '
                f"conventions), got fields {sorted(record)}"
            )
    return pairs


def completion_sequences(
    pairs: Sequence[tuple[str, str, str, bool]], tok: TextTokenizer, max_length: int, name: str
) -> tuple[PromptCompletions, int]:
    """`PromptCompletions` of (where, prompt, completion, chat) and the number left out for
    being longer than `max_length`. A plain prompt starts with the tokenizer's start token when
    it has one (a chat template writes its own); a completion ends with the end token."""
    if tok.eos_id is None:
        raise DataError(f"{name}: the tokenizer has no end-of-sequence token to end completions")
    prompts_ids = tok.encode([p for _, p, _, _ in pairs])
    completions_ids = tok.encode([c for _, _, c, _ in pairs])
    kept_prompts, kept_completions, texts = [], [], []
    dropped = 0
    for (where, prompt, completion, chat), p_ids, c_ids in zip(pairs, prompts_ids, completions_ids):
        if not chat:  # a chat template writes special tokens on purpose
            _check_lossless(tok, prompt, p_ids, f"{where} (prompt)")
            _check_lossless(tok, completion, c_ids, f"{where} (completion)")
        start = [tok.bos_id] if tok.bos_id is not None and not chat else []
        prompt_ids = start + list(p_ids)
        completion_ids = list(c_ids)
        if not completion_ids or completion_ids[-1] != tok.eos_id:
            completion_ids.append(tok.eos_id)
        if not prompt_ids:
            raise DataError(f"{where}: the prompt is empty and the tokenizer has no start token")
        if len(prompt_ids) + len(completion_ids) > max_length:
            dropped += 1
            continue
        kept_prompts.append(torch.tensor(prompt_ids, dtype=torch.int64))
        kept_completions.append(torch.tensor(completion_ids, dtype=torch.int64))
        texts.append((prompt, completion))
    if not kept_prompts:
        raise DataError(f"{name}: no sequence fits in max_length={max_length} tokens")
    input_ids, attention_mask, labels = sequences_from_parts(kept_prompts, kept_completions)
    if input_ids.shape[1] < 2:
        input_ids, attention_mask, labels = sequences_from_parts(kept_prompts, kept_completions, 2)
    lengths = torch.tensor([len(p) for p in kept_prompts], dtype=torch.int64)
    data = PromptCompletions(
        input_ids, attention_mask, labels, lengths, tok.token_bytes, name=name, texts=texts,
        end_id=tok.eos_id,
    )  # fmt: skip
    return data, dropped


def _max_length(spec: Mapping[str, Any]) -> int:
    size = spec.get("max_length", 256)
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ConfigError(
            f"data.max_length: longest sequence in tokens, an integer ≥ 2, got {size!r}"
        )
    return size


class CompletionJsonlKind(FileKind):
    name = "jsonl"
    target = "completions"
    layout = (
        "root/train.jsonl, root/test.jsonl (optional val.jsonl) or train:/test:/val: files; one "
        '{"prompt", "completion"} or {"messages": [{role, content}, …]} per line'
    )
    options = ("root", "train", "test", "val", "max_length", "vocab_size", "min_frequency",
               "tokenizer_dir")  # fmt: skip
    fingerprinted = ("max_length",)

    def check(self, spec: Mapping[str, Any]) -> None:
        _max_length(spec)
        self.files(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        return list(_split_files(spec, self.name, ".jsonl", self.layout).values())

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        fingerprint = self.fingerprint(spec)
        records = {
            split: [(f"{path}, line {n}", r) for n, r in jsonl_records(path)]
            for split, path in _split_files(spec, self.name, ".jsonl", self.layout).items()
        }
        if tokenizer is None:
            texts = [
                text
                for _, r in records["train"]
                for text in (
                    [m.get("content", "") for m in r.get("messages", [])]
                    or [r.get("prompt", ""), r.get("completion", "")]
                )
                if isinstance(text, str)
            ]
            tok, status = _tokenizer_for(spec, None, texts)
        else:
            tok, status = as_text_tokenizer(tokenizer), "given"
        size = _max_length(spec)
        splits, counts = {}, {}
        for split, found in records.items():
            pairs = completion_pairs(found, tok)
            splits[split], dropped = completion_sequences(pairs, tok, size, f"{self.name}-{split}")
            counts[split] = {"sequences": len(pairs), "dropped": dropped}
        info = {
            "kind": self.name,
            "files": [str(p) for p in self.files(spec)],
            "tokenizer": {"status": status, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                          "chat_template": tok.has_chat_template},
            "max_length": size,
            "splits": counts,
        }  # fmt: skip
        return DataSplits(
            splits["train"], splits["test"], splits.get("val"), fingerprint, info, tok.raw
        )


class CompletionFactoryKind(FactoryKind):
    target = "completions"
    layout = (
        "factory: package.module:function returning (train, test) PromptCompletions, or "
        "sequences of (prompt_ids, completion_ids) (the completion counted as given)"
    )
    options = ("factory", "kwargs", "vocab_size")

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        path = str(spec["factory"])
        tok = as_text_tokenizer(tokenizer) if tokenizer is not None else None
        splits = {}
        for split, source in zip(SPLITS, self.call(spec)):
            if source is None:
                continue
            if isinstance(source, PromptCompletions):
                splits[split] = source
                continue
            vocab = tok.vocab_size if tok else spec.get("vocab_size")
            if vocab is None:
                raise ConfigError(
                    f"data: {path} returns token pairs; give the tokenizer or data.vocab_size"
                )
            prompts, completions = [], []
            for index in range(len(source)):
                item = source[index]
                if not isinstance(item, tuple | list) or len(item) != 2:
                    raise DataError(
                        f"{path} {split}, item {index}: expected (prompt_ids, completion_ids)"
                    )
                prompts.append(torch.as_tensor(item[0], dtype=torch.int64).reshape(-1))
                completions.append(torch.as_tensor(item[1], dtype=torch.int64).reshape(-1))
            ids, mask, labels = sequences_from_parts(prompts, completions)
            token_bytes = tok.token_bytes if tok else torch.zeros(int(vocab), dtype=torch.int64)
            lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
            splits[split] = PromptCompletions(
                ids, mask, labels, lengths, token_bytes, f"factory-{split}"
            )
        extra = {"factory": path, "kwargs": spec.get("kwargs") or {}, "target": self.target}
        return DataSplits(
            splits["train"], splits["test"], splits.get("val"),
            split_digest(self.name, extra, *splits.values()),
            {"kind": self.name, **extra},
            tokenizer,
        )  # fmt: skip


# -- the built-in KJV -------------------------------------------------------------------------
class KjvKind:
    """The King James Bible (`kdistill.data.text.kjv_splits` / `kdistill.data.completions.
    kjv_completion_splits`), split by book; settings under ``text:`` (a recipe's
    ``data.text``) or at the top level."""

    name_of = {"tokens": "kjv", "completions": "kjv_completions"}
    layout = "the King James Bible from Debian's bible-kjv (program or text_file), split by book"
    options = ("text", "train_limit", "test_limit", "val_limit", "tokenizer_dir", "vocab_size",
               "block_size", "max_length", "val_books", "test_books", "min_frequency", "program",
               "text_file", "start_token", "end_token")  # fmt: skip

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = self.name_of[target]

    def __repr__(self) -> str:
        return f"<data kind {self.name} ({self.target}): {self.layout}>"

    def settings(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        settings = dict(spec.get("text") or {})
        settings.update({k: spec[k] for k in self.options if k in spec and k != "text"})
        return settings

    def check(self, spec: Mapping[str, Any]) -> None:
        pass

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        text_file = self.settings(spec).get("text_file")
        return [Path(text_file)] if text_file else []

    def fingerprint(self, spec: Mapping[str, Any]) -> str:
        from kdistill.data.text import read_kjv, text_digest

        s = self.settings(spec)
        books = read_kjv(s.get("program", "bible"), s.get("text_file"))
        verses = [verse for book in books for chapter in book.chapters for verse in chapter]
        return self._digest(text_digest(verses, {}), s)

    def _digest(self, text_sha256: str, settings: Mapping[str, Any]) -> str:
        extra = json.dumps({"kind": self.name, **settings}, sort_keys=True, default=str)
        return hashlib.sha256((text_sha256 + extra).encode()).hexdigest()

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        from kdistill.data.completions import kjv_completion_splits
        from kdistill.data.text import BOS_ID, EOS_ID, kjv_splits

        if tokenizer is not None:
            raise ConfigError(
                f"data kind {self.name} trains its own BPE on the training books; a given "
                "tokenizer is read by kinds text / jsonl"
            )
        s = self.settings(spec)
        common = {k: s[k] for k in ("vocab_size", "val_books", "test_books", "tokenizer_dir",
                                   "min_frequency", "program", "text_file", "train_limit",
                                   "test_limit") if k in s}  # fmt: skip
        if self.target == "completions":
            found = kjv_completion_splits(
                max_length=s.get("max_length", 128),
                start_id=BOS_ID if s.get("start_token", "bos") == "bos" else EOS_ID,
                end_token=s.get("end_token", "eos"),
                seed=seed,
                val_limit=s.get("val_limit"),
                **common,
            )
        else:
            found = kjv_splits(block_size=s.get("block_size", 128), seed=seed, **common)
        fingerprint = self._digest(found.info["text_sha256"], s)
        return DataSplits(
            found.train, found.test, found.val, fingerprint, dict(found.info), found.tokenizer
        )


register_kind(KjvKind("tokens"))
register_kind(TextKind())
register_kind(JsonlTextKind())
register_kind(TokenFactoryKind())
register_kind(KjvKind("completions"))
register_kind(CompletionJsonlKind())
register_kind(CompletionFactoryKind())
