"""Typed operating points, the Pareto frontier, and picking a point for a budget or a target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from collabvit.lite.summary import Summary


@dataclass(frozen=True)
class SweepPoint:
    """One operating point of a sweep and its figures.

    Attributes:
        attention_mode: patch scores (``mean`` or ``rollout``).
        temperature: the gate saw the edge logits divided by this (1 = unscaled).
        policy, threshold: the selection policy and its threshold.
        measure, eta: the uncertainty measure of the gate and its threshold.
        figures: the summary over all images, as `collabvit eval` reports it.
        subsets: the summary on named parts of the images (calibration, held-out).
        pareto: no other point of the same run is at least as cheap and more accurate.
    """

    attention_mode: str
    temperature: float
    policy: str
    threshold: float
    measure: str
    eta: float
    figures: Summary
    subsets: dict[str, Summary] = field(default_factory=dict)
    pareto: bool = False

    @property
    def comm_cost(self) -> float:
        return self.figures.comm_cost

    @property
    def collab_acc(self) -> float:
        return self.figures.collab_acc

    def on(self, subset: str | None) -> Summary:
        """The figures on a named subset, or over all images when `subset` is None."""
        return self.figures if subset is None else self.subsets[subset]

    def as_dict(self) -> dict:
        """A JSON-ready dict: the settings, the figures flat, each subset nested."""
        row = {name: getattr(self, name) for name in POINT_SETTINGS}
        row.update(self.figures.as_dict())
        row["pareto"] = self.pareto
        row.update({name: figures.as_dict() for name, figures in self.subsets.items()})
        return row


POINT_SETTINGS = ("attention_mode", "temperature", "policy", "threshold", "measure", "eta")
SERIES_FIELDS = ("attention_mode", "policy", "measure", "temperature")


def series_label(point: SweepPoint, fields: Sequence[str] = SERIES_FIELDS) -> str:
    """Which curve a point belongs to: its values of `fields` (temperature as T=..)."""
    parts = []
    for name in fields:
        value = getattr(point, name)
        if name == "temperature":
            parts.append(f"T={value:.2f}" if value != 1.0 else "")
        else:
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


def mark_pareto(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """The points with `pareto` set over the whole list."""
    flags = pareto_optimal([p.comm_cost for p in points], [p.collab_acc for p in points])
    return [replace(point, pareto=flag) for point, flag in zip(points, flags, strict=True)]


def pick_point(
    points: Sequence[SweepPoint],
    on: str | None = None,
    budget: float | None = None,
    target_acc: float | None = None,
) -> SweepPoint | None:
    """The best point by its figures on subset `on` (None: over all its images).

    With `budget`: the most accurate point whose cost is <= budget (ties: cheaper).
    With `target_acc`: the cheapest point whose accuracy is >= target (ties: more
    accurate). None when no point qualifies.
    """
    if (budget is None) == (target_acc is None):
        raise ValueError("give exactly one of budget and target accuracy")
    if budget is not None:
        fitting = [p for p in points if p.on(on).comm_cost <= budget]
        key = lambda p: (-p.on(on).collab_acc, p.on(on).comm_cost)  # noqa: E731
    else:
        fitting = [p for p in points if p.on(on).collab_acc >= target_acc]
        key = lambda p: (p.on(on).comm_cost, -p.on(on).collab_acc)  # noqa: E731
    return min(fitting, key=key) if fitting else None


def compare_series(
    points: Sequence[SweepPoint], costs: Sequence[float]
) -> dict[str, dict[str, float | None]]:
    """Each series' best collaborative accuracy at each cost (None where nothing fits)."""
    series: dict[str, list[SweepPoint]] = {}
    for point in points:
        series.setdefault(series_label(point), []).append(point)
    table = {}
    for name, members in series.items():
        row = {}
        for cost in costs:
            best = pick_point(members, budget=cost)
            row[str(cost)] = best.collab_acc if best is not None else None
        table[name] = row
    return table
