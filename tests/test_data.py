"""Tests for collabvit.data: IDX / Fashion-MNIST, TensorFile, ImageNet-style folders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from collabvit.data import (
    FASHION_MNIST_ROOT,
    DataError,
    FashionMNIST,
    TensorFile,
    build_dataset,
    image_folder,
    read_idx,
)

HINT = "dataset-fashion-mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding: 0x00 0x00, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    data = _idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _fake_fmnist(root: Path, compress: bool, height: int = 5, width: int = 4) -> dict:
    """Write tiny train/test IDX files; return the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, count in (("train", 6), ("t10k", 3)):
        images = rng.integers(0, 256, size=(count, height, width), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(count,), dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


# --- IDX / Fashion-MNIST -----------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(("split", "prefix"), [("train-all", "train"), ("test", "t10k")])
def test_fashion_mnist_reads_tiny_idx_files(tmp_path, compress, split, prefix):
    arrays = _fake_fmnist(tmp_path, compress)
    images, labels = arrays[prefix]
    dataset = FashionMNIST(tmp_path, split)
    assert len(dataset) == len(labels)
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert isinstance(image, torch.Tensor)
        assert image.dtype == torch.uint8
        assert image.shape == (1, 5, 4)
        assert torch.equal(image[0], torch.from_numpy(images[index]))
        assert type(label) is int
        assert label == int(labels[index])


def test_fashion_mnist_default_split_is_test(tmp_path):
    arrays = _fake_fmnist(tmp_path, compress=True)
    dataset = FashionMNIST(tmp_path)
    assert len(dataset) == len(arrays["t10k"][1])


def test_fashion_mnist_mixed_compression(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 3, 3), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=False)
    dataset = FashionMNIST(tmp_path, "test")
    assert [dataset[i][1] for i in range(4)] == [9, 0, 3, 3]
    assert torch.equal(dataset[2][0][0], torch.from_numpy(images[2]))


def test_read_idx_shape_and_values(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        path = _write_idx(tmp_path / f"x{int(compress)}", array, compress)
        out = read_idx(path)
        assert out.dtype == np.uint8
        assert out.shape == (2, 3, 4)
        assert np.array_equal(out, array)


def test_missing_folder_raises_with_hint(tmp_path):
    with pytest.raises(DataError, match=HINT):
        FashionMNIST(tmp_path / "nowhere", "test")


@pytest.mark.parametrize("missing", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_missing_file_raises_with_hint(tmp_path, missing):
    _fake_fmnist(tmp_path, compress=True)
    (tmp_path / f"{missing}.gz").unlink()
    with pytest.raises(DataError, match=HINT):
        FashionMNIST(tmp_path, "test")


def test_missing_train_files_only_fail_for_train(tmp_path):
    _fake_fmnist(tmp_path, compress=False)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    FashionMNIST(tmp_path, "test")
    with pytest.raises(DataError, match=HINT):
        FashionMNIST(tmp_path, "train")


def test_unknown_split_raises(tmp_path):
    _fake_fmnist(tmp_path, compress=True)
    with pytest.raises(DataError, match="split must be one of"):
        FashionMNIST(tmp_path, "validation")
    with pytest.raises(DataError, match="too few"):
        FashionMNIST(tmp_path, "val")


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_truncated_body_raises(tmp_path, compress):
    _fake_fmnist(tmp_path, compress=compress)
    images = np.zeros((3, 5, 4), dtype=np.uint8)
    data = _idx_bytes(images)[:-7]  # header intact, body short
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")
    (tmp_path / name).write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DataError):
        FashionMNIST(tmp_path, "test")


def test_truncated_header_raises(tmp_path):
    # the file stops inside the dimension list (3 dims declared, fewer than 12 bytes follow)
    _fake_fmnist(tmp_path, compress=False)
    data = _idx_bytes(np.zeros((3, 5, 4), dtype=np.uint8))[:9]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(data)
    with pytest.raises(DataError):
        FashionMNIST(tmp_path, "test")


def test_truncated_gzip_stream_raises(tmp_path):
    # a partially downloaded .gz: the compressed stream itself is cut short
    _fake_fmnist(tmp_path, compress=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError):
        FashionMNIST(tmp_path, "test")


def test_not_an_idx_file_raises(tmp_path):
    _fake_fmnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 3))
    with pytest.raises(DataError):
        FashionMNIST(tmp_path, "test")


def test_image_label_count_mismatch_raises(tmp_path):
    _fake_fmnist(tmp_path, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8), compress=False)
    with pytest.raises(DataError):
        FashionMNIST(tmp_path, "test")


@pytest.mark.skipif(
    not FASHION_MNIST_ROOT.is_dir(),
    reason=f"{FASHION_MNIST_ROOT} not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split():
    dataset = FashionMNIST(FASHION_MNIST_ROOT, "test")
    assert len(dataset) == 10000
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert type(label) is int
    assert dataset.images.shape == (10000, 1, 28, 28)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.min().item() == 0 and dataset.labels.max().item() == 9
    assert torch.bincount(dataset.labels, minlength=10).tolist() == [1000] * 10
    assert len(FashionMNIST.classes) == 10


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason=f"{FASHION_MNIST_ROOT} not installed")
def test_real_fashion_mnist_val_and_train_partition_the_training_set():
    everything = FashionMNIST(FASHION_MNIST_ROOT, "train-all")
    train, val = FashionMNIST(FASHION_MNIST_ROOT, "train"), FashionMNIST(FASHION_MNIST_ROOT, "val")
    assert (len(everything), len(train), len(val)) == (60000, 55000, 5000)
    both = torch.cat([train.images, val.images]).flatten(1)
    # same multiset of images as the whole training set: compare sorted row sums as a cheap check
    torch.testing.assert_close(
        both.sum(1).sort().values, everything.images.flatten(1).sum(1).sort().values
    )
    assert torch.equal(FashionMNIST(FASHION_MNIST_ROOT, "val").labels, val.labels)  # deterministic


# --- TensorFile --------------------------------------------------------------------------


def test_tensor_file_round_trip(tmp_path):
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    targets = torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    path = tmp_path / "data.safetensors"
    save_file({"images": images, "targets": targets}, str(path))
    dataset = TensorFile(path)
    assert len(dataset) == 4
    for index in range(4):
        image, target = dataset[index]
        assert torch.equal(image, images[index])
        assert image.dtype == torch.uint8
        assert type(target) is int and target == int(targets[index])
    assert isinstance(build_dataset("tensors", path, model=None), TensorFile)
    assert len(build_dataset("tensors", str(path), model=None)) == 4


@pytest.mark.parametrize(
    "tensors",
    [
        {"images": torch.zeros(2, 1, 4, 4)},
        {"targets": torch.zeros(2, dtype=torch.int64)},
        {"pixels": torch.zeros(2, 1, 4, 4), "labels": torch.zeros(2, dtype=torch.int64)},
    ],
    ids=["no-targets", "no-images", "other-names"],
)
def test_tensor_file_missing_keys_raise(tmp_path, tensors):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(DataError, match="images"):
        TensorFile(path)


def test_tensor_file_bad_shapes_raise(tmp_path):
    path = tmp_path / "flat.safetensors"
    save_file({"images": torch.zeros(2, 4, 4), "targets": torch.zeros(2)}, str(path))
    with pytest.raises(DataError):
        TensorFile(path)
    path = tmp_path / "count.safetensors"
    save_file({"images": torch.zeros(3, 1, 4, 4), "targets": torch.zeros(2)}, str(path))
    with pytest.raises(DataError):
        TensorFile(path)


def test_tensor_file_missing_or_unreadable(tmp_path):
    with pytest.raises(DataError):
        TensorFile(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(DataError):
        TensorFile(garbage)


# --- image_folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit_tiny():
    timm = pytest.importorskip("timm")
    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


def _write_pngs(folder: Path, layout: dict[str, list[tuple[int, int, int]]]) -> None:
    from PIL import Image

    for class_name, colours in layout.items():
        (folder / class_name).mkdir(parents=True)
        for index, colour in enumerate(colours):
            size = (40 + 8 * index, 30 + 4 * index)  # small, non-square, varied
            Image.new("RGB", size, colour).save(folder / class_name / f"img{index}.png")


LAYOUT = {
    "ant": [(255, 0, 0), (0, 255, 0)],
    "bee": [(10, 20, 30)],
    "cat": [(200, 100, 50), (0, 0, 0), (255, 255, 255)],
}


def _check_folder_dataset(dataset, expected_targets):
    assert len(dataset) == len(expected_targets)
    assert dataset.classes == ["ant", "bee", "cat"]
    seen = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert isinstance(image, torch.Tensor)
        assert image.dtype == torch.uint8
        assert image.shape == (3, 224, 224)
        seen.append(target)
    assert seen == expected_targets


def _expected_samples():
    targets, colours = [], []
    for class_index, name in enumerate(sorted(LAYOUT)):
        for colour in LAYOUT[name]:
            targets.append(class_index)
            colours.append(colour)
    return targets, colours


def test_image_folder_val_layout(tmp_path, deit_tiny):
    _write_pngs(tmp_path / "val", LAYOUT)
    targets, colours = _expected_samples()
    dataset = image_folder(tmp_path, deit_tiny)
    _check_folder_dataset(dataset, targets)
    # unnormalised: a solid-colour image stays (almost exactly) its colour
    for index, colour in enumerate(colours):
        image = dataset[index][0].int()
        expected = torch.tensor(colour, dtype=torch.int32).view(3, 1, 1)
        assert (image - expected).abs().max().item() <= 1, (index, colour)


def test_image_folder_flat_layout(tmp_path, deit_tiny):
    root = tmp_path / "flat"
    _write_pngs(root, LAYOUT)
    targets, _ = _expected_samples()
    _check_folder_dataset(image_folder(root, deit_tiny), targets)
    _check_folder_dataset(build_dataset("imagenet", root, deit_tiny), targets)
    _check_folder_dataset(build_dataset("imagenet", str(root), deit_tiny), targets)


def test_image_folder_missing_folder_raises(tmp_path, deit_tiny):
    with pytest.raises(DataError):
        image_folder(tmp_path / "does-not-exist", deit_tiny)


def test_image_folder_without_class_folders_raises(tmp_path, deit_tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        image_folder(tmp_path / "empty", deit_tiny)


# --- build_dataset -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet", "tensors"])
def test_build_dataset_needs_path(name):
    with pytest.raises(DataError, match="--data-path"):
        build_dataset(name, None, model=None)


def test_build_dataset_unknown_name():
    with pytest.raises(DataError, match="unknown data set"):
        build_dataset("cifar10", "/tmp", model=None)


def test_build_dataset_fmnist_with_path(tmp_path):
    arrays = _fake_fmnist(tmp_path, compress=True)
    dataset = build_dataset("fmnist", tmp_path, model=None, split="train-all")
    assert isinstance(dataset, FashionMNIST)
    assert len(dataset) == len(arrays["train"][1])
    with pytest.raises(DataError, match=HINT):
        build_dataset("fmnist", tmp_path / "missing", model=None)


def test_deit_folders_use_the_reference_resize_256_crop_224(tmp_path):
    """DeiT's own eval transform (the reference's): resize to 256, centre crop 224, bicubic."""
    import timm
    from PIL import Image
    from torchvision import transforms

    from collabvit.data import image_folder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (300, 300)).save(tmp_path / "a" / "x.png")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    steps = image_folder(tmp_path, model).transform.transforms
    resize = next(t for t in steps if isinstance(t, transforms.Resize))
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert image_folder(tmp_path, model, crop_pct=1.0).transform.transforms[0].size == 224
