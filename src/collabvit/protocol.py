"""What the edge sends the server: the selected patches' pixels and their grid positions.

Pixels travel unnormalised (uint8 stays uint8, losslessly), so edge and server
may normalise differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Cut images into row-major patches.

    Args:
        images: [B, C, H, W] with H, W multiples of the patch size.
        patch_size: (P_h, P_w).

    Returns:
        [B, N, C, P_h, P_w], N = (H / P_h) * (W / P_w).
    """
    batch, channels, height, width = images.shape
    ph, pw = patch_size
    if height % ph or width % pw:
        raise ValueError(f"image {height}x{width} is not a whole number of {ph}x{pw} patches")
    grid = images.reshape(batch, channels, height // ph, ph, width // pw, pw)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels, ph, pw)


def build_payloads(
    images: torch.Tensor, keep: torch.Tensor, rows: list[int], patch_size: tuple[int, int]
) -> list[PatchPayload]:
    """The payloads of the chosen images: their kept patches' pixels and grid positions.

    Args:
        images: unnormalised [B, C, H, W].
        keep: selections [B, N] bool.
        rows: which images to build payloads for, in order.
        patch_size: (P_h, P_w).
    """
    if not rows:
        return []
    patches = patchify(images[rows], patch_size)
    keep = keep[rows].cpu()
    return [
        PatchPayload(positions=positions, patches=patches[i, positions])
        for i, positions in enumerate(torch.nonzero(row).flatten() for row in keep)
    ]


@dataclass(frozen=True)
class PatchPayload:
    """One image's transmission.

    Attributes:
        positions: row-major grid indices of the kept patches [k] int64, distinct.
        patches: their pixels [k, C, P_h, P_w], uint8 or float.
    """

    positions: torch.Tensor
    patches: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.positions.shape[0])

    def validate(self, channels: int, patch_size: tuple[int, int], num_patches: int) -> None:
        """Raise ValueError unless the payload fits a model with this geometry."""
        if self.positions.dim() != 1 or self.positions.dtype != torch.int64:
            raise ValueError("payload positions must be a 1-D int64 tensor")
        expected = (self.size, channels, *patch_size)
        if tuple(self.patches.shape) != expected:
            raise ValueError(
                f"payload patches have shape {tuple(self.patches.shape)}, expected {expected}"
            )
        if self.size:
            if int(self.positions.min()) < 0 or int(self.positions.max()) >= num_patches:
                raise ValueError(f"payload positions must lie in [0, {num_patches})")
            if int(self.positions.unique().numel()) != self.size:
                raise ValueError("payload positions must be distinct")
