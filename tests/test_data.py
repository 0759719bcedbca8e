"""kdistill.data: IDX reading, Fashion-MNIST loading and lookup, datasets, loaders and splits.

IDX files are written by hand with ``struct.pack`` so the expected values are known independently
of the reader.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import kdistill.data.fashion_mnist as fmnist
from kdistill.data import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ArrayDataset,
    Batch,
    BatchLoader,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
    resolve_fashion_mnist_root,
    split_train_val,
    take,
)
from kdistill.errors import DataError

OFFICIAL_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# helpers: hand-written IDX files


def idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """Magic 0x0000, dtype code, ndim, big-endian uint32 dims, then the payload."""
    return struct.pack(f">BBBB{len(dims)}I", 0, 0, code, len(dims), *dims) + payload


def write(path: Path, content: bytes, gz: bool = False) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def images_idx(n: int, value: int = 0, size: tuple[int, int] = (28, 28)) -> bytes:
    """n uint8 images whose pixel k of image i is (value + i + k) % 256."""
    pixels = [(value + i + k) % 256 for i in range(n) for k in range(size[0] * size[1])]
    return idx_bytes(0x08, (n, *size), struct.pack(f">{len(pixels)}B", *pixels))


def labels_idx(labels: list[int]) -> bytes:
    return idx_bytes(0x08, (len(labels),), struct.pack(f">{len(labels)}B", *labels))


def write_fashion(
    folder: Path,
    train_labels: tuple[int, ...] = (0, 9, 3),
    test_labels: tuple[int, ...] = (5, 1),
    gz: bool = True,
) -> Path:
    """The four official files with tiny contents (3 train and 2 test images by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "train-images-idx3-ubyte", images_idx(len(train_labels)), gz)
    write(folder / "train-labels-idx1-ubyte", labels_idx(list(train_labels)), gz)
    write(folder / "t10k-images-idx3-ubyte", images_idx(len(test_labels), value=100), gz)
    write(folder / "t10k-labels-idx1-ubyte", labels_idx(list(test_labels)), gz)
    return folder


@pytest.fixture
def no_env_no_default(monkeypatch, tmp_path):
    """No $KDISTILL_DATA and a default folder that does not exist."""
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    default = tmp_path / "no-default"
    monkeypatch.setattr(fmnist, "DEFAULT_FASHION_MNIST_DIRS", (default,))
    return default


# --------------------------------------------------------------------------------------------
# read_idx: values


@pytest.mark.parametrize(
    "code, fmt, values, dtype",
    [
        (0x08, "B", [0, 255, 7, 128, 1, 2], np.uint8),
        (0x09, "b", [-128, 127, -1, 0, 5, -6], np.int8),
        (0x0B, "h", [-300, 2, 32767, -32768, 0, 1], np.int16),
        (0x0C, "i", [-70000, 1, 2**31 - 1, -(2**31), 0, 65536], np.int32),
        (0x0D, "f", [1.5, -2.25, 0.0, 1e-3, 3.0e20, -7.0], np.float32),
        (0x0E, "d", [1e300, -0.5, 3.0, 0.1, -1e-300, 2.0], np.float64),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_decodes_each_dtype_big_endian(tmp_path, code, fmt, values, dtype, gz):
    payload = struct.pack(f">{len(values)}{fmt}", *values)
    path = write(tmp_path / "x-idx", idx_bytes(code, (2, 3), payload), gz=gz)
    array = read_idx(path)
    assert array.dtype == np.dtype(dtype)
    assert array.dtype.isnative
    assert array.shape == (2, 3)
    np.testing.assert_array_equal(array, np.array(values, dtype=dtype).reshape(2, 3))
    assert array.flags.writeable


def test_read_idx_one_dimensional_and_string_path(tmp_path):
    path = write(tmp_path / "labels", labels_idx([3, 1, 4, 1, 5]))
    np.testing.assert_array_equal(read_idx(str(path)), [3, 1, 4, 1, 5])


def test_read_idx_recognises_gzip_without_gz_suffix(tmp_path):
    path = tmp_path / "labels-no-suffix"
    path.write_bytes(gzip.compress(labels_idx([2, 7])))
    np.testing.assert_array_equal(read_idx(path), [2, 7])


# --------------------------------------------------------------------------------------------
# read_idx: every failure is a DataError naming the file


def expect_data_error(path: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_read_idx_missing_file(tmp_path):
    expect_data_error(tmp_path / "absent-idx1-ubyte.gz", "not found")


def test_read_idx_wrong_magic(tmp_path):
    path = write(tmp_path / "magic", b"\x00\x01" + idx_bytes(0x08, (1,), b"\x05")[2:])
    expect_data_error(path, "0x00 0x01")


def test_read_idx_unknown_dtype_code(tmp_path):
    path = write(tmp_path / "code", idx_bytes(0x0A, (1,), b"\x05"))
    expect_data_error(path, "unknown IDX dtype code 0x0A")


def test_read_idx_zero_dimensions(tmp_path):
    path = write(tmp_path / "ndim0", struct.pack(">BBBB", 0, 0, 0x08, 0))
    expect_data_error(path, "ndim 0")


@pytest.mark.parametrize("content", [b"\x00\x00\x08", idx_bytes(0x08, (2, 3), b"")[:9]])
def test_read_idx_truncated_header(tmp_path, content):
    path = write(tmp_path / "short-header", content)
    expect_data_error(path, "truncated header")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_payload(tmp_path, gz):
    # 3 int32 values need 12 bytes; only 10 are there
    path = write(tmp_path / "short-idx", idx_bytes(0x0C, (3,), bytes(10)), gz=gz)
    expect_data_error(path, "truncated: expected 12 data bytes after the header", "found 10")


def test_read_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "long-idx", idx_bytes(0x08, (2, 2), bytes(4) + b"junk!"))
    expect_data_error(path, "5 trailing bytes", "expected 4", "found 9")


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(labels_idx(list(range(10)) * 50))
    bad = bytearray(good)
    bad[20:40] = bytes(20)  # clobber the deflate stream after the gzip header
    path = write(tmp_path / "corrupt.gz", bytes(bad))
    expect_data_error(path, "corrupt gzip")


def test_read_idx_truncated_gzip_stream(tmp_path):
    good = gzip.compress(labels_idx(list(range(10)) * 50))
    path = write(tmp_path / "cut.gz", good[: len(good) // 2])
    expect_data_error(path, "corrupt gzip")


def test_read_idx_not_gzip_despite_suffix(tmp_path):
    path = write(tmp_path / "plain.gz", labels_idx([1, 2]))
    expect_data_error(path, "corrupt gzip")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST loading from hand-written files


@pytest.mark.parametrize("gz", [False, True])
def test_load_fashion_mnist_values(tmp_path, gz, no_env_no_default):
    root = write_fashion(tmp_path / "fm", gz=gz)
    raw = load_fashion_mnist("train", root=root, normalize=False)
    assert raw.inputs.shape == (3, 1, 28, 28)
    assert raw.inputs.dtype == torch.float32
    assert raw.targets.tolist() == [0, 9, 3]
    assert raw.targets.dtype == torch.int64
    assert raw.classes == FASHION_MNIST_CLASSES
    # pixel k of image i is (i + k) % 256 (see images_idx): image 1, pixel 5 → 6; image 0,
    # pixel 9·28 + 3 = 255 → 255
    assert raw.inputs[1, 0, 0, 5].item() == pytest.approx(6 / 255)
    assert raw.inputs[0, 0, 9, 3].item() == 1.0
    normed = load_fashion_mnist("train", root=root)
    expected = (6 / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert normed.inputs[1, 0, 0, 5].item() == pytest.approx(expected, rel=1e-6)
    test = load_fashion_mnist("test", root=root, normalize=False)
    assert test.targets.tolist() == [5, 1]
    assert test.inputs[0, 0, 0, 0].item() == pytest.approx(100 / 255)
    assert test.name == "fashion_mnist-test"


def test_load_fashion_mnist_mixed_raw_and_gz(tmp_path, no_env_no_default):
    root = write_fashion(tmp_path / "fm", gz=True)
    labels = root / "train-labels-idx1-ubyte.gz"
    labels.with_suffix("").write_bytes(gzip.decompress(labels.read_bytes()))
    labels.unlink()
    assert load_fashion_mnist("train", root=root).targets.tolist() == [0, 9, 3]


def test_load_fashion_mnist_returns_fresh_datasets_and_rereads_changed_files(
    tmp_path, no_env_no_default
):
    root = write_fashion(tmp_path / "fm", gz=False)
    first = load_fashion_mnist("train", root=root)
    second = load_fashion_mnist("train", root=root)
    assert first is not second
    torch.testing.assert_close(first.inputs, second.inputs)
    write_fashion(root, train_labels=(1, 2, 3, 4), gz=False)  # replaced: 4 samples now
    assert load_fashion_mnist("train", root=root).targets.tolist() == [1, 2, 3, 4]


def test_load_fashion_mnist_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="'valid'"):
        load_fashion_mnist("valid", root=write_fashion(tmp_path / "fm"))


def replace_file(root: Path, name: str, content: bytes) -> Path:
    (root / f"{name}.gz").unlink()
    return write(root / name, content)


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("train-labels-idx1-ubyte", labels_idx([0, 1]), "2 labels but"),
        ("train-labels-idx1-ubyte", labels_idx([0, 10, 1]), "label 10 at position 1"),
        ("train-images-idx3-ubyte", images_idx(3, size=(27, 28)), "expected 28×28 images"),
        ("train-images-idx3-ubyte", idx_bytes(0x0C, (3, 28, 28), bytes(4 * 3 * 784)), "uint8"),
        ("train-images-idx3-ubyte", idx_bytes(0x08, (3, 784), bytes(3 * 784)), "3-D"),
        ("train-labels-idx1-ubyte", idx_bytes(0x08, (3, 1), bytes(3)), "1-D"),
        ("train-labels-idx1-ubyte", idx_bytes(0x08, (3,), bytes(2)), "truncated"),
    ],
)
def test_load_fashion_mnist_bad_files_name_the_file(
    tmp_path, no_env_no_default, name, content, fragment
):
    root = write_fashion(tmp_path / "fm")
    replace_file(root, name, content)
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", root=root)
    assert name in str(info.value)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: where the files are looked up


def test_resolve_explicit_root_and_its_subfolder(tmp_path, no_env_no_default):
    root = write_fashion(tmp_path / "a")
    assert resolve_fashion_mnist_root(root) == root.resolve()
    assert resolve_fashion_mnist_root(str(root)) == root.resolve()
    nested = write_fashion(tmp_path / "parent" / "fashion-mnist")
    assert resolve_fashion_mnist_root(tmp_path / "parent") == nested.resolve()


def test_resolve_explicit_root_wins_over_env_and_default(tmp_path, monkeypatch):
    explicit = write_fashion(tmp_path / "explicit")
    monkeypatch.setenv("KDISTILL_DATA", str(write_fashion(tmp_path / "env")))
    monkeypatch.setattr(fmnist, "DEFAULT_FASHION_MNIST_DIRS", (write_fashion(tmp_path / "d"),))
    assert resolve_fashion_mnist_root(explicit) == explicit.resolve()


def test_resolve_explicit_root_lacking_files_lists_them(tmp_path, monkeypatch):
    root = write_fashion(tmp_path / "partial")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    (root / "train-images-idx3-ubyte.gz").unlink()
    # a complete env folder must not be used as a fallback for an explicit root
    monkeypatch.setenv("KDISTILL_DATA", str(write_fashion(tmp_path / "env")))
    with pytest.raises(DataError) as info:
        resolve_fashion_mnist_root(root)
    message = str(info.value)
    assert str(root) in message
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte" in message
    assert "train-labels-idx1-ubyte" not in message


def test_resolve_explicit_root_that_does_not_exist(tmp_path, no_env_no_default):
    with pytest.raises(DataError, match="does not exist"):
        resolve_fashion_mnist_root(tmp_path / "nowhere")


def test_resolve_env_var_folder_itself(tmp_path, monkeypatch):
    env = write_fashion(tmp_path / "env")
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    monkeypatch.setattr(fmnist, "DEFAULT_FASHION_MNIST_DIRS", (write_fashion(tmp_path / "d"),))
    assert resolve_fashion_mnist_root() == env.resolve()


def test_resolve_env_var_fashion_mnist_subfolder(tmp_path, monkeypatch, no_env_no_default):
    nested = write_fashion(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "data"))
    assert resolve_fashion_mnist_root() == nested.resolve()


def test_resolve_default_when_env_unset_or_empty(tmp_path, monkeypatch):
    default = write_fashion(tmp_path / "default")
    monkeypatch.setattr(fmnist, "DEFAULT_FASHION_MNIST_DIRS", (default,))
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    assert resolve_fashion_mnist_root() == default.resolve()
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "empty-env"))  # holds nothing: fall back
    assert resolve_fashion_mnist_root() == default.resolve()


def test_resolve_not_found_message(tmp_path, monkeypatch, no_env_no_default):
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    with pytest.raises(DataError) as info:
        resolve_fashion_mnist_root()
    message = str(info.value)
    for searched in (env, env / "fashion-mnist", no_env_no_default):
        assert str(searched) in message
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-root" in message and "KDISTILL_DATA" in message


def test_load_dataset_uses_env_var(tmp_path, monkeypatch, no_env_no_default):
    monkeypatch.setenv("KDISTILL_DATA", str(write_fashion(tmp_path / "env", test_labels=(7,))))
    assert load_dataset("fashion_mnist", "test").targets.tolist() == [7]


# --------------------------------------------------------------------------------------------
# the official files, when installed


@pytest.mark.skipif(
    not all(
        (OFFICIAL_DIR / f"{name}.gz").is_file() or (OFFICIAL_DIR / name).is_file()
        for pair in fmnist.FASHION_MNIST_FILES.values()
        for name in pair
    ),
    reason=f"official Fashion-MNIST files not in {OFFICIAL_DIR} (apt-get install "
    "dataset-fashion-mnist)",
)
def test_official_fashion_mnist():
    train = load_fashion_mnist("train", root=OFFICIAL_DIR)
    test = load_fashion_mnist("test", root=OFFICIAL_DIR)
    assert len(train) == 60000 and len(test) == 10000
    assert train.inputs.shape == (60000, 1, 28, 28)
    assert test.inputs.shape == (10000, 1, 28, 28)
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10
    assert torch.bincount(train.targets, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [1000] * 10
    assert train.inputs.mean().item() == pytest.approx(0.0, abs=0.01)
    assert train.inputs.std().item() == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------------------------
# ArrayDataset


def toy_dataset(n: int = 10, num_classes: int = 3, name: str = "toy") -> ArrayDataset:
    """Sample i has every input value equal to i and label i % num_classes."""
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    targets = torch.arange(n) % num_classes
    return ArrayDataset(inputs, targets, [f"c{k}" for k in range(num_classes)], name=name)


def test_array_dataset_basics():
    data = toy_dataset()
    assert len(data) == 10 and data.num_classes == 3 and data.input_shape == (1, 2, 2)
    inputs, target = data.get_batch(torch.tensor([7, 2]))
    assert inputs[:, 0, 0, 0].tolist() == [7.0, 2.0]
    assert target.tolist() == [1, 2]
    sub = data.subset([4, 0, 9], name="few")
    assert sub.name == "few" and len(sub) == 3
    assert sub.inputs[:, 0, 0, 0].tolist() == [4.0, 0.0, 9.0]
    assert sub.targets.tolist() == [1, 0, 0]
    assert sub.classes == data.classes
    with pytest.raises(IndexError, match="10"):
        data.subset([10])


@pytest.mark.parametrize(
    "inputs, targets, fragment",
    [
        (torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64), "3 inputs but 2 targets"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int32), "int64"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 3]), "[0, 3]"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([-1, 0]), "[-1, 0]"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, dtype=torch.int64), "1-D"),
    ],
)
def test_array_dataset_validation(inputs, targets, fragment):
    with pytest.raises(DataError) as info:
        ArrayDataset(inputs, targets, ["a", "b", "c"], name="bad")
    assert "'bad'" in str(info.value) and fragment in str(info.value)


def test_fingerprint_depends_on_content_only():
    a, b = toy_dataset(name="a"), toy_dataset(name="b")
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    changed_input = toy_dataset()
    changed_input.inputs[3, 0, 1, 1] = 0.5
    assert changed_input.fingerprint() != a.fingerprint()
    changed_target = toy_dataset()
    changed_target.targets[0] = 1
    assert changed_target.fingerprint() != a.fingerprint()
    reshaped = ArrayDataset(a.inputs.reshape(10, 1, 4, 1), a.targets, a.classes)
    assert reshaped.fingerprint() != a.fingerprint()


# --------------------------------------------------------------------------------------------
# BatchLoader


def epoch_indices(loader: BatchLoader) -> list[int]:
    return [i for batch in loader for i in batch.index.tolist()]


def test_loader_batches_are_consistent_with_indices():
    data = toy_dataset(10)
    batches = list(BatchLoader(data, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.index.dtype == torch.int64
        assert batch.inputs[:, 0, 0, 0].tolist() == batch.index.float().tolist()
        assert batch.target.tolist() == (batch.index % 3).tolist()
    assert epoch_indices(BatchLoader(data, batch_size=4)) == list(range(10))


def test_loader_shuffle_is_seeded_by_seed_and_epoch():
    data = toy_dataset(50)
    a = BatchLoader(data, batch_size=8, shuffle=True, seed=3)
    b = BatchLoader(data, batch_size=8, shuffle=True, seed=3)
    first = epoch_indices(a)
    assert first == epoch_indices(b)
    assert first == epoch_indices(a)  # iterating again replays the same epoch
    assert first != list(range(50))
    a.set_epoch(1)
    second = epoch_indices(a)
    assert second != first
    b.set_epoch(1)
    assert epoch_indices(b) == second
    other_seed = BatchLoader(data, batch_size=8, shuffle=True, seed=4)
    assert epoch_indices(other_seed) != first
    assert a.epoch_order(0).tolist() == first


def test_loader_every_index_once_per_epoch():
    loader = BatchLoader(toy_dataset(23), batch_size=5, shuffle=True, seed=1)
    assert len(loader) == 5
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = epoch_indices(loader)
        assert sorted(seen) == list(range(23))


def test_loader_drop_last():
    loader = BatchLoader(toy_dataset(23), batch_size=5, shuffle=True, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert all(len(b) == 5 for b in batches)
    assert len(set(epoch_indices(loader))) == 20


def test_loader_iter_from_equals_tail_of_epoch():
    loader = BatchLoader(toy_dataset(23), batch_size=4, shuffle=True, seed=9)
    loader.set_epoch(2)
    full = [b.index.tolist() for b in loader]
    for k in range(len(loader) + 1):
        assert [b.index.tolist() for b in loader.iter_from(k)] == full[k:]
    with pytest.raises(ValueError, match="step"):
        loader.iter_from(len(loader) + 1)


def test_loader_iter_from_does_not_build_skipped_batches():
    class Counting:
        def __init__(self):
            self.calls = 0

        def __len__(self):
            return 100

        def get_batch(self, indices):
            self.calls += 1
            return indices.float(), indices

    data = Counting()
    batches = list(BatchLoader(data, batch_size=10).iter_from(7))
    assert len(batches) == 3 and data.calls == 3
    assert batches[0].index.tolist() == list(range(70, 80))


@pytest.mark.parametrize("size, world", [(7, 2), (10, 4), (8, 2), (3, 4)])
def test_loader_rank_sharding_covers_padded_epoch(size, world):
    data = toy_dataset(size)
    loaders = [
        BatchLoader(data, batch_size=2, shuffle=True, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    per_rank = -(-size // world)  # ceil
    orders = [epoch_indices(loader) for loader in loaders]
    assert all(len(order) == per_rank for order in orders)
    assert len({len(loader) for loader in loaders}) == 1
    # interleave the ranks back: padded[i] = orders[i % world][i // world]
    padded = [orders[i % world][i // world] for i in range(per_rank * world)]
    full = BatchLoader(data, batch_size=2, shuffle=True, seed=5).epoch_order(0).tolist()
    assert sorted(full) == list(range(size))
    wrapped = (full * world)[: per_rank * world]  # DistributedSampler-style padding by wrapping
    assert padded == wrapped
    assert set(padded) == set(range(size))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 2, "rank": -1}, "rank"),
        ({"batch_size": 2, "world_size": 0}, "world_size"),
    ],
)
def test_loader_argument_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        BatchLoader(toy_dataset(), **kwargs)


def test_loader_empty_dataset():
    empty = toy_dataset().subset([], name="nothing")
    with pytest.raises(DataError, match="dataset 'nothing' is empty"):
        BatchLoader(empty, batch_size=4)


# --------------------------------------------------------------------------------------------
# split_train_val and take


def imbalanced(n_per_class: tuple[int, ...] = (60, 30, 10)) -> ArrayDataset:
    targets = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_class)])
    n = len(targets)
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    return ArrayDataset(inputs, targets, [str(k) for k in range(len(n_per_class))], name="imb")


def positions(data: ArrayDataset) -> list[int]:
    """The original positions of a subset's samples (inputs hold the position)."""
    return data.inputs.reshape(-1).long().tolist()


@pytest.mark.parametrize("val_size, n_val", [(0.2, 20), (25, 25), (0.333, 33)])
def test_split_train_val_disjoint_complete_deterministic(val_size, n_val):
    data = imbalanced()
    train, val = split_train_val(data, val_size, seed=1)
    assert len(val) == n_val and len(train) == 100 - n_val
    assert set(positions(train)).isdisjoint(positions(val))
    assert sorted(positions(train) + positions(val)) == list(range(100))
    again_train, again_val = split_train_val(data, val_size, seed=1)
    assert positions(again_val) == positions(val) and positions(again_train) == positions(train)
    assert positions(split_train_val(data, val_size, seed=2)[1]) != positions(val)


def test_split_train_val_is_stratified():
    train, val = split_train_val(imbalanced(), 0.2, seed=0)
    assert torch.bincount(val.targets).tolist() == [12, 6, 2]
    assert torch.bincount(train.targets).tolist() == [48, 24, 8]
    unstratified = split_train_val(imbalanced(), 0.2, seed=0, stratify=False)[1]
    assert len(unstratified) == 20


@pytest.mark.parametrize("val_size", [100, 1.0, 0.0, 0, -3, 0.001])
def test_split_train_val_rejects_sizes_without_train_or_val(val_size):
    with pytest.raises(ValueError):
        split_train_val(imbalanced(), val_size)


def test_split_train_val_no_training_data_message():
    with pytest.raises(DataError, match="leaves no training data"):
        split_train_val(imbalanced(), 150)


def test_take_is_deterministic_and_stratified():
    data = imbalanced()
    small = take(data, 10, seed=4)
    assert len(small) == 10
    assert positions(small) == positions(take(data, 10, seed=4))
    assert positions(small) != positions(take(data, 10, seed=5))
    assert positions(small) == sorted(set(positions(small)))
    assert torch.bincount(small.targets).tolist() == [6, 3, 1]
    assert take(data, None) is data
    assert take(data, 100) is data and take(data, 1000) is data
    with pytest.raises(ValueError, match="n must be"):
        take(data, 0)


# --------------------------------------------------------------------------------------------
# digits and the registry


def test_digits_split():
    pytest.importorskip("sklearn")
    train = load_digits("train")
    test = load_digits("test")
    assert len(train) + len(test) == 1797
    assert len(test) == round(0.25 * 1797) == 449
    assert train.inputs.shape == (1348, 1, 8, 8) and train.inputs.dtype == torch.float32
    assert test.inputs.shape == (449, 1, 8, 8)
    assert train.classes == [str(d) for d in range(10)]
    all_counts = torch.bincount(torch.cat([train.targets, test.targets]), minlength=10)
    test_counts = torch.bincount(test.targets, minlength=10)
    assert ((test_counts.float() - 0.25 * all_counts.float()).abs() <= 1).all()
    assert train.inputs.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.inputs.std().item() == pytest.approx(1.0, abs=1e-5)
    raw = load_digits("train", normalize=False)
    assert raw.inputs.min().item() == 0.0 and raw.inputs.max().item() == 1.0
    torch.testing.assert_close(load_digits("test").inputs, test.inputs)
    assert len(load_digits("test", test_fraction=0.5)) == round(0.5 * 1797)


def test_registry_and_load_dataset(tmp_path, no_env_no_default):
    assert DATASETS.names() == ["digits", "fashion_mnist"]
    root = write_fashion(tmp_path / "fm")
    assert load_dataset("fashion_mnist", "train", root=root).targets.tolist() == [0, 9, 3]
    with pytest.raises(KeyError, match="did you mean 'fashion_mnist'"):
        load_dataset("fashion-mnist", "train")


def test_load_dataset_digits_ignores_root():
    pytest.importorskip("sklearn")
    assert len(load_dataset("digits", "test", root="/ignored", seed=0)) == 449
