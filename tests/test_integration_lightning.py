"""`DistillationModule` in `lightning.Trainer(accelerator="cpu", max_epochs=1)` on real
Fashion-MNIST trains what `kd.fit` trains on the same fixed batches: the same per-step losses,
the same student and connector weights; its checkpoint and optimiser hold no teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import kdistill as kd  # noqa: E402
from kdistill.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from kdistill.errors import ConfigError  # noqa: E402
from kdistill.integrations.lightning import DistillationModule  # noqa: E402
from kdistill.losses import CE, KD, FitNet, ForwardKL  # noqa: E402
from kdistill.models.classic import MiniStudent  # noqa: E402

SAMPLES, BATCH, LR = 256, 32, 0.05


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data() -> DataLoader:
    try:
        train = load_fashion_mnist("train")
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not installed: {error}")
    dataset = TensorDataset(train.inputs[:SAMPLES], train.targets[:SAMPLES])
    return DataLoader(dataset, batch_size=BATCH, shuffle=False)


def _models():
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(1, 8, 7, stride=7), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10)
    )
    return teacher, MiniStudent()


def _terms():
    # FitNet from the student's 1-channel 4×4 conv to the teacher's 8-channel one: a connector
    return [
        kd.Term(KD(temperature=4.0), 0.8),
        kd.Term(CE(), 0.2),
        kd.Term(FitNet(), 0.1, student="conv", teacher="0"),
    ]


class StepLosses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_lightning_loss_and_weights_equal_kd_fit(tmp_path):
    loader = _data()
    teacher, student = _models()
    example = next(iter(loader))[0]

    reference = kd.Distiller(teacher, copy.deepcopy(student), _terms())
    torch.manual_seed(5)  # the connector's initial weights
    reference.build(example)
    config = kd.TrainConfig(
        epochs=1, optimizer="sgd", momentum=0.0, lr=LR, schedule="constant", progress=False
    )
    fitted = kd.fit(reference, loader, config).final

    distiller = kd.Distiller(teacher, copy.deepcopy(student), _terms())
    torch.manual_seed(5)
    module = DistillationModule(
        distiller, optimizer=lambda params: torch.optim.SGD(params, lr=LR), example_inputs=example
    )
    steps = StepLosses()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[steps],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader)

    assert len(steps.losses) == SAMPLES // BATCH
    assert sum(steps.losses) / len(steps.losses) == pytest.approx(fitted["train_loss"], rel=1e-6)
    logged = trainer.logged_metrics
    for name, value in fitted["train_parts"].items():
        assert float(logged[f"train/{name}_epoch"]) == pytest.approx(value, rel=1e-5)
    mine, theirs = distiller.student.state_dict(), reference.student.state_dict()
    for key in theirs:
        assert torch.allclose(mine[key], theirs[key], atol=1e-6, rtol=0), key
    for key, value in reference.connectors.state_dict().items():
        assert torch.allclose(distiller.connectors.state_dict()[key], value, atol=1e-6, rtol=0)

    # the optimiser: student + connector, never the teacher
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in distiller.trainable_parameters()}
    assert len(list(distiller.connectors.parameters())) == 3  # 1×1 conv weight, BatchNorm γ, β
    assert not optimised & {id(p) for p in teacher.parameters()}
    # the checkpoint: student, connectors, losses; not one teacher tensor
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert {key.split(".")[0] for key in saved} == {"student", "connectors"}
    assert set(saved) == {f"student.{k}" for k in mine} | {
        f"connectors.{k}" for k in distiller.connectors.state_dict()
    }
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_connectors_need_example_inputs_and_token_terms_refuse_accumulation():
    teacher, student = _models()
    with pytest.raises(ConfigError, match="example_inputs"):
        DistillationModule(kd.Distiller(teacher, student, _terms()))
    module = DistillationModule(kd.Distiller(teacher, student, [kd.Term(ForwardKL(), 1.0)]))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="accumulation"):
        trainer.fit(module, _data())
