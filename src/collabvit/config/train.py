"""`collabvit train`'s configs: the recipe that decides a training run (TrainConfig, recorded
in its checkpoint, weights and model card) and where it writes and how it reports (TrainRun).
Torch-free, like the rest of collabvit.config."""

from __future__ import annotations

from dataclasses import dataclass, field

from collabvit.config import CLUTTER_HELP, check_clutter
from collabvit.lite.fashion import FASHION_MNIST_ROOT
from collabvit.lite.specs import flag, require

# The data sets collabvit trains on: two built from the Fashion-MNIST IDX files, and any
# ImageNet-style image folder.
TRAIN_DATA_SETS = ("fmnist", "fmnist-cluttered", "imagenet")
FASHION_MNIST_FOLDER = str(FASHION_MNIST_ROOT)
DISTILL_MODES = ("hard", "soft")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (written into its checkpoint and model card).

    The validation split is not a knob: every run holds out the same 5,000 training
    images (data.py), whatever its seed.
    """

    model: str = field(default="collabvit_fmnist_edge", metadata=flag(
        "timm ViT name or a named collabvit architecture: collabvit_fmnist_edge, "
        "collabvit_fmnist_server, or the CNN teacher collabvit_fmnist_cnn; on "
        "fmnist-cluttered collabvit_cluttered_edge, collabvit_cluttered_server, "
        "collabvit_cluttered_cnn (default: %(default)s)", metavar="NAME"))
    model_kwargs: dict = field(default_factory=dict, metadata=flag(
        "architecture overrides for timm.create_model, e.g. '{\"depth\": 6}'", type="json",
        metavar="JSON"))
    data_set: str = field(default="fmnist", metadata=flag(
        "fmnist: Fashion-MNIST; fmnist-cluttered: its cluttered 56x56 canvases, each step "
        "drawing one of 32 canvases of each item, maybe flipped; imagenet: any ImageNet-style "
        "folder, DIR/train/<class>/<image> and DIR/val/<class>/<image> (without val/, a "
        "tenth of train/ is held out), with timm's training transforms (default: "
        "%(default)s)", choices=TRAIN_DATA_SETS))
    data_path: str = field(default=FASHION_MNIST_FOLDER, metadata=flag(
        "Fashion-MNIST IDX folder, or the image folder of --data-set imagenet (default: "
        "%(default)s)", metavar="DIR"))
    clutter: dict = field(default_factory=dict, metadata=flag(
        CLUTTER_HELP + "; training and validation canvases both take the changes", type="json",
        metavar="JSON"))
    epochs: int = field(default=30, metadata=flag(
        "(default: %(default)s)", type="positive_int", metavar="N"))
    batch_size: int = field(default=128, metadata=flag(
        "(default: %(default)s)", type="positive_int", metavar="N"))
    lr: float = field(default=1e-3, metadata=flag(
        "peak AdamW learning rate (default: %(default)s)", type="finite"))
    min_lr: float = field(default=1e-5, metadata=flag(
        "learning rate at the end of the cosine schedule (default: %(default)s)", type="finite"))
    weight_decay: float = field(default=0.05, metadata=flag(
        "(default: %(default)s)", type="finite"))
    warmup_epochs: float = field(default=1.0, metadata=flag(
        "linear warm-up, in epochs (default: %(default)s)", type="finite"))
    label_smoothing: float = field(default=0.1, metadata=flag(
        "(default: %(default)s)", type="finite"))
    train_limit: int | None = field(default=None, metadata=flag(
        "train on only N images (smoke tests)", type="positive_int", metavar="N"))
    token_drop: float = field(default=0.0, metadata=flag(
        "token-drop training: each batch keeps a random subset of between (1-P) N and N "
        "patches per image (default: %(default)s, off)", type="finite", metavar="P"))
    ema_decay: float = field(default=0.0, metadata=flag(
        "keep an exponential moving average of the weights with this decay per step (e.g. "
        "0.999); validation and the exported weights use it (default: %(default)s, off)",
        type="finite", metavar="D"))
    teacher: str | None = field(default=None, metadata=flag(
        "distil from this trained model: a `collabvit train` output folder or its "
        "model.safetensors, or a timm model name with weights (shipped, or from the hub); it "
        "sees the whole augmented image, the student its token-dropped patches",
        metavar="RUN_OR_NAME"))
    distill: str = field(default="hard", metadata=flag(
        "hard: the teacher's top class as a second label; soft: its softened probabilities "
        "(default: %(default)s)", choices=DISTILL_MODES))
    distill_weight: float = field(default=0.5, metadata=flag(
        "weight of the teacher's term; the label's gets 1 - weight (default: %(default)s)",
        type="finite", metavar="W"))
    distill_temperature: float = field(default=3.0, metadata=flag(
        "temperature of soft distillation (default: %(default)s)", type="finite", metavar="T"))
    augment: bool = field(default=True, metadata=flag(
        "no augmentation (Fashion-MNIST: random shift and flip; cluttered: a new canvas of "
        "the item, and flip; image folders: timm's random resized crop, flip, colour jitter "
        "and --auto-augment)"))
    auto_augment: str | None = field(default=None, metadata=flag(
        "image folders: timm's auto-augment policy, e.g. rand-m9-mstd0.5-inc1-mmax9 "
        "(RandAugment, the default), augmix-m5-w4-d2, or none", metavar="POLICY"))
    crop_scale: float = field(default=0.08, metadata=flag(
        "image folders: the smallest share of an image the random resized crop keeps (timm's "
        "scale; raise it for small images; default: %(default)s)", type="finite",
        metavar="S"))
    mixup: float = field(default=0.0, metadata=flag(
        "mixup alpha (timm's Mixup; e.g. 0.8; default: %(default)s, off)", type="finite",
        metavar="A"))
    cutmix: float = field(default=0.0, metadata=flag(
        "cutmix alpha (timm's Mixup; e.g. 1.0; default: %(default)s, off)", type="finite",
        metavar="A"))
    init_weights: str | None = field(default=None, metadata=flag(
        "fine-tune: start from these weights (.safetensors or .pth; a `collabvit train` "
        "model.safetensors too), or 'pretrained' for the weights timm knows for --model "
        "(shipped with collabvit, or from timm's hub); the "
        "position embeddings are resampled to the model's grid and the head is new where the "
        "class count differs (default: random initialisation)", metavar="FILE"))
    bf16: bool = field(default=False, metadata=flag(
        "bfloat16 autocast (faster on CPUs with AVX512-BF16)"))
    seed: int = field(default=0, metadata=flag(
        "weight initialisation and batch order (default: %(default)s)", type=int))

    def __post_init__(self) -> None:
        require([
            (self.data_set in TRAIN_DATA_SETS, f"unknown training data set {self.data_set!r}; "
             f"choose one of {', '.join(TRAIN_DATA_SETS)}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, "the minimum learning rate must lie in [0, lr]"),
            (0 <= self.token_drop < 1, f"token drop must lie in [0, 1), got {self.token_drop}"),
            (0 <= self.label_smoothing < 1, "label smoothing must lie in [0, 1)"),
            (self.warmup_epochs >= 0, "warm-up epochs must be >= 0"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (0 <= self.ema_decay < 1, f"EMA decay must lie in [0, 1), got {self.ema_decay}"),
            (self.distill in DISTILL_MODES, f"distillation is one of {', '.join(DISTILL_MODES)}"),
            (0 <= self.distill_weight <= 1, "the distillation weight must lie in [0, 1]"),
            (self.distill_temperature > 0, "the distillation temperature must be > 0"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
            (0 < self.crop_scale <= 1, f"the crop scale must lie in (0, 1], got "
             f"{self.crop_scale}"),
            (self.data_set != "imagenet" or self.data_path != FASHION_MNIST_FOLDER,
             "--data-set imagenet needs --data-path DIR, a folder with train/<class>/<image>"),
            (self.data_set == "imagenet" or self.auto_augment is None,
             "--auto-augment is for image folders (--data-set imagenet)"),
        ])  # fmt: skip
        check_clutter(self.data_set, self.clutter)


@dataclass(frozen=True)
class TrainRun:
    """Where a training run writes, and how it reports."""

    out_dir: str = field(default="", metadata=flag(
        "checkpoint (last.pt), log.jsonl, config.json, model.safetensors, model_card.json",
        required=True, metavar="DIR"))
    resume: bool = field(default=False, metadata=flag("continue from DIR/last.pt"))
    stop_after: int | None = field(default=None, metadata=flag(
        "end after epoch N of the --epochs schedule and export that model (the learning rate "
        "follows the whole schedule; --resume without it continues to the end)",
        type="positive_int", metavar="N"))
    quiet: bool = field(default=False, metadata=flag("no progress output"))
    device: str = field(default="cpu", metadata=flag(
        "torch device: cpu, cuda, cuda:1; under torchrun, cuda gives each process the GPU of "
        "its local rank (default: %(default)s)"))
    workers: int = field(default=0, metadata=flag(
        "image folders: processes that decode and augment the next batches (default: "
        "%(default)s, in the training process)", type="non_negative_int", metavar="N"))
