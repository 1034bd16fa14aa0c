"""Running summary of a collaborative evaluation (DESIGN.md section 1, "Summary metrics")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    sum_of_min_attention: float = 0.0
    sum_of_sum_attention: float = 0.0

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
        targets = targets.to(edge_logits.device)
        sent = ~confident
        nonempty = sent & (selection_size > 0)
        self.images += int(targets.shape[0])
        self.confident += int(confident.sum())
        self.client_top1 += topk_correct(edge_logits, targets, 1)
        self.client_top5 += topk_correct(edge_logits, targets, 5)
        self.collab_top1 += topk_correct(final_logits, targets, 1)
        self.collab_top5 += topk_correct(final_logits, targets, 5)
        self.sent_patches += int(selection_size[sent].sum())
        self.nonempty_sent += int(nonempty.sum())
        self.sum_of_min_attention += float(selection_min[nonempty].double().sum())
        self.sum_of_sum_attention += float(selection_sum[nonempty].double().sum())

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
                self.sum_of_min_attention / self.nonempty_sent if self.nonempty_sent else 0.0
            ),
            avg_sum_attention=(
                self.sum_of_sum_attention / self.nonempty_sent if self.nonempty_sent else 0.0
            ),
            comm_cost=(sent / self.images) * (sent_tokens / self.num_patches)
            if self.images
            else 0.0,
            client_acc=self.client_top1 * percent,
            client_acc5=self.client_top5 * percent,
            collab_acc=self.collab_top1 * percent,
            collab_acc5=self.collab_top5 * percent,
        )

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
