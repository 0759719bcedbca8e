"""Causal-LM models (`kdistill.models.lm`): registry builds from configs, sizes, the vocabulary
check, and a local `save_pretrained` folder built back through the `hf:<folder>` spec."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

from kdistill.models import count_parameters, create_model, model_from_spec  # noqa: E402
from kdistill.models.lm import check_vocabulary, gpt2_lm, llama_lm  # noqa: E402
from kdistill.models.specs import DATA_SIZES, check_model_spec  # noqa: E402


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_named_sizes_have_the_documented_parameter_counts(arch):
    torch.manual_seed(0)
    teacher = create_model("lm_teacher", vocab_size=2048, arch=arch)
    student = create_model("lm_student", vocab_size=2048, arch=arch)
    assert 2_000_000 <= count_parameters(teacher) <= 6_000_000
    assert 300_000 <= count_parameters(student) <= 1_000_000
    assert count_parameters(teacher) > 4 * count_parameters(student)
    # tied head: the output layer is the token embedding, counted once
    assert teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight


def test_gpt2_lm_counts_parameters_as_the_architecture_says():
    # GPT-2 block: 12·d² + 13·d (attention 4d²+4d, MLP 8d²+5d, two layer norms 4d);
    # embeddings V·d + P·d (tied head); final layer norm 2d
    V, P, d, layers = 300, 32, 16, 2
    model = gpt2_lm(V, n_layer=layers, n_embd=d, n_head=2, n_positions=P)
    assert count_parameters(model) == layers * (12 * d * d + 13 * d) + V * d + P * d + 2 * d


def test_outputs_are_logits_over_the_vocabulary_and_nothing_to_cache():
    model = gpt2_lm(300, n_layer=1, n_embd=16, n_head=2, n_positions=16).eval()
    ids = torch.randint(0, 300, (2, 7))
    output = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert list(output.keys()) == ["logits"] and output.logits.shape == (2, 7, 300)
    llama = llama_lm(300, n_layer=1, hidden_size=16, n_head=2, max_position_embeddings=16)
    assert list(llama(input_ids=ids).keys()) == ["logits"]


def test_the_registry_gives_lm_models_the_tokenizer_size():
    assert "vocab_size" in DATA_SIZES
    check_model_spec("lm_student", {})  # vocab_size counts as given by the data
    sizes = {"in_channels": 1, "num_classes": 10, "image_size": 128, "vocab_size": 321}
    model = model_from_spec("lm_student", {"width": 16}, data_sizes=sizes)
    assert model.get_input_embeddings().weight.shape == (321, 16)
    padded = model_from_spec("gpt2_lm", {"vocab_size": 336, "n_embd": 16}, data_sizes=sizes)
    assert padded.get_input_embeddings().weight.shape[0] == 336  # the spec's kwargs win


def test_too_few_embedding_rows_are_an_error_naming_both_sizes():
    model = gpt2_lm(300, n_layer=1, n_embd=16, n_head=2)
    check_vocabulary(model, 300)
    check_vocabulary(model, 256)  # padding rows are fine
    with pytest.raises(ValueError, match="has 300 rows but the tokenizer has 2048 tokens"):
        check_vocabulary(model, 2048)
    check_vocabulary(torch.nn.Linear(2, 2), 2048)  # no embedding to read: not checked


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_embd=100 must be a multiple of n_head=3"):
        gpt2_lm(300, n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        gpt2_lm(0)
    with pytest.raises(ValueError, match="n_head=4 must be a multiple of n_kv_head=3"):
        llama_lm(300, hidden_size=16, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="arch must be 'gpt2' or 'llama'"):
        create_model("lm_teacher", vocab_size=300, arch="bert")


def test_a_missing_transformers_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'kdistill\[lm\]'"):
        gpt2_lm(300)


def test_a_saved_causal_lm_folder_builds_back_through_hf_spec(tmp_path):
    torch.manual_seed(0)
    original = gpt2_lm(300, n_layer=1, n_embd=16, n_head=2, n_positions=16).eval()
    original.save_pretrained(tmp_path / "tiny")
    spec = f"hf:{tmp_path / 'tiny'}"
    check_model_spec(spec, {"hf_class": "AutoModelForCausalLM"})
    loaded = model_from_spec(spec, {"hf_class": "AutoModelForCausalLM"}).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)
    default_class = model_from_spec(spec).eval()  # config.architectures[0]
    with torch.no_grad():
        assert torch.equal(default_class(input_ids=ids).logits, original(input_ids=ids).logits)
