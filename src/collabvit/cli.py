"""The `collabvit` command.

Flags are kebab-case; the reference implementation's spellings (snake_case,
e.g. ``--masking_mode``, ``--uncer_th``, ``--data_path``) are accepted too.
User mistakes exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import torch
from torch.utils.data import DataLoader, Subset

from collabvit import __version__, versions, vit, zoo
from collabvit.data import DATA_SETS, FASHION_MNIST_SPLITS, FashionMNIST, build_dataset
from collabvit.edge import EdgeConfig, EdgeDevice
from collabvit.evaluate import evaluate, write_per_image, write_results
from collabvit.metrics import format_summary
from collabvit.scoring import ATTENTION_MODES
from collabvit.selection import MASKING_MODES
from collabvit.server import Server
from collabvit.train import TrainConfig, Trainer
from collabvit.uncertainty import UNCERTAINTY_MODES, canonical_uncertainty_mode

# The default run: the shipped Fashion-MNIST pair at an operating point chosen on the
# validation split by scripts/fmnist_results.py (benchmarks/fmnist_results.json records it).
DEFAULT_DELTA = 0.99
DEFAULT_ETA = 0.633


class UsageError(Exception):
    """A user mistake found after parsing; reported in one line with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add(group, *flags: str, **kwargs) -> None:
    """Add a kebab-case flag plus its snake_case spelling (the reference's)."""
    spellings = list(flags)
    for flag in flags:
        snake = flag.replace("-", "_").replace("__", "--", 1)
        if snake not in spellings:
            spellings.append(snake)
    group.add_argument(*spellings, **kwargs)


def _uncertainty_mode(text: str) -> str:
    try:
        return canonical_uncertainty_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _checked_number(parse, valid, expected: str):
    """An argparse type: parse a number and check its range, with a one-line reason."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from error
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


_positive_int = _checked_number(int, lambda v: v >= 1, "a whole number >= 1")
_fraction = _checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    _add(
        models,
        "--model",
        default=zoo.EDGE,
        metavar="NAME",
        help="edge model: a timm ViT name, e.g. deit_tiny_patch16_224 (default: the shipped "
        "Fashion-MNIST edge, %(default)s)",
    )
    _add(
        models,
        "--model-weights",
        metavar="FILE",
        help="edge weights: .safetensors or .pth (the DeiT release's nested 'model' is fine); "
        "without it timm's hub is asked",
    )
    _add(
        models,
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="edge architecture overrides for timm.create_model, e.g. '{\"img_size\": 32}'",
    )
    _add(
        models,
        "--server-model",
        default=zoo.SERVER,
        metavar="NAME",
        help="server model: a timm ViT name, e.g. deit_base_patch16_224 (default: the shipped "
        "Fashion-MNIST server, %(default)s)",
    )
    _add(models, "--server-weights", metavar="FILE", help="server weights, as --model-weights")
    _add(
        models,
        "--server-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="server architecture overrides, as --model-kwargs",
    )

    data = parser.add_argument_group("data")
    _add(
        data,
        "--data-set",
        choices=DATA_SETS,
        default="fmnist",
        help="imagenet: ImageNet-style folder with the edge model's eval transform; fmnist: "
        "Fashion-MNIST IDX files; tensors: a safetensors file with images and targets "
        "(default: %(default)s)",
    )
    _add(
        data,
        "--data-path",
        metavar="PATH",
        help="ROOT with ROOT/val/<class>/<image> or ROOT/<class>/<image>; the Fashion-MNIST "
        "folder (default /usr/share/datasets/fashion-mnist); or the tensor file",
    )
    _add(
        data,
        "--split",
        choices=FASHION_MNIST_SPLITS,
        default="test",
        help="Fashion-MNIST split: test; val = the 5,000 training images collabvit's training "
        "holds out (seed 0); train = the other 55,000; train-all (default: %(default)s)",
    )
    _add(
        data,
        "--crop-pct",
        type=_fraction,
        metavar="F",
        help="centre-crop fraction for ImageNet-style data (default: 0.875 = resize 256, crop "
        "224 for DeiT as the reference does; timm's value for other models)",
    )
    _add(data, "--limit", type=_positive_int, metavar="N", help="evaluate only the first N images")
    _add(
        data,
        "--inputs-normalized",
        action="store_true",
        help="images are already normalised: feed them to both models as they are",
    )
    _add(data, "--batch-size", type=_positive_int, default=64, help="(default: %(default)s)")
    _add(
        data,
        "--num-workers",
        type=int,
        default=0,
        help="data loading processes (default: %(default)s)",
    )

    method = parser.add_argument_group("collaborative inference (DESIGN.md section 1)")
    _add(
        method,
        "--attention-mode",
        choices=ATTENTION_MODES,
        default="mean",
        help="patch scores from the last block (mean) or attention rollout (default: %(default)s)",
    )
    _add(
        method,
        "--masking-mode",
        choices=MASKING_MODES,
        default="attention_sum_threshold",
        help="patch selection policy (default: %(default)s)",
    )
    _add(
        method,
        "--masking-th",
        type=float,
        default=DEFAULT_DELTA,
        metavar="TH",
        help="k for random/topk, score threshold for attention_threshold, cumulative share "
        "delta in [0, 1] for attention_sum_threshold (default: %(default)s)",
    )
    _add(
        method,
        "--uncer-mode",
        type=_uncertainty_mode,
        default="min_entropy",
        metavar="{" + ",".join(UNCERTAINTY_MODES) + "}",
        help="uncertainty measure of the transmission gate; none sends every image "
        "(default: %(default)s)",
    )
    _add(
        method,
        "--uncer-th",
        type=float,
        default=DEFAULT_ETA,
        metavar="ETA",
        help="gate threshold eta: entropies below it / margin above it stay at the edge "
        "(default: %(default)s)",
    )

    run = parser.add_argument_group("run")
    _add(run, "--device", default="cpu", help="torch device for both models (default: %(default)s)")
    _add(
        run, "--seed", type=int, default=0, help="seed of the random policy (default: %(default)s)"
    )
    _add(
        run,
        "--results-file",
        metavar="FILE",
        help="write every figure and the resolved config as JSON",
    )
    _add(run, "--per-image", metavar="FILE", help="write one CSV row per image")
    _add(run, "--quiet", action="store_true", help="no progress bar")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    _add(
        parser,
        "--model",
        default=defaults.model,
        metavar="NAME",
        help="timm ViT name or a named collabvit architecture: collabvit_fmnist_edge, "
        "collabvit_fmnist_server (default: %(default)s)",
    )
    _add(
        parser,
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="architecture overrides for timm.create_model, e.g. '{\"depth\": 6}'",
    )
    _add(
        parser,
        "--data-path",
        default=defaults.data_path,
        metavar="DIR",
        help="Fashion-MNIST IDX folder (default: %(default)s)",
    )
    _add(
        parser,
        "--out-dir",
        required=True,
        metavar="DIR",
        help="checkpoint (last.pt), log.jsonl, config.json, model.safetensors, model_card.json",
    )
    _add(parser, "--resume", action="store_true", help="continue from DIR/last.pt")
    _add(
        parser,
        "--epochs",
        type=_positive_int,
        default=defaults.epochs,
        help="(default: %(default)s)",
    )
    _add(
        parser,
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help="(default: %(default)s)",
    )
    _add(
        parser,
        "--lr",
        type=float,
        default=defaults.lr,
        help="peak AdamW learning rate (default: %(default)s)",
    )
    _add(parser, "--min-lr", type=float, default=defaults.min_lr, help="(default: %(default)s)")
    _add(
        parser,
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="(default: %(default)s)",
    )
    _add(
        parser,
        "--warmup-epochs",
        type=float,
        default=defaults.warmup_epochs,
        help="(default: %(default)s)",
    )
    _add(
        parser,
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help="(default: %(default)s)",
    )
    _add(
        parser,
        "--val-size",
        type=_positive_int,
        default=defaults.val_size,
        help="validation images carved from the training set (default: %(default)s)",
    )
    _add(
        parser,
        "--train-limit",
        type=_positive_int,
        metavar="N",
        help="train on only N images (smoke tests)",
    )
    _add(
        parser,
        "--token-drop",
        type=float,
        default=defaults.token_drop,
        metavar="P",
        help="token-drop training: each batch keeps a random subset of between (1-P) N and N "
        "patches per image (default: %(default)s, off)",
    )
    _add(parser, "--no-augment", action="store_true", help="no random shift/flip")
    _add(
        parser,
        "--bf16",
        action="store_true",
        help="bfloat16 autocast (faster on CPUs with AVX512-BF16)",
    )
    _add(parser, "--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    _add(parser, "--quiet", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    try:
        config = TrainConfig(
            model=args.model, model_kwargs=args.model_kwargs, data_path=args.data_path,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing, val_size=args.val_size,
            train_limit=args.train_limit, token_drop=args.token_drop,
            augment=not args.no_augment, bf16=args.bf16, seed=args.seed,
        )  # fmt: skip
        trainer = Trainer(config, args.out_dir, progress=False if args.quiet else None)
        resumed = trainer.resume() if args.resume else False
        if not args.resume and trainer.checkpoint_path.is_file():
            raise UsageError(
                f"{trainer.checkpoint_path} exists: pass --resume or another --out-dir"
            )
        test = FashionMNIST(config.data_path, "test")
    except (UsageError, ValueError) as error:
        print(f"collabvit train: error: {error}", file=sys.stderr)
        return 2
    if resumed:
        print(f"resuming after epoch {trainer.start_epoch}", file=sys.stderr)
    trainer.fit(on_epoch=lambda r: print(
        f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f} % | "
        f"val acc {r['val_acc']:.2f} % | {r['seconds']} s", flush=True))  # fmt: skip
    weights = trainer.export(test.images, test.labels)
    card = json.loads((trainer.out_dir / "model_card.json").read_text())
    print(
        f"wrote {weights}: validation {card['validation_acc']:.2f} %, test {card['test_acc']:.2f} %"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="collabvit", description=(
        "Attention-aware collaborative inference between an edge ViT and a server ViT "
        "(Im et al., IEEE IoT Journal 2024)."))  # fmt: skip
    parser.add_argument("--version", action="version", version=f"collabvit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    evaluate_parser = commands.add_parser(
        "eval", help="collaborative evaluation: prints the reference's six summary lines",
        description="Run edge + server collaborative inference over a dataset and print the "
                    "reference's six summary lines (plus top-5).")  # fmt: skip
    _add_eval_arguments(evaluate_parser)
    train_parser = commands.add_parser(
        "train", help="train a small ViT on Fashion-MNIST (optionally with token drop)",
        description="Train a timm ViT on Fashion-MNIST: AdamW, cosine schedule with warm-up, "
                    "label smoothing, augmentation, a validation split from the training set; "
                    "resumable; deterministic given --seed.")  # fmt: skip
    _add_train_arguments(train_parser)
    return parser


def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {name!r} requested but CUDA is not available here; use --device cpu"
        )
    return device


def run_eval(args: argparse.Namespace) -> int:
    try:
        config = EdgeConfig(
            attention_mode=args.attention_mode, masking_mode=args.masking_mode,
            masking_th=args.masking_th, uncer_mode=args.uncer_mode, uncer_th=args.uncer_th,
        )  # fmt: skip
        device = _resolve_device(args.device)
        edge_model = vit.create_vit(args.model, args.model_weights, args.model_kwargs)
        server_model = vit.create_vit(
            args.server_model, args.server_weights, args.server_kwargs, server=True
        )
        vit.check_compatible(edge_model, server_model)
        dataset = build_dataset(
            args.data_set, args.data_path, edge_model, args.split, args.crop_pct
        )
        if args.limit is not None:
            dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        if len(dataset) == 0:
            raise UsageError("the dataset is empty")
        sample = dataset[0][0]
        geometry = vit.geometry(edge_model)
        expected = (geometry.in_chans, *geometry.img_size)
        if tuple(sample.shape) != expected:
            raise UsageError(
                f"{args.data_set} images are {'x'.join(map(str, sample.shape))} but the edge model "
                f"takes {'x'.join(map(str, expected))}"
            )
        normalization = vit.Normalization.identity() if args.inputs_normalized else None
        edge = EdgeDevice(edge_model, config, device, normalization)
        server = Server(server_model, device, normalization)
    except (UsageError, ValueError) as error:  # ModelError and DataError are ValueErrors
        print(f"collabvit eval: error: {error}", file=sys.stderr)
        return 2

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    result = evaluate(
        edge, server, loader, seed=args.seed, progress=False if args.quiet else None,
        keep_records=args.per_image is not None, total=len(loader),
    )  # fmt: skip
    print(format_summary(result.summary, config.masking_mode, config.masking_th,
                         config.uncer_mode, config.uncer_th))  # fmt: skip
    if args.results_file:
        write_results(args.results_file, result.summary, _provenance(args, config))
    if args.per_image:
        write_per_image(args.per_image, result.records)
    return 0


def _provenance(args: argparse.Namespace, config: EdgeConfig) -> dict:
    """How the numbers were made: every resolved flag, the edge config and the versions."""
    return {
        "command": "eval",
        "arguments": {k: v for k, v in vars(args).items() if k != "command"},
        "edge_config": dict(config.__dict__),
        **versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval":
        return run_eval(args)
    if args.command == "train":
        return run_train(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
