"""Attention -> per-patch scores (DESIGN.md section 1, "Attention scores").

Pure tensor functions. Shapes: B images, H heads, T = prefix + N tokens,
N patches, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from collabvit.lite.modes import ATTENTION_MODES  # noqa: F401 - re-exported


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, scale: float, rows: slice | None = None
) -> torch.Tensor:
    """Softmax attention probabilities, optionally for a few query rows only.

    Args:
        q: queries [B, H, T, D].
        k: keys [B, H, T, D].
        scale: the attention's logit scale (1 / sqrt(D) for timm ViTs).
        rows: which query rows to compute; all when None. ``slice(0, 1)``
            computes only the class token's row, without any T x T map.

    Returns:
        [B, H, R, T] with R the number of selected rows.
    """
    if rows is not None:
        q = q[:, :, rows]
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1)


def normalize_scores(raw: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum; an all-zero row stays zero.

    Args:
        raw: non-negative scores [B, N].

    Returns:
        [B, N], rows summing to 1 (or all zero).
    """
    total = raw.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, raw / torch.where(total > 0, total, 1.0), 0.0)


def mean_scores(class_row: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Scores of the ``mean`` mode from the last block's class-token row.

    Args:
        class_row: softmax attention of the class token (query 0) [B, H, T].
        num_prefix_tokens: prefix tokens before the patches.

    Returns:
        normalised scores [B, N].
    """
    return normalize_scores(class_row[:, :, num_prefix_tokens:].mean(dim=1))


def rollout_scores(attentions: Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """Scores of the reference's ``rollout`` mode.

    Per head, R = (A_L + I) ... (A_1 + I) with no re-normalisation. Only the
    class token's row of R is needed, so it is carried as a row vector
    multiplied from the right block by block: O(L T^2) instead of O(L T^3).

    Args:
        attentions: per block, in forward order, softmax attention [B, H, T, T].
        num_prefix_tokens: prefix tokens before the patches.

    Returns:
        normalised scores [B, N].
    """
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    last = attentions[-1]
    row = last[:, :, 0, :].clone()
    row[:, :, 0] += 1.0  # row 0 of (A_L + I)
    for attention in reversed(attentions[:-1]):
        # row @ (A + I) == row @ A + row
        row = (row.unsqueeze(2) @ attention).squeeze(2) + row
    return normalize_scores(row[:, :, num_prefix_tokens:].mean(dim=1))
