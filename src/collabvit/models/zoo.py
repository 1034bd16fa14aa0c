"""The models collabvit ships, registered with timm.

After ``import collabvit.models.zoo``,
``timm.create_model("collabvit_fmnist_edge", pretrained=True)`` loads the shipped
Fashion-MNIST edge ViT offline from the package (timm's ``file`` pretrained source),
and likewise ``collabvit_fmnist_server`` (trained
with token drop). With ``pretrained=False`` they are the architectures to train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from collabvit.lite.specs import SHIPPED_PAIRS, EdgeConfig  # noqa: F401 - the pairs, by data set

EDGE_CONFIG_FIELDS = tuple(item.name for item in fields(EdgeConfig))
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"  # collabvit/weights: package data

# Training-set pixel statistics (on [0, 1]) of each data set the shipped models know.
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
CLUTTERED_MEAN = (0.1365,)  # ClutteredFashionMNIST "train", draw 0
CLUTTERED_STD = (0.2860,)


@dataclass(frozen=True)
class Family:
    """What the models of one data set share: their input, statistics and timm tag."""

    data_set: str
    tag: str
    input: dict
    mean: tuple
    std: tuple


FMNIST = Family("fmnist", "fmnist", dict(img_size=28, patch_size=4, in_chans=1, num_classes=10),
                FMNIST_MEAN, FMNIST_STD)  # fmt: skip
CLUTTERED = Family("fmnist-cluttered", "fmnist_cluttered",
                   dict(img_size=56, patch_size=8, in_chans=1, num_classes=10),
                   CLUTTERED_MEAN, CLUTTERED_STD)  # fmt: skip

EDGE, SERVER = "collabvit_fmnist_edge", "collabvit_fmnist_server"
CLUTTERED_EDGE, CLUTTERED_SERVER = "collabvit_cluttered_edge", "collabvit_cluttered_server"
ARCHITECTURES = {
    EDGE: dict(**FMNIST.input, embed_dim=96, depth=4, num_heads=3),
    SERVER: dict(**FMNIST.input, embed_dim=192, depth=6, num_heads=3),
    CLUTTERED_EDGE: dict(**CLUTTERED.input, embed_dim=96, depth=4, num_heads=3),
    CLUTTERED_SERVER: dict(**CLUTTERED.input, embed_dim=192, depth=6, num_heads=3),
}
FAMILIES = {EDGE: FMNIST, SERVER: FMNIST, CLUTTERED_EDGE: CLUTTERED, CLUTTERED_SERVER: CLUTTERED}


def weights_file(name: str) -> Path:
    """Where the shipped weights of a registered model live."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def read_card(path: Path) -> dict:
    """A model card JSON file (shipped, or a run's model_card.json); {} if absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(name: str) -> dict:
    """The shipped model card (config, recipe, data, accuracies, version); {} if absent."""
    return read_card(WEIGHTS_DIR / f"{name}.json")


def precision_change(name: str, precision: str) -> float | None:
    """The largest change (points) of a collaborative figure that the shipped model's card
    records for serving it in `precision` (scripts/precision_report.py), None if unmeasured."""
    measured = model_card(name).get("precision", {}).get(precision, {})
    change = measured.get("largest_change_pt")
    return float(change) if isinstance(change, (int, float)) else None


def default_operating_point(edge: str, server: str) -> EdgeConfig:
    """The operating point shipped with an edge model for its server, else the paper's.

    The shipped pairs' points were chosen on the validation split (the edge's
    model card says how); any other pair gets the paper's delta 0.97 / eta 1.0
    with mean attention and min-entropy.
    """
    point = model_card(edge.split(".")[0]).get("operating_point")
    if not point or point.get("server") != server.split(".")[0]:
        return EdgeConfig()
    return EdgeConfig(**{key: point[key] for key in EDGE_CONFIG_FIELDS})


def is_shipped(name: str) -> bool:
    """A collabvit model whose weights are in the package."""
    return name.split(".")[0] in ARCHITECTURES and weights_file(name.split(".")[0]).is_file()


def _pretrained_cfg(name: str, family: Family) -> dict:
    return {
        "file": str(weights_file(name)),
        "num_classes": 10,
        "input_size": (1, family.input["img_size"], family.input["img_size"]),
        "mean": family.mean,
        "std": family.std,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "description": f"collabvit {family.data_set} ViT (see its model card JSON beside the "
        "weights)",
    }


# timm's register_model reads this module-level name.
default_cfgs = generate_default_cfgs(
    {f"{name}.{FAMILIES[name].tag}": _pretrained_cfg(name, FAMILIES[name])
     for name in ARCHITECTURES}  # fmt: skip
)


def _create(name: str, pretrained: bool, **kwargs) -> VisionTransformer:
    args = {**ARCHITECTURES[name], **kwargs}
    return build_model_with_cfg(VisionTransformer, name, pretrained, **args)


@register_model
def collabvit_fmnist_edge(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Edge ViT for Fashion-MNIST: 28x28x1, 4x4 patches (49), width 96, depth 4, 3 heads."""
    return _create(EDGE, pretrained, **kwargs)


@register_model
def collabvit_fmnist_server(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Server ViT for Fashion-MNIST: 28x28x1, 4x4 patches (49), width 192, depth 6, 3 heads."""
    return _create(SERVER, pretrained, **kwargs)


@register_model
def collabvit_cluttered_edge(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Edge ViT for cluttered Fashion-MNIST: 56x56x1, 8x8 patches (49), width 96, depth 4,
    3 heads."""
    return _create(CLUTTERED_EDGE, pretrained, **kwargs)


@register_model
def collabvit_cluttered_server(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Server ViT for cluttered Fashion-MNIST: 56x56x1, 8x8 patches (49), width 192, depth 6,
    3 heads."""
    return _create(CLUTTERED_SERVER, pretrained, **kwargs)


# ------------------------------------------------------------------ the CNN teacher
#
# Used only to train the ViTs (distillation); not a collabvit edge or server model, and
# its weights are not shipped. Convolutions see pixels beyond a patch, which is why it
# reaches accuracies the small ViTs do not, and why it cannot be a server.

TEACHER = "collabvit_fmnist_cnn"


class _ConvBlock(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers; the first may stride."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True),
        )  # fmt: skip


class FashionCNN(nn.Module):
    """A small VGG-style CNN for grayscale images: widths w, 2w, 4w at full, 1/2 and 1/4 of
    the input's side divided by `stem_stride` (28, 14, 7 pixels for 28x28 Fashion-MNIST; a
    stride-2 stem keeps 56x56 canvases as cheap), global average pooling, dropout, a linear
    head. images [B, C, H, W] -> logits [B, classes].
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 64,
                 drop_rate: float = 0.2, stem_stride: int = 1, **_) -> None:  # fmt: skip
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _ConvBlock(in_chans, width, stem_stride), nn.MaxPool2d(2),
            _ConvBlock(width, 2 * width), nn.MaxPool2d(2),
            _ConvBlock(2 * width, 4 * width),
        )  # fmt: skip
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images).mean(dim=(2, 3))
        return self.head(self.head_drop(pooled))


CLUTTERED_TEACHER = "collabvit_cluttered_cnn"
TEACHER_FAMILIES = {TEACHER: FMNIST, CLUTTERED_TEACHER: CLUTTERED}


def _teacher_cfg(name: str) -> dict:
    family = TEACHER_FAMILIES[name]
    return {**_pretrained_cfg(name, family), "first_conv": "features.0.0", "classifier": "head",
            "description": f"collabvit {family.data_set} CNN teacher (training only)"}  # fmt: skip


default_cfgs.update(generate_default_cfgs(
    {f"{name}.{family.tag}": _teacher_cfg(name) for name, family in TEACHER_FAMILIES.items()}
))  # fmt: skip


@register_model
def collabvit_fmnist_cnn(pretrained: bool = False, **kwargs) -> FashionCNN:
    """CNN teacher for Fashion-MNIST: widths 64/128/256, six conv layers (training only)."""
    return build_model_with_cfg(FashionCNN, TEACHER, pretrained,
                                **{"in_chans": 1, "num_classes": 10, **kwargs})  # fmt: skip


@register_model
def collabvit_cluttered_cnn(pretrained: bool = False, **kwargs) -> FashionCNN:
    """CNN teacher for cluttered Fashion-MNIST: a stride-2 stem, then widths 64/128/256 at
    28, 14, 7 pixels (training only)."""
    return build_model_with_cfg(FashionCNN, CLUTTERED_TEACHER, pretrained,
                                **{"in_chans": 1, "num_classes": 10, "stem_stride": 2,
                                   **kwargs})  # fmt: skip


def recorded_training_config(model_name: str, weights_path: str | Path | None) -> dict | None:
    """The training config recorded for a model: None when unknown.

    Without a weights file: the shipped model card's ``run_card.training``;
    with one: the JSON under the safetensors metadata key "config" (what
    Trainer.export writes). Other files (.pth, foreign safetensors) give None.
    """
    name = model_name.split(".")[0]  # "name.tag" -> the card of name
    shipped = weights_file(name)
    if weights_path is None or (shipped.is_file() and Path(weights_path).resolve() == shipped):
        card = model_card(name)
        training = card.get("run_card", {}).get("training")
        return training if isinstance(training, dict) else None
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        config = json.loads(metadata["config"])
    except (OSError, SafetensorError, KeyError, ValueError):  # JSONDecodeError is a ValueError
        return None
    return config if isinstance(config, dict) else None


def recorded_classes(weights_path: str | Path | None) -> list[str] | None:
    """The class names a `collabvit train` weights file records (its safetensors metadata
    "classes"), one per class index; None for other files and for no file."""
    if weights_path is None:
        return None
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            classes = json.loads((handle.metadata() or {})["classes"])
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    return [str(name) for name in classes] if isinstance(classes, list) else None


def shipped_frontier(model_name: str, weights: str | None) -> dict | None:
    """The frontier shipped in an edge model's card: None for other weights (a frontier
    belongs to the weights it was swept with); which server it was swept with, read_frontier
    checks."""
    return None if weights is not None else model_card(model_name.split(".")[0]).get("frontier")
