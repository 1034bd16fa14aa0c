"""Server: payloads of selected patches -> logits, in ragged batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from collabvit import vit
from collabvit.protocol import PatchPayload


def pack_payloads(
    payloads: Sequence[PatchPayload], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad payloads of different sizes into one batch.

    Returns:
        patches [B, L, C, P, P] (zeros where padded, dtype of the payloads),
        positions [B, L] int64 (0 where padded), valid [B, L] bool; L = largest size
        (at least 0).
    """
    length = max(p.size for p in payloads)
    first = payloads[0].patches
    patches = first.new_zeros((len(payloads), length, *first.shape[1:]))
    positions = torch.zeros(len(payloads), length, dtype=torch.int64)
    valid = torch.zeros(len(payloads), length, dtype=torch.bool)
    for row, payload in enumerate(payloads):
        patches[row, : payload.size] = payload.patches
        positions[row, : payload.size] = payload.positions
        valid[row, : payload.size] = True
    return patches.to(device), positions.to(device), valid.to(device)


class Server:
    """Owns the server model and its device; holds no per-request state."""

    def __init__(
        self,
        model: VisionTransformer,
        device: str | torch.device = "cpu",
        normalization: vit.Normalization | None = None,
        max_batch: int = 64,
    ) -> None:
        vit.check_supported(model, server=True)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.geometry = vit.geometry(model)
        self.normalization = normalization or vit.Normalization.of_model(model)
        self.max_batch = max_batch

    def validate(self, payload: PatchPayload) -> None:
        """Raise ValueError unless the payload fits this server's model."""
        g = self.geometry
        payload.validate(g.in_chans, g.patch_size, g.num_patches)

    @torch.inference_mode()
    def classify(self, payloads: Sequence[PatchPayload]) -> torch.Tensor:
        """Logits for each payload, in order: [len(payloads), classes].

        Payloads are sorted by size and cut into batches of at most
        `max_batch`, so images of similar size share a forward and padding
        stays small.
        """
        for payload in payloads:
            self.validate(payload)
        logits = torch.empty(len(payloads), self.geometry.num_classes, device=self.device)
        order = sorted(range(len(payloads)), key=lambda i: payloads[i].size)
        for start in range(0, len(order), self.max_batch):
            rows = order[start : start + self.max_batch]
            patches, positions, valid = pack_payloads([payloads[i] for i in rows], self.device)
            logits[rows] = vit.forward_selected(
                self.model, self.normalization(patches), positions, valid
            ).float()
        return logits
