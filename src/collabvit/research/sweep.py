"""`collabvit sweep`: every operating point of a grid over a dataset, as a typed report.

One edge pass per attention mode, one server pass per selection setting
(passes.py), any number of gates for free; then the Pareto frontier, the
comparison at equal cost and the calibrated pick (frontier.py), and
temperature scaling (calibration.py).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from collabvit.algo.metrics import accuracy
from collabvit.config import SweepConfig
from collabvit.lite import frontier
from collabvit.lite.controller import FRONTIER_FILE, frontier_document
from collabvit.lite.frontier import SweepPoint
from collabvit.lite.modes import validate_masking
from collabvit.lite.specs import EdgeConfig
from collabvit.models.pair import Pair
from collabvit.research import calibration, passes
from collabvit.research.distributed import Processes, shard_block

OUTPUT_FILES = ("points.jsonl", "points.csv", "sweep.json", FRONTIER_FILE)


@dataclass(frozen=True)
class TemperatureFit:
    """Temperature scaling of the edge's logits, fitted on the calibration part."""

    temperature: float
    held_out_ece_before: float
    held_out_ece_after: float


@dataclass(frozen=True)
class SweepReport:
    """What a sweep found.

    Attributes:
        points: every operating point, `pareto` marked over all of them.
        images: how many images were swept.
        edge_acc, server_acc: edge alone, and the server alone on every patch (None if skipped).
        comparison: series label -> {cost: best collaborative accuracy at that cost or None}.
        temperatures: attention mode -> the fitted temperature (with --temperature-scaling).
        picks: "uncalibrated" / "temperature-scaled" -> the calibrated pick (None when no
            point qualifies); empty without a budget or target.
    """

    points: tuple[SweepPoint, ...]
    images: int
    edge_acc: float
    server_acc: float | None
    comparison: dict[str, dict[str, float | None]]
    temperatures: dict[str, TemperatureFit] = field(default_factory=dict)
    picks: dict[str, SweepPoint | None] = field(default_factory=dict)

    @property
    def pick(self) -> SweepPoint | None:
        """The uncalibrated gate's pick, if any."""
        return self.picks.get("uncalibrated")


def run(
    pair: Pair, config: SweepConfig, seed: int = 0, progress: bool | None = None,
    processes: Processes | None = None,
) -> SweepReport:
    """Sweep `config`'s grid over the pair's dataset.

    Under torchrun (`processes`), each process runs the forwards of its own span of the
    dataset; every process then holds the same figures, equal to a single process's.
    """
    processes = processes or Processes()
    block = shard_block(pair.data_spec.batch_size)
    span = processes.span(len(pair.dataset), block)
    server = pair.server()
    num_patches = server.geometry.num_patches
    policies = config.selection_policies()
    for mode, threshold in policies:  # every threshold checked before any forward
        validate_masking(mode, threshold, num_patches)
    parts = {}
    if config.calibrating or config.temperature_scaling:
        cal, held = calibration.split_calibration(
            len(pair.dataset), config.calibration_fraction, seed
        )
        parts = {"calibration": cal, "held_out": held}
    subsets = parts if config.calibrating else {}

    points, temperatures, edge_pass = [], {}, None
    for mode in config.attention_modes:
        local = passes.run_edge(pair.edge(EdgeConfig(attention_mode=mode)), pair.loader(span),
                                progress)  # fmt: skip
        edge_pass = local.gathered(processes)
        server_pass = passes.ServerPasses(server, local.images, span, len(pair.dataset), block,
                                          processes)  # fmt: skip
        if len(edge_pass.labels) != len(pair.dataset):
            raise ValueError("the sweep needs every image: some could not be read "
                             f"({len(pair.dataset) - len(edge_pass.labels)} skipped)")  # fmt: skip
        scales = [1.0]
        if config.temperature_scaling:
            fit = _fit_temperature(edge_pass, parts["calibration"], parts["held_out"])
            temperatures[mode] = fit
            scales.append(fit.temperature)
        # Candidate etas come from the calibration part when there is one (labels unused).
        eta_logits = edge_pass.logits[parts["calibration"]] if parts else edge_pass.logits
        gates = passes.gate_grid(eta_logits, config.uncer_modes, config.num_etas, config.etas,
                                 scales)  # fmt: skip
        grid = passes.Grid(policies, gates)
        points += passes.sweep_points(edge_pass, server, grid, mode, subsets, seed, progress,
                                      server_pass)  # fmt: skip
    points = frontier.mark_pareto(points)
    server_acc = None
    if not config.no_server_alone:
        full = torch.ones_like(edge_pass.scores, dtype=torch.bool)
        server_acc = accuracy(server_pass(full), edge_pass.labels)
    picks = {}
    if config.calibrating:
        for temperature in dict.fromkeys(p.temperature for p in points):
            key = "uncalibrated" if temperature == 1.0 else "temperature-scaled"
            candidates = [p for p in points if p.temperature == temperature]
            picks[key] = frontier.pick_point(candidates, "calibration", config.budget,
                                             config.target_acc)  # fmt: skip
    return SweepReport(
        points=tuple(points), images=len(edge_pass.labels),
        edge_acc=accuracy(edge_pass.logits, edge_pass.labels), server_acc=server_acc,
        comparison=frontier.compare_series(points, config.compare_at),
        temperatures=temperatures, picks=picks,
    )  # fmt: skip


def _fit_temperature(
    edge_pass: passes.EdgePass, calibration_part: torch.Tensor, held_out: torch.Tensor
) -> TemperatureFit:
    temperature = calibration.fit_temperature(
        edge_pass.logits[calibration_part], edge_pass.labels[calibration_part]
    )
    logits, labels = edge_pass.logits[held_out], edge_pass.labels[held_out]
    return TemperatureFit(
        temperature=temperature,
        held_out_ece_before=calibration.expected_calibration_error(logits, labels),
        held_out_ece_after=calibration.expected_calibration_error(logits / temperature, labels),
    )


# ------------------------------------------------------------------ output

CSV_SUBSET_FIELDS = ("comm_cost", "collab_acc", "sent_tokens", "sent_images", "images")


def csv_row(point: SweepPoint) -> dict:
    """One CSV row: the settings, the figures, `pareto`, then each subset's as <subset>_<field>."""
    row = {name: value for name, value in point.as_dict().items()
           if not isinstance(value, dict)}  # fmt: skip
    for name, figures in point.subsets.items():
        row.update({f"{name}_{key}": getattr(figures, key) for key in CSV_SUBSET_FIELDS})
    return row


def write_points(points, jsonl_path: str | Path, csv_path: str | Path) -> None:
    """Every point as JSON Lines (nested subsets kept) and as CSV (flattened)."""
    Path(jsonl_path).write_text("".join(json.dumps(p.as_dict()) + "\n" for p in points))
    rows = [csv_row(p) for p in points]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["pareto"])
        writer.writeheader()
        writer.writerows(rows)


def report_dict(report: SweepReport, provenance: dict) -> dict:
    """sweep.json: the figures of the run and how they were made."""
    return {
        "provenance": provenance,
        "images": report.images,
        "edge_acc": report.edge_acc,
        "server_acc": report.server_acc,
        "points": len(report.points),
        "comparison": report.comparison,
        "temperature": {mode: asdict(fit) for mode, fit in report.temperatures.items()},
        "pick": {key: (point.as_dict() if point else None)
                 for key, point in report.picks.items()},
    }  # fmt: skip


def write_report(
    report: SweepReport,
    out_dir: str | Path,
    provenance: dict,
    plot_title: str | None = None,
    pick_label: str = "pick",
    references: Sequence = (),
) -> list[Path]:
    """points.jsonl, points.csv, sweep.json, frontier.json (each series' Pareto points, which
    `collabvit edge --budget-*` moves along) and (with a title) frontier.png/svg in out_dir.

    The frontier marks the uncalibrated pick, if any, as `pick_label`, and each of
    `references` (plots.ReferencePoint, e.g. a published result).
    """
    out_dir = Path(out_dir)
    jsonl, csv_path, summary, frontier_path = (out_dir / name for name in OUTPUT_FILES)
    written = [jsonl, csv_path, summary, frontier_path]
    document = report_dict(report, provenance)
    if plot_title is not None:
        from collabvit.research import plots  # matplotlib only when a figure is drawn

        figures = plots.plot_frontier(list(report.points), report.edge_acc, report.server_acc,
                                      out_dir / "frontier", plot_title, pick=report.pick,
                                      pick_label=pick_label, references=references)
        document["figures"] = [str(path) for path in figures]
        written += figures
    write_points(report.points, jsonl, csv_path)
    frontier_path.write_text(json.dumps(frontier_document(
        [p.as_dict() for p in report.points], provenance), indent=2) + "\n")  # fmt: skip
    summary.write_text(json.dumps(document, indent=2) + "\n")
    return written


def findings_text(report: SweepReport, config: SweepConfig, out_dir: Path) -> str:
    """The sweep's findings for people: reference accuracies, the best accuracy at each
    compared cost, the picks checked on the held-out part, the fitted temperatures."""
    server = (f" | server alone (all patches): {report.server_acc:.2f} %"
              if report.server_acc is not None else "")  # fmt: skip
    pareto = sum(p.pareto for p in report.points)
    width = max(len(name) for name in report.comparison)
    lines = [f"edge alone: {report.edge_acc:.2f} %{server}",
             f"{len(report.points)} operating points, {pareto} Pareto-optimal: "
             f"{out_dir / 'points.csv'}",
             "best collaborative accuracy (%) at communication cost <=",
             " " * width + "".join(f"{c:>9}" for c in config.compare_at)]  # fmt: skip
    for name, row in report.comparison.items():
        cells = "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in row.values())
        lines.append(f"{name:<{width}}{cells}")
    goal = (f"budget {config.budget}" if config.budget is not None
            else f"target {config.target_acc} %")  # fmt: skip
    for key, chosen in report.picks.items():
        if chosen is None:
            lines.append(f"{goal} ({key}): no operating point qualifies on the calibration part")
            continue
        cal, held = chosen.subsets["calibration"], chosen.subsets["held_out"]
        lines.append(f"{goal} ({key}): {chosen.attention_mode} {chosen.policy} "
                     f"{chosen.threshold}, {chosen.measure} eta {chosen.eta:.4g} -> calibration "
                     f"{cal.collab_acc:.2f} % at cost {cal.comm_cost:.3f}; held-out "
                     f"{held.collab_acc:.2f} % at cost {held.comm_cost:.3f}")  # fmt: skip
    for mode, fit in report.temperatures.items():
        lines.append(f"temperature ({mode}): T = {fit.temperature:.3f}; held-out expected "
                     f"calibration error {fit.held_out_ece_before:.2f} % -> "
                     f"{fit.held_out_ece_after:.2f} %")  # fmt: skip
    return "\n".join(lines)
