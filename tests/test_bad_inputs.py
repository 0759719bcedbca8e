"""The bad-input matrix: each way a user can feed kdistill something wrong gets a clear error
naming what was wrong — at set-up, before any training step — never a silent wrong result.

Library-level cases call the engine directly; CLI cases run `kdistill.cli.main` in-process and
check the exit code (2) and the one-line message on stderr.
"""

from __future__ import annotations

import gzip
import math
import textwrap

import pytest
import torch
from torch import Tensor, nn

from kdistill.cli import main
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import MemoryTeacherOutputs
from kdistill.engine import TrainConfig, fit, trained_state
from kdistill.engine.checkpoint import load_state_dict_file
from kdistill.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from kdistill.losses import CE, KD
from kdistill.losses.base import INDEX, STUDENT, DistillLoss
from kdistill.models import create_model
from kdistill.recipes import load_recipe


def dataset(n: int = 64, classes: int = 3, channels: int = 1, size: int = 8) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randn(n, channels, size, size, generator=generator),
        torch.arange(n) % classes,
        classes=[str(c) for c in range(classes)],
        name="toy",
    )


class Linear(nn.Module):
    def __init__(self, classes: int = 3, inputs: int = 64):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(x))


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 16, "progress": False, **overrides})


def snapshot(distiller: Distiller) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in trained_state(distiller).items()}


def assert_untouched(before: dict[str, Tensor], distiller: Distiller) -> None:
    after = trained_state(distiller)
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed"


# -- non-finite loss ---------------------------------------------------------------------------


class NanOnSample(DistillLoss):
    """Mean squared logits, NaN for any batch holding dataset sample `bad` (step known)."""

    needs = (STUDENT, INDEX)

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def forward(self, logits: Tensor, index: Tensor) -> Tensor:
        value = logits.pow(2).mean()
        return value * math.nan if bool((index == self.bad).any()) else value


def test_non_finite_loss_stops_naming_the_term_epoch_and_step():
    data = dataset()
    torch.manual_seed(0)
    distiller = Distiller(None, Linear(), [Term(CE()), Term(NanOnSample(bad=37), name="probe")])
    # unshuffled, batch 16: sample 37 is in step 2 (samples 32–47)
    with pytest.raises(NonFiniteLossError) as info:
        fit(distiller, BatchLoader(data, batch_size=16), quick())
    message = str(info.value)
    assert "'probe'" in message and "epoch 1, step 2" in message and "nan" in message
    assert info.value.term == "probe"


def test_non_finite_loss_skip_policy_skips_that_batch_only():
    data = dataset()
    torch.manual_seed(0)
    distiller = Distiller(None, Linear(), [Term(CE()), Term(NanOnSample(bad=37), name="probe")])
    result = fit(distiller, BatchLoader(data, batch_size=16), quick(on_nonfinite="skip"))
    assert result.skipped_batches == 1
    assert all(torch.isfinite(v).all() for v in trained_state(distiller).values())
    assert math.isfinite(result.final["train_loss"])


# -- labels, classes, channels ------------------------------------------------------------------


def test_labels_out_of_range_fail_before_training():
    data = dataset(classes=5)  # labels 0–4, but the student outputs 3 classes
    torch.manual_seed(0)
    distiller = Distiller(None, Linear(classes=3), [Term(CE(), name="hard")])
    before = snapshot(distiller)
    with pytest.raises(DataError) as info:
        fit(distiller, BatchLoader(data, batch_size=16), quick())
    assert str(info.value) == (
        "labels out of range: the training labels lie in [0, 4] but the student outputs 3 "
        "classes (term 'hard' needs labels in [0, 2])"
    )
    assert_untouched(before, distiller)


def test_labels_beyond_the_first_batch_are_checked_too():
    data = dataset(n=64, classes=3)
    targets = data.targets.clone()
    targets[-1] = 7  # only in the last batch
    data = ArrayDataset(data.inputs, targets, classes=[str(c) for c in range(8)], name="toy")
    distiller = Distiller(None, Linear(classes=3), [Term(CE(), name="hard")])
    with pytest.raises(DataError, match=r"lie in \[0, 7\] but the student outputs 3 classes"):
        fit(distiller, BatchLoader(data, batch_size=16), quick())


def test_teacher_and_student_class_counts_must_match():
    data = dataset(classes=3)
    teacher, student = Linear(classes=10), Linear(classes=3)
    distiller = Distiller(teacher, student, [Term(KD(), name="kd"), Term(CE(), name="hard")])
    before = snapshot(distiller)
    with pytest.raises(ConfigError) as info:
        fit(distiller, BatchLoader(data, batch_size=16), quick())
    assert str(info.value).startswith(
        "class-count mismatch: the teacher outputs 10 classes and the student 3, "
        "but term 'kd' compares the two outputs"
    )
    assert_untouched(before, distiller)


def test_class_count_mismatch_is_found_with_stored_teacher_outputs():
    data = dataset(classes=3)
    distiller = Distiller(Linear(classes=3), Linear(classes=3), [Term(KD(), name="kd")])
    stored = MemoryTeacherOutputs.of(torch.zeros(len(data), 4), data)
    with pytest.raises(ConfigError, match="teacher outputs 4 classes and the student 3"):
        fit(distiller, BatchLoader(data, batch_size=16), quick(), teacher_outputs=stored)


def test_wrong_input_channels_name_the_model_layer_and_both_counts():
    data = dataset(channels=1, size=8)
    student = create_model("resnet8", in_channels=3, num_classes=3, width=4)
    distiller = Distiller(None, student, [Term(CE())])
    with pytest.raises(ConfigError) as info:
        fit(distiller, BatchLoader(data, batch_size=16), quick())
    message = str(info.value)
    assert message.startswith("wrong input channels: the student (ResNet) expects 3 input channels")
    assert "its first layer 'stem.conv' is Conv2d(3, 4" in message
    assert "but the data has 1 (batch shape (16, 1, 8, 8))" in message


def test_teacher_with_wrong_input_channels_is_named_as_the_teacher():
    data = dataset(channels=1, size=8)
    teacher = create_model("resnet8", in_channels=3, num_classes=3, width=4)
    distiller = Distiller(teacher, Linear(), [Term(KD())])
    with pytest.raises(ConfigError, match=r"the teacher \(ResNet\) expects 3 input channels"):
        fit(distiller, BatchLoader(data, batch_size=16), quick())


def test_a_model_rejecting_the_batch_shape_is_reported_with_the_shape():
    data = dataset(channels=1, size=8)
    student = create_model("middle_student", in_channels=1, num_classes=3, image_size=28)
    distiller = Distiller(None, student, [Term(CE())])
    with pytest.raises(ConfigError) as info:
        fit(distiller, BatchLoader(data, batch_size=16), quick())
    assert "the student (MiddleStudent) cannot process a training batch of shape (16, 1, 8, 8)" in (
        str(info.value)
    )
    assert "expects a batch of shape N×1×28×28" in str(info.value)


# -- data ---------------------------------------------------------------------------------------


def test_empty_dataset_is_refused():
    empty = ArrayDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64), ["a"], "void")
    with pytest.raises(DataError, match="dataset 'void' is empty"):
        BatchLoader(empty, batch_size=4)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


RECIPE = """
name: tiny
data: {dataset: fashion_mnist}
teacher: {model: middle_student}
students:
  - {name: mini, model: mini_student}
distill:
  methods:
    kd:
      - {loss: kd, params: {temperature: 4.0}}
"""


def recipe_file(tmp_path, text: str = RECIPE):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_missing_data_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, err = run_cli(
        capsys, "run", str(recipe_file(tmp_path)), "--data-root", str(missing), "--quiet"
    )
    assert code == 2
    assert f"Fashion-MNIST data root {missing} does not exist" in err


def test_corrupt_data_file_is_named(tmp_path, capsys):
    folder = tmp_path / "fm"
    folder.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (folder / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    code, err = run_cli(
        capsys, "run", str(recipe_file(tmp_path)), "--data-root", str(folder), "--quiet"
    )
    assert code == 2
    assert err.startswith("kdistill: error: ") and str(folder) in err


# -- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "students.0.model=mini_studnet",
            "students.0.model: unknown model 'mini_studnet'; did you mean 'mini_student'",
        ),
        (
            "distill.methods.kd.0.loss=kdd",
            "distill.methods.kd.0: unknown loss 'kdd'; did you mean 'kd'",
        ),
        ("distill.methods.kd.0.params.temperature=0", "temperature must be > 0, got 0"),
        (
            "distill.methods.kd.0.weight=-1",
            "distill.methods.kd.0.weight: Input should be greater than or equal to 0",
        ),
        (
            "train.precision=fp16",
            "train: precision fp16 needs a CUDA device (device is 'cpu'); use bf16 on the CPU",
        ),
    ],
    ids=["unknown-model", "unknown-loss", "temperature-zero", "negative-weight", "fp16-on-cpu"],
)
def test_recipe_errors_name_the_field(tmp_path, capsys, override, expected):
    code, err = run_cli(capsys, "run", str(recipe_file(tmp_path)), "--set", override, "--quiet")
    assert code == 2
    assert expected in err


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = recipe_file(tmp_path, "name: tiny\nteacher: {model: middle_student\n")
    code, err = run_cli(capsys, "run", str(path), "--quiet")
    assert code == 2
    assert f"{path}: not valid YAML" in err and "line" in err


# -- checkpoints --------------------------------------------------------------------------------


def pickled_teacher(tmp_path) -> tuple[nn.Module, str]:
    torch.manual_seed(3)
    model = create_model("middle_student")
    path = tmp_path / "teacher.pt"
    torch.save(model, path)  # a whole pickled module, not a state dict
    return model, str(path)


def test_pickled_checkpoint_is_refused_without_trust(tmp_path):
    _, path = pickled_teacher(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: this file holds pickled Python objects")
    assert "--trust-checkpoint" in message and "teacher.trust_checkpoint: true" in message


def test_pickled_checkpoint_loads_with_trust(tmp_path):
    model, path = pickled_teacher(tmp_path)
    weights = load_state_dict_file(path, trust=True)
    assert set(weights) == set(model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_trust_flag_reaches_the_recipe_and_the_cli_refuses_without_it(tmp_path, capsys):
    _, path = pickled_teacher(tmp_path)
    recipe = recipe_file(tmp_path, RECIPE + f"  # teacher at {path}\n")
    text = recipe.read_text().replace(
        "teacher: {model: middle_student}",
        f"teacher: {{model: middle_student, checkpoint: {path}}}",
    )
    recipe.write_text(text)
    assert load_recipe(recipe, ["teacher.trust_checkpoint=true"]).teacher.trust_checkpoint
    assert not load_recipe(recipe).teacher.trust_checkpoint
    code, err = run_cli(
        capsys,
        "run",
        str(recipe),
        "--set",
        "data.dataset=digits",
        "--set",
        "data.val_size=100",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    )
    assert code == 2
    assert "refused: this file holds pickled Python objects" in err


def test_trusted_pickled_teacher_is_used_by_a_run(tmp_path, capsys):
    model, path = pickled_teacher(tmp_path)
    # digits are 8×8: the pickled teacher (28×28 input) does not fit — build a fitting one
    torch.manual_seed(3)
    model = create_model("middle_student", image_size=8, channels=(4, 8))
    torch.save(model, path)
    recipe = recipe_file(
        tmp_path,
        f"""
        name: trusted
        data: {{dataset: digits, val_size: 100, train_limit: 400, test_limit: 100}}
        teacher: {{model: middle_student, checkpoint: {path}}}
        students:
          - {{name: small, model: middle_student, kwargs: {{channels: [2, 2]}}}}
        train: {{epochs: 1, batch_size: 50, progress: false}}
        tune: {{enabled: false}}
        cost: {{enabled: false}}
        """,
    )
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--trust-checkpoint", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "models" / "small__kd__seed0.safetensors").exists()
