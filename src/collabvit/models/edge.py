"""EdgeDevice: images -> edge predictions, the transmission decision and payloads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from collabvit.algo.selection import select_patches, selection_statistics, validate_masking
from collabvit.algo.uncertainty import gate_measure, is_confident
from collabvit.data import check_images
from collabvit.lite.protocol import PatchPayload, build_payloads
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit

__all__ = ["EdgeConfig", "EdgeDevice", "EdgeResult", "gate", "select"]


def gate(logits: torch.Tensor, config: EdgeConfig, temperature: float = 1.0) -> torch.Tensor:
    """The transmission gate: which images the edge answers itself.

    logits [B, classes] (seen divided by `temperature`) -> confident [B] bool.
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    return is_confident(scaled, config.uncer_mode, config.uncer_th)


def select(
    scores: torch.Tensor, config: EdgeConfig, image_ids: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """The patches an image would send. scores [B, N], image_ids [B] -> keep [B, N] bool.

    `random` draws each image's patches from (seed, its image id), so a selection does
    not depend on the batch it is in.
    """
    return select_patches(scores, config.masking_mode, config.masking_th, image_ids, seed)


@dataclass(frozen=True)
class EdgeResult:
    """The edge's view of one batch.

    Attributes:
        logits: [B, classes] float32.
        scores: normalised patch scores [B, N] float32.
        uncertainty: the gate's measure [B] float32 (0 when the gate has none).
        confident: answered at the edge [B] bool.
        keep: selected patches [B, N] bool (computed for every image).
        payloads: one per image that is not confident, in batch order.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    uncertainty: torch.Tensor
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
        self.inputs_normalized = self.normalization == vit.Normalization.identity()
        validate_masking(config.masking_mode, config.masking_th, self.geometry.num_patches)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless images are [B, C, H, W] of the model's size, in the input
        contract (uint8, or float in [0, 1]; any finite float when already normalised)."""
        g = self.geometry
        expected = (g.in_chans, *g.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not fit the edge model, "
                f"which takes [B, {expected[0]}, {expected[1]}, {expected[2]}]"
            )
        check_images(images, normalized=self.inputs_normalized)

    @torch.inference_mode()
    def process(
        self, images: torch.Tensor, image_ids: torch.Tensor | None = None, seed: int = 0
    ) -> EdgeResult:
        """Classify, gate and select for one batch.

        Args:
            images: unnormalised [B, C, H, W] (uint8, or float in [0, 1]).
            image_ids: [B] int64 dataset indices (default 0..B-1); seed the ``random`` policy.
            seed: seed of the ``random`` policy.
        """
        if image_ids is None:
            image_ids = torch.arange(images.shape[0])
        logits, scores = self.scores(images)
        measured, confident = gate_measure(logits, self.config.uncer_mode, self.config.uncer_th)
        keep = select(scores, self.config, image_ids, seed)
        sent = torch.nonzero(~confident.cpu()).flatten().tolist()
        payloads = build_payloads(images, keep, sent, self.geometry.patch_size)
        return EdgeResult(logits, scores, measured, confident, keep, payloads)

    def set_operating_point(self, masking_th: float | None = None,
                            uncer_th: float | None = None) -> None:  # fmt: skip
        """Move to another (δ or k, η); None keeps the current value."""
        self.config = self.config.moved(masking_th, uncer_th, self.geometry.num_patches)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge logits [B, classes] and normalised patch scores [B, N] of unnormalised images."""
        self.check_images(images)
        normalised = self.normalization(images.to(self.device))
        return vit.forward_with_scores(self.model, normalised, self.config.attention_mode)
