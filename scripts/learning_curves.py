"""The shipped Fashion-MNIST models' learning curves, from their model cards.

    python scripts/learning_curves.py [--out docs/training/learning_curves]

Validation accuracy per epoch (and training accuracy on the augmented, token-dropped
batches) of the shipped edge and server, and of the CNN teacher they were distilled
from when its card is in models/; the test accuracy of each shipped file as a dot.
Writes OUT.png and OUT.svg.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collabvit import zoo
from collabvit.plots import plot_learning_curves

REPO = Path(__file__).resolve().parents[1]
TEACHER_CARD = REPO / "models" / zoo.TEACHER / "model_card.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "training" / "learning_curves")
    args = parser.parse_args()

    logs, test_acc = {}, {}
    for name in (zoo.TEACHER, zoo.SERVER, zoo.EDGE):
        card = zoo.read_card(TEACHER_CARD) if name == zoo.TEACHER else zoo.model_card(name)
        log = card.get("run_card", card).get("log")
        if not log:
            print(f"{name}: no model card with a training log, left out")
            continue
        logs[name], test_acc[name] = log, card["test_acc"]
    if not logs:
        raise SystemExit("no model card with a training log")
    for path in plot_learning_curves(logs, args.out, test_acc):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


if __name__ == "__main__":
    main()
