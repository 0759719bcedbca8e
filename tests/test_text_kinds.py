"""Token data kinds (issue 25 part A): text folders, one file split by documents, `.jsonl` with
`text`, prompt → completion and chat `messages` (TRL's conventions), token factories. Expected
token streams are built here by encoding each document with the same tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.data.completions import PromptCompletions
from kdistill.data.kinds import as_text_tokenizer, read_data, resolve
from kdistill.data.text import IGNORE_INDEX, TokenBlocks, train_bpe
from kdistill.errors import ConfigError, DataError

pytest.importorskip("tokenizers")

CORPUS = [
    "In the beginning was the word.",
    "The quick brown fox jumps over the lazy dog.",
    "A tiny corpus, written by hand for the tests.",
    "Every document ends with an end token.",
    "Blocks overlap by one token.",
    "Nothing is downloaded.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS * 3, vocab_size=300, min_frequency=1)


def stream_of(blocks: TokenBlocks) -> list[int]:
    """The token stream packed into `blocks` (block k starts at token k·(L − 1))."""
    tokens = blocks.input_ids[0][blocks.attention_mask[0] == 1].tolist()
    for row in range(1, len(blocks)):
        real = blocks.input_ids[row][blocks.attention_mask[row] == 1].tolist()
        tokens += real[1:]
    return tokens


def expected_stream(tokenizer, documents) -> list[int]:
    out = []
    for document in documents:
        out += tokenizer.encode(document, add_special_tokens=False).ids + [2]  # <eos> = 2
    return out


def test_text_folder_with_a_given_tokenizer(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("\n\n".join(CORPUS[:4]) + "\n")
    (tmp_path / "test.txt").write_text(CORPUS[4] + "\n\n\n" + CORPUS[5])
    splits = read_data(
        "tokens", {"kind": "text", "root": str(tmp_path), "block_size": 8}, tokenizer=tokenizer
    )
    assert isinstance(splits.train, TokenBlocks) and splits.val is None
    assert stream_of(splits.train) == expected_stream(tokenizer, CORPUS[:4])
    assert stream_of(splits.test) == expected_stream(tokenizer, CORPUS[4:])
    assert splits.train.block_size == 8 and splits.tokenizer is tokenizer
    # byte-level: bits per byte computable, the counted bytes are the text's (+ 0 per <eos>)
    counted = sum(len(d.encode()) for d in CORPUS[:4])
    first = len(tokenizer.encode(CORPUS[0], add_special_tokens=False).ids[0:1])
    first_bytes = len(tokenizer.id_to_token(tokenizer.encode(CORPUS[0]).ids[0]))
    assert int(splits.train.num_bytes.sum()) == counted - first_bytes and first == 1


def test_one_file_split_by_documents_at_fractions(tmp_path, tokenizer):
    documents = [f"Document number {k} of ten." for k in range(10)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(documents))
    spec = {
        "kind": "text",
        "file": str(tmp_path / "corpus.txt"),
        "fractions": {"val": 0.2, "test": 0.1},
    }
    splits = read_data("tokens", {**spec, "block_size": 16}, tokenizer=tokenizer)
    # contiguous: 10 − round(2) − round(1) = 7 train, then 2 val, then 1 test
    assert stream_of(splits.train) == expected_stream(tokenizer, documents[:7])
    assert stream_of(splits.val) == expected_stream(tokenizer, documents[7:9])
    assert stream_of(splits.test) == expected_stream(tokenizer, documents[9:])
    lines = read_data("tokens", {**spec, "documents": "line"}, tokenizer=tokenizer)
    assert lines.info["splits"]["train"]["documents"] == 7  # the blank lines are not documents
    with pytest.raises(ConfigError, match=r"data\.fractions: .*test"):
        resolve("tokens", {"kind": "text", "file": str(tmp_path / "corpus.txt")})
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DataError, match=r"one\.txt: 1 documents cannot be split"):
        read_data("tokens", {**spec, "file": str(tmp_path / "one.txt")}, tokenizer=tokenizer)


def test_text_without_a_tokenizer_trains_the_bpe_on_the_training_split(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n".join(CORPUS * 2))
    (tmp_path / "test.txt").write_text(CORPUS[0])
    spec = {
        "kind": "text",
        "root": str(tmp_path),
        "vocab_size": 280,
        "tokenizer_dir": str(tmp_path / "tok"),
    }
    splits = read_data("tokens", spec)
    assert splits.tokenizer is not None and (tmp_path / "tok/tokenizer.json").is_file()
    assert splits.info["tokenizer"]["status"].startswith("trained")
    assert stream_of(splits.test) == expected_stream(splits.tokenizer, CORPUS[:1])


def test_text_errors(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_bytes(b"good\n\nbad \xff byte")
    (tmp_path / "test.txt").write_text("x")
    with pytest.raises(DataError, match=r"train\.txt: byte 10 is not UTF-8"):
        read_data("tokens", {"kind": "text", "root": str(tmp_path)}, tokenizer=tokenizer)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match=r"test\.txt: no such file; data kind text reads"):
        resolve("tokens", {"kind": "text", "root": str(tmp_path)})
    (tmp_path / "train.txt").write_text("a document holding <eos> as text")
    (tmp_path / "test.txt").write_text("fine")
    with pytest.raises(DataError, match=r"train\.txt, document 1: its .* tokens spell"):
        read_data("tokens", {"kind": "text", "root": str(tmp_path)}, tokenizer=tokenizer)


def jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_text_field_and_errors(tmp_path, tokenizer):
    jsonl(tmp_path / "train.jsonl", [{"text": d, "id": k} for k, d in enumerate(CORPUS[:3])])
    jsonl(tmp_path / "test.jsonl", [{"text": CORPUS[3]}])
    splits = read_data("tokens", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer)
    assert stream_of(splits.train) == expected_stream(tokenizer, CORPUS[:3])
    jsonl(tmp_path / "test.jsonl", [{"text": CORPUS[3]}, {"body": "x"}])
    with pytest.raises(
        DataError, match=r"test\.jsonl, line 2: no 'text' field \(the record has \['body'\]\)"
    ):
        read_data("tokens", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer)
    (tmp_path / "test.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"test\.jsonl, line 2: not JSON"):
        read_data("tokens", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer)


def test_prompt_completion_labels_only_the_completion_and_its_end(tmp_path, tokenizer):
    records = [{"prompt": "The quick brown", "completion": " fox jumps"}]
    jsonl(tmp_path / "train.jsonl", records)
    jsonl(tmp_path / "test.jsonl", records)
    splits = read_data("completions", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer)
    data = splits.train
    assert isinstance(data, PromptCompletions)
    prompt = tokenizer.encode("The quick brown", add_special_tokens=False).ids
    completion = tokenizer.encode(" fox jumps", add_special_tokens=False).ids
    # <bos> = 1, prompt, completion, <eos> = 2; labels −100 on <bos> + prompt
    assert data.input_ids[0].tolist() == [1, *prompt, *completion, 2]
    assert data.labels[0].tolist() == [IGNORE_INDEX] * (1 + len(prompt)) + [*completion, 2]
    assert int(data.prompt_lengths[0]) == 1 + len(prompt)


def test_chat_messages_one_sequence_per_assistant_turn(tmp_path, tokenizer):
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "so long"},
        ]
    }
    jsonl(tmp_path / "train.jsonl", [chat])
    jsonl(tmp_path / "test.jsonl", [chat])
    data = read_data(
        "completions", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer
    ).train
    # no chat template: "role: content\n" lines, "assistant: " opens the turn
    assert len(data) == 2
    prompts = ["user: hi\nassistant: ", "user: hi\nassistant: hello\nuser: bye\nassistant: "]
    completions = ["hello\n", "so long\n"]
    for row in range(2):
        p = tokenizer.encode(prompts[row], add_special_tokens=False).ids
        c = tokenizer.encode(completions[row], add_special_tokens=False).ids + [2]
        counted = data.labels[row][data.labels[row] != IGNORE_INDEX].tolist()
        assert counted == c and int(data.prompt_lengths[row]) == len(p)
        assert data.input_ids[row, : len(p)].tolist() == p
    jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    with pytest.raises(DataError, match=r"train\.jsonl, line 1: no assistant message"):
        read_data("completions", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer)
    jsonl(tmp_path / "train.jsonl", [{"question": "?"}])
    with pytest.raises(DataError, match=r"line 1: expected \{\"prompt\", \"completion\"\} or"):
        read_data("completions", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=tokenizer)


def test_chat_template_of_a_transformers_tokenizer(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    jsonl(tmp_path / "train.jsonl", [chat])
    jsonl(tmp_path / "test.jsonl", [chat])
    splits = read_data("completions", {"kind": "jsonl", "root": str(tmp_path)}, tokenizer=fast)
    assert splits.info["tokenizer"]["chat_template"] is True
    data = splits.train
    prompt = fast.encode("<user>hi<eos><assistant>", add_special_tokens=False)
    completion = fast.encode("yo<eos>", add_special_tokens=False)  # ends with <eos>: not doubled
    assert completion[-1] == 2
    assert data.input_ids[0].tolist() == prompt + completion
    assert data.labels[0][data.labels[0] != IGNORE_INDEX].tolist() == completion
    wrapped = as_text_tokenizer(fast)
    assert wrapped.byte_level and wrapped.eos_id == 2 and wrapped.vocab_size == len(fast)


def token_lists():
    return [[5, 6, 7], [8, 9]], [[10, 11, 12, 13]]


def test_token_factory_packs_sequences_with_the_end_token():
    spec = {"kind": "factory", "factory": "test_text_kinds:token_lists", "block_size": 4}
    with pytest.raises(ConfigError, match=r"data\.vocab_size and data\.eos_id"):
        read_data("tokens", spec)
    splits = read_data("tokens", {**spec, "vocab_size": 20, "eos_id": 2})
    assert stream_of(splits.train) == [5, 6, 7, 2, 8, 9, 2]
    assert int(splits.train.token_bytes.sum()) == 0  # no tokenizer: no byte lengths


def test_text_fingerprint_follows_the_file(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text(CORPUS[0])
    (tmp_path / "test.txt").write_text(CORPUS[1])
    kind, options = resolve("tokens", {"kind": "text", "root": str(tmp_path)})
    before = kind.fingerprint(options)
    assert read_data("tokens", options, tokenizer=tokenizer).fingerprint == before
    (tmp_path / "test.txt").write_text(CORPUS[1] + "!")
    assert kind.fingerprint(options) != before
    assert kind.fingerprint({**options, "block_size": 64}) != kind.fingerprint(options)
