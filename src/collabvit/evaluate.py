"""In-process collaborative evaluation: the same EdgeDevice and Server as the network path."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from collabvit import vit
from collabvit.edge import EdgeDevice
from collabvit.metrics import RunningSummary
from collabvit.server import Server


@dataclass(frozen=True)
class ImageRecord:
    """One image's outcome (the --per-image CSV row)."""

    index: int
    label: int
    edge_prediction: int
    final_prediction: int
    sent: bool
    patches_sent: int


@dataclass
class EvalResult:
    summary: dict[str, float]
    records: list[ImageRecord] = field(default_factory=list)


def evaluate(
    edge: EdgeDevice,
    server: Server,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    seed: int = 0,
    progress: bool | None = None,
    keep_records: bool = False,
    total: int | None = None,
) -> EvalResult:
    """Run the collaborative protocol over batches and summarise it.

    Confident images keep the edge's answer; the others get the server's
    answer on their selected patches alone.

    Args:
        edge: the edge device.
        server: the server.
        batches: (unnormalised images [B, C, H, W], targets [B]) pairs.
        seed: seeds the ``random`` selection policy.
        progress: tqdm bar on stderr; None shows it only on a terminal.
        keep_records: also return one ImageRecord per image.
        total: number of batches, for the progress bar.
    """
    vit.check_compatible(edge.model, server.model)
    generator = torch.Generator().manual_seed(seed)
    running = RunningSummary(num_patches=edge.geometry.num_patches)
    records: list[ImageRecord] = []
    quiet = None if progress is None else not progress  # tqdm: None = quiet unless a terminal
    bar = tqdm(batches, total=total, disable=quiet, unit="batch", desc="collaborative eval")
    for images, targets in bar:
        result = edge.process(images, generator)
        final_logits = result.logits.clone()
        if result.payloads:
            final_logits[result.sent] = server.classify(result.payloads).to(final_logits.device)
        size, minimum, total_score = result.selection_statistics()
        running.update(
            targets, result.logits, final_logits, result.confident, size, minimum, total_score
        )
        if keep_records:
            edge_pred = result.logits.argmax(dim=1).tolist()
            final_pred = final_logits.argmax(dim=1).tolist()
            sent = result.sent.tolist()
            sizes = size.tolist()
            for row, label in enumerate(targets.tolist()):
                records.append(ImageRecord(
                    index=len(records), label=int(label), edge_prediction=edge_pred[row],
                    final_prediction=final_pred[row], sent=sent[row],
                    patches_sent=sizes[row] if sent[row] else 0,
                ))  # fmt: skip
    return EvalResult(summary=running.summary(), records=records)


def write_results(path: str | Path, summary: dict, config: dict) -> None:
    """Every figure plus the resolved config (how the numbers were made) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "config": config}, indent=2) + "\n")


def write_per_image(path: str | Path, records: list[ImageRecord]) -> None:
    """One CSV row per image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(ImageRecord.__dataclass_fields__)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for record in records:
            row = asdict(record)
            row["sent"] = int(row["sent"])
            writer.writerow(row)
