"""A shipped pair's learning curves, from its model cards.

    python scripts/learning_curves.py [--data-set fmnist|fmnist-cluttered] [--out STEM]

Validation accuracy per epoch (and training accuracy on the augmented, token-dropped
batches) of the data set's shipped edge and server, and of the CNN teacher they were
distilled from when its card is in models/; the test accuracy of each shipped file as a
dot. Writes STEM.png and STEM.svg (default: docs/training/learning_curves for Fashion-MNIST,
docs/training/cluttered_learning_curves for the cluttered canvases).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collabvit.lite.specs import SHIPPED_PAIRS
from collabvit.models import zoo
from collabvit.research.plots import plot_learning_curves

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-set", choices=sorted(SHIPPED_PAIRS), default="fmnist")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    teacher = next(name for name, family in zoo.TEACHER_FAMILIES.items()
                   if family.data_set == args.data_set)  # fmt: skip
    stem = "learning_curves" if args.data_set == "fmnist" else "cluttered_learning_curves"
    out = args.out or REPO / "docs" / "training" / stem
    edge, server = SHIPPED_PAIRS[args.data_set]

    logs, test_acc = {}, {}
    for name in (teacher, server, edge):
        card = (zoo.read_card(REPO / "models" / teacher / "model_card.json") if name == teacher
                else zoo.model_card(name))  # fmt: skip
        log = card.get("run_card", card).get("log")
        if not log:
            print(f"{name}: no model card with a training log, left out")
            continue
        logs[name], test_acc[name] = log, card["test_acc"]
    if not logs:
        raise SystemExit("no model card with a training log")
    for path in plot_learning_curves(logs, out, test_acc):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


if __name__ == "__main__":
    main()
