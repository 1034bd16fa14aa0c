"""Put a trained run into the package as a shipped, timm-registered model.

    python scripts/ship_model.py runs/train/edge collabvit_fmnist_edge \\
        --recipe "collabvit train --model collabvit_fmnist_edge --out-dir runs/train/edge ..."

Stores the weights as float16 when that moves the test accuracy by at most
0.05 pt (float32 otherwise), and writes the model card beside them: the
run's card (config, recipe, seed, data, validation accuracy, log) plus the
test accuracy of the shipped file on its data set's test split (Fashion-MNIST or the
cluttered canvases), on all 10,000 test images and on the first 2,000 (the slice the tests
re-check), and the collabvit version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import timm
from safetensors.torch import save_file

from collabvit import __version__, versions
from collabvit.data import build_dataset
from collabvit.models import vit, zoo
from collabvit.research.train import model_accuracy

SLICE = 2000
MAX_FP16_CHANGE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name", choices=sorted(zoo.ARCHITECTURES))
    parser.add_argument("--recipe", required=True, help="the command that trained the run")
    args = parser.parse_args()

    run_card = json.loads((args.run_dir / "model_card.json").read_text())
    model = vit.create_vit(args.name, args.run_dir / "model.safetensors")
    test = build_dataset(zoo.FAMILIES[args.name].data_set, None, model, split="test")
    fp32_acc = model_accuracy(model, test.images, test.labels)

    target = zoo.weights_file(args.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    half = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(half, str(target), metadata={"model": args.name, "collabvit": __version__})
    shipped = timm.create_model(args.name, pretrained=True)
    shipped_acc = model_accuracy(shipped, test.images, test.labels)
    storage = "float16"
    if abs(shipped_acc - fp32_acc) > MAX_FP16_CHANGE:
        save_file(
            model.state_dict(), str(target), metadata={"model": args.name, "collabvit": __version__}
        )
        shipped = timm.create_model(args.name, pretrained=True)
        shipped_acc, storage = model_accuracy(shipped, test.images, test.labels), "float32"

    card = {
        "name": args.name,
        "load": f'import collabvit.models.zoo, timm; '
                f'timm.create_model("{args.name}", pretrained=True)',
        "storage": storage,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "test_acc": shipped_acc,
        "test_acc_float32": fp32_acc,
        f"test_acc_first_{SLICE}": model_accuracy(
            shipped, test.images[:SLICE], test.labels[:SLICE]
        ),
        "validation_acc": run_card["validation_acc"],
        "recipe": args.recipe,
        **versions(),
        "run_card": run_card,
    }
    (target.parent / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: v for k, v in card.items() if k != "run_card"}, indent=2))


if __name__ == "__main__":
    main()
