"""Operating points that follow a budget: the edge's gate and selection chosen online.

numpy only, no HTTP: the network client and an offline evaluation can both drive it.

An operating point of the offline sweep is kept as a *send share* (the share of images its η
sends on the sweep's data) rather than as η itself: online, η is set to the quantile of the
recent uncertainties that sends that share, so a shift in the images' difficulty moves η,
not the traffic. `CostController` then holds a cost budget by choosing, among the sweep's
Pareto points, the most accurate one within it, with its δ; η then sends as large a share
as the budget leaves (at least that point's), so the budget is met between the frontier's
points, not only at them.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collabvit.frontier import pareto_optimal


class RecentValues:
    """The last `size` values of a stream (bounded memory) and their quantiles."""

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError(f"the window must hold at least one value, not {size}")
        self.values: deque[float] = deque(maxlen=size)

    def add(self, values) -> None:
        self.values.extend(float(v) for v in np.asarray(values, dtype=np.float64).ravel())

    def __len__(self) -> int:
        return len(self.values)

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1) of the values held; ValueError when there are none."""
        if not self.values:
            raise ValueError("no values yet")
        return float(np.quantile(np.fromiter(self.values, dtype=np.float64), q))


@dataclass(frozen=True)
class FrontierPoint:
    """An operating point of the offline frontier, in terms that survive a change of data.

    Attributes:
        masking_th: the selection's threshold (δ, or k for topk).
        send_share: the share of images the gate sends at this point (0..1).
        sent_tokens: mean patches per sent image. num_patches: N.
        collab_acc: the offline collaborative accuracy, in %.
        eta: the sweep's η for this point, used until the first uncertainties arrive.
    """

    masking_th: float
    send_share: float
    sent_tokens: float
    num_patches: int
    collab_acc: float
    eta: float | None = None  # the sweep's own η for this point (before any image is seen)

    @property
    def comm_cost(self) -> float:
        return self.send_share * self.sent_tokens / self.num_patches


def frontier_from_sweep(path: str | Path, policy: str, measure: str,
                        attention_mode: str = "mean") -> list[FrontierPoint]:  # fmt: skip
    """The frontier a controller moves along, from a sweep's points.jsonl: the Pareto points
    among the points of one policy, measure and attention mode (at temperature 1)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if (row["policy"], row["measure"], row["attention_mode"], row["temperature"]) == \
                (policy, measure, attention_mode, 1.0):  # fmt: skip
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no point of {policy} with {measure} and "
                         f"{attention_mode} attention")  # fmt: skip
    best = pareto_optimal([r["comm_cost"] for r in rows], [r["collab_acc"] for r in rows])
    return [FrontierPoint(masking_th=r["threshold"],
                          send_share=r["sent_images"] / max(r["images"], 1),
                          sent_tokens=r["sent_tokens"], num_patches=r["num_patches"],
                          collab_acc=r["collab_acc"], eta=r["eta"])
            for r, keep in zip(rows, best, strict=True) if keep]  # fmt: skip


def gate_threshold(recent: RecentValues, share: float, measure: str) -> float:
    """The η that sends `share` of images like the recent ones: entropies send at or above
    η (η is the (1 - share)-quantile), the margin at or below it (the share-quantile)."""
    share = min(max(share, 0.0), 1.0)
    return recent.quantile(share if measure == "margin" else 1.0 - share)


def best_within(points: list[FrontierPoint], cost: float) -> FrontierPoint:
    """The most accurate point whose communication cost is at most `cost` (the cheapest
    point when none is)."""
    fitting = [p for p in points if p.comm_cost <= cost + 1e-12]
    if not fitting:
        return min(points, key=lambda p: p.comm_cost)
    return max(fitting, key=lambda p: (p.collab_acc, -p.comm_cost))


class _FollowsFrontier:
    """What both controllers answer: the current point's δ, and η for the current share
    from the recent uncertainties (attributes point, share, measure, recent)."""

    point: FrontierPoint
    share: float
    measure: str
    recent: RecentValues

    def operating_point(self) -> tuple[float, float | None]:
        """(masking_th, η) to use now; before any uncertainty is seen, the point's own η
        (None when the frontier has none)."""
        if not len(self.recent):
            return self.point.masking_th, self.point.eta
        return self.point.masking_th, gate_threshold(self.recent, self.share, self.measure)


class CostController(_FollowsFrontier):
    """Holds a communication-cost budget (the paper's measure) along the frontier.

    It takes the most accurate frontier point within the budget, with its δ, and lets η
    send as large a share of images as the budget leaves (at least that point's own), with
    η read from the recent uncertainties so the share, and so the cost, holds when the
    images get harder or easier.

    Args:
        points: the frontier (Pareto points of a sweep for this pair and codec).
        measure: the gate's uncertainty measure (entropies or margin).
        cost: the budget, in [0, 1].
        recent: uncertainties remembered for η's quantile.
    """

    def __init__(self, points: list[FrontierPoint], measure: str, cost: float,
                 recent: int = 2048) -> None:  # fmt: skip
        if not points:
            raise ValueError("the controller needs at least one frontier point")
        if not 0.0 <= cost <= 1.0:
            raise ValueError(f"a communication cost budget lies in [0, 1], not {cost}")
        self.measure, self.cost = measure, cost
        self.recent = RecentValues(recent)
        self.point = best_within(points, cost)
        self.share = min(1.0, cost * self.point.num_patches / max(self.point.sent_tokens, 1e-9))

    def observe(self, uncertainties) -> None:
        """The uncertainties of a batch of images (every image, sent or not)."""
        self.recent.add(uncertainties)


class BytesController(_FollowsFrontier):
    """Holds bytes per second on the wire: a token bucket decides each send, and the share
    of images the gate asks to send follows what the bucket lets through.

    The bucket (refilled at the budget, holding `burst` seconds of it) admits a send only
    when it has the send's bytes, so the wire never carries more than the budget allows.
    The share η asks for is adapted every `adapt` seconds so that the bucket refuses 15 to
    30 % of the sends asked for (those images are answered at the edge): enough demand
    that the bucket, not the chance arrival of uncertain images, sets the bytes, and few
    refusals of images the gate found uncertain. The selection's δ is that of the most
    accurate frontier point whose own share fits the budget. With tens of sends per second
    the bytes of every 10 s window stay within a few per cent of the budget; with a few,
    the granularity of single sends and of their chance arrival shows.

    Args:
        points: the frontier (Pareto points of a sweep for this pair and codec).
        measure: the gate's uncertainty measure (entropies or margin).
        bytes_per_second: the budget.
        burst: seconds of budget the bucket can hold.
        adapt: seconds between adaptations of the share.
    """

    def __init__(self, points: list[FrontierPoint], measure: str, bytes_per_second: float,
                 burst: float = 1.0, adapt: float = 1.0, recent: int = 2048) -> None:  # fmt: skip
        if not points:
            raise ValueError("the controller needs at least one frontier point")
        if bytes_per_second <= 0:
            raise ValueError(f"a bytes/s budget must be > 0, not {bytes_per_second}")
        self.points = sorted(points, key=lambda p: p.comm_cost)
        self.measure, self.budget, self.adapt = measure, bytes_per_second, adapt
        self.capacity = bytes_per_second * burst
        self.tokens = self.capacity
        self.recent = RecentValues(recent)
        self.point = self.points[0]
        self.share = self.point.send_share
        self.last: float | None = None
        self.adapted_at: float | None = None
        self.wanted = self.refused = 0
        self.images = 0
        self.send_bytes = 0.0  # mean bytes of a send (learnt)

    def observe(self, now: float, uncertainties) -> None:
        """A batch's uncertainties (every image) at time `now`."""
        values = np.asarray(uncertainties, dtype=np.float64).ravel()
        self.recent.add(values)
        self.images += len(values)
        self._refill(now)
        if self.adapted_at is None:
            self.adapted_at = now
        elif now - self.adapted_at >= self.adapt:
            self._adapt(now - self.adapted_at)
            self.adapted_at = now

    def admit(self, now: float, nbytes: float) -> bool:
        """Whether an image the gate sends may go out now with its `nbytes` on the wire."""
        self._refill(now)
        self.wanted += 1
        self.send_bytes = nbytes if not self.send_bytes else 0.9 * self.send_bytes + 0.1 * nbytes
        if self.tokens >= nbytes:
            self.tokens -= nbytes
            return True
        self.refused += 1
        return False

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.capacity, self.tokens + self.budget * (now - self.last))
        self.last = now if self.last is None else max(self.last, now)

    def _adapt(self, seconds: float) -> None:
        rate = self.images / seconds  # images per second in the period
        # Ask for a little more than the budget carries, so that the bucket, not the
        # chance arrival of uncertain images, sets the bytes: 15 to 30 % of the sends asked
        # for are refused (those images are answered at the edge).
        refused = self.refused / self.wanted if self.wanted else 0.0
        if refused > 0.3:
            self.share *= 0.95
        elif refused < 0.15:
            self.share = min(1.0, self.share * 1.05)
        if rate > 0 and self.send_bytes:
            affordable = self.budget / (rate * self.send_bytes)  # share the budget pays for
            fitting = [p for p in self.points if p.send_share <= affordable]
            self.point = max(fitting, key=lambda p: (p.collab_acc, -p.comm_cost)) if fitting \
                else self.points[0]  # fmt: skip
        self.images = self.wanted = self.refused = 0
