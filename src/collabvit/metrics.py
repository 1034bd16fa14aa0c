"""Running summary of a collaborative evaluation (DESIGN.md section 1, "Summary metrics")."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import torch


@dataclass(frozen=True)
class Summary:
    """The figures of a collaborative run over some images (docs/design.md, "Summary metrics").

    Accuracies are in %; `sent_tokens` is the mean selection size over the sent
    images; the attention averages are over sent images with a non-empty selection;
    `comm_cost` = (sent images / images) x (sent_tokens / num_patches).
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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


TOP_K = 5


def top_classes(logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """The k best classes per row, best first: logits [B, C] -> [B, min(k, C)] int64."""
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


def exact_sum(values: torch.Tensor) -> Fraction:
    """The exact sum of float values [n] (independent of their order)."""
    return sum(map(Fraction, values.double().tolist()), Fraction(0))


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many rows have their target among the k largest logits.

    logits [B, C], targets [B]; k is capped at C.
    """
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == targets.unsqueeze(1)).any(dim=1).sum())


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
    # Exact sums: the figures do not depend on how the images were split into batches,
    # in what order they arrived, or on which process saw them.
    sum_of_min_attention: Fraction = Fraction(0)
    sum_of_sum_attention: Fraction = Fraction(0)

    def update(
        self,
        targets: torch.Tensor,
        edge_logits: torch.Tensor,
        final_logits: torch.Tensor,
        confident: torch.Tensor,
        selection_size: torch.Tensor,
        selection_min: torch.Tensor,
        selection_sum: torch.Tensor,
    ) -> None:
        """Add one batch.

        Args:
            targets: labels [B].
            edge_logits: edge model logits [B, C].
            final_logits: the answer used per image (edge if confident, else server) [B, C].
            confident: [B] bool.
            selection_size: patches selected per image [B] (only sent images count).
            selection_min: minimum selected score [B].
            selection_sum: sum of selected scores [B].
        """
        self.update_ranked(targets, top_classes(edge_logits), top_classes(final_logits),
                           confident, selection_size, selection_min, selection_sum)  # fmt: skip

    def update_ranked(
        self,
        targets: torch.Tensor,
        edge_top: torch.Tensor,
        final_top: torch.Tensor,
        confident: torch.Tensor,
        selection_size: torch.Tensor,
        selection_min: torch.Tensor,
        selection_sum: torch.Tensor,
    ) -> None:
        """Add images whose answers are given as ranked classes (top_classes of the logits).

        Args:
            targets: labels [B].
            edge_top, final_top: [B, k] class indices, best first (k = min(5, classes)).
            confident, selection_size, selection_min, selection_sum: as for `update`.
        """
        targets = targets.to(edge_top.device).unsqueeze(1)
        sent = ~confident.to(edge_top.device)
        selection_size = selection_size.to(edge_top.device)
        nonempty = sent & (selection_size > 0)
        self.images += int(targets.shape[0])
        self.confident += int((~sent).sum())
        self.client_top1 += int((edge_top[:, :1] == targets).any(dim=1).sum())
        self.client_top5 += int((edge_top == targets).any(dim=1).sum())
        self.collab_top1 += int((final_top[:, :1] == targets).any(dim=1).sum())
        self.collab_top5 += int((final_top == targets).any(dim=1).sum())
        self.sent_patches += int(selection_size[sent].sum())
        self.nonempty_sent += int(nonempty.sum())
        self.sum_of_min_attention += exact_sum(selection_min[nonempty.to(selection_min.device)])
        self.sum_of_sum_attention += exact_sum(selection_sum[nonempty.to(selection_sum.device)])

    def summary(self) -> Summary:
        """The figures read out (accuracies in %, 0 when nothing was seen)."""
        sent = self.images - self.confident
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


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in % of logits [n, C] against targets [n] (0 for n = 0)."""
    return 100.0 * topk_correct(logits, targets, 1) / len(targets) if len(targets) else 0.0


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
