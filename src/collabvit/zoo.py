"""The models collabvit ships, registered with timm.

After ``import collabvit.zoo``, ``timm.create_model("collabvit_fmnist_edge", pretrained=True)``
loads the shipped Fashion-MNIST edge ViT offline from the package (timm's
``file`` pretrained source), and likewise ``collabvit_fmnist_server`` (trained
with token drop). With ``pretrained=False`` they are the architectures to train.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from collabvit.config import EdgeConfig

EDGE_CONFIG_FIELDS = tuple(item.name for item in fields(EdgeConfig))
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Fashion-MNIST training-set pixel statistics (on [0, 1]).
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

_FMNIST_INPUT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10)
EDGE, SERVER = "collabvit_fmnist_edge", "collabvit_fmnist_server"
ARCHITECTURES = {
    EDGE: dict(**_FMNIST_INPUT, embed_dim=96, depth=4, num_heads=3),
    SERVER: dict(**_FMNIST_INPUT, embed_dim=192, depth=6, num_heads=3),
}


def weights_file(name: str) -> Path:
    """Where the shipped weights of a registered model live."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def read_card(path: Path) -> dict:
    """A model card JSON file (shipped, or a run's model_card.json); {} if absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(name: str) -> dict:
    """The shipped model card (config, recipe, data, accuracies, version); {} if absent."""
    return read_card(WEIGHTS_DIR / f"{name}.json")


def default_operating_point(edge: str, server: str) -> EdgeConfig:
    """The operating point shipped with an edge model for its server, else the paper's.

    The shipped Fashion-MNIST pair's point was chosen on the validation split
    (the edge's model card says how); any other pair gets the paper's
    delta 0.97 / eta 1.0 with mean attention and min-entropy.
    """
    point = model_card(edge.split(".")[0]).get("operating_point")
    if not point or point.get("server") != server.split(".")[0]:
        return EdgeConfig()
    return EdgeConfig(**{key: point[key] for key in EDGE_CONFIG_FIELDS})


def is_shipped(name: str) -> bool:
    """A collabvit model whose weights are in the package."""
    return name.split(".")[0] in ARCHITECTURES and weights_file(name.split(".")[0]).is_file()


def _pretrained_cfg(name: str) -> dict:
    return {
        "file": str(weights_file(name)),
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "description": "collabvit Fashion-MNIST ViT (see its model card JSON beside the weights)",
    }


# timm's register_model reads this module-level name.
default_cfgs = generate_default_cfgs(
    {f"{name}.fmnist": _pretrained_cfg(name) for name in ARCHITECTURES}
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


# ------------------------------------------------------------------ the CNN teacher
#
# Used only to train the ViTs (distillation); not a collabvit edge or server model, and
# its weights are not shipped. Convolutions see pixels beyond a patch, which is why it
# reaches accuracies the small ViTs do not, and why it cannot be a server.

TEACHER = "collabvit_fmnist_cnn"


class _ConvBlock(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True),
        )  # fmt: skip


class FashionCNN(nn.Module):
    """A small VGG-style CNN for 28x28 grayscale images: widths w, 2w, 4w at 28, 14, 7 pixels,
    global average pooling, dropout, a linear head. images [B, C, H, W] -> logits [B, classes].
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 64,
                 drop_rate: float = 0.2, **_) -> None:  # fmt: skip
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _ConvBlock(in_chans, width), nn.MaxPool2d(2),
            _ConvBlock(width, 2 * width), nn.MaxPool2d(2),
            _ConvBlock(2 * width, 4 * width),
        )  # fmt: skip
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images).mean(dim=(2, 3))
        return self.head(self.head_drop(pooled))


def _teacher_cfg() -> dict:
    return {**_pretrained_cfg(TEACHER), "first_conv": "features.0.0", "classifier": "head",
            "description": "collabvit Fashion-MNIST CNN teacher (training only)"}  # fmt: skip


default_cfgs.update(generate_default_cfgs({f"{TEACHER}.fmnist": _teacher_cfg()}))


@register_model
def collabvit_fmnist_cnn(pretrained: bool = False, **kwargs) -> FashionCNN:
    """CNN teacher for Fashion-MNIST: widths 64/128/256, six conv layers (training only)."""
    return build_model_with_cfg(FashionCNN, TEACHER, pretrained,
                                **{"in_chans": 1, "num_classes": 10, **kwargs})  # fmt: skip
