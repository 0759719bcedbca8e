"""Issue 25 item 3: the tokenizer belongs to the teacher.

A teacher folder (`hf:<folder>`, written by `save_pretrained`) brings its trained weights — a
tied head included — and its tokenizer; the recipe names that tokenizer and every model's
vocabulary is checked against it, comparing ids, not only sizes."""

from __future__ import annotations

import pytest
import torch
import yaml
from own_text import generated_text, save_teacher, train_tokenizer

from kdistill.data.tokenizer import compare_tokenizers, load_tokenizer
from kdistill.engine.checkpoint import load_state_dict_file, load_weights
from kdistill.errors import ConfigError
from kdistill.recipes import load_recipe

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_teacher")
    return save_teacher(folder, train_tokenizer(generated_text(200)))


def test_tied_head_loads_from_the_one_stored_tensor(teacher_dir):
    from safetensors import safe_open
    from transformers import GPT2Config, GPT2LMHeadModel

    with safe_open(str(teacher_dir / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    assert "lm_head.weight" not in stored  # the case: save_pretrained writes a tied head once
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(teacher_dir))  # fresh random weights
    weights = load_state_dict_file(teacher_dir / "model.safetensors", field="teacher.")
    load_weights(model, weights, "teacher", str(teacher_dir), field="teacher.")
    embedding = weights["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert torch.equal(model.lm_head.weight, embedding)  # the head is the embedding, as saved


def test_untied_missing_head_is_still_refused(teacher_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(teacher_dir)
    config.tie_word_embeddings = False
    model = GPT2LMHeadModel(config)
    weights = load_state_dict_file(teacher_dir / "model.safetensors", field="teacher.")
    with pytest.raises(Exception, match=r"missing keys \['lm_head.weight'\]"):
        load_weights(model, weights, "teacher", str(teacher_dir), field="teacher.")


def test_same_size_other_ids_is_a_different_tokenizer(tmp_path):
    texts = generated_text(200)
    first, second = train_tokenizer(texts), train_tokenizer(texts, reverse=True)
    assert first.get_vocab_size() == second.get_vocab_size()
    first.save(str(tmp_path / "a.json"))
    second.save(str(tmp_path / "b.json"))
    compare_tokenizers(str(tmp_path / "a.json"), str(tmp_path / "a.json"), "a", "b")  # agrees
    with pytest.raises(ConfigError, match="other ids") as error:
        compare_tokenizers(str(tmp_path / "a.json"), str(tmp_path / "b.json"), "teacher", "x")
    # the first token listed: the one with the smallest id in the first that moved
    vocab_a, vocab_b = first.get_vocab(), second.get_vocab()
    moved = min((t for t in vocab_a if vocab_a[t] != vocab_b[t]), key=vocab_a.get)
    assert f"{moved!r}: {vocab_a[moved]} vs {vocab_b[moved]}" in str(error.value)


def lm_recipe(tmp_path, teacher_dir, **changes) -> str:
    recipe = {
        "name": "text",
        "task": "language_modeling",
        "data": {"dataset": "kjv"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "students": [
            {
                "name": "llama",
                "model": "hf:llama",
                "kwargs": {
                    "hf_class": "LlamaForCausalLM",
                    "vocab_size": load_tokenizer(f"hf:{teacher_dir}").get_vocab_size(),
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 64,
                },
            }
        ],
        "distill": {"methods": {"kl": [{"loss": "forward_kl"}]}},
    }
    for dotted, value in changes.items():
        node = recipe
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[keys[-1]] = value
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_teacher_folder_with_a_tokenizer_must_be_named(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match=r"data.tokenizer: the teacher .* holds the tokenizer"):
        load_recipe(lm_recipe(tmp_path, teacher_dir))
    recipe = load_recipe(lm_recipe(tmp_path, teacher_dir, data__tokenizer=f"hf:{teacher_dir}"))
    assert recipe.data.tokenizer == f"hf:{teacher_dir}"


def test_a_student_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, teacher_dir):
    size = load_tokenizer(f"hf:{teacher_dir}").get_vocab_size()
    path = lm_recipe(
        tmp_path,
        teacher_dir,
        data__tokenizer=f"hf:{teacher_dir}",
        students__0__kwargs__vocab_size=size - 1,
    )
    with pytest.raises(ConfigError, match=rf"students.llama: vocab_size {size - 1} is smaller"):
        load_recipe(path)


def test_a_student_folder_with_another_tokenizer_is_refused(tmp_path, teacher_dir):
    other = save_teacher(
        tmp_path / "other", train_tokenizer(generated_text(200), reverse=True), seed=1
    )
    path = lm_recipe(tmp_path, teacher_dir, data__tokenizer=f"hf:{teacher_dir}")
    data = yaml.safe_load(open(path))
    data["students"][0] = {"name": "other", "model": f"hf:{other}"}
    open(path, "w").write(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="students.other .* are not the same tokenizer"):
        load_recipe(path)


def test_costs_are_off_by_default_for_token_tasks_and_refused_when_asked(tmp_path, teacher_dir):
    # model costs are measured on image inputs: a language-model recipe that says nothing of
    # cost reads with costs off; one that asks for them is refused, naming the field
    path = lm_recipe(tmp_path, teacher_dir, data__tokenizer=f"hf:{teacher_dir}")
    assert load_recipe(path).cost.enabled is False
    asked = lm_recipe(
        tmp_path, teacher_dir, data__tokenizer=f"hf:{teacher_dir}", cost={"enabled": True}
    )
    with pytest.raises(ConfigError, match=r"cost.enabled: model costs .* image inputs"):
        load_recipe(asked)
