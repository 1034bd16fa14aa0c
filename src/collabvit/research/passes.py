"""The sweep's forward passes: one edge pass over a dataset, one server pass per selection.

The gate threshold eta only decides which images use the server's answer, so
for a fixed selection every eta is evaluated from the same two sets of logits.
The gate and the selection are the edge's own decision step (edge.gate,
edge.select), and the figures come from metrics.RunningSummary, exactly as in
`collabvit eval`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from collabvit.algo.selection import selection_statistics
from collabvit.algo.uncertainty import uncertainty
from collabvit.lite.frontier import SweepPoint
from collabvit.lite.modes import canonical_uncertainty_mode
from collabvit.lite.progress import progress_bar
from collabvit.lite.protocol import build_payloads
from collabvit.lite.specs import EdgeConfig
from collabvit.lite.summary import RunningSummary, Summary
from collabvit.models.edge import EdgeDevice, gate, select
from collabvit.models.server import Server
from collabvit.research.distributed import BLOCK_IMAGES, Processes


@dataclass(frozen=True)
class EdgePass:
    """The edge's outputs over a dataset, kept for sweeping.

    Attributes:
        images: unnormalised [n, C, H, W] (None in a pass put together from several
            processes: each keeps its own images).
        labels: [n].
        image_ids: dataset indices [n] int64 (they seed the ``random`` policy).
        logits: edge logits [n, classes].
        scores: normalised patch scores [n, N] (of the edge's attention mode).
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    image_ids: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor

    def subset(self, index: torch.Tensor) -> EdgePass:
        """The pass restricted to images `index` [m] (positions in this pass)."""
        images = self.images[index] if self.images is not None else None
        return EdgePass(images, self.labels[index], self.image_ids[index], self.logits[index],
                        self.scores[index])  # fmt: skip

    def gathered(self, processes: Processes) -> EdgePass:
        """The whole dataset's pass from each process's part, in dataset order (without the
        images, which stay where they are)."""
        if not processes.distributed:
            return self
        return EdgePass(None, processes.concat(self.labels), processes.concat(self.image_ids),
                        processes.concat(self.logits), processes.concat(self.scores))


@torch.inference_mode()
def run_edge(
    edge: EdgeDevice,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    progress: bool | None = None,
) -> EdgePass:
    """Edge logits and patch scores for every image (the gate and selection come later).

    batches: (unnormalised images [B, C, H, W], targets [B], dataset indices [B]).
    """
    images, labels, ids, logits, scores = [], [], [], [], []
    for batch, targets, indices in progress_bar(batches, "edge pass", unit="batch",
                                                enabled=progress):  # fmt: skip
        batch_logits, batch_scores = edge.scores(batch)
        images.append(batch)
        labels.append(targets)
        ids.append(indices)
        logits.append(batch_logits.cpu())
        scores.append(batch_scores.cpu())
    if not images:  # a process whose shard is empty
        g = edge.geometry
        no_ids = torch.zeros(0, dtype=torch.int64)
        return EdgePass(torch.zeros(0, g.in_chans, *g.img_size, dtype=torch.uint8), no_ids,
                        no_ids, torch.zeros(0, g.num_classes), torch.zeros(0, g.num_patches))
    return EdgePass(torch.cat(images), torch.cat(labels), torch.cat(ids), torch.cat(logits),
                    torch.cat(scores))  # fmt: skip


def server_logits(
    server: Server,
    images: torch.Tensor,
    keep: torch.Tensor,
    block: int = BLOCK_IMAGES,
    rows: torch.Tensor | None = None,
    first: int = 0,
) -> torch.Tensor:
    """The server's logits for every image (or only `rows`) on its selection alone.

    The images are classified block by block (positions [b·block, (b+1)·block)
    of the dataset), whatever the number of processes, so a process holding
    whole blocks computes exactly what a single process would.

    Args:
        images: unnormalised [m, C, H, W]: the dataset's images first .. first + m - 1.
        keep: selections [m, N] bool of those images.
        block: images per block (distributed.shard_block of the batch size).
        rows: dataset positions to classify, within the span; the others come back NaN.
        first: the dataset position of images[0].

    Returns:
        [m, classes] float32, row i for dataset position first + i.
    """
    wanted = torch.arange(first, first + len(images)) if rows is None else rows
    out = torch.full((len(images), server.geometry.num_classes), torch.nan)
    for number in torch.unique(torch.div(wanted, block, rounding_mode="floor")).tolist():
        chunk = wanted[(wanted >= number * block) & (wanted < (number + 1) * block)] - first
        payloads = build_payloads(images, keep, chunk.tolist(), server.geometry.patch_size)
        out[chunk] = server.classify(payloads).cpu()
    return out


class ServerPasses:
    """Server passes over a dataset whose images may be spread over processes.

    Each process classifies the requested images of its own span (its images are
    `local_images`, dataset positions `span`); the logits of all processes are put
    together in dataset order, so every process gets the whole pass.
    """

    def __init__(self, server: Server, local_images: torch.Tensor, span: range, count: int,
                 block: int, processes: Processes | None = None) -> None:  # fmt: skip
        self.server = server
        self.images = local_images
        self.span = span
        self.count = count
        self.block = block
        self.processes = processes or Processes()

    def __call__(self, keep: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """keep [count, N] bool for every image; rows: dataset positions (default all).

        Returns [count, classes] float32, NaN for the rows not asked for.
        """
        start, stop = self.span.start, self.span.stop
        wanted = torch.arange(self.count) if rows is None else rows
        local = wanted[(wanted >= start) & (wanted < stop)]
        out = server_logits(self.server, self.images, keep[start:stop], self.block, local,
                            first=start)  # fmt: skip
        classes = self.server.geometry.num_classes
        return self.processes.fill(local, out[local - start], (self.count, classes), torch.nan)


def selections(edge_pass: EdgePass, config: EdgeConfig, seed: int = 0) -> torch.Tensor:
    """What each image of the pass would send under `config`'s policy: keep [n, N] bool."""
    return select(edge_pass.scores, config, edge_pass.image_ids, seed)


def summarize_decisions(
    edge_pass: EdgePass,
    statistics: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    server_out: torch.Tensor,
    confident: torch.Tensor,
) -> Summary:
    """The summary of one operating point from decisions already made.

    Args:
        edge_pass: n images.
        statistics: selection_statistics of the selections (size, minimum, sum; [n] each).
        server_out: server logits [n, classes] (rows of confident images unused, may be NaN).
        confident: the gate's decision [n] bool.
    """
    final = torch.where(confident[:, None], edge_pass.logits, server_out)
    running = RunningSummary(num_patches=edge_pass.scores.shape[1])
    running.update(edge_pass.labels, edge_pass.logits, final, confident, *statistics)
    return running.summary()


# ---------------------------------------------------------------- the grid


def eta_grid(logits: torch.Tensor, measure: str, count: int) -> list[float]:
    """`count` gate thresholds sending evenly spaced shares of the images, none to all.

    The thresholds are quantiles of the measure over `logits` [n, classes], so
    the grid spreads evenly over the sent fraction whatever the measure's
    scale (entropies in bits, margins in probability). The first keeps every
    image at the edge (edge alone, cost 0), the last sends every image; with
    count 1 only the last. Equal thresholds (ties in the data) appear once.
    ``none`` has the single eta 0.
    """
    if canonical_uncertainty_mode(measure) == "none":
        return [0.0]
    fractions = torch.linspace(0.0, 1.0, count, dtype=torch.float64) if count > 1 else [1.0]
    return sorted(set(etas_for_sent_fractions(logits, measure, torch.as_tensor(fractions))))


def etas_for_sent_fractions(
    logits: torch.Tensor, measure: str, fractions: torch.Tensor
) -> list[float]:
    """The etas that send about each of `fractions` [f] of the images (the most uncertain).

    Entropies are confident below eta, so eta is their (1 - fraction) quantile;
    the margin is confident above it, so eta is its fraction quantile. A
    fraction of 1 gives the extreme value, where the strict gate sends all; a
    fraction of 0 gives the next number beyond the other extreme, so none is sent.
    """
    # Stay in the measure's own dtype: the gate compares in it, so the "beyond" value
    # must be a neighbour there, not in float64 (it would round back onto the extreme).
    values = uncertainty(logits, measure).cpu()
    margin = canonical_uncertainty_mode(measure) == "margin"
    fractions = fractions.to(values.dtype).clamp(0.0, 1.0)
    etas = torch.quantile(values, fractions if margin else 1.0 - fractions)
    if margin:
        beyond = torch.nextafter(values.min(), torch.tensor(-math.inf, dtype=values.dtype))
    else:
        beyond = torch.nextafter(values.max(), torch.tensor(math.inf, dtype=values.dtype))
    return torch.where(fractions == 0, beyond, etas).tolist()


@dataclass(frozen=True)
class Grid:
    """What a sweep covers.

    Attributes:
        policies: (masking_mode, threshold) pairs; each costs one server pass.
        gates: (temperature, measure) -> eta values; free (no forward). The
            gate sees the edge logits divided by the temperature.
    """

    policies: tuple[tuple[str, float], ...]
    gates: dict[tuple[float, str], tuple[float, ...]]

    def __len__(self) -> int:
        return len(self.policies) * sum(len(etas) for etas in self.gates.values())


def gate_grid(
    logits: torch.Tensor,
    measures: Sequence[str],
    num_etas: int | None = None,
    etas: Sequence[float] | None = None,
    temperatures: Sequence[float] = (1.0,),
) -> dict[tuple[float, str], tuple[float, ...]]:
    """Grid.gates: explicit `etas` for every measure, or `num_etas` from eta_grid.

    logits [n, classes] are the ones the eta quantiles are taken over (e.g. the
    calibration part's), divided by each temperature in turn.
    """
    gates = {}
    for temperature in temperatures:
        for measure in dict.fromkeys(measures):
            if etas is not None and canonical_uncertainty_mode(measure) != "none":
                values = tuple(etas)
            else:
                values = tuple(eta_grid(logits / temperature, measure, num_etas or 1))
            gates[(temperature, measure)] = values
    return gates


def gate_decisions(
    logits: torch.Tensor, gates: dict[tuple[float, str], Sequence[float]]
) -> dict[tuple[float, str, float], torch.Tensor]:
    """Which images each gate keeps at the edge: (temperature, measure, eta) -> [n] bool.

    The gate sees logits [n, classes] / temperature; the answers stay the edge's own
    (a positive temperature changes no prediction).
    """
    decisions = {}
    for (temperature, measure), etas in gates.items():
        for eta in etas:
            config = EdgeConfig(uncer_mode=measure, uncer_th=eta)
            decisions[(temperature, measure, eta)] = gate(logits, config, temperature).cpu()
    return decisions


def needed_rows(confident: Iterable[torch.Tensor]) -> torch.Tensor:
    """Images sent under at least one gate decision [n] bool: the only ones the server must see.

    Returns indices [m] int64, ascending.
    """
    sent = None
    for decision in confident:
        sent = ~decision if sent is None else sent | ~decision
    return torch.nonzero(sent).flatten() if sent is not None else torch.zeros(0, dtype=torch.long)


def sweep_points(
    edge_pass: EdgePass,
    server: Server,
    grid: Grid,
    attention_mode: str = "mean",
    subsets: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    server_pass: ServerPasses | None = None,
) -> list[SweepPoint]:
    """Every operating point of the grid: one server pass per policy, the gates for free.

    Each gate decides once for all policies, each selection's statistics are
    taken once for all gates, and the server sees only images some gate sends.

    Args:
        edge_pass: the edge outputs over n images (of `attention_mode`).
        subsets: name -> image positions [m] in the pass; each point also gets its
            figures on each subset under that name (e.g. calibration and held-out).
        server_pass: how to run a server pass (default: on the pass's own images, in
            this process).
    """
    subsets = subsets or {}
    if server_pass is None:
        count = len(edge_pass.labels)
        server_pass = ServerPasses(server, edge_pass.images, range(count), count, BLOCK_IMAGES)
    decisions = gate_decisions(edge_pass.logits, grid.gates)
    rows = needed_rows(decisions.values())
    parts = {name: edge_pass.subset(index) for name, index in subsets.items()}
    points = []
    for mode, threshold in progress_bar(grid.policies, "server passes", unit="pass",
                                        enabled=progress):  # fmt: skip
        policy = EdgeConfig(attention_mode=attention_mode, masking_mode=mode, masking_th=threshold)
        keep = selections(edge_pass, policy, seed)
        server_out = server_pass(keep, rows)
        statistics = selection_statistics(edge_pass.scores, keep)
        for (temperature, measure, eta), confident in decisions.items():
            figures = {
                name: summarize_decisions(
                    parts[name], tuple(values[index] for values in statistics),
                    server_out[index], confident[index],
                )
                for name, index in subsets.items()
            }  # fmt: skip
            points.append(SweepPoint(
                attention_mode=attention_mode, temperature=temperature, policy=mode,
                threshold=threshold, measure=measure, eta=eta,
                figures=summarize_decisions(edge_pass, statistics, server_out, confident),
                subsets=figures,
            ))  # fmt: skip
    return points

