"""Calibration data and calibrated confidence: the calibration/held-out split,
temperature scaling of the edge's logits, and the expected calibration error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from collabvit.data import split_indices


def split_calibration(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random (calibration, held-out) indices of `count` images, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction must lie in (0, 1), got {fraction}")
    calibration_size = round(count * fraction)
    if not 0 < calibration_size < count:
        raise ValueError(f"{count} images cannot be split into calibration and held-out parts")
    held_out, calibration = split_indices(count, calibration_size, seed)
    return calibration, held_out
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    logits [n, classes], labels [n] -> T > 0.
    """
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE in %: the bin-weighted gap between confidence and accuracy (equal-width bins).

    logits [n, classes], labels [n].
    """
    probabilities = logits.double().softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    bin_of = torch.clamp((confidence * bins).ceil().long() - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = bin_of == b
        if in_bin.any():
            gap = (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
            error += float(in_bin.double().mean() * gap)
    return 100.0 * error


