"""The method's modes and their rules, declared once for both edges.

The torch algorithm (collabvit.algo) and the exported ONNX edge check the same names and the
same (mode, threshold) rules, so they live here, where no torch is needed.
"""

from __future__ import annotations

import math

ATTENTION_MODES = ("mean", "rollout")
MASKING_MODES = ("random", "topk", "attention_threshold", "attention_sum_threshold")
COUNT_MODES = ("random", "topk")
UNCERTAINTY_MODES = ("shannon_entropy", "min_entropy", "margin", "none")


def canonical_uncertainty_mode(mode: str | None) -> str:
    """Map the accepted spellings onto UNCERTAINTY_MODES ('' and None mean 'none')."""
    if mode is None or mode in ("", "none"):
        return "none"
    if mode not in UNCERTAINTY_MODES:
        raise ValueError(
            f"unknown uncertainty mode {mode!r}; choose one of {', '.join(UNCERTAINTY_MODES)}"
        )
    return mode


def validate_masking(mode: str, threshold: float, num_patches: int | None = None) -> None:
    """Raise ValueError with a one-line reason if (mode, threshold) is unusable.

    Args:
        mode: one of MASKING_MODES.
        threshold: k for the count modes, a score threshold otherwise.
        num_patches: N, when known, to reject k > N.
    """
    if mode not in MASKING_MODES:
        raise ValueError(f"unknown masking mode {mode!r}; choose one of {', '.join(MASKING_MODES)}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"masking threshold must be a finite number, got {threshold}")
    if mode in COUNT_MODES:
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
