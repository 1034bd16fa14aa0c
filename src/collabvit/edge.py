"""EdgeDevice: images -> edge predictions, the transmission decision and payloads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from collabvit import vit
from collabvit.protocol import PatchPayload, build_payloads
from collabvit.scoring import ATTENTION_MODES
from collabvit.selection import select_patches, selection_statistics, validate_masking
from collabvit.uncertainty import canonical_uncertainty_mode, is_confident


@dataclass(frozen=True)
class EdgeConfig:
    """The paper's knobs. Validated on construction (ValueError with a one-line reason)."""

    attention_mode: str = "mean"
    masking_mode: str = "attention_sum_threshold"
    masking_th: float = 0.97
    uncer_mode: str = "min_entropy"
    uncer_th: float = 1.0

    def __post_init__(self) -> None:
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(
                f"unknown attention mode {self.attention_mode!r}; "
                f"choose one of {', '.join(ATTENTION_MODES)}"
            )
        validate_masking(self.masking_mode, self.masking_th)
        object.__setattr__(self, "uncer_mode", canonical_uncertainty_mode(self.uncer_mode))
        if not isinstance(self.uncer_th, (int, float)) or self.uncer_th != self.uncer_th:
            raise ValueError(f"uncertainty threshold must be a number, got {self.uncer_th!r}")


@dataclass(frozen=True)
class EdgeResult:
    """The edge's view of one batch.

    Attributes:
        logits: [B, classes].
        scores: normalised patch scores [B, N].
        confident: answered at the edge [B] bool.
        keep: selected patches [B, N] bool (computed for every image).
        payloads: one per image that is not confident, in batch order.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    confident: torch.Tensor
    keep: torch.Tensor
    payloads: list[PatchPayload]

    @property
    def sent(self) -> torch.Tensor:
        return ~self.confident

    def selection_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Size, minimum and sum of the selected scores per image ([B] each)."""
        return selection_statistics(self.scores, self.keep)


class EdgeDevice:
    """Owns the edge model and its device; holds no per-request state."""

    def __init__(
        self,
        model: VisionTransformer,
        config: EdgeConfig,
        device: str | torch.device = "cpu",
        normalization: vit.Normalization | None = None,
    ) -> None:
        vit.check_supported(model)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config = config
        self.geometry = vit.geometry(model)
        self.normalization = normalization or vit.Normalization.of_model(model)
        validate_masking(config.masking_mode, config.masking_th, self.geometry.num_patches)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless images are [B, C, H, W] of the model's size."""
        g = self.geometry
        expected = (g.in_chans, *g.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not fit the edge model, "
                f"which takes [B, {expected[0]}, {expected[1]}, {expected[2]}]"
            )

    @torch.inference_mode()
    def process(self, images: torch.Tensor, generator: torch.Generator | None = None) -> EdgeResult:
        """Classify, gate and select for one batch.

        Args:
            images: unnormalised [B, C, H, W] (uint8, or float taken as is).
            generator: randomness for the ``random`` policy.
        """
        cfg = self.config
        logits, scores = self.scores(images)
        confident = is_confident(logits, cfg.uncer_mode, cfg.uncer_th)
        keep = select_patches(scores, cfg.masking_mode, cfg.masking_th, generator)
        sent = torch.nonzero(~confident.cpu()).flatten().tolist()
        payloads = build_payloads(images, keep, sent, self.geometry.patch_size)
        return EdgeResult(logits, scores, confident, keep, payloads)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge logits [B, classes] and normalised patch scores [B, N] of unnormalised images."""
        self.check_images(images)
        normalised = self.normalization(images.to(self.device))
        return vit.forward_with_scores(self.model, normalised, self.config.attention_mode)
