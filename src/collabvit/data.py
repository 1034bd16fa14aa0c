"""Datasets yielding unnormalised images: (uint8 [C, H, W], label).

Each model normalises with its own mean/std (see vit.Normalization).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import timm.data
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

DATA_SETS = ("fmnist", "imagenet", "tensors")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or point --data-path at a folder holding the four *-idx?-ubyte(.gz) files"
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DataError(ValueError):
    """A dataset cannot be found or read (a user-facing, one-line reason)."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # BadGzipFile is an OSError; a cut stream is EOFError
        raise DataError(f"cannot read {path}: {error}") from error
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}"
        )
    return body.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {FASHION_MNIST_HINT}")


# collabvit's training runs hold out these training images for every choice
# (model selection, operating points); the test set is only reported.
FASHION_MNIST_VAL_SIZE = 5000
FASHION_MNIST_VAL_SEED = 0
FASHION_MNIST_SPLITS = ("test", "val", "train", "train-all")


def split_indices(count: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random train/validation split of range(count): (train [count - v], val [v])."""
    if val_size >= count:
        raise ValueError(f"validation size {val_size} leaves no training images out of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files: uint8 [1, 28, 28] images, labels 0..9.

    Splits: ``test`` (10,000), ``train-all`` (60,000), and the training set cut
    as collabvit's training does: ``val`` (5,000 held out, seed 0) and ``train``
    (the other 55,000).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "test") -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST folder {root} does not exist: {FASHION_MNIST_HINT}")
        if split not in FASHION_MNIST_SPLITS:
            choices = ", ".join(FASHION_MNIST_SPLITS)
            raise DataError(f"Fashion-MNIST split must be one of {choices}, got {split!r}")
        prefix = "t10k" if split == "test" else "train"
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        if split in ("train", "val"):
            if len(labels) <= FASHION_MNIST_VAL_SIZE:
                raise DataError(
                    f"{root} holds {len(labels)} training images, too few for the "
                    f"{FASHION_MNIST_VAL_SIZE}-image validation split; use train-all"
                )
            train, val = split_indices(len(labels), FASHION_MNIST_VAL_SIZE, FASHION_MNIST_VAL_SEED)
            keep = train if split == "train" else val
            self.images, self.labels = self.images[keep], self.labels[keep]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class TensorFile(Dataset):
    """A safetensors file with ``images`` [n, C, H, W] and ``targets`` [n] (no transform)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tensor file {path} does not exist")
        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise DataError(f"cannot read {path} as safetensors: {error}") from error
        if "images" not in tensors or "targets" not in tensors:
            raise DataError(f"{path} must hold 'images' and 'targets', found {sorted(tensors)}")
        self.images, self.targets = tensors["images"], tensors["targets"].long()
        if self.images.dim() != 4 or len(self.images) != len(self.targets):
            raise DataError(f"{path}: images must be [n, C, H, W] with one target each")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


# The reference evaluates DeiT as DeiT's own code does: resize to 256/224 of the
# input, then centre crop; timm's DeiT configs say 0.9 instead of 0.875.
DEIT_CROP_PCT = 224 / 256


def eval_crop_pct(model: nn.Module) -> float:
    """The centre-crop fraction the reference uses for this model (DeiT: 0.875, else timm's)."""
    architecture = (
        model.pretrained_cfg.get("architecture", "") if hasattr(model, "pretrained_cfg") else ""
    )
    if architecture.startswith("deit"):
        return DEIT_CROP_PCT
    return timm.data.resolve_data_config(model=model)["crop_pct"]


def image_folder(root: str | Path, model: nn.Module, crop_pct: float | None = None) -> ImageFolder:
    """ImageNet-style folder with the model's timm eval transform, unnormalised uint8.

    Uses ROOT/val/<class>/<image> when ROOT/val exists (the reference's layout),
    else ROOT/<class>/<image>. `crop_pct` defaults to eval_crop_pct(model).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    folder = root / "val" if (root / "val").is_dir() else root
    config = timm.data.resolve_data_config(model=model)
    config["crop_pct"] = crop_pct if crop_pct is not None else eval_crop_pct(model)
    transform = timm.data.create_transform(**config, is_training=False, normalize=False)
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(
            f"{folder} is not an ImageNet-style folder (<class>/<image>): {error}"
        ) from error


def build_dataset(
    name: str,
    path: str | Path | None,
    model: nn.Module,
    split: str = "test",
    crop_pct: float | None = None,
) -> Dataset:
    """The evaluation dataset named on the command line.

    Args:
        name: one of DATA_SETS.
        path: its location (Fashion-MNIST defaults to the Debian package's folder).
        model: the edge model (its eval transform for ImageNet-style data).
        split: Fashion-MNIST split.
        crop_pct: centre-crop fraction for ImageNet-style data (default: the reference's).
    """
    if name == "fmnist":
        return FashionMNIST(path or FASHION_MNIST_ROOT, split)
    if name == "imagenet":
        if path is None:
            raise DataError("--data-set imagenet needs --data-path ROOT (ROOT/val/<class>/<image>)")
        return image_folder(path, model, crop_pct)
    if name == "tensors":
        if path is None:
            raise DataError("--data-set tensors needs --data-path FILE.safetensors")
        return TensorFile(path)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATA_SETS)}")
