"""Tests for collabvit.data: IDX / Fashion-MNIST, TensorFile, ImageNet-style folders."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from collabvit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    DataError,
    FashionMNIST,
    InputError,
    TensorFile,
    build_dataset,
    check_images,
    check_labels,
    class_names,
    eval_crop_pct,
    image_folder,
    indexed_loader,
    label_fit_problem,
    read_idx,
    val_overlap,
)
from collabvit.models.zoo import recorded_training_config

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


# --- input contract ----------------------------------------------------------------------

HINT_0_255 = (
    "floats must lie in [0, 1]; pass uint8 for 0..255 pixels, "
    "or --inputs-normalized for normalised inputs"
)


@pytest.mark.parametrize(
    ("images", "normalized"),
    [
        (torch.tensor([0, 17, 255], dtype=torch.uint8).view(1, 1, 1, 3), False),
        (torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3), False),
        (torch.tensor([0.0, 0.25, 1.0], dtype=torch.float16).view(1, 1, 1, 3), False),
        (torch.tensor([0.0, 0.25, 1.0], dtype=torch.bfloat16).view(1, 1, 1, 3), False),
        (torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2), False),
        (torch.tensor([-2.1, 0.0, 2.6]).view(1, 1, 1, 3), True),
        (torch.zeros(0, 3, 4, 4), False),
    ],
    ids=["uint8", "float32", "float16", "bfloat16", "float64", "normalised", "empty"],
)
def test_check_images_accepts_the_contract(images, normalized):
    check_images(images, normalized=normalized)


@pytest.mark.parametrize(
    ("images", "normalized", "message"),
    [
        (torch.tensor([0, 255]).view(1, 1, 1, 2), False, "images are torch.int64"),
        (torch.tensor([0, 255], dtype=torch.int32).view(1, 1, 1, 2), True, "torch.int32"),
        (torch.tensor([True, False]).view(1, 1, 1, 2), False, "torch.bool"),
        (torch.tensor([0.0, 255.0]).view(1, 1, 1, 2), False, r"span \[0, 255\]"),
        (torch.tensor([-0.5, 0.5]).view(1, 1, 1, 2), False, r"span \[-0.5, 0.5\]"),
        (torch.tensor([0.5, float("nan")]).view(1, 1, 1, 2), False, "1 NaN or infinite"),
        (torch.tensor([float("inf"), float("-inf")]).view(1, 1, 1, 2), True, "2 NaN or inf"),
        (np.zeros((1, 1, 2, 2), dtype=np.uint8), False, "torch tensor, got ndarray"),
    ],
    ids=["int64", "int32", "bool", "0-255-floats", "negative", "nan", "inf-normalised", "numpy"],
)
def test_check_images_rejects_everything_else(images, normalized, message):
    with pytest.raises(InputError, match=message) as caught:
        check_images(images, normalized=normalized)
    assert isinstance(caught.value, DataError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


def test_check_images_says_what_to_do_with_0_255_floats():
    with pytest.raises(InputError) as caught:
        check_images(torch.full((2, 1, 4, 4), 200.0))
    assert str(caught.value) == f"image values span [200, 200] but {HINT_0_255}"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_check_labels_accepts_integer_labels_in_range(dtype):
    check_labels(torch.tensor([0, 9, 3], dtype=dtype), num_classes=10)
    check_labels(torch.zeros(0, dtype=dtype), num_classes=10)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (torch.tensor([3, 10, 11]), r"^label 10 \(batch position 1\) is outside 0\.\.9"),
        (torch.tensor([-1, 2]), r"^label -1 \(batch position 0\)"),
        (torch.tensor([1.0, 2.0]), "labels are torch.float32"),
        (torch.tensor([True]), "labels are torch.bool"),
        (torch.zeros(2, 1, dtype=torch.int64), r"one per image \[B\], got shape \(2, 1\)"),
        ([1, 2], "torch tensor, got list"),
    ],
    ids=["too-large", "negative", "float", "bool", "2-d", "list"],
)
def test_check_labels_names_the_offending_label(targets, message):
    with pytest.raises(InputError, match=message):
        check_labels(targets, num_classes=10)


# --- evaluation crop ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("deit_tiny_patch16_224", 0.875),
        ("deit_base_distilled_patch16_224", 0.875),
        ("deit3_small_patch16_224", 0.9),  # timm's value: DeiT III is not the paper's recipe
        ("deit_base_patch16_384", 1.0),  # timm's value: DeiT's 384 fine-tunes are not cropped
        ("collabvit_fmnist_edge", 1.0),
    ],
)
def test_eval_crop_pct_is_256_224_only_for_deit_at_224(name, expected):
    import timm

    import collabvit.models.zoo  # noqa: F401 - registers collabvit_fmnist_edge

    # depth 1 keeps the large variants cheap; the crop depends on the architecture name only
    model = timm.create_model(name, pretrained=False, depth=1)
    assert eval_crop_pct(model) == expected


def test_eval_crop_pct_follows_the_models_own_input_size():
    import timm

    # An img_size override is not in the pretrained config: DeiT at 288 is not the 256/224 rule.
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=288)
    assert eval_crop_pct(model) == 0.9


# --- the validation split recorded by training runs --------------------------------------


@pytest.mark.parametrize(
    ("record", "overlap"),
    [
        # records from before the split was fixed: drawn with val_size and the training seed
        ({"val_size": 5000, "seed": 1, "train_limit": None}, 4588),
        ({"val_size": 5000, "seed": 1, "train_limit": 1000}, 87),
        ({"val_size": 200, "seed": 5, "train_limit": None}, 4985),
        ({"val_size": 5000, "seed": 0, "train_limit": None}, 0),
        # records that name their split
        ({"seed": 1, "train_limit": None, "validation_split": {"size": 5000, "seed": 0}}, 0),
        ({"seed": 0, "validation_split": {"size": 5000, "seed": 1}}, 4588),
    ],
    ids=["old-seed-1", "old-seed-1-limit", "old-200-seed-5", "old-seed-0", "new", "other-split"],
)
def test_val_overlap_counts_val_images_a_run_trained_on(record, overlap):
    assert val_overlap(record) == overlap


def test_recorded_training_config_of_shipped_models():
    for name in ("collabvit_fmnist_edge", "collabvit_fmnist_server.fmnist"):
        record = recorded_training_config(name, None)
        assert record["seed"] == 0 and record["validation_split"] == {"size": 5000, "seed": 0}
        assert val_overlap(record) == 0
    from collabvit.models.zoo import weights_file

    shipped = weights_file("collabvit_fmnist_edge")
    assert recorded_training_config("collabvit_fmnist_edge", shipped)["seed"] == 0
    assert recorded_training_config("deit_tiny_patch16_224", None) is None


def test_recorded_training_config_of_weight_files(tmp_path):
    weights = {"w": torch.zeros(2)}
    recorded = tmp_path / "run.safetensors"
    save_file(
        weights, str(recorded), metadata={"config": json.dumps({"seed": 1, "val_size": 5000})}
    )
    assert recorded_training_config("collabvit_fmnist_edge", recorded) == {
        "seed": 1,
        "val_size": 5000,
    }
    bare = tmp_path / "bare.safetensors"
    save_file(weights, str(bare), metadata={"model": "x"})
    broken = tmp_path / "broken.safetensors"
    save_file(weights, str(broken), metadata={"config": "{not json"})
    pth = tmp_path / "weights.pth"
    torch.save(weights, pth)
    for path in (bare, broken, pth, tmp_path / "absent.safetensors"):
        assert recorded_training_config("collabvit_fmnist_edge", path) is None


# --- ImageNet labels, class names, label fit ---------------------------------------------

SYNSET_LAYOUT = {  # ImageNet-1k indices 0, 217 and 701
    "n01440764": [(255, 0, 0)],
    "n02102040": [(0, 255, 0), (0, 0, 255)],
    "n03888257": [(9, 9, 9)],
}


def test_synset_folders_get_their_imagenet_labels(tmp_path, deit_tiny):
    _write_pngs(tmp_path / "val", SYNSET_LAYOUT)
    dataset = image_folder(tmp_path, deit_tiny)
    assert dataset.classes == ["n01440764", "n02102040", "n03888257"]
    assert [dataset[i][1] for i in range(len(dataset))] == [0, 217, 217, 701]
    assert label_fit_problem(dataset, 1000) is None
    names = class_names(dataset, 1000)
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca"
    assert (
        names[1] == "goldfish, Carassius auratus"
    )  # every class has a name, not only present ones
    assert names[217] == "English springer, English springer spaniel"
    assert class_names(torch.utils.data.Subset(dataset, [0]), 1000) == names


def test_synset_folders_for_a_model_that_is_not_an_imagenet_classifier(tmp_path):
    import timm

    _write_pngs(tmp_path, SYNSET_LAYOUT)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1)
    dataset = image_folder(tmp_path, model)
    assert [dataset[i][1] for i in range(len(dataset))] == [0, 1, 1, 2]
    assert label_fit_problem(dataset, 3) is None
    assert class_names(dataset, 4) == ["n01440764", "n02102040", "n03888257", "3"]


def test_other_folders_are_numbered_in_order_and_flagged(tmp_path, deit_tiny):
    _write_pngs(tmp_path, {**LAYOUT, "n01440764": [(1, 2, 3)]})  # one synset is not enough
    dataset = image_folder(tmp_path, deit_tiny)
    assert sorted({dataset.targets[i] for i in range(len(dataset))}) == [0, 1, 2, 3]
    problem = label_fit_problem(dataset, 1000)
    assert problem.startswith(
        f"{tmp_path}: labels 0..3 are assigned by folder order and may not match the model's "
        "1000 classes"
    )
    assert "n01440764" in problem and "\n" not in problem  # suggests synset names
    assert label_fit_problem(dataset, 4) is None
    assert label_fit_problem(dataset, 2) == (
        f"{tmp_path} has 4 class folders but the model has 2 classes: "
        "labels 2..3 can never be predicted"
    )
    assert class_names(dataset, 6) == ["ant", "bee", "cat", "n01440764", "4", "5"]
    assert class_names(dataset, 2) == ["ant", "bee"]


def test_label_fit_and_class_names_of_other_datasets(tmp_path):
    _fake_fmnist(tmp_path, compress=False)
    fmnist = FashionMNIST(tmp_path, "test")
    assert label_fit_problem(fmnist, 10) is None
    assert label_fit_problem(fmnist, 1000) == "the data has 10 classes but the model has 1000"
    assert class_names(fmnist, 10) == list(FASHION_MNIST_CLASSES)
    assert class_names(fmnist, 11)[10] == "10"
    path = tmp_path / "data.safetensors"
    save_file({"images": torch.zeros(3, 1, 2, 2), "targets": torch.tensor([3, 0, 12])}, str(path))
    tensors = TensorFile(path)
    assert label_fit_problem(tensors, 13) is None
    assert label_fit_problem(tensors, 10) == "labels span 0..12 but the model's classes are 0..9"
    assert class_names(tensors, 3) == ["0", "1", "2"]


# --- unreadable images and the evaluation loader -----------------------------------------


def _folder_with_broken_images(root: Path) -> tuple[Path, Path]:
    """ROOT/a: good0.png, good1.png; ROOT/b: bad.png (not an image), cut.png (truncated)."""
    from PIL import Image

    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "a" / f"good{index}.png")
    bad, cut = root / "b" / "bad.png", root / "b" / "cut.png"
    bad.write_bytes(b"this is not an image")
    whole = (root / "a" / "good0.png").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    return bad, cut


def test_unreadable_images_raise_naming_the_file(tmp_path, deit_tiny):
    bad, cut = _folder_with_broken_images(tmp_path)
    dataset = image_folder(tmp_path, deit_tiny)
    assert dataset[0][0].shape == (3, 224, 224)
    with pytest.raises(DataError) as caught:
        dataset[2]
    assert str(caught.value) == f"cannot read image {bad}: not an image format PIL knows"
    with pytest.raises(DataError, match=f"^cannot read image {cut}: image file is truncated"):
        dataset[3]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_indexed_loader_raises_one_line_for_an_unreadable_image(tmp_path, deit_tiny, num_workers):
    bad, _ = _folder_with_broken_images(tmp_path)
    loader = indexed_loader(image_folder(tmp_path, deit_tiny), 4, num_workers)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert str(caught.value) == f"cannot read image {bad}: not an image format PIL knows"


def test_indexed_loader_skips_unreadable_images(tmp_path, deit_tiny):
    _folder_with_broken_images(tmp_path)
    dataset = image_folder(tmp_path, deit_tiny)
    batches = list(indexed_loader(dataset, 3, 0, skip_unreadable=True))
    assert [len(targets) for _, targets, _ in batches] == [2]  # the batch of 3 lost bad.png
    images, targets, indices = batches[0]
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.uint8
    assert targets.tolist() == [0, 0] and indices.tolist() == [0, 1]
    # a batch of only unreadable images is left out, not yielded empty
    singles = list(indexed_loader(dataset, 1, 0, skip_unreadable=True))
    assert [indices.tolist() for _, _, indices in singles] == [[0], [1]]


def test_indexed_loader_yields_dataset_indices(tmp_path):
    path = tmp_path / "data.safetensors"
    images = torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2)
    save_file({"images": images, "targets": torch.tensor([4, 3, 2, 1, 0])}, str(path))
    subset = torch.utils.data.Subset(TensorFile(path), [1, 2, 3, 4])
    batches = list(indexed_loader(subset, 3, 0))
    assert [b[2].tolist() for b in batches] == [[0, 1, 2], [3]]
    assert [b[1].tolist() for b in batches] == [[3, 2, 1], [0]]
    assert all(b[1].dtype == torch.int64 and b[2].dtype == torch.int64 for b in batches)
    assert torch.equal(batches[0][0], images[1:4])


@pytest.mark.parametrize(
    ("batch_size", "num_workers", "message"),
    [(4, -1, "number of workers must be >= 0, got -1"), (0, 0, "batch size must be >= 1")],
)
def test_indexed_loader_rejects_bad_settings(tmp_path, batch_size, num_workers, message):
    with pytest.raises(DataError, match=message):
        indexed_loader(torch.utils.data.TensorDataset(torch.zeros(2)), batch_size, num_workers)


# --- a file where a folder is expected, and the reverse ----------------------------------


def test_a_file_given_for_a_data_folder(tmp_path, deit_tiny):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=f"^{path} is a file, not a folder: point --data-path"):
        FashionMNIST(path, "test")
    with pytest.raises(DataError, match=f"^{path} is a file, not a folder"):
        build_dataset("fmnist", path, model=None)
    with pytest.raises(DataError, match=f"^{path} is a file, not a folder: --data-set imagenet"):
        build_dataset("imagenet", path, deit_tiny)


def test_a_folder_given_for_a_tensor_file(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path} is a folder, not a file: --data-set tensors"):
        build_dataset("tensors", tmp_path, model=None)


@pytest.mark.parametrize("count, seed", [(0, 0), (1, 3), (10, 0), (1000, 123), (60000, 0),
                                         (60000, 7)])  # fmt: skip
def test_the_numpy_permutation_is_torchs_randperm(count, seed):
    """The split is cut without torch, yet is the one collabvit's models were trained and
    chosen on: torch.randperm's order, for the validation seed and others (old records)."""
    from collabvit.lite.fashion import permutation

    expected = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    np.testing.assert_array_equal(permutation(count, seed), expected.numpy())


def test_the_validation_split_is_pinned():
    """The 5,000 validation images of the 60,000 (seed 0), as every shipped model and
    operating point has used them."""
    from collabvit.lite.fashion import validation_split

    train, val = validation_split(60000)
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    assert val.tolist() == order[:5000].sort().values.tolist()
    assert train.tolist() == order[5000:].sort().values.tolist()
    # and pinned by value, should torch's randperm ever change
    assert val[:5].tolist() == [1, 3, 47, 49, 80] and int(val.sum()) == 149911330
