"""Issue 25 on the user's own text: a folder of text files (train.txt, val.txt, test.txt), a
teacher saved with `save_pretrained` (a tiny GPT-2 and the byte-level BPE it was trained with)
and a Llama student built from a config. `kdistill init --task language_modeling --teacher
hf:<folder>` → `--dry-run` → a run on a tiny budget; the teacher is used as saved (not trained
again), the data are its tokenizer's ids, and its reported NLL is recomputed here with
transformers on the test file, packed as kdistill documents its blocks (each document's ids and
the end token, windows of L tokens overlapping by one, every token but the first predicted once).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from own_text import generated_text, save_teacher, train_tokenizer

from kdistill.cli import main

transformers = pytest.importorskip("transformers")

STUDENT = (
    "{hf_class: LlamaForCausalLM, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}"
)


def paragraphs(count: int, seed: int) -> str:
    lines = generated_text(count * 3, seed)
    return "\n\n".join("\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text folder, teacher folder): the teacher trained 40 steps on the training text."""
    folder = tmp_path_factory.mktemp("text")
    for name, count, seed in (("train", 60, 0), ("val", 8, 1), ("test", 10, 2)):
        (folder / f"{name}.txt").write_text(paragraphs(count, seed))
    teacher_dir = tmp_path_factory.mktemp("gpt2")
    tokenizer = train_tokenizer(generated_text(400, 5))
    save_teacher(teacher_dir, tokenizer)
    model = transformers.GPT2LMHeadModel.from_pretrained(teacher_dir)
    ids = tokenizer.encode((folder / "train.txt").read_text()).ids
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).reshape(-1, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _step in range(40):
        batch = blocks[torch.randint(0, len(blocks), (8,))]
        optimizer.zero_grad()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
    model.save_pretrained(teacher_dir)
    return folder, teacher_dir


def teacher_nll(teacher_dir, text_file, block: int) -> float:
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(teacher_dir).eval()
    documents = [d.strip() for d in text_file.read_text().split("\n\n") if d.strip()]
    stream = []
    for document in documents:
        stream += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, block - 1):
            window = torch.tensor(stream[start : start + block])[None]
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), -1)
            total -= logp.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    assert count == len(stream) - 1  # every token but the first, once
    return total / count


def test_text_folder_hf_teacher_llama_student(corpus, tmp_path):
    folder, teacher_dir = corpus
    recipe_file = tmp_path / "text.yaml"
    argv = ["init", "--task", "language_modeling", "--teacher", f"hf:{teacher_dir}"]
    argv += ["--student", "hf:llama", "--student-kwargs", STUDENT, "--data", str(folder)]
    assert main([*argv, "--out", str(recipe_file)]) == 0
    recipe = yaml.safe_load(recipe_file.read_text())
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    assert recipe["data"]["kind"] == "text"
    assert recipe["data"]["tokenizer"] == f"hf:{teacher_dir.resolve()}"
    assert recipe["data"]["block_size"] == 64  # the teacher's n_positions
    assert recipe["students"][0]["kwargs"]["vocab_size"] == vocab  # from the teacher's tokenizer
    assert main(["run", str(recipe_file), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    out = tmp_path / "run"
    tiny = ["--seeds", "1", "--quiet", "--set", "cost.enabled=false", "--set", "train.epochs=1"]
    tiny += ["--set", "train.max_steps=3"]
    assert main(["run", str(recipe_file), "--out", str(out), *tiny]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["method"] for r in records] == ["teacher", "alone", "kd"]
    reported = records[0]["test_metrics"]["nll"]
    expected = teacher_nll(teacher_dir, folder / "test.txt", 64)
    assert expected < torch.log(torch.tensor(float(vocab))).item()  # better than uniform
    assert reported == pytest.approx(expected, abs=1e-4)
    assert not (out / "checkpoints" / "teacher").exists()  # used as saved, never trained
    plan = json.loads((out / "plan.json").read_text())
    assert plan["teacher"]["source"] == "pretrained"
