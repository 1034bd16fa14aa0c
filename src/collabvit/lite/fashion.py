"""Fashion-MNIST's IDX files as numpy arrays (no torch): what both the torch data sets
(data.py) and the ONNX edge (`collabvit edge --onnx`, cli.py) read."""

from __future__ import annotations

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


# The splits readable without torch: `val` and `train` are cut by data.validation_split's
# torch permutation, so only a workstation (with torch) makes them.
UNCUT_SPLITS = ("test", "train-all")


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
    (its published canvases, draw 0, with the `clutter` changes) on an uncut split, the
    first `limit` of them."""
    from collabvit.lite.cluttered import compose

    if data_set not in ("fmnist", "fmnist-cluttered"):
        raise DataError(f"without torch only fmnist and fmnist-cluttered are read, not {data_set}")
    if split not in UNCUT_SPLITS:
        raise DataError(f"without torch only the {' and '.join(UNCUT_SPLITS)} splits are read "
                        f"(the {split} split is cut by torch's permutation)")  # fmt: skip
    items, labels = read_fashion_mnist(root or FASHION_MNIST_ROOT,
                                       "test" if split == "test" else "train")  # fmt: skip
    count = len(labels) if limit is None else min(limit, len(labels))
    if data_set == "fmnist":
        return items[:count, None].copy(), labels[:count]
    canvases, _ = compose(items, np.arange(count), clutter_spec(clutter), split)
    return canvases[:, None], labels[:count]
