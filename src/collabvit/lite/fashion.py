"""Fashion-MNIST's IDX files as numpy arrays (no torch): what both the torch data sets
(data.py) and the ONNX edge (`collabvit edge --onnx`, cli.py) read."""

from __future__ import annotations

import functools
import gzip
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

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


def read_fashion_mnist(root: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """One of the two IDX parts, `test` (t10k) or `train`: uint8 images [n, 28, 28] and
    int64 labels [n]; DataError with a one-line reason for a missing or broken folder."""
    root = Path(root)
    if root.is_file():
        raise DataError(
            f"{root} is a file, not a folder: point --data-path at the folder holding "
            "the four Fashion-MNIST *-idx?-ubyte(.gz) files"
        )
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist: {FASHION_MNIST_HINT}")
    prefix = "t10k" if part == "test" else "train"
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


# collabvit's training runs hold out these training images for every choice
# (model selection, operating points); the test set is only reported. This is
# the one definition of the cut: `--split val`, `--split train` and training use it.
FASHION_MNIST_VAL_SIZE = 5000
FASHION_MNIST_VAL_SEED = 0
FASHION_MNIST_TRAIN_SIZE = 60000
VALIDATION_SPLIT = {"size": FASHION_MNIST_VAL_SIZE, "seed": FASHION_MNIST_VAL_SEED}


def permutation(count: int, seed: int) -> np.ndarray:
    """A random order of range(count): int64 [count], the very order of
    ``torch.randperm(count, generator=torch.Generator().manual_seed(seed))`` on the CPU.

    torch shuffles with Fisher-Yates, drawing 32-bit words from an MT19937 seeded the
    classic way; numpy's MT19937 seeded the same way gives the same words, so the split
    is cut without torch and a device reads the same `val` images as a workstation.
    """
    bits = np.random.MT19937()
    bits.state = np.random.RandomState(seed).get_state(legacy=False)
    words = bits.random_raw(max(count - 1, 0)).tolist()
    order = list(range(count))  # swapping in a list is twice as fast as in an array
    for i, word in enumerate(words):
        j = i + word % (count - i)
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)


def split_indices(count: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/validation split of range(count): sorted int64 (train
    [count - val_size], val [val_size]), the caller's own copies."""
    if val_size >= count:
        raise ValueError(f"validation size {val_size} leaves no training images out of {count}")
    train, val = _cut(count, val_size, seed)
    return train.copy(), val.copy()


@functools.lru_cache(maxsize=4)
def _cut(count: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # A pair's loading asks for the same cut several times (the data set, each model's
    # recorded training); the Python shuffle takes tens of milliseconds each time.
    order = permutation(count, seed)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def validation_split(count: int) -> tuple[np.ndarray, np.ndarray]:
    """collabvit's train/validation cut of a `count`-image training set (VALIDATION_SPLIT):
    sorted int64 indices, train [count - 5000] and val [5000]."""
    return split_indices(count, FASHION_MNIST_VAL_SIZE, FASHION_MNIST_VAL_SEED)


def split_of(images: np.ndarray, labels: np.ndarray, split: str, root) -> tuple:
    """The `split` (test, val, train, train-all) of the images and labels read from its
    Fashion-MNIST file (the test file for test, the training file otherwise)."""
    if split not in ("train", "val"):
        return images, labels
    if len(labels) <= FASHION_MNIST_VAL_SIZE:
        raise DataError(f"{root} holds {len(labels)} training images, too few for the "
                        f"{FASHION_MNIST_VAL_SIZE}-image validation split; use train-all")
    train, val = validation_split(len(labels))
    keep = train if split == "train" else val
    return images[keep], labels[keep]


def clutter_spec(changes: Mapping[str, int] | None, model_patch: int | None = None):
    """cluttered.spec_with, its reasons as DataError: the canvases of --clutter."""
    from collabvit.lite.cluttered import spec_with

    try:
        return spec_with(changes, model_patch)
    except ValueError as error:
        raise DataError(f"cluttered canvases: {error}") from error


def read_split_images(
    data_set: str,
    root: str | Path | None,
    split: str,
    limit: int | None = None,
    clutter: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 1, H, W] and labels int64 [n] of `fmnist` or `fmnist-cluttered`
    (its published canvases, draw 0, with the `clutter` changes) on any split, the first
    `limit` of them (a canvas's clutter comes from its whole split)."""
    from collabvit.lite.cluttered import compose

    if data_set not in ("fmnist", "fmnist-cluttered"):
        raise DataError(f"without torch only fmnist and fmnist-cluttered are read, not {data_set}")
    root = root or FASHION_MNIST_ROOT
    items, labels = split_of(*read_fashion_mnist(root, "test" if split == "test" else "train"),
                             split, root)  # fmt: skip
    count = len(labels) if limit is None else min(limit, len(labels))
    if data_set == "fmnist":
        return items[:count, None].copy(), labels[:count]
    canvases, _ = compose(items, np.arange(count), clutter_spec(clutter), split)
    return canvases[:, None], labels[:count]
