"""Recipes on text: `data.dataset: kjv` with its `data.text` block, validated when read, and the
runner's splits by book (validation = the held-out books, tokenizer in the run folder).

A text in the `bible -f` format with the real layout (`test_text_data.fake_kjv_lines`) stands in
for the KJV, so these run without Debian's bible-kjv; `test_text_data` reads the real one.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from test_text_data import fake_kjv_lines

from kdistill.data.text import KJV_BOOKS, TokenBlocks
from kdistill.errors import ConfigError
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import Experiment, load_splits

RECIPE = """
name: kjv-test
task: {task}
data:
  dataset: {dataset}
{data}
teacher: {{model: lm_teacher, kwargs: {{width: 16, n_layer: 1, n_head: 2}}}}
students: [{{name: s, model: lm_student, kwargs: {{width: 16}}}}]
cost: {{enabled: false}}
"""


def recipe(tmp_path, data="", task="language_modeling", dataset="kjv"):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(task=task, dataset=dataset, data=data)))
    return load_recipe(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kjv") / "kjv.txt"
    path.write_text("\n".join(fake_kjv_lines()) + "\n")
    return path


def test_the_text_block_has_documented_defaults(tmp_path):
    spec = recipe(tmp_path).data.text
    assert (spec.vocab_size, spec.block_size) == (2048, 128)
    assert spec.test_books == ["John", "Hosea", "Galatians"]
    assert spec.val_books == ["Ruth", "Ecclesiastes", "Joel", "James"]
    assert spec.tokenizer_dir is None and spec.program == "bible"
    named = recipe(tmp_path, "  text: {val_books: [ruth, Jas], test_books: [Mark]}").data.text
    assert named.val_books == ["Ruth", "James"] and named.test_books == ["Mark"]


@pytest.mark.parametrize(
    ("data", "task", "dataset", "fragment"),
    [
        ("", "classification", "kjv", "dataset kjv holds token blocks.*language_modeling"),
        ("", "lm", "fashion_mnist", "task: lm needs text: data.dataset: kjv"),
        ("  text: {vocab_size: 300}", "classification", "fashion_mnist", "text: settings of"),
        ("  val_size: 100", "lm", "kjv", "val_size: not read by dataset kjv"),
        ("  normalize: train", "lm", "kjv", "normalize: not read by dataset kjv"),
        ("  text: {test_books: [Jonn]}", "lm", "kjv", "unknown book 'Jonn'; did you mean 'John'"),
        ("  text: {val_books: [John]}", "lm", "kjv", r"\['John'\] are in both val_books"),
        ("  text: {val_books: [Ruth, ruth]}", "lm", "kjv", "val_books names a book twice"),
        ("  text: {val_books: []}", "lm", "kjv", "val_books: List should have at least 1"),
        ("  text: {vocab_size: 100}", "lm", "kjv", "vocab_size: Input should be greater than"),
        (
            "  text: {blocksize: 64}",
            "lm",
            "kjv",
            "unknown field 'blocksize'; did you mean 'block_size'",
        ),
    ],
)
def test_bad_text_recipes_fail_when_read(tmp_path, data, task, dataset, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe(tmp_path, data, task, dataset)


def test_identity_ignores_where_the_tokenizer_is_kept_and_old_recipes_are_unchanged(tmp_path):
    a = recipe(tmp_path, "  text: {tokenizer_dir: /tmp/a}").data.identity()
    b = recipe(tmp_path, "  text: {tokenizer_dir: /tmp/b}").data.identity()
    c = recipe(tmp_path, "  text: {vocab_size: 1024}").data.identity()
    assert a == b and a != c and "tokenizer_dir" not in a["text"]
    image = recipe(tmp_path, task="classification", dataset="fashion_mnist").data.identity()
    assert "text" not in image  # a teacher saved before data.text existed is still recognised


def test_splits_hold_out_whole_books_and_keep_the_tokenizer_in_the_run_folder(tmp_path, text_file):
    data = f"  text: {{vocab_size: 300, block_size: 32, text_file: {text_file}}}"
    spec = recipe(tmp_path, data)
    splits = load_splits(spec, out_dir=tmp_path / "run")
    assert all(isinstance(s, TokenBlocks) for s in (splits.train, splits.val, splits.test))
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    books = splits.text["splits"]
    assert books["val"]["books"] == ["Ruth", "Ecclesiastes", "Joel", "James"]
    assert books["test"]["books"] == ["Hosea", "John", "Galatians"]
    chapters = {info.name: info.chapters for info in KJV_BOOKS}
    assert books["val"]["chapters"] == sum(chapters[b] for b in books["val"]["books"])
    assert books["train"]["chapters"] == 1189 - 24 - 41
    # the validation blocks are the held-out books' text: decode them back
    val = splits.val
    first = splits.tokenizer.decode(val.input_ids[0][val.attention_mask[0] == 1].tolist())
    assert first.startswith(fake_kjv_lines()[_first_line_of("Ruth")].split(" ", 1)[1])
    assert splits.tokenizer.get_vocab_size() == 300 == splits.train.vocab_size
    again = load_splits(spec, out_dir=tmp_path / "run")
    assert again.text["tokenizer"]["status"].startswith("reused")
    limited = load_splits(recipe(tmp_path, data + "\n  train_limit: 7"), out_dir=tmp_path / "run")
    assert len(limited.train) == 7 and len(limited.val) == len(splits.val)


def _first_line_of(book: str) -> int:
    abbreviation = next(info.abbreviation for info in KJV_BOOKS if info.name == book)
    return next(
        i for i, line in enumerate(fake_kjv_lines()) if line.startswith(abbreviation + "1:1 ")
    )


def test_the_experiment_reaches_the_tokenizer_and_describes_the_text(tmp_path, text_file):
    data = f"  text: {{vocab_size: 300, block_size: 32, text_file: {text_file}}}"
    experiment = Experiment(recipe(tmp_path, data), tmp_path / "run", progress=False)
    assert experiment.splits.tokenizer.token_to_id("<eos>") == 2
    description = experiment.data_description()
    assert description["input_shape"] == [32]
    assert description["text"]["tokenizer"]["vocab_size"] == 300
    json.dumps(description)  # data.json must be writable
    model = experiment.initial_student(experiment.recipe.students[0], 0)
    assert model.get_input_embeddings().weight.shape[0] == 300  # vocab_size from the data
