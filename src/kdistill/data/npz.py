"""Arrays from `.npz` files: `x` (`N×H×W` or `N×C×H×W`) and `y` (`N` class indices).

`x` may be uint8 (scaled to [0, 1] by x / 255) or floating point (kept as it is, as float32);
`N×H×W` gets a channel dimension of 1. An optional `classes` array names the classes; otherwise
they are "0" … "K−1" with K = 1 + the largest label of both splits. Files are read with
`allow_pickle=False` (object arrays are refused: nothing is unpickled).

Errors (`DataError`, naming the file): a missing file or key (the keys found are listed), a wrong
number of dimensions, an `x` that looks channels-last (`N×H×W×C`), non-integer or negative
labels, `x` and `y` of different lengths, train and test samples of different shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError

__all__ = ["load_npz_pair", "read_npz", "read_npz_arrays"]

_CHANNEL_SIZES = (1, 2, 3, 4)


def read_npz_arrays(path: Path, y_name: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """`(x, y, class names or None)` as stored in the .npz file `path`, without unpickling;
    DataError naming the file for a missing key (the keys found listed; `y_name` says what `y`
    holds in the fix) or a file that is no .npz."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            missing = [key for key in ("x", "y") if key not in keys]
            if missing:
                raise DataError(
                    f"{path}: no array {missing[0]!r}; the file holds {keys}; save it with "
                    f"np.savez(path, x=images, y={y_name})"
                )
            x, y = archive["x"], archive["y"]
            classes = [str(c) for c in archive["classes"]] if "classes" in keys else None
    except DataError:
        raise
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: cannot be read as an .npz file ({error})") from None
    return x, y, classes


def read_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """`(inputs N×C×H×W float32, targets N int64, class names or None)` of one file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    x, y, classes = read_npz_arrays(path, "labels")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in _CHANNEL_SIZES and x.shape[-1] in _CHANNEL_SIZES:
            raise DataError(
                f"{path}: x has shape {x.shape}, which looks channels-last (N×H×W×C); save it "
                "as N×C×H×W (x.transpose(0, 3, 1, 2))"
            )
    else:
        raise DataError(f"{path}: x must be N×H×W or N×C×H×W, got shape {x.shape}")
    if x.dtype == np.uint8:
        inputs = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        inputs = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    else:
        raise DataError(f"{path}: x must be uint8 or floating point, got {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: y must be a 1-D array of integer class indices, got {y.dtype} of shape "
            f"{y.shape}"
        )
    if len(y) != len(x):
        raise DataError(f"{path}: x holds {len(x)} samples but y holds {len(y)} labels")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: labels must be ≥ 0, found {int(y.min())}")
    return inputs, torch.from_numpy(y.astype(np.int64)), classes


def load_npz_pair(train: str | Path, test: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """`(train, test)` ArrayDatasets from two `.npz` files (see the module doc)."""
    (x_train, y_train, names_train), (x_test, y_test, names_test) = read_npz(train), read_npz(test)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{test}: samples are {tuple(x_test.shape[1:])} but {train} has "
            f"{tuple(x_train.shape[1:])}; both splits need the same C×H×W"
        )
    if names_train is not None and names_test is not None and names_train != names_test:
        raise DataError(f"{test}: classes {names_test} differ from {train}'s {names_train}")
    classes = names_train or names_test
    largest = max(int(y.max()) if len(y) else -1 for y in (y_train, y_test))
    if classes is None:
        classes = [str(k) for k in range(largest + 1)]
    elif largest >= len(classes):
        raise DataError(
            f"{train}, {test}: label {largest} is out of range for the {len(classes)} "
            f"classes named in the file"
        )
    return (
        ArrayDataset(x_train, y_train, classes=classes, name="arrays-train"),
        ArrayDataset(x_test, y_test, classes=classes, name="arrays-test"),
    )
