"""scikit-learn's bundled 8×8 handwritten digits (1797 images, classes "0"-"9").

Small enough for tests and smoke runs; needs the optional scikit-learn dependency.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kdistill.data.arrays import ArrayDataset, split_train_val

__all__ = ["DIGITS_CLASSES", "load_digits"]

DIGITS_CLASSES = [str(digit) for digit in range(10)]

_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[Tensor, Tensor]:
    """All 1797 images as ``N×1×8×8`` float32 in [0, 1] (values / 16) and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or kdistill[sklearn])"
        ) from err
    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def load_digits(
    split: str = "train", test_fraction: float = 0.25, seed: int = 0, normalize: bool = True
) -> ArrayDataset:
    """The ``"train"`` or ``"test"`` part of a seeded, class-stratified split of the digits.

    inputs: ``N×1×8×8`` float32, ``x / 16``; with ``normalize`` then ``(x − μ) / σ`` where μ, σ
    are the mean and std of all training-split pixels (the same for both splits).
    ``test_fraction`` of the 1797 samples (rounded) go to the test split.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels = _raw_digits()
    full = ArrayDataset(images, labels, classes=list(DIGITS_CLASSES), name="digits")
    train, test = split_train_val(full, float(test_fraction), seed=seed)
    part = train if split == "train" else test
    inputs = part.inputs
    if normalize:
        mean, std = train.inputs.mean(), train.inputs.std()
        inputs = (inputs - mean) / std
    return ArrayDataset(inputs, part.targets, classes=list(DIGITS_CLASSES), name=f"digits-{split}")
