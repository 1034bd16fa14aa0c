"""The README's picture of the cluttered Fashion-MNIST canvases.

    python scripts/cluttered_examples.py [--out docs/data/cluttered_examples.png]

The first 24 test canvases (default ClutterSpec), each titled with its label, with the
item's patches (its mask on the 7 x 7 grid of 8 x 8 patches) outlined.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collabvit.data import ClutteredFashionMNIST
from collabvit.research import plots

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "data" / "cluttered_examples")
    parser.add_argument("--count", type=int, default=24)
    args = parser.parse_args()
    data = ClutteredFashionMNIST(split="test")
    count = args.count
    titles = [f"{index}: {data.classes[int(data.labels[index])]}" for index in range(count)]
    figure = plots.canvas_examples_figure(data.images[:count], data.masks[:count], titles,
                                          (data.spec.patch, data.spec.patch))  # fmt: skip
    for path in plots.save(figure, args.out, ("png",)):
        print(path)


if __name__ == "__main__":
    main()
