"""What a lower precision changes in a collaborative run, image by image: the gate's
decisions, the kept patches, the answers, and every figure of the summary.

A run at each precision keeps, per image, what the edge decided (confident or sent, which
patches) and the final answer; comparing two runs over the same images counts where they
part. The edge's patch scores are float32 at every precision (vit.py), so a kept-patch set
changes only where the blocks' outputs moved the class token's attention across the
selection's boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from collabvit.lite.summary import Summary
from collabvit.models.edge import EdgeDevice
from collabvit.models.server import Server
from collabvit.research.evaluate import evaluate


@dataclass(frozen=True)
class DecidedRun:
    """A collaborative run's figures and its per-image decisions, in dataset order.

    Attributes:
        summary: the run's figures.
        indices: [n] dataset indices; confident: [n] bool, answered at the edge;
        keep: [n, N] bool, the kept patches (of every image, sent or not);
        answers: [n] int64, the final top-1 class.
    """

    summary: Summary
    indices: np.ndarray
    confident: np.ndarray
    keep: np.ndarray
    answers: np.ndarray


def decided_run(edge: EdgeDevice, server: Server,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                seed: int = 0, progress: bool | None = None,
                total: int | None = None) -> DecidedRun:  # fmt: skip
    """`evaluate` over `batches` (images [B, C, H, W], targets [B], indices [B]), keeping
    each image's decisions, in dataset order."""
    result = evaluate(edge, server, batches, seed, progress, keep_records=True, total=total,
                      keep_masks=True)  # fmt: skip
    indices = np.array([r.index for r in result.records])
    order = np.argsort(indices, kind="stable")
    confident = np.array([not r.sent for r in result.records])
    answers = np.array([r.final_prediction for r in result.records])
    keep = torch.cat(result.kept).numpy()
    return DecidedRun(result.summary, indices[order], confident[order], keep[order],
                      answers[order])  # fmt: skip


# the summary's figures compared between precisions, in points (%) or as they are
COMPARED = ("client_acc", "collab_acc", "client_acc5", "collab_acc5", "comm_cost",
            "sent_tokens", "confident_images")  # fmt: skip


def compare_runs(exact: DecidedRun, other: DecidedRun) -> dict:
    """How `other` differs from `exact` over the same images: each figure's change, and the
    share (%) of images whose gate decision, kept-patch set (among images both runs send)
    and final answer differ."""
    if not np.array_equal(exact.indices, other.indices):
        raise ValueError("the runs cover different images")
    both_sent = ~exact.confident & ~other.confident
    kept_differs = (exact.keep != other.keep).any(axis=1) & both_sent
    size_change = np.abs(exact.keep.sum(axis=1) - other.keep.sum(axis=1))[both_sent]
    figures = {name: {"exact": getattr(exact.summary, name), "other": getattr(other.summary, name),
                      "change": getattr(other.summary, name) - getattr(exact.summary, name)}
               for name in COMPARED}  # fmt: skip
    return {
        "images": int(exact.indices.size),
        "figures": figures,
        "gate_changed_pct": 100.0 * float((exact.confident != other.confident).mean()),
        "kept_set_changed_pct": 100.0 * float(kept_differs.sum() / max(both_sent.sum(), 1)),
        "kept_size_change_mean": float(size_change.mean()) if size_change.size else 0.0,
        "answer_agreement_pct": 100.0 * float((exact.answers == other.answers).mean()),
        "largest_change_pt": max(abs(figures[name]["change"])
                                 for name in ("client_acc", "collab_acc", "client_acc5",
                                              "collab_acc5")),  # fmt: skip
    }


# how the table names the shipped pairs, by data set
PAIR_NAMES = {"fmnist": "Fashion-MNIST", "fmnist-cluttered": "cluttered"}


def precision_table(results: dict) -> str:
    """The table of scripts/precision_report.py's results (README, RESULTS.md): for each pair
    and lower precision, both models in it and the server alone in it, the change of the
    figures and the shares of images that part from float32."""
    lines = ["| pair | precision | in it | collab. acc. (float32 → it) | edge acc. | cost | "
             "gate changed | kept set changed | answers agree |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for data_set, report in results["pairs"].items():
        for precision in report["both"]:
            for scope, label in (("both", "both models"), ("server_alone", "server alone")):
                c = report[scope][precision]
                f = c["figures"]
                lines.append(
                    f"| {PAIR_NAMES[data_set]} | {precision} | {label} | "
                    f"{f['collab_acc']['exact']:.2f} → {f['collab_acc']['other']:.2f} % | "
                    f"{f['client_acc']['change']:+.2f} pt | {f['comm_cost']['change']:+.4f} | "
                    f"{c['gate_changed_pct']:.2f} % | {c['kept_set_changed_pct']:.2f} % | "
                    f"{c['answer_agreement_pct']:.2f} % |")  # fmt: skip
    return "\n".join(lines)
