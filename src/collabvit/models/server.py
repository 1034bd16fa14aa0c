"""Server: payloads of selected patches -> logits, in ragged batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from collabvit.lite.protocol import PatchPayload
from collabvit.models import vit
from collabvit.models.precision import precision_of


def pack_payloads(
    payloads: Sequence[PatchPayload], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad payloads of different sizes into one batch.

    Returns:
        patches [B, L, C, P, P] (zeros where padded; the payloads' dtype, float32 for a mix),
        positions [B, L] int64 (0 where padded), valid [B, L] bool; L = largest size
        (at least 0).
    """
    length = max(p.size for p in payloads)
    dtypes = {p.patches.dtype for p in payloads}
    # uint8 and float pixels in one batch: all as floats in [0, 1]
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    shape = payloads[0].patches.shape[1:]
    patches = np.zeros((len(payloads), length, *shape), dtype=dtype)
    positions = np.zeros((len(payloads), length), dtype=np.int64)
    for row, payload in enumerate(payloads):
        pixels = payload.patches
        if pixels.dtype != dtype:
            pixels = pixels / 255.0 if pixels.dtype == np.uint8 else pixels
        patches[row, : payload.size] = pixels
        positions[row, : payload.size] = payload.positions
    sizes = torch.tensor([p.size for p in payloads])
    valid = torch.arange(length)[None, :] < sizes[:, None]
    return (torch.from_numpy(patches).to(device), torch.from_numpy(positions).to(device),
            valid.to(device))


def plan_batches(
    sizes: Sequence[int], max_batch: int, prefix_tokens: int, max_padding: float = 1.1
) -> list[list[int]]:
    """Group payload indices into forwards of similar size.

    Payloads are taken in order of size; a new group starts when the group
    would exceed `max_batch` payloads or its padded token count would exceed
    `max_padding` times its real token count. On a CPU one image of ~100+
    tokens already keeps the cores busy, so padded slots are pure waste.

    Args:
        sizes: selection size per payload.
        max_batch: payloads per forward at most.
        prefix_tokens: tokens every image carries besides its patches.
        max_padding: allowed padded / real tokens per forward.

    Returns:
        index lists, each sorted by size, covering every payload once.
    """
    groups: list[list[int]] = []
    real = 0
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        tokens = sizes[index] + prefix_tokens
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * tokens  # sorted: this payload is the group's longest
            if len(group) < max_batch and padded <= max_padding * (real + tokens):
                group.append(index)
                real += tokens
                continue
        groups.append([index])
        real = tokens
    return groups


class Server:
    """Owns the server model and its device; holds no per-request state."""

    def __init__(
        self,
        model: VisionTransformer,
        device: str | torch.device = "cpu",
        normalization: vit.Normalization | None = None,
        max_batch: int = 32,
        max_padding: float = 1.1,
    ) -> None:
        vit.check_supported(model, server=True)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.geometry = vit.geometry(model)
        # one name per class where the weights record them (a `collabvit train` run)
        self.class_names: list[str] | None = None
        self.normalization = normalization or vit.Normalization.of_model(model)
        self.max_batch = max_batch
        self.max_padding = max_padding
        self.precision = precision_of(self.model)  # what it computes in, for its answers

    def validate(self, payload: PatchPayload) -> None:
        """Raise ValueError unless the payload fits this server's model."""
        g = self.geometry
        payload.validate(g.in_chans, g.patch_size, g.num_patches)

    @torch.inference_mode()
    def classify(self, payloads: Sequence[PatchPayload]) -> torch.Tensor:
        """Logits for each payload, in order: [len(payloads), classes].

        Payloads of similar size share a forward (see plan_batches), so
        padding stays small.
        """
        for payload in payloads:
            self.validate(payload)
        logits = torch.empty(len(payloads), self.geometry.num_classes, device=self.device)
        sizes = [p.size for p in payloads]
        groups = plan_batches(
            sizes, self.max_batch, self.geometry.num_prefix_tokens, self.max_padding
        )
        for rows in groups:
            patches, positions, valid = pack_payloads([payloads[i] for i in rows], self.device)
            logits[rows] = vit.forward_selected(
                self.model, self.normalization(patches), positions, valid
            ).float()
        return logits
