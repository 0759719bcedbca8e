"""Write real Fashion-MNIST test images as an image folder of PNGs.

    python -m kdistill.examples.fashion_mnist_pngs data/fashion_mnist_png --per-class 100

takes, for each class, the first `2 × per_class` images of the official test set (t10k) in file
order: the first `per_class` go to `train/<class>/`, the next `per_class` to `test/<class>/` (no
image is in both). Class folders are the class names with `/` replaced by `-`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from kdistill.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdistill.data.imagefolder import write_image_folder
from kdistill.errors import DataError

__all__ = ["write_fashion_mnist_pngs"]


def write_fashion_mnist_pngs(
    out: str | Path, per_class: int = 100, data_root: str | Path | None = None
) -> dict[str, int]:
    """Write `per_class` training and `per_class` test PNGs per class under `out`; returns the
    number of images written per split. Raises DataError when a class has too few images."""
    data = load_fashion_mnist("test", root=data_root, normalize=False)  # x / 255, exact
    images = (data.inputs[:, 0] * 255).round().to(torch.uint8).numpy()
    labels = data.targets.numpy()
    chosen: dict[str, list[int]] = {"train": [], "test": []}
    for label in range(len(FASHION_MNIST_CLASSES)):
        indices = np.flatnonzero(labels == label)
        if len(indices) < 2 * per_class:
            raise DataError(
                f"Fashion-MNIST test set has {len(indices)} images of class {label}, fewer than "
                f"2 × per_class = {2 * per_class}"
            )
        chosen["train"] += indices[:per_class].tolist()
        chosen["test"] += indices[per_class : 2 * per_class].tolist()
    written = {}
    for split, indices in chosen.items():
        order = np.array(sorted(indices))
        written[split] = write_image_folder(
            out, split, images[order], labels[order], FASHION_MNIST_CLASSES
        )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write train/ and test/ into")
    parser.add_argument("--per-class", type=int, default=100, help="images per class and split")
    parser.add_argument("--data-root", help="folder holding the Fashion-MNIST IDX files")
    args = parser.parse_args(argv)
    written = write_fashion_mnist_pngs(args.out, args.per_class, args.data_root)
    print(f"{args.out}: {written['train']} training and {written['test']} test PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
