"""The paper's figures of a collaborative run (DESIGN.md section 1, "Summary metrics").

numpy only: the torch edge, the sweep, the network client and the ONNX edge all count
with this one RunningSummary. Inputs may be numpy arrays or torch tensors (read through
`as_array`, which needs no torch import).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np

from collabvit import versions
from collabvit.lite.arrays import Array, as_array

TOP_K = 5


def ranked_classes(logits: Array, k: int = TOP_K) -> np.ndarray:
    """The k best classes per row, best first (ties: the lower class first).

    logits [B, C] -> [B, min(k, C)] int64.
    """
    logits = as_array(logits)
    k = min(k, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)


def exact_sum(values: Array) -> Fraction:
    """The exact sum of float values [n] (independent of their order)."""
    return sum(map(Fraction, as_array(values).astype(np.float64).tolist()), Fraction(0))


@dataclass(frozen=True)
class Summary:
    """The figures of a collaborative run over some images (docs/design.md, "Summary metrics").

    Accuracies are in %; `sent_tokens` is the mean selection size over the sent
    images; the attention averages are over sent images with a non-empty selection;
    `comm_cost` = (sent images / images) x (sent_tokens / num_patches). Over a network,
    `undelivered_images` were sent by the gate but never reached the server (they keep the
    edge's answer); `sent_images`, `sent_tokens`, the averages and `comm_cost` count what
    was delivered, so confident + sent + undelivered = images.
    """

    images: int
    num_patches: int
    confident_images: int
    sent_images: int
    sent_tokens: float
    avg_min_attention: float
    avg_sum_attention: float
    comm_cost: float
    client_acc: float
    client_acc5: float
    collab_acc: float
    collab_acc5: float
    undelivered_images: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class RunningSummary:
    """Accumulates the paper's figures batch by batch; `summary()` reads them out.

    Attributes are running counts and sums over the images seen so far.
    """

    num_patches: int
    images: int = 0
    confident: int = 0
    client_top1: int = 0
    client_top5: int = 0
    collab_top1: int = 0
    collab_top5: int = 0
    sent_patches: int = 0
    nonempty_sent: int = 0
    undelivered: int = 0
    # Exact sums: the figures do not depend on how the images were split into batches,
    # in what order they arrived, or on which process saw them.
    sum_of_min_attention: Fraction = Fraction(0)
    sum_of_sum_attention: Fraction = Fraction(0)

    def update(
        self,
        targets: Array,
        edge_logits: Array,
        final_logits: Array,
        confident: Array,
        selection_size: Array,
        selection_min: Array,
        selection_sum: Array,
    ) -> None:
        """Add one batch (numpy arrays or torch tensors, on any device).

        Args:
            targets: labels [B].
            edge_logits: edge model logits [B, C].
            final_logits: the answer used per image (edge if confident, else server) [B, C].
            confident: [B] bool.
            selection_size: patches selected per image [B] (only sent images count).
            selection_min: minimum selected score [B].
            selection_sum: sum of selected scores [B].
        """
        self.update_ranked(targets, ranked_classes(edge_logits), ranked_classes(final_logits),
                           confident, selection_size, selection_min, selection_sum)  # fmt: skip

    def update_ranked(
        self,
        targets: Array,
        edge_top: Array,
        final_top: Array,
        confident: Array,
        selection_size: Array,
        selection_min: Array,
        selection_sum: Array,
        delivered: Array | None = None,
    ) -> None:
        """Add images whose answers are given as ranked classes (ranked_classes of the logits).

        Args:
            targets: labels [B].
            edge_top, final_top: [B, k] class indices, best first (k = min(5, classes)).
            confident, selection_size, selection_min, selection_sum: as for `update`.
            delivered: [B] bool, whether a sent image reached the server (default: all
                did); one that did not counts as undelivered, not as sent.
        """
        targets = as_array(targets)[:, None]
        edge_top, final_top = as_array(edge_top), as_array(final_top)
        confident = as_array(confident).astype(bool)
        sent = ~confident
        if delivered is not None:
            missed = sent & ~as_array(delivered).astype(bool)
            self.undelivered += int(missed.sum())
            sent = sent & ~missed
        selection_size = as_array(selection_size)
        nonempty = sent & (selection_size > 0)
        self.images += int(targets.shape[0])
        self.confident += int(confident.sum())
        self.client_top1 += int((edge_top[:, :1] == targets).any(axis=1).sum())
        self.client_top5 += int((edge_top == targets).any(axis=1).sum())
        self.collab_top1 += int((final_top[:, :1] == targets).any(axis=1).sum())
        self.collab_top5 += int((final_top == targets).any(axis=1).sum())
        self.sent_patches += int(selection_size[sent].sum())
        self.nonempty_sent += int(nonempty.sum())
        self.sum_of_min_attention += exact_sum(as_array(selection_min)[nonempty])
        self.sum_of_sum_attention += exact_sum(as_array(selection_sum)[nonempty])

    def summary(self) -> Summary:
        """The figures read out (accuracies in %, 0 when nothing was seen)."""
        sent = self.images - self.confident - self.undelivered
        sent_tokens = self.sent_patches / sent if sent else 0.0
        percent = 100.0 / self.images if self.images else 0.0
        return Summary(
            images=self.images,
            num_patches=self.num_patches,
            confident_images=self.confident,
            sent_images=sent,
            sent_tokens=sent_tokens,
            avg_min_attention=(
                float(self.sum_of_min_attention / self.nonempty_sent) if self.nonempty_sent
                else 0.0
            ),
            avg_sum_attention=(
                float(self.sum_of_sum_attention / self.nonempty_sent) if self.nonempty_sent
                else 0.0
            ),
            comm_cost=(sent / self.images) * (sent_tokens / self.num_patches)
            if self.images
            else 0.0,
            client_acc=self.client_top1 * percent,
            client_acc5=self.client_top5 * percent,
            collab_acc=self.collab_top1 * percent,
            collab_acc5=self.collab_top5 * percent,
            undelivered_images=self.undelivered,
        )

    @classmethod
    def merged(cls, parts: list[RunningSummary]) -> RunningSummary:
        """One summary of the images of all `parts` (e.g. one per process): counts and exact
        sums added, so it equals the summary of one pass over all the images."""
        total = cls(num_patches=parts[0].num_patches)
        for part in parts:
            if part.num_patches != total.num_patches:
                raise ValueError("summaries of models with different patch counts")
            for name in asdict(total):
                if name != "num_patches":
                    setattr(total, name, getattr(total, name) + getattr(part, name))
        return total

    def state(self) -> dict:
        """Raw counters, for merging or debugging."""
        return asdict(self)


def format_summary(
    summary: Summary,
    masking_mode: str,
    masking_th: float,
    uncer_mode: str,
    uncer_th: float,
) -> str:
    """The reference's six summary lines, then the two top-5 lines."""
    r = lambda value: round(float(value), 4)  # noqa: E731 - the reference prints round(x, 4)
    summary = summary.as_dict()
    return "\n".join(
        [
            f"* Masking mode:: {masking_mode}, {masking_th} / "
            f"Confidence criterion:: {uncer_mode}, {uncer_th}",
            f"* Sent token number:: {r(summary['sent_tokens'])} / "
            f"Averaged minimum attention:: {r(summary['avg_min_attention'])} / "
            f"Averaged sum of attention:: {r(summary['avg_sum_attention'])}",
            f"* Total confident image:: {int(summary['confident_images'])}",
            f"* Communication cost:: {summary['comm_cost']}",
            f"Client only accuracy: {r(summary['client_acc'])} %",
            f"Collaborative accuracy: {r(summary['collab_acc'])} %",
            f"Client only top-5 accuracy: {r(summary['client_acc5'])} %",
            f"Collaborative top-5 accuracy: {r(summary['collab_acc5'])} %",
        ]
    )


def provenance(command: str, **configs) -> dict:
    """How the numbers were made, for a results file: every resolved config (`asdict` of each
    dataclass, by name), the versions and the time. A bearer token is never written: it shows
    as '<set>'."""

    def public(config) -> dict:
        values = asdict(config)
        if values.get("token"):
            values["token"] = "<set>"
        return values

    return {
        "command": command,
        **{name: public(config) for name, config in configs.items()},
        **versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: str | Path, summary: Summary, provenance: dict, **extra) -> None:
    """Every figure plus how they were made (resolved config, data, versions) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"summary": summary.as_dict(), **extra, "config": provenance}
    path.write_text(json.dumps(record, indent=2) + "\n")
