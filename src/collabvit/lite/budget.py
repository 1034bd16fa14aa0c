"""A budget held over one run, for `collabvit eval` and `collabvit edge` alike: the controller
a BudgetConfig asks for, the operating point it ended at, and what it held (for people and for
the results file, computed once).

The controllers themselves (how a budget is kept image by image) are in controller.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from collabvit.lite.config import BudgetConfig
from collabvit.lite.controller import (
    Backpressure,
    BudgetOutcome,
    BytesController,
    CostController,
    read_frontier,
)
from collabvit.lite.specs import EdgeConfig


def budget_controller(budget: BudgetConfig, config: EdgeConfig, server_model: str,
                      shipped_frontier: dict | None
                      ) -> CostController | BytesController:  # fmt: skip
    """The controller holding `budget` along the frontier of the edge's series.

    Args:
        budget: the budget flags (one of budget_cost, budget_bps is set; `frontier` a file).
        config: the edge's policy, attention mode and gate measure (their series is followed).
        server_model: the served model's name (a frontier swept with another is refused).
        shipped_frontier: the frontier the edge carries (its model card or export), used
            when `budget.frontier` names no file.

    Raises ValueError (one line) when the gate cannot move or no frontier is at hand.
    """
    measure = config.uncer_mode  # canonical already
    if measure == "none":
        raise ValueError("a budget moves the gate's eta: --uncer-mode none sends every image")
    source = budget.frontier or shipped_frontier
    if source is None:
        raise ValueError("this edge has no shipped frontier: pass --frontier with the "
                         "frontier.json `collabvit sweep` wrote for this pair")  # fmt: skip
    points = read_frontier(source, config.masking_mode, measure, config.attention_mode,
                           server=server_model)  # fmt: skip
    pressure = Backpressure(latency_target=budget.latency_target)
    if budget.budget_cost is not None:
        return CostController(points, measure, budget.budget_cost, pressure=pressure)
    return BytesController(points, measure, budget.budget_bps, pressure=pressure)


def last_point(config: EdgeConfig, controller) -> EdgeConfig:
    """The operating point a budget held last (what the summary's first line shows)."""
    delta, eta = controller.operating_point()
    return replace(config, masking_th=delta, uncer_th=config.uncer_th if eta is None else eta)


@dataclass(frozen=True)
class BudgetHeld:
    """What a run held its budget to: what it spent, how far from the budget against the
    tolerance its controller holds, what it withheld and the point it ended at."""

    budget: BudgetConfig
    outcome: BudgetOutcome
    comm_cost: float
    bytes_per_second: float
    seconds: float
    withheld: int
    masking_th: float
    uncer_th: float | None
    send_share: float

    @classmethod
    def of(cls, budget: BudgetConfig, controller, comm_cost: float, images: int, withheld: int,
           bytes_per_second: float, seconds: float) -> BudgetHeld:  # fmt: skip
        """Read off `controller` at the end of a run over `images` images."""
        delta, eta = controller.operating_point()
        outcome = controller.outcome(comm_cost, images, bytes_per_second, seconds)
        return cls(budget, outcome, comm_cost, bytes_per_second, seconds, withheld,
                   delta, eta, controller.share)  # fmt: skip

    def text(self) -> str:
        """One line for people."""
        if self.budget.budget_bps is not None:
            held = (f"Budget {self.budget.budget_bps:,.0f} B/s: {self.bytes_per_second:,.0f} "
                    f"B/s on the wire over {self.seconds:.1f} s")  # fmt: skip
        else:
            held = (f"Budget cost {self.budget.budget_cost:g}: communication cost "
                    f"{self.comm_cost:.4f}")  # fmt: skip
        return (f"{held}, {self.outcome.text()}; {self.withheld} images the gate would send "
                f"were answered at the edge; last point: {self.masking_th:g} with a send "
                f"share of {self.send_share:.3f}")  # fmt: skip

    def as_dict(self) -> dict:
        """The results file's `budget` entry."""
        return {**self.outcome.as_dict(), "withheld": self.withheld,
                "last_point": {"masking_th": self.masking_th, "uncer_th": self.uncer_th,
                               "send_share": self.send_share}}  # fmt: skip
