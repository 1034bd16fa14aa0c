"""Uncertainty measures and the transmission gate (DESIGN.md section 1).

Pure tensor functions on edge logits [B, C]; p = softmax(logits).
"""

from __future__ import annotations

import math

import torch

from collabvit.lite.modes import UNCERTAINTY_MODES, canonical_uncertainty_mode  # noqa: F401

_LN2 = math.log(2.0)


def shannon_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum p log2 p with 0 log 0 = 0. logits [B, C] -> [B] bits."""
    p = logits.float().softmax(dim=-1)
    return -torch.special.xlogy(p, p).sum(dim=-1) / _LN2


def min_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-log2 max p. logits [B, C] -> [B] bits."""
    return -logits.float().log_softmax(dim=-1).amax(dim=-1) / _LN2


def margin(logits: torch.Tensor) -> torch.Tensor:
    """p_(1) - p_(2), the gap between the two most likely classes. logits [B, C] -> [B]."""
    top2 = logits.float().softmax(dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


_MEASURES = {"shannon_entropy": shannon_entropy, "min_entropy": min_entropy, "margin": margin}


def uncertainty(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """The named measure. logits [B, C] -> [B]."""
    mode = canonical_uncertainty_mode(mode)
    if mode == "none":
        raise ValueError("uncertainty mode 'none' has no measure")
    return _MEASURES[mode](logits)


def is_confident(logits: torch.Tensor, mode: str, eta: float) -> torch.Tensor:
    """The entropy-aware gate: which images the edge answers itself.

    Entropies are confident below eta, the margin above it; with no measure
    no image is confident. logits [B, C] -> [B] bool.
    """
    return gate_measure(logits, mode, eta)[1]


def gate_measure(logits: torch.Tensor, mode: str, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's measure and its decision, the measure computed once.

    logits [B, C] -> (measure [B] float32, zeros with no measure; confident [B] bool).
    """
    mode = canonical_uncertainty_mode(mode)
    if mode == "none":
        zeros = torch.zeros(logits.shape[0], device=logits.device)
        return zeros, zeros.bool()
    values = _MEASURES[mode](logits)
    return values, confident_by(values, mode, eta)


def confident_by(value: torch.Tensor, mode: str, eta: float | torch.Tensor) -> torch.Tensor:
    """The gate on an already computed measure: value [B] of `mode` (not 'none'), eta a
    float or 0-d tensor -> confident [B] bool. Entropies are confident below eta, the
    margin above it."""
    return value > eta if mode == "margin" else value < eta
