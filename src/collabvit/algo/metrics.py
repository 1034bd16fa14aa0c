"""Accuracy of logits against labels; the run's figures live in summary.py (numpy only)
and are re-exported here."""

from __future__ import annotations

import torch

from collabvit.lite.arrays import as_array
from collabvit.lite.summary import (  # noqa: F401 - re-exported
    RunningSummary,
    Summary,
    exact_sum,
    format_summary,
    ranked_classes,
)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many rows have their target among the k largest logits (ties: the lower class
    first, the one rule of summary.ranked_classes).

    logits [B, C], targets [B]; k is capped at C.
    """
    top = ranked_classes(logits, k)
    return int((top == as_array(targets)[:, None]).any(axis=1).sum())


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in % of logits [n, C] against targets [n] (0 for n = 0)."""
    return 100.0 * topk_correct(logits, targets, 1) / len(targets) if len(targets) else 0.0
