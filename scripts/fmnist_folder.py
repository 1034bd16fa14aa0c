"""Fashion-MNIST as an ImageNet-style image folder: PNG files in one folder per class, the
layout `collabvit train --data-set imagenet` (and `eval`, `sweep`) read, to try the own-data
recipe on images that are here.

    python scripts/fmnist_folder.py OUT [--train-per-class 300] [--val-per-class 50]

OUT/train/<class>/<index>.png from collabvit's training split of Fashion-MNIST, and
OUT/val/<class>/<index>.png from its validation split (`--split val`), each the first N
images of every class. Class folders are named "<label>_<name>" so that their sorted order
is Fashion-MNIST's label order. Writes OUT/README.txt saying how it was made.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image

from collabvit import versions
from collabvit.data import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, FashionMNIST


def folder_name(label: int) -> str:
    return f"{label}_{re.sub(r'[^A-Za-z0-9-]+', '-', FASHION_MNIST_CLASSES[label])}"


def write_split(data: FashionMNIST, folder: Path, per_class: int) -> int:
    labels = data.labels.numpy()
    written = 0
    for label in range(len(FASHION_MNIST_CLASSES)):
        target = folder / folder_name(label)
        target.mkdir(parents=True, exist_ok=True)
        for row in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(data.images[row, 0].numpy()).save(target / f"{row}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--data-path", type=Path, default=FASHION_MNIST_ROOT)
    args = parser.parse_args()
    counts = {split: write_split(FashionMNIST(args.data_path, split), args.out / split, count)
              for split, count in (("train", args.train_per_class),
                                   ("val", args.val_per_class))}  # fmt: skip
    (args.out / "README.txt").write_text(
        f"Fashion-MNIST from {args.data_path} as class folders: {counts['train']} training "
        f"images (the first {args.train_per_class} of each class of collabvit's training "
        f"split), {counts['val']} validation images (the first {args.val_per_class} of each "
        f"class of --split val). Made by scripts/fmnist_folder.py, collabvit "
        f"{versions()['collabvit']}.\n")  # fmt: skip
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.out}")


if __name__ == "__main__":
    main()
