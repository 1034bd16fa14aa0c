"""Operating points: one edge pass, one server pass per selection setting, any number of gates.

The gate threshold eta only decides which images use the server's answer, so
for a fixed selection every eta is evaluated from the same two sets of logits.
Figures are computed with metrics.RunningSummary, exactly as `collabvit eval`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from collabvit.edge import EdgeDevice
from collabvit.metrics import RunningSummary
from collabvit.protocol import build_payloads
from collabvit.selection import select_patches, selection_statistics
from collabvit.server import Server
from collabvit.uncertainty import is_confident


@dataclass(frozen=True)
class EdgePass:
    """The edge's outputs over a dataset, kept for sweeping.

    Attributes:
        images: unnormalised [n, C, H, W].
        labels: [n].
        logits: edge logits [n, classes].
        scores: normalised patch scores [n, N] (of the edge's attention mode).
    """

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor


@torch.inference_mode()
def run_edge(
    edge: EdgeDevice,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    progress: bool | None = None,
) -> EdgePass:
    """Edge logits and patch scores for every image (the gate and selection come later)."""
    images, labels, logits, scores = [], [], [], []
    quiet = None if progress is None else not progress
    for batch, targets in tqdm(batches, desc="edge pass", disable=quiet, unit="batch"):
        batch_logits, batch_scores = edge.scores(batch)
        images.append(batch)
        labels.append(targets)
        logits.append(batch_logits.cpu())
        scores.append(batch_scores.cpu())
    return EdgePass(torch.cat(images), torch.cat(labels), torch.cat(logits), torch.cat(scores))


def server_logits(
    server: Server, images: torch.Tensor, keep: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """The server's logits for every image on its selection alone.

    Args:
        images: unnormalised [n, C, H, W].
        keep: selections [n, N] bool.

    Returns:
        [n, classes].
    """
    out = []
    for start in range(0, len(images), batch_size):
        rows = list(range(start, min(start + batch_size, len(images))))
        payloads = build_payloads(images, keep, rows, server.geometry.patch_size)
        out.append(server.classify(payloads).cpu())
    return torch.cat(out)


def summarize(
    edge_pass: EdgePass,
    keep: torch.Tensor,
    server_out: torch.Tensor,
    uncer_mode: str,
    uncer_th: float,
) -> dict[str, float]:
    """The summary figures of one operating point (same definitions as `collabvit eval`)."""
    confident = is_confident(edge_pass.logits, uncer_mode, uncer_th)
    final = torch.where(confident[:, None], edge_pass.logits, server_out)
    size, minimum, total = selection_statistics(edge_pass.scores, keep)
    running = RunningSummary(num_patches=edge_pass.scores.shape[1])
    running.update(edge_pass.labels, edge_pass.logits, final, confident, size, minimum, total)
    return running.summary()


def select(
    edge_pass: EdgePass, masking_mode: str, masking_th: float, seed: int = 0
) -> torch.Tensor:
    """Selections [n, N] of a policy over the whole pass (``random`` seeded once)."""
    generator = torch.Generator().manual_seed(seed)
    return select_patches(edge_pass.scores, masking_mode, masking_th, generator)
