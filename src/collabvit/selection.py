"""Patch selection policies (DESIGN.md section 1, "Patch selection").

Pure tensor functions. A selection is a boolean keep mask [B, N] over the N
patches of each image; an all-False row (empty selection) is legal.
"""

from __future__ import annotations

import math

import torch

MASKING_MODES = ("random", "topk", "attention_threshold", "attention_sum_threshold")
_COUNT_MODES = ("random", "topk")


def validate_masking(mode: str, threshold: float, num_patches: int | None = None) -> None:
    """Raise ValueError with a one-line reason if (mode, threshold) is unusable.

    Args:
        mode: one of MASKING_MODES.
        threshold: k for the count modes, a score threshold otherwise.
        num_patches: N, when known, to reject k > N.
    """
    if mode not in MASKING_MODES:
        raise ValueError(f"unknown masking mode {mode!r}; choose one of {', '.join(MASKING_MODES)}")
    if not math.isfinite(threshold):
        raise ValueError(f"masking threshold must be a finite number, got {threshold}")
    if mode in _COUNT_MODES:
        if threshold < 0:
            raise ValueError(
                f"{mode} keeps k = int(threshold) patches; k must be >= 0, got {threshold}"
            )
        if num_patches is not None and int(threshold) > num_patches:
            raise ValueError(
                f"{mode} asks for k = {int(threshold)} patches but the model has only {num_patches}"
            )
    elif mode == "attention_sum_threshold" and not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"attention_sum_threshold takes a cumulative attention share in [0, 1], got {threshold}"
        )
    elif mode == "attention_threshold" and threshold < 0:
        raise ValueError(
            f"attention_threshold must be >= 0 (scores are non-negative), got {threshold}"
        )


def _mask_from_ranking(order: torch.Tensor, keep_sorted: torch.Tensor) -> torch.Tensor:
    """Scatter a keep decision made in ranked order back to patch order.

    Args:
        order: patch indices in ranked order [B, N].
        keep_sorted: keep decision per rank [B, N] bool.

    Returns:
        keep mask in patch order [B, N] bool.
    """
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k patches with the largest score. scores [B, N] -> keep [B, N]."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return _mask_from_ranking(order, ranks < k)


def select_random(
    scores: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k distinct patches uniformly at random. scores [B, N] (only its shape) -> keep [B, N]."""
    noise = torch.rand(scores.shape, generator=generator, device="cpu").to(scores.device)
    order = noise.argsort(dim=1)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return _mask_from_ranking(order, ranks < k)


def select_attention_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every patch with score >= threshold. scores [B, N] -> keep [B, N]."""
    return scores >= threshold


def select_attention_sum_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Most attended patches whose cumulative score stays <= threshold.

    The patch whose cumulative sum crosses the threshold is not kept, so the
    selection can be empty. scores [B, N] -> keep [B, N].
    """
    ranked, order = scores.sort(dim=1, descending=True, stable=True)
    return _mask_from_ranking(order, ranked.cumsum(dim=1) <= threshold)


def select_patches(
    scores: torch.Tensor,
    mode: str,
    threshold: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply a masking mode. scores [B, N] -> keep [B, N] bool.

    Args:
        scores: normalised patch scores [B, N].
        mode: one of MASKING_MODES.
        threshold: k (count modes, int(threshold)) or score threshold.
        generator: randomness for ``random``.
    """
    validate_masking(mode, threshold, scores.shape[1])
    if mode == "topk":
        return select_topk(scores, int(threshold))
    if mode == "random":
        return select_random(scores, int(threshold), generator)
    if mode == "attention_threshold":
        return select_attention_threshold(scores, threshold)
    return select_attention_sum_threshold(scores, threshold)


def selection_statistics(
    scores: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size, minimum and sum of the kept scores per image.

    Args:
        scores: [B, N].
        keep: [B, N] bool.

    Returns:
        counts [B] int64, minimum [B] (+inf for an empty selection), sum [B].
    """
    counts = keep.sum(dim=1)
    minimum = torch.where(keep, scores, torch.inf).amin(dim=1)
    total = torch.where(keep, scores, 0.0).sum(dim=1)
    return counts, minimum, total
