"""The `collabvit` command.

Flags are kebab-case; the reference implementation's spellings (snake_case,
e.g. ``--masking_mode``, ``--uncer_th``, ``--data_path``) are accepted too.
User mistakes exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import timm
import torch
from torch.utils.data import DataLoader, Subset

from collabvit import __version__, vit
from collabvit.data import DATA_SETS, build_dataset
from collabvit.edge import EdgeConfig, EdgeDevice
from collabvit.evaluate import evaluate, write_per_image, write_results
from collabvit.metrics import format_summary
from collabvit.scoring import ATTENTION_MODES
from collabvit.selection import MASKING_MODES
from collabvit.server import Server
from collabvit.uncertainty import UNCERTAINTY_MODES, canonical_uncertainty_mode


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from error
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    _add(
        models,
        "--model",
        default="deit_tiny_patch16_224",
        metavar="NAME",
        help="edge model: a timm ViT name (default: %(default)s)",
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
        default="deit_base_patch16_224",
        metavar="NAME",
        help="server model: a timm ViT name (default: %(default)s)",
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
        default="imagenet",
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
        choices=("test", "train"),
        default="test",
        help="Fashion-MNIST split (default: %(default)s)",
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
        default=0.97,
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
        default=1.0,
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
        "collabvit": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval":
        return run_eval(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
