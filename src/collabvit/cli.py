"""The `collabvit` command.

Flags are kebab-case; the reference implementation's spellings (snake_case,
e.g. ``--masking_mode``, ``--uncer_th``, ``--data_path``) are accepted too.
User mistakes exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from collabvit import __version__, plots, sweep, versions, vit, zoo
from collabvit.data import DATA_SETS, FASHION_MNIST_SPLITS, FashionMNIST, build_dataset
from collabvit.edge import EdgeConfig, EdgeDevice
from collabvit.evaluate import evaluate, write_per_image, write_results
from collabvit.metrics import format_summary, topk_correct
from collabvit.scoring import ATTENTION_MODES
from collabvit.selection import MASKING_MODES, validate_masking
from collabvit.server import Server
from collabvit.train import TrainConfig, Trainer
from collabvit.uncertainty import UNCERTAINTY_MODES, canonical_uncertainty_mode

# The default run: the shipped Fashion-MNIST pair at an operating point chosen on the
# validation split by scripts/fmnist_results.py (benchmarks/fmnist_results.json records it).
DEFAULT_DELTA = 0.99
DEFAULT_ETA = 0.717


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
_num_etas = _checked_number(int, lambda v: 1 <= v <= 1000, "a whole number in 1..1000")
_num_bins = _checked_number(int, lambda v: 1 <= v <= 10_000, "a whole number in 1..10000")
_cost = _checked_number(float, lambda v: math.isfinite(v) and v >= 0, "a cost >= 0")
_percent = _checked_number(float, lambda v: 0.0 <= v <= 100.0, "an accuracy in [0, 100]")
_open_fraction = _checked_number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_fraction = _checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def _add_models_and_data(parser: argparse.ArgumentParser) -> None:
    """The flags every command that runs the pair shares: which models, which images."""
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


def _add_method(parser: argparse.ArgumentParser, gate: bool = True) -> None:
    """The operating point: attention, selection and (with `gate`) the uncertainty gate."""
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
    if not gate:
        return
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


def _add_run(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    run = parser.add_argument_group("run")
    _add(run, "--device", default="cpu", help="torch device for both models (default: %(default)s)")
    _add(
        run, "--seed", type=int, default=0, help="seed of the random policy (default: %(default)s)"
    )
    _add(run, "--quiet", action="store_true", help="no progress bar")
    return run


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_models_and_data(parser)
    _add_method(parser)
    run = _add_run(parser)
    _add(
        run,
        "--results-file",
        metavar="FILE",
        help="write every figure and the resolved config as JSON",
    )
    _add(run, "--per-image", metavar="FILE", help="write one CSV row per image")


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


# The sweep's default grid: ten deltas of the paper's policy, twenty etas per measure.
SWEEP_DELTAS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
SWEEP_NUM_ETAS = 20
SWEEP_COMPARE_AT = (0.1, 0.2, 0.27)


def _number_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") \
            from error  # fmt: skip
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _cost_list(text: str) -> list[float]:
    values = _number_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"costs must be >= 0, got {text!r}")
    return values


def _policy(text: str) -> tuple[str, list[float]]:
    """MODE=TH,TH,... as given to --policy."""
    mode, sep, thresholds = text.partition("=")
    if not sep or mode not in MASKING_MODES:
        raise argparse.ArgumentTypeError(
            f"expected MODE=TH,TH,... with MODE one of {', '.join(MASKING_MODES)}, got {text!r}"
        )
    return mode, _number_list(thresholds)


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _add_models_and_data(parser)
    grid = parser.add_argument_group("grid: one server pass per policy threshold, etas for free")
    _add(
        grid,
        "--attention-modes",
        nargs="+",
        choices=ATTENTION_MODES,
        default=["mean"],
        help="patch scores to sweep; each mode costs one edge pass (default: mean)",
    )
    _add(
        grid,
        "--policy",
        type=_policy,
        action="append",
        metavar="MODE=TH,...",
        help="a selection policy and its thresholds, repeatable, e.g. topk=20,30,40 (default: "
        f"attention_sum_threshold={','.join(map(str, SWEEP_DELTAS))})",
    )
    _add(
        grid,
        "--uncer-modes",
        nargs="+",
        type=_uncertainty_mode,
        default=["min_entropy"],
        metavar="MODE",
        help="uncertainty measures of the gate (default: min_entropy)",
    )
    etas = grid.add_mutually_exclusive_group()
    _add(
        etas,
        "--num-etas",
        type=_num_etas,
        default=SWEEP_NUM_ETAS,
        metavar="N",
        help="N etas per measure, sending evenly spaced shares of the images from none (edge "
        "alone) to all (default: %(default)s)",
    )
    _add(etas, "--etas", type=_number_list, metavar="ETA,...", help="explicit etas, every measure")
    _add(
        grid,
        "--compare-at",
        type=_cost_list,
        default=list(SWEEP_COMPARE_AT),
        metavar="COST,...",
        help="report each series' best accuracy at these costs (default: "
        f"{','.join(map(str, SWEEP_COMPARE_AT))})",
    )
    _add(
        grid,
        "--no-server-alone",
        action="store_true",
        help="skip the server-alone reference pass (all patches of every image)",
    )

    pick = parser.add_argument_group("budget calibration")
    target = pick.add_mutually_exclusive_group()
    _add(target, "--budget", type=_cost, metavar="C",
         help="pick the most accurate point with communication cost <= C on the calibration "
         "part and report it on the held-out part")  # fmt: skip
    _add(target, "--target-acc", type=_percent, metavar="A",
         help="pick the cheapest point with accuracy >= A %% on the calibration part")  # fmt: skip
    _add(
        pick,
        "--calibration-fraction",
        type=_open_fraction,
        default=0.5,
        metavar="F",
        help="share of the images, drawn at random with --seed, used for calibration; the rest "
        "is held out (default: %(default)s)",
    )
    _add(
        pick,
        "--temperature-scaling",
        action="store_true",
        help="also fit a temperature to the edge logits on the calibration part, sweep the "
        "gate on the scaled logits and report the calibration error before and after",
    )
    run = _add_run(parser)
    _add(run, "--out-dir", required=True, metavar="DIR",
         help="writes points.jsonl, points.csv, sweep.json, frontier.png/svg")  # fmt: skip
    _add(run, "--no-plots", action="store_true", help="do not draw the frontier")


def _add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    _add_models_and_data(parser)
    _add_method(parser, gate=False)
    views = parser.add_argument_group("what to draw")
    _add(
        views,
        "--indices",
        "--output-list",
        type=int,
        nargs="+",
        default=[],
        metavar="I",
        help="dataset indices to draw: original, attention heatmap, masked image (the random "
        "policy draws each image's patches with --seed)",
    )
    _add(
        views,
        "--attention-histogram",
        action="store_true",
        help="also histogram every patch score over the dataset (use --limit for a part)",
    )
    _add(views, "--bins", type=_num_bins, default=50, help="histogram bins (default: 50)")
    run = _add_run(parser)
    _add(run, "--output-dir", required=True, metavar="DIR", help="where the PNG/SVG/CSV go")


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
        return _fail("train", error)
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
    for name, (summary, description, add_arguments, run) in _commands().items():
        command = commands.add_parser(name, help=summary, description=description)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def _commands() -> dict:
    """name -> (one-line help, description, flag declarations, what runs it)."""
    return {
        "eval": (
            "collaborative evaluation: prints the reference's six summary lines",
            "Run edge + server collaborative inference over a dataset and print the "
            "reference's six summary lines (plus top-5).",
            _add_eval_arguments, run_eval,
        ),
        "train": (
            "train a small ViT on Fashion-MNIST (optionally with token drop)",
            "Train a timm ViT on Fashion-MNIST: AdamW, cosine schedule with warm-up, label "
            "smoothing, augmentation, a validation split from the training set; resumable; "
            "deterministic given --seed.",
            _add_train_arguments, run_train,
        ),
        "sweep": (
            "operating points: accuracy against communication cost, the frontier, picking a "
            "point for a budget",
            "Sweep selection thresholds and gate thresholds over a dataset with one edge pass "
            "and one server pass per selection setting; write every point (JSON Lines and CSV) "
            "with the Pareto-optimal ones marked, plot the frontier, and optionally pick a "
            "point for a budget on a calibration part and check it on the held-out part.",
            _add_sweep_arguments, run_sweep,
        ),
        "visualize": (
            "attention heatmaps, masked images, the attention histogram",
            "Draw what the edge sends: for chosen images the original, the attention heatmap "
            "and the masked image (PNG); and the histogram of patch attention over the dataset "
            "(PNG, SVG, CSV).",
            _add_visualize_arguments, run_visualize,
        ),
    }  # fmt: skip


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


@dataclass(frozen=True)
class _Pair:
    """What the models-and-data flags resolve to."""

    edge_model: torch.nn.Module
    server_model: torch.nn.Module
    dataset: Dataset
    device: torch.device
    normalization: vit.Normalization | None

    def edge(self, config: EdgeConfig) -> EdgeDevice:
        return EdgeDevice(self.edge_model, config, self.device, self.normalization)

    def server(self) -> Server:
        return Server(self.server_model, self.device, self.normalization)


def _load_pair(args: argparse.Namespace) -> _Pair:
    """Build both models and the dataset from the flags; user mistakes raise ValueError."""
    device = _resolve_device(args.device)
    edge_model = vit.create_vit(args.model, args.model_weights, args.model_kwargs)
    server_model = vit.create_vit(
        args.server_model, args.server_weights, args.server_kwargs, server=True
    )
    vit.check_compatible(edge_model, server_model)
    dataset = build_dataset(args.data_set, args.data_path, edge_model, args.split, args.crop_pct)
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
    return _Pair(edge_model, server_model, dataset, device, normalization)


def _fail(command: str, error: Exception) -> int:
    print(f"collabvit {command}: error: {error}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    try:
        config = EdgeConfig(
            attention_mode=args.attention_mode, masking_mode=args.masking_mode,
            masking_th=args.masking_th, uncer_mode=args.uncer_mode, uncer_th=args.uncer_th,
        )  # fmt: skip
        pair = _load_pair(args)
        edge, server, dataset = pair.edge(config), pair.server(), pair.dataset
    except (UsageError, ValueError) as error:  # ModelError and DataError are ValueErrors
        return _fail("eval", error)

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


def _sweep_policies(args: argparse.Namespace, num_patches: int) -> tuple[tuple[str, float], ...]:
    """The (mode, threshold) pairs of --policy, validated before any forward pass."""
    policies = args.policy or [("attention_sum_threshold", list(SWEEP_DELTAS))]
    pairs = []
    for mode, thresholds in policies:
        for threshold in thresholds:
            validate_masking(mode, threshold, num_patches)
            pairs.append((mode, threshold))
    return tuple(dict.fromkeys(pairs))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * topk_correct(logits, labels, 1) / len(labels)


def run_sweep(args: argparse.Namespace) -> int:
    calibrating = args.budget is not None or args.target_acc is not None
    try:
        pair = _load_pair(args)
        server = pair.server()
        policies = _sweep_policies(args, vit.geometry(pair.edge_model).num_patches)
        edges = {mode: pair.edge(EdgeConfig(attention_mode=mode)) for mode in args.attention_modes}
        calibration = held_out = None
        if calibrating or args.temperature_scaling:
            calibration, held_out = sweep.split_calibration(
                len(pair.dataset), args.calibration_fraction, args.seed
            )
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = [out_dir / name for name in ("points.jsonl", "points.csv", "sweep.json")]
        for path in outputs:
            if path.exists() and not path.is_file():
                raise UsageError(f"{path} exists and is not a file")
    except (UsageError, ValueError, OSError) as error:
        return _fail("sweep", error)
    progress = False if args.quiet else None
    loader = DataLoader(pair.dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    subsets = {"calibration": calibration, "held_out": held_out} if calibrating else {}

    points, temperatures = [], {}
    for mode, edge in edges.items():
        edge_pass = sweep.run_edge(edge, loader, progress)
        scales = [1.0]
        if args.temperature_scaling:
            fitted = sweep.fit_temperature(
                edge_pass.logits[calibration], edge_pass.labels[calibration]
            )
            logits, labels = edge_pass.logits[held_out], edge_pass.labels[held_out]
            temperatures[mode] = {
                "temperature": fitted,
                "held_out_ece_before": sweep.expected_calibration_error(logits, labels),
                "held_out_ece_after": sweep.expected_calibration_error(logits / fitted, labels),
            }
            scales.append(fitted)
        # Candidate etas come from the calibration part when there is one (labels unused).
        eta_logits = edge_pass.logits if calibration is None else edge_pass.logits[calibration]
        gates = sweep.gate_grid(eta_logits, args.uncer_modes, args.num_etas, args.etas, scales)
        grid = sweep.Grid(policies, gates)
        for point in sweep.sweep_points(edge_pass, server, grid, subsets, args.seed, progress):
            point["attention_mode"] = mode
            points.append(point)
    sweep.mark_pareto(points)
    edge_acc = _accuracy(edge_pass.logits, edge_pass.labels)
    server_acc = None
    if not args.no_server_alone:
        full = torch.ones_like(edge_pass.scores, dtype=torch.bool)
        alone = sweep.server_logits(server, edge_pass.images, full)
        server_acc = _accuracy(alone, edge_pass.labels)

    print(
        f"edge alone: {edge_acc:.2f} %"
        + (f" | server alone (all patches): {server_acc:.2f} %" if server_acc is not None else "")
    )
    pareto = sum(p["pareto"] for p in points)
    print(f"{len(points)} operating points, {pareto} Pareto-optimal: {out_dir / 'points.csv'}")
    report = {"provenance": _provenance(args, None, "sweep"), "edge_acc": edge_acc,
              "server_acc": server_acc, "points": len(points),
              "comparison": _compare_series(points, args.compare_at),
              "temperature": temperatures}  # fmt: skip
    if calibrating:
        report["pick"] = _report_picks(points, args)
    for mode, info in temperatures.items():
        print(f"temperature ({mode}): T = {info['temperature']:.3f}; held-out expected "
              f"calibration error {info['held_out_ece_before']:.2f} % -> "
              f"{info['held_out_ece_after']:.2f} %")  # fmt: skip
    try:
        if not args.no_plots:
            title = f"{len(edge_pass.labels)} images" + (
                f" of Fashion-MNIST {args.split}" if args.data_set == "fmnist" else ""
            )
            figures = plots.plot_frontier(points, edge_acc, server_acc, out_dir / "frontier", title)
            report["figures"] = [str(path) for path in figures]
            print(f"frontier: {figures[0]}")
        sweep.write_points(points, outputs[0], outputs[1])
        outputs[2].write_text(json.dumps(report, indent=2) + "\n")
    except OSError as error:
        return _fail("sweep", error)
    return 0


def _compare_series(points: list[dict], costs: Sequence[float]) -> dict:
    """Each series' best accuracy at each cost; printed as a table and returned."""
    series: dict[str, list[dict]] = {}
    for point in points:
        series.setdefault(sweep.series_label(point), []).append(point)
    table = {
        name: {str(c): (best := sweep.pick_point(members, budget=c)) and best["collab_acc"]
               for c in costs}
        for name, members in series.items()
    }  # fmt: skip
    width = max(len(name) for name in table)
    print("best collaborative accuracy (%) at communication cost <=")
    print(" " * width + "".join(f"{c:>9}" for c in costs))
    for name, row in table.items():
        cells = "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in row.values())
        print(f"{name:<{width}}{cells}")
    return table


def _report_picks(points: list[dict], args: argparse.Namespace) -> dict:
    """The calibrated pick per temperature (1 = uncalibrated): printed and returned."""
    picks = {}
    goal = f"budget {args.budget}" if args.budget is not None else f"target {args.target_acc} %"
    for temperature in dict.fromkeys(p["temperature"] for p in points):
        candidates = [p for p in points if p["temperature"] == temperature]
        chosen = sweep.pick_point(candidates, "calibration", args.budget, args.target_acc)
        key = "uncalibrated" if temperature == 1.0 else "temperature-scaled"
        picks[key] = chosen
        if chosen is None:
            print(f"{goal} ({key}): no operating point qualifies on the calibration part")
            continue
        cal, held = chosen["calibration"], chosen["held_out"]
        print(f"{goal} ({key}): {chosen['attention_mode']} {chosen['policy']} "
              f"{chosen['threshold']}, {chosen['measure']} eta {chosen['eta']:.4g} -> "
              f"calibration {cal['collab_acc']:.2f} % at cost {cal['comm_cost']:.3f}; "
              f"held-out {held['collab_acc']:.2f} % at cost {held['comm_cost']:.3f}")  # fmt: skip
    return picks


def run_visualize(args: argparse.Namespace) -> int:
    try:
        config = EdgeConfig(attention_mode=args.attention_mode, masking_mode=args.masking_mode,
                            masking_th=args.masking_th, uncer_mode="none")  # fmt: skip
        pair = _load_pair(args)
        edge, server = pair.edge(config), pair.server()
        for index in args.indices:
            if not 0 <= index < len(pair.dataset):
                last = len(pair.dataset) - 1
                raise UsageError(f"index {index} is outside the dataset (0..{last})")
        if not args.indices and not args.attention_histogram:
            raise UsageError("nothing to draw: give --indices and/or --attention-histogram")
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    except (UsageError, ValueError, OSError) as error:
        return _fail("visualize", error)
    base = pair.dataset.dataset if isinstance(pair.dataset, Subset) else pair.dataset
    classes = getattr(base, "classes", None)
    name = (lambda i: classes[i]) if classes else str  # noqa: E731
    patch_size = edge.geometry.patch_size
    for index in args.indices:
        image, label = pair.dataset[index]
        result = edge.process(image[None], torch.Generator().manual_seed(args.seed))
        server_answer = int(server.classify(result.payloads).argmax(1)[0])
        edge_answer = int(result.logits.argmax(1)[0])
        paths = plots.save_patch_views(image, result.scores[0], result.keep[0], patch_size,
                                       out_dir, f"{index:05d}")  # fmt: skip
        kept = int(result.keep[0].sum())
        print(f"image {index}: label {name(int(label))}; edge says {name(edge_answer)}, server on "
              f"{kept}/{edge.geometry.num_patches} patches says {name(server_answer)} -> "
              f"{paths[0].parent}/{index:05d}_*.png")  # fmt: skip
    if args.attention_histogram:
        loader = DataLoader(pair.dataset, batch_size=args.batch_size, num_workers=args.num_workers)
        scores = sweep.run_edge(edge, loader, False if args.quiet else None).scores
        counts, edges = torch.histogram(scores.flatten().float(), bins=args.bins)
        csv_path = out_dir / "attention_histogram.csv"
        csv_path.write_text(
            "bin_start,bin_end,patches\n"
            + "".join(
                f"{a:.6g},{b:.6g},{int(c)}\n"
                for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
            )
        )
        figure = plots.plot_histogram(counts.tolist(), edges.tolist(),
                                      out_dir / "attention_histogram",
                                      f"{args.attention_mode} attention, {len(scores)} images, "
                                      f"{scores.shape[1]} patches each")  # fmt: skip
        print(f"attention histogram: {figure[0]} and {csv_path}")
    return 0


def _provenance(args: argparse.Namespace, config: EdgeConfig | None, command="eval") -> dict:
    """How the numbers were made: every resolved flag, the edge config and the versions."""
    return {
        "command": command,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("command", "run")},
        "edge_config": dict(config.__dict__) if config else None,
        **versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
