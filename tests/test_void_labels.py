"""Void labels end to end (issue 14 item 7): the checks before training accept a loss's
`ignore_index`, recipes pass `distill.ignore_index` to the hard loss, the dense soft terms and the
segmentation metrics. The losses' own values are tested in test_losses_logit / test_losses_dense.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdistill.data.arrays import BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.engine.preflight import check_labels
from kdistill.errors import ConfigError, DataError
from kdistill.losses import CE, CWD, PixelKD
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import alone_terms, method_terms
from kdistill.tasks import evaluate, get_task

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VOID = 255


class Masks:
    """The smallest dataset of N×C×H×W inputs and N×H×W masks (which may hold void labels)."""

    def __init__(self, inputs, masks, num_seg_classes):
        self.inputs, self.masks, self.num_seg_classes = inputs, masks, num_seg_classes
        self.input_shape = tuple(inputs.shape[1:])

    def __len__(self):
        return len(self.inputs)

    def get_batch(self, index):
        return self.inputs[index], self.masks[index]


def loader(inputs, masks, batch_size, classes):
    return BatchLoader(Masks(inputs, masks, classes), batch_size=batch_size)


def test_segmentation_metrics_of_a_recipe_leave_void_pixels_out():
    # target [0, 1, void, 1], prediction [0, 0, 1, 1] (the model passes its logits through).
    # Counted pixels: 0→0, 1→0, 1→1: IoU₀ = 1/(1+1) = ½, IoU₁ = 1/(1+1) = ½, mIoU ½;
    # pixel accuracy 2/3. The void pixel, predicted 1, would otherwise be refused (255 ∉ [0, 1]).
    logits = torch.tensor([[[[5.0, 5.0, 0.0, 0.0]], [[0.0, 0.0, 5.0, 5.0]]]])
    masks = torch.tensor([[[0, 1, VOID, 1]]])
    masks_loader = loader(logits, masks, 1, 2)
    got = evaluate(nn.Identity(), masks_loader, get_task("segmentation", ignore_index=VOID))
    assert got == pytest.approx({"miou": 0.5, "pixel_accuracy": 2 / 3})
    with pytest.raises(ValueError, match="255"):
        evaluate(nn.Identity(), masks_loader, get_task("segmentation"))


def seg_recipe(*overrides: str):
    return load_recipe(RECIPES / "scenes_segmentation.yaml", list(overrides))


def test_recipe_ignore_index_reaches_the_hard_loss_and_the_dense_soft_terms():
    recipe = seg_recipe(f"distill.ignore_index={VOID}")
    for method in ("pixel_kd", "cwd"):
        terms = method_terms(recipe.distill, method, {}, task="segmentation")
        assert {type(t.loss): t.loss.ignore_index for t in terms} == {
            CE: VOID,
            PixelKD if method == "pixel_kd" else CWD: VOID,
        }
        assert all("target" in t.needs for t in terms)
    assert [t.loss.ignore_index for t in alone_terms(recipe)] == [VOID]
    # a term's own ignore_index wins; without the recipe field the defaults stay
    own = seg_recipe(f"distill.ignore_index={VOID}", "distill.methods.cwd.0.params.ignore_index=7")
    assert [t.loss.ignore_index for t in method_terms(own.distill, "cwd", {})] == [VOID, 7]
    plain = seg_recipe()
    assert [t.loss.ignore_index for t in method_terms(plain.distill, "cwd", {})] == [-100, None]


def test_multitask_recipe_ignore_index_reaches_the_segmentation_terms_only():
    recipe = load_recipe(RECIPES / "scenes_multitask.yaml", [f"distill.ignore_index={VOID}"])
    terms = {t.name: t.loss for t in method_terms(recipe.distill, "cwd", {}, task="multitask")}
    assert terms["seg_hard"].ignore_index == terms["seg_soft"].ignore_index == VOID
    assert not hasattr(terms["det_hard"], "ignore_index")
    assert {t.name: t.loss.ignore_index for t in alone_terms(recipe) if t.output == "seg"} == {
        "seg_hard": VOID
    }


def test_recipe_ignore_index_needs_a_segmentation_task():
    with pytest.raises(ConfigError, match="distill.ignore_index marks void pixels"):
        load_recipe(RECIPES / "fashion_mnist.yaml", ["distill.ignore_index=255"])


# -- the checks before training -----------------------------------------------------------------


def void_data(n=8, classes=3):
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 2, 3, 3, generator=g)
    masks = torch.randint(0, classes, (n, 3, 3), generator=g)
    masks[:, 0, 0] = VOID
    return inputs, masks


def test_training_with_void_labels_passes_the_label_check_and_stays_finite():
    inputs, masks = void_data()
    torch.manual_seed(0)
    teacher, student = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
    terms = [Term(CE(ignore_index=VOID)), Term(PixelKD(ignore_index=VOID)), Term(CWD(1.0, VOID))]
    distiller = Distiller(teacher, student, terms)
    result = fit(
        distiller,
        loader(inputs, masks, 4, 3),
        TrainConfig(epochs=1, batch_size=4, lr=0.01, progress=False),
    )
    assert torch.isfinite(torch.tensor(result.final["train_loss"]))


def test_void_labels_without_ignore_index_fail_before_training_and_name_the_fix():
    inputs, masks = void_data()
    distiller = Distiller(None, nn.Conv2d(2, 3, 1), [Term(CE(), name="hard")])
    with pytest.raises(DataError) as error:
        fit(distiller, loader(inputs, masks, 4, 3), TrainConfig(epochs=1, progress=False))
    assert str(error.value) == (
        "labels out of range: the first batch's labels lie in [0, 255] but the student outputs "
        "3 classes (term 'hard' needs labels in [0, 2]); if 255 marks void labels, build the "
        "loss with ignore_index=255 (recipes: distill.ignore_index)"
    )


def test_label_check_names_ignore_index_and_refuses_float_labels():
    inputs, masks = void_data()
    masks[0, 1, 1] = 9  # neither a class nor void
    distiller = Distiller(None, nn.Conv2d(2, 3, 1), [Term(CE(ignore_index=VOID), name="hard")])
    with pytest.raises(DataError, match=r"lie in \[0, 9\] .*\[0, 2\] or ignore_index=255\)$"):
        fit(distiller, loader(inputs, masks, 4, 3), TrainConfig(epochs=1, progress=False))
    float_batch = SimpleNamespace(target=torch.tensor([0.5, 1.0]))
    with pytest.raises(DataError, match=r"integer class indices, got dtype torch.float32; .*long"):
        check_labels(None, float_batch, 2, "hard")
