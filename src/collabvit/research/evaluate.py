"""In-process collaborative evaluation: the same EdgeDevice and Server as the network path."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from collabvit.data import check_labels
from collabvit.lite.controller import BytesController
from collabvit.lite.pacing import Pacing
from collabvit.lite.progress import progress_bar
from collabvit.lite.protocol import PatchPayload
from collabvit.lite.summary import RunningSummary, Summary, write_results  # noqa: F401 - re-exported
from collabvit.models import vit
from collabvit.models.edge import EdgeDevice
from collabvit.models.server import Server


@dataclass(frozen=True)
class PerImageRow:
    """One image's outcome (the --per-image CSV row)."""

    index: int
    label: int
    edge_prediction: int
    final_prediction: int
    sent: bool
    patches_sent: int


@dataclass
class EvalResult:
    """The figures of a run, its per-image records (when asked for) and the images skipped."""

    summary: Summary
    records: list[PerImageRow] = field(default_factory=list)
    skipped: int = 0
    running: RunningSummary | None = None  # the exact counts behind `summary`
    withheld: int = 0  # images the gate would send that a budget answered at the edge
    wire_bytes: float = 0.0  # of the sends a budget admitted (with send_bytes)
    seconds: float = 0.0  # the images' time at their pace (with images_per_second)
    # each record's kept patches [n, N] bool (with keep_masks): of every image, sent or not
    kept: list[torch.Tensor] = field(default_factory=list)


def evaluate(
    edge: EdgeDevice,
    server: Server,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    seed: int = 0,
    progress: bool | None = None,
    keep_records: bool = False,
    total: int | None = None,
    expected_images: int | None = None,
    controller=None,
    images_per_second: float | None = None,
    send_bytes: Callable[[PatchPayload], int] | None = None,
    keep_masks: bool = False,
) -> EvalResult:
    """Run the collaborative protocol over batches and summarise it.

    Confident images keep the edge's answer; the others get the server's
    answer on their selected patches alone.

    Args:
        edge: the edge device.
        server: the server.
        batches: (unnormalised images [B, C, H, W], targets [B], dataset indices [B]).
        seed: seeds the ``random`` selection policy (with each image's index).
        progress: progress on stderr; None shows it on a terminal, and as periodic
            lines otherwise; False shows nothing.
        keep_records: also return one PerImageRow per image.
        keep_masks: with keep_records, also each image's kept patches (EvalResult.kept),
            where the gate keeps the image at the edge too.
        total: number of batches, for the progress display.
        expected_images: the dataset's size, to count images the loader skipped.
        controller: a controller.CostController or BytesController: each batch then runs at
            the operating point it gives (δ, and η from the uncertainties of the batches
            before; the edge's own η for the first), it sees each batch's uncertainties, and
            it admits or withholds each send (a withheld image keeps the edge's answer and
            counts as answered at the edge). The edge's own point is back in place when the
            run ends.
        images_per_second: with a controller, the clock it sees: the images arrive at this
            pace, the k-th (from 0) at k / images_per_second (what a bytes budget means
            offline: "what accuracy at 2 kB/s?"; lite.pacing.Pacing).
        send_bytes: with a controller, the bytes on the wire of offloading a payload
            (client.offload_bytes); without it a send costs 0 bytes.
    """
    vit.check_compatible(edge.model, server.model)
    num_classes = edge.geometry.num_classes
    running = RunningSummary(num_patches=edge.geometry.num_patches)
    records: list[PerImageRow] = []
    kept: list[torch.Tensor] = []
    chosen = edge.config
    withheld = 0
    wire_bytes = 0.0
    if isinstance(controller, BytesController) and not images_per_second:
        raise ValueError("a bytes/s budget needs the images' pace (images_per_second)")
    # first=0: the first image arrives at time 0, as it always has here, so that no budget
    # figure of an offline run moves (the edge's images come a frame later: first=1)
    pacing = Pacing(controller, images_per_second, first=0)
    try:
        for images, targets, indices in progress_bar(
            batches, "collaborative eval", total=total, unit="batch", enabled=progress
        ):
            check_labels(targets, num_classes)
            pacing.arrive(len(targets))
            pacing.steer(edge)
            result = edge.process(images, indices, seed)
            confident, payloads = result.confident, result.payloads
            if controller is not None:
                values = result.uncertainty.tolist()
                pacing.observe(values)
                rows = torch.nonzero(result.sent).flatten().tolist()  # a payload's image
                costs = [send_bytes(p) if send_bytes else 0 for p in payloads]
                admitted = [pacing.admit(row, nbytes, values[row])
                            for row, nbytes in zip(rows, costs, strict=True)]  # fmt: skip
                withheld += admitted.count(False)
                wire_bytes += sum(n for n, a in zip(costs, admitted, strict=True) if a)
                confident = confident.clone()
                confident[[row for row, a in zip(rows, admitted, strict=True) if not a]] = True
                payloads = [p for p, a in zip(payloads, admitted, strict=True) if a]
            final_logits = result.logits.clone()
            if payloads:
                final_logits[~confident] = server.classify(payloads).to(final_logits.device)
            size, minimum, total_score = result.selection_statistics()
            running.update(
                targets, result.logits, final_logits, confident, size, minimum, total_score
            )
            if keep_records:
                edge_pred = result.logits.argmax(dim=1).tolist()
                final_pred = final_logits.argmax(dim=1).tolist()
                sent = (~confident).tolist()
                sizes = size.tolist()
                for row, (index, label) in enumerate(zip(indices.tolist(), targets.tolist(),
                                                         strict=True)):
                    records.append(PerImageRow(
                        index=int(index), label=int(label), edge_prediction=edge_pred[row],
                        final_prediction=final_pred[row], sent=sent[row],
                        patches_sent=sizes[row] if sent[row] else 0,
                    ))  # fmt: skip
                if keep_masks:
                    kept.append(result.keep.cpu())
    finally:
        edge.config = chosen
    summary = running.summary()
    skipped = expected_images - summary.images if expected_images is not None else 0
    return EvalResult(summary=summary, records=records, skipped=skipped, running=running,
                      withheld=withheld, wire_bytes=wire_bytes,
                      seconds=pacing.seconds, kept=kept)


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """The result of one run over the images of all `parts` (one per process): exact counts
    and sums combined, per-image records in dataset order."""
    running = RunningSummary.merged([part.running for part in parts])
    records = sorted((r for part in parts for r in part.records), key=lambda r: r.index)
    return EvalResult(summary=running.summary(), records=records,
                      skipped=sum(part.skipped for part in parts), running=running)  # fmt: skip


def write_per_image(path: str | Path, records: list[PerImageRow]) -> None:
    """One CSV row per image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(PerImageRow.__dataclass_fields__)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for record in records:
            row = asdict(record)
            row["sent"] = int(row["sent"])
            writer.writerow(row)
