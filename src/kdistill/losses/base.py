"""What every kdistill loss shares: the `needs` declaration and the name registry.

A loss is a pure `nn.Module`: tensors in, a 0-dim tensor out. It declares in `needs` which values
the distiller must pass, in order:

- ``"student"`` / ``"teacher"``: the model output (or the tapped layer output) of each side;
- ``"target"``: the labels of the batch;
- ``"index"``: the dataset positions of the batch's samples (memory-bank losses);
- ``"attention_mask"``: which positions of an ``N×L`` sequence are real tokens (1) or padding (0):
  the batch's ``attention_mask`` (dict inputs), else all ones (hidden-state losses).

A loss with ``counts_tokens = True`` (token divergences, hidden-state losses) averages over counted
positions and offers ``count(labels_or_mask)`` and a ``num_counted`` keyword of `forward`: the
engine passes the count of the whole accumulation window / all ranks, so micro-batches and DDP
ranks give the value and gradient of one big batch (`kdistill.losses.token`). One that counts
labelled positions (``count_from = TARGET``) also takes an ``attention_mask`` keyword, which the
distiller passes when the batch has one, to refuse a counted position that is padding.

Weights, warm-up and layer selection live in `kdistill.Term`, never inside a loss.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from kdistill.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")

STUDENT = "student"
TEACHER = "teacher"
TARGET = "target"
INDEX = "index"
MASK = "attention_mask"


class DistillLoss(nn.Module):
    """Base for kdistill losses: only adds the `needs` contract and the registry name."""

    needs: ClassVar[tuple[str, ...]] = (STUDENT, TEACHER)
    name: ClassVar[str] = ""
    # True when student and teacher tensors may differ in channels and a trainable connector
    # (1×1 conv / linear) should map the student's channels to the teacher's.
    uses_connector: ClassVar[bool] = False
    # True when `target` holds class indices of the student output's dimension 1 (checked before
    # training); False for targets of another kind (e.g. a detector's boxes).
    target_is_class_index: ClassVar[bool] = True
    # True when student and teacher tensors are class scores (logits) that must have the same
    # number of classes on dimension 1 (checked before training: KD, DKD, DIST, PixelKD, …);
    # False for features and embeddings, whose widths may differ.
    compares_classes: ClassVar[bool] = False
    # The dimension of the student / teacher tensors that holds the classes: 1 for N×K[×H×W]
    # scores, -1 (the last) for token logits N×L×V, whose classes are the vocabulary.
    class_dim: ClassVar[int] = 1
    # True when the loss averages over counted positions (tokens) and takes a `num_counted`
    # keyword (the count the caller normalises by) and has `count(...)`; see kdistill.losses.token.
    counts_tokens: ClassVar[bool] = False
    # What `count(...)` reads when counts_tokens: the labels (TARGET) or the attention mask (MASK).
    count_from: ClassVar[str] = TARGET


def register_loss(name: str):
    """Class decorator: register under `name` and record the name on the class."""

    def add(cls):
        cls.name = name
        return LOSSES.register(name)(cls)

    return add


def create_loss(name: str, **params) -> nn.Module:
    """Build a registered loss by name, e.g. ``create_loss("kd", temperature=2.0)``."""
    constructor = LOSSES.get(name)
    try:
        return constructor(**params)
    except TypeError as error:
        raise TypeError(f"loss {name!r}: {error}") from None
