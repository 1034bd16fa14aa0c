"""Operating points: one edge pass, one server pass per selection setting, any number of gates.

The gate threshold eta only decides which images use the server's answer, so
for a fixed selection every eta is evaluated from the same two sets of logits.
Figures are computed with metrics.RunningSummary, exactly as `collabvit eval`.
On top: the Pareto frontier, picking a point for a budget on calibration
data, and temperature scaling of the edge's logits.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from collabvit.data import split_indices
from collabvit.edge import EdgeDevice
from collabvit.metrics import RunningSummary
from collabvit.protocol import build_payloads
from collabvit.selection import select_patches, selection_statistics
from collabvit.server import Server
from collabvit.uncertainty import canonical_uncertainty_mode, is_confident, uncertainty


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

    def subset(self, index: torch.Tensor) -> EdgePass:
        """The pass restricted to images `index` [m]."""
        return EdgePass(self.images[index], self.labels[index], self.logits[index],
                        self.scores[index])  # fmt: skip


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
    server: Server,
    images: torch.Tensor,
    keep: torch.Tensor,
    batch_size: int = 256,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The server's logits for every image (or only `rows`) on its selection alone.

    Args:
        images: unnormalised [n, C, H, W].
        keep: selections [n, N] bool.
        rows: image indices [m] to classify; the other rows come back NaN.

    Returns:
        [n, classes].
    """
    wanted = torch.arange(len(images)) if rows is None else rows
    out = None
    for start in range(0, len(wanted), batch_size):
        chunk = wanted[start : start + batch_size]
        payloads = build_payloads(images, keep, chunk.tolist(), server.geometry.patch_size)
        logits = server.classify(payloads).cpu()
        if out is None:
            out = torch.full((len(images), logits.shape[1]), torch.nan, dtype=logits.dtype)
        out[chunk] = logits
    if out is None:  # no image needs the server; the width is the server's class count
        out = torch.full((len(images), server.geometry.num_classes), torch.nan)
    return out


def summarize(
    edge_pass: EdgePass,
    keep: torch.Tensor,
    server_out: torch.Tensor,
    uncer_mode: str,
    uncer_th: float,
) -> dict[str, float]:
    """The summary figures of one operating point (same definitions as `collabvit eval`).

    Args:
        edge_pass: n images.
        keep: selections [n, N] bool.
        server_out: server logits [n, classes] (rows of confident images unused, may be NaN).
        uncer_mode, uncer_th: the gate on edge_pass.logits.
    """
    confident = is_confident(edge_pass.logits, uncer_mode, uncer_th)
    return summarize_decisions(
        edge_pass, selection_statistics(edge_pass.scores, keep), server_out, confident
    )


def summarize_decisions(
    edge_pass: EdgePass,
    statistics: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    server_out: torch.Tensor,
    confident: torch.Tensor,
) -> dict[str, float]:
    """summarize() from decisions already made (a sweep reuses them across points).

    Args:
        edge_pass: n images.
        statistics: selection_statistics of the selections (size, minimum, sum; [n] each).
        server_out: server logits [n, classes].
        confident: the gate's decision [n] bool.
    """
    final = torch.where(confident[:, None], edge_pass.logits, server_out)
    running = RunningSummary(num_patches=edge_pass.scores.shape[1])
    running.update(edge_pass.labels, edge_pass.logits, final, confident, *statistics)
    return running.summary()


def select(
    edge_pass: EdgePass, masking_mode: str, masking_th: float, seed: int = 0
) -> torch.Tensor:
    """Selections keep [n, N] bool of a policy over the whole pass (``random`` seeded once)."""
    generator = torch.Generator().manual_seed(seed)
    return select_patches(edge_pass.scores, masking_mode, masking_th, generator)


# ---------------------------------------------------------------- the grid


def eta_grid(logits: torch.Tensor, measure: str, count: int) -> list[float]:
    """`count` gate thresholds sending evenly spaced shares of the images, none to all.

    The thresholds are quantiles of the measure over `logits` [n, classes], so
    the grid spreads evenly over the sent fraction whatever the measure's
    scale (entropies in nats, margins in probability). The first keeps every
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
        scaled = logits / temperature
        for eta in etas:
            decisions[(temperature, measure, eta)] = is_confident(scaled, measure, eta).cpu()
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
    subsets: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> list[dict]:
    """Every operating point of the grid: one server pass per policy, the gates for free.

    Each gate decides once for all policies, each selection's statistics are
    taken once for all gates, and the server sees only images some gate sends.

    Args:
        edge_pass: the edge outputs over n images.
        subsets: name -> image indices [m]; each point also gets the figures on
            each subset under that name (e.g. calibration and held-out).

    Returns:
        one dict per (policy, threshold, temperature, measure, eta): those five,
        the figures over all images (as `collabvit eval` reports them) and one
        dict of figures per subset.
    """
    subsets = subsets or {}
    decisions = gate_decisions(edge_pass.logits, grid.gates)
    rows = needed_rows(decisions.values())
    parts = {name: edge_pass.subset(index) for name, index in subsets.items()}
    points = []
    quiet = None if progress is None else not progress
    for mode, threshold in tqdm(grid.policies, desc="server passes", disable=quiet, unit="pass"):
        keep = select(edge_pass, mode, threshold, seed)
        server_out = server_logits(server, edge_pass.images, keep, rows=rows)
        statistics = selection_statistics(edge_pass.scores, keep)
        for (temperature, measure, eta), confident in decisions.items():
            point = {"policy": mode, "threshold": threshold, "temperature": temperature,
                     "measure": measure, "eta": eta}  # fmt: skip
            point.update(summarize_decisions(edge_pass, statistics, server_out, confident))
            for name, index in subsets.items():
                part_statistics = tuple(values[index] for values in statistics)
                point[name] = summarize_decisions(
                    parts[name], part_statistics, server_out[index], confident[index]
                )
            points.append(point)
    return points


# ------------------------------------------------------- frontier and budget

SERIES_FIELDS = ("attention_mode", "policy", "measure", "temperature")


def series_label(point: dict, fields: Sequence[str] = SERIES_FIELDS) -> str:
    """Which curve a point belongs to: its values of `fields` (temperature as T=..)."""
    parts = []
    for field in fields:
        value = point.get(field)
        if field == "temperature":
            parts.append(f"T={value:.2f}" if value not in (None, 1.0) else "")
        elif value is not None:
            parts.append(str(value))
    return " · ".join(part for part in parts if part) or "all points"


def pareto_optimal(costs: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """Which points no other point beats: none cheaper-or-equal and at least as accurate.

    Of exact duplicates only the first counts. costs, accuracies [n] -> [n] bool.
    """
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracies[i], i))
    optimal = [False] * len(costs)
    best = -math.inf
    for i in order:
        if accuracies[i] > best:
            optimal[i] = True
            best = accuracies[i]
    return optimal


def mark_pareto(points: list[dict], cost_key: str = "comm_cost", acc_key: str = "collab_acc"):
    """Set point["pareto"] over the whole list (in place) and return the list."""
    flags = pareto_optimal([p[cost_key] for p in points], [p[acc_key] for p in points])
    for point, flag in zip(points, flags, strict=True):
        point["pareto"] = flag
    return points


def pick_point(
    points: Sequence[dict],
    on: str | None = None,
    budget: float | None = None,
    target_acc: float | None = None,
) -> dict | None:
    """The best point by its figures on subset `on` (None: over all its images).

    With `budget`: the most accurate point whose cost is <= budget (ties: cheaper).
    With `target_acc`: the cheapest point whose accuracy is >= target (ties: more
    accurate). None when no point qualifies.
    """
    if (budget is None) == (target_acc is None):
        raise ValueError("give exactly one of budget and target accuracy")
    figures = (lambda p: p[on]) if on else (lambda p: p)  # noqa: E731
    if budget is not None:
        fitting = [p for p in points if figures(p)["comm_cost"] <= budget]
        key = lambda p: (-figures(p)["collab_acc"], figures(p)["comm_cost"])  # noqa: E731
    else:
        fitting = [p for p in points if figures(p)["collab_acc"] >= target_acc]
        key = lambda p: (figures(p)["comm_cost"], -figures(p)["collab_acc"])  # noqa: E731
    return min(fitting, key=key) if fitting else None


def split_calibration(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random (calibration, held-out) indices of `count` images, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction must lie in (0, 1), got {fraction}")
    calibration_size = round(count * fraction)
    if not 0 < calibration_size < count:
        raise ValueError(f"{count} images cannot be split into calibration and held-out parts")
    held_out, calibration = split_indices(count, calibration_size, seed)
    return calibration, held_out


# ------------------------------------------------------------- calibration


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


# ------------------------------------------------------------------ output

POINT_FIELDS = ("attention_mode", "temperature", "policy", "threshold", "measure", "eta",
                "comm_cost", "collab_acc", "sent_tokens", "sent_images", "confident_images",
                "images", "client_acc", "collab_acc5", "avg_min_attention", "avg_sum_attention",
                "pareto")  # fmt: skip
SUBSET_FIELDS = ("comm_cost", "collab_acc", "sent_tokens", "sent_images", "images")


def flat_point(point: dict) -> dict:
    """One CSV row: the point's fields, then each subset's as <subset>_<field>."""
    row = {field: point[field] for field in POINT_FIELDS if field in point}
    for name, figures in point.items():
        if isinstance(figures, dict):
            row.update({f"{name}_{field}": figures[field] for field in SUBSET_FIELDS})
    return row


def write_points(points: Sequence[dict], jsonl_path: str | Path, csv_path: str | Path) -> None:
    """Every point as JSON Lines (nested subsets kept) and as CSV (flattened)."""
    Path(jsonl_path).write_text("".join(json.dumps(p) + "\n" for p in points))
    rows = [flat_point(p) for p in points]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(POINT_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
