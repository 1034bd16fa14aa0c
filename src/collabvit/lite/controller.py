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
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from collabvit.lite.frontier import pareto_optimal


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


FRONTIER_FORMAT = "collabvit-frontier/1"
FRONTIER_FILE = "frontier.json"


def _frontier_point(row: dict) -> FrontierPoint:
    return FrontierPoint(masking_th=row["threshold"],
                         send_share=row["sent_images"] / max(row["images"], 1),
                         sent_tokens=row["sent_tokens"], num_patches=row["num_patches"],
                         collab_acc=row["collab_acc"], eta=row["eta"])  # fmt: skip


def frontier_document(rows: Iterable[dict], provenance: dict) -> dict:
    """The frontier file `collabvit sweep` writes (frontier.json): for each series of its
    points (attention mode, policy, measure; temperature 1) the Pareto points, as
    FrontierPoint fields. `rows` are the sweep's points as points.jsonl holds them."""
    series: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if row["temperature"] == 1.0 and row["measure"] != "none":
            key = (row["attention_mode"], row["policy"], row["measure"])
            series.setdefault(key, []).append(row)
    document = []
    for (attention_mode, policy, measure), members in series.items():
        best = pareto_optimal([r["comm_cost"] for r in members],
                              [r["collab_acc"] for r in members])  # fmt: skip
        points = sorted((_frontier_point(r) for r, keep in zip(members, best, strict=True)
                         if keep), key=lambda p: p.comm_cost)  # fmt: skip
        document.append({"attention_mode": attention_mode, "policy": policy,
                         "measure": measure, "images": members[0]["images"],
                         "points": [asdict(p) for p in points]})  # fmt: skip
    return {"format": FRONTIER_FORMAT, "provenance": provenance, "series": document}


def read_frontier(source: str | Path | dict, policy: str, measure: str,
                  attention_mode: str = "mean",
                  server: str | None = None) -> list[FrontierPoint]:  # fmt: skip
    """The frontier a controller moves along: one series of a frontier file (a path, or the
    document itself, as a model card carries it). ValueError, one line, when it is not a
    frontier file, holds no such series, or (given `server`) was swept with another
    server model."""
    name = str(source) if not isinstance(source, dict) else "the frontier"
    if isinstance(source, dict):
        document = source
    else:
        try:
            document = json.loads(Path(source).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the frontier file {name}: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FRONTIER_FORMAT:
        raise ValueError(f"{name} is not a frontier file written by `collabvit sweep` "
                         f"({FRONTIER_FILE}, format {FRONTIER_FORMAT})")  # fmt: skip
    swept = (document.get("provenance") or {}).get("server_model") or {}
    if server is not None and swept.get("name") not in (None, server):
        raise ValueError(f"{name} was swept with the server {swept['name']}, not {server}: "
                         "sweep this pair")  # fmt: skip
    for series in document.get("series", []):
        if (series["policy"], series["measure"], series["attention_mode"]) == \
                (policy, measure, attention_mode):  # fmt: skip
            return [FrontierPoint(**point) for point in series["points"]]
    held = ", ".join(f"{s['policy']} with {s['measure']} ({s['attention_mode']})"
                     for s in document.get("series", [])) or "nothing"  # fmt: skip
    raise ValueError(f"{name} holds no point of {policy} with {measure} and {attention_mode} "
                     f"attention (it holds {held}): sweep that series")


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


# What a budget promises. A cost is held by sending a share s of the images, η following the
# recent uncertainties, so over n images the count sent strays by chance with a relative
# spread of sqrt((1 - s) / (n s)) (each image sent or not as its uncertainty falls); the
# patches per sent image come from the frontier, measured on validation at its points' own
# shares, which on test images puts a few per cent on top. A CostController holds the cost
# within three of those spreads and at least 3 % (scripts/budget_tolerance.py measures it).
COST_SPREADS = 3.0
COST_FLOOR = 0.03


def cost_tolerance(share: float, images: int) -> float:
    """The relative deviation from its budget that CostController's cost keeps within over
    `images` images sending a share `share` of them: max(3 %, 3 sqrt((1 - s) / (n s)));
    infinite before any image (nothing to hold yet)."""
    if images < 1:
        return math.inf
    if share <= 0:
        return COST_FLOOR
    return max(COST_FLOOR, COST_SPREADS * math.sqrt(max(1.0 - share, 0.0) / (images * share)))


def bytes_tolerance(burst: float, seconds: float) -> float:
    """How far over its budget BytesController's bytes/s can end over a run of `seconds`:
    its bucket starts with `burst` seconds of budget and only ever gains the budget's rate,
    so by burst / seconds of it at most (infinite for an instant)."""
    return burst / seconds if seconds > 0 else math.inf


@dataclass(frozen=True)
class BudgetOutcome:
    """How a run kept its budget: `spent` against `budget` (a communication cost, or bytes
    per second), and the relative `tolerance` its controller holds: both ways for a cost,
    only over it for bytes (`two_sided` False: a bucket bounds what goes out, not what the
    images ask for). `basis` says what the tolerance rests on, e.g. 'on 600 images'."""

    budget: float
    spent: float
    tolerance: float
    two_sided: bool
    basis: str

    @property
    def deviation(self) -> float:
        """spent / budget - 1 (for a budget of 0: 0 when nothing was spent, else inf)."""
        if self.budget > 0:
            return self.spent / self.budget - 1.0
        return 0.0 if self.spent <= 0 else math.inf

    @property
    def within(self) -> bool:
        """The run ended within the tolerance."""
        deviation = self.deviation
        return deviation <= self.tolerance and (not self.two_sided
                                                or deviation >= -self.tolerance)  # fmt: skip

    def text(self) -> str:
        """E.g. 'over the budget by 5.0 %, within the ±19.7 % this controller holds on 600
        images', or '..., beyond the ±3.0 % ...'."""
        deviation = self.deviation
        side = "over" if deviation > 0 else "under"
        if math.isinf(self.tolerance):
            return f"{side} the budget by {100 * abs(deviation):.1f} %"
        band = f"{'±' if self.two_sided else '+'}{100 * self.tolerance:.1f} %"
        return (f"{side} the budget by {100 * abs(deviation):.1f} %, "
                f"{'within' if self.within else 'beyond'} the {band} this controller holds "
                f"{self.basis}")  # fmt: skip

    def as_dict(self) -> dict:
        return {**asdict(self), "deviation": self.deviation, "within": self.within}


class Backpressure:
    """How much of its budget a client spends now: 1 while the link and the server keep up,
    less while they do not (multiplicative decrease, multiplicative and additive increase).

    A period is congested when the server asked to wait (503 or 429), reported a queue more
    than `load_limit` full (the load hint of its answers), a send timed out, the sends'
    median time on the wire rose more than `latency_target` seconds above the least median
    of the last `memory` periods (a queue building on the link), or the oldest send still
    unanswered has waited that long (answers that do not come are a signal too). The factor
    then drops by at least 30 %, and to 85 % of what the period delivered when the budget's
    rate is known (so a link that fell to a tenth is matched in one period, and its queue
    drains); a clear period raises it by a quarter plus 0.03, up to 1.

    Args:
        latency_target: seconds of queueing on the link taken as congestion.
        load_limit: the server's queue fill (0..1) taken as congestion.
        floor: the least factor (a client keeps probing the link).
        memory: periods over which the least median latency is remembered.
    """

    def __init__(self, latency_target: float = 0.2, load_limit: float = 0.5,
                 floor: float = 0.02, memory: int = 30) -> None:  # fmt: skip
        self.latency_target, self.load_limit, self.floor = latency_target, load_limit, floor
        self.factor = 1.0
        self.base: deque[float] = deque(maxlen=memory)  # median latency of recent periods
        self.outstanding: deque[float] = deque()  # when the unanswered sends left, oldest first
        self._reset()

    def _reset(self) -> None:
        self.latencies: list[float] = []
        self.loads: list[float] = []
        self.delivered = 0.0
        self.asked_to_wait = self.timed_out = False

    def sent(self, now: float) -> None:
        """A send left at `now` (of the clock `update` is given)."""
        self.outstanding.append(now)

    def finished(self) -> None:
        """A send ended without an answer to learn from (a failure other than a time-out)."""
        if self.outstanding:
            self.outstanding.popleft()

    def answered(self, nbytes: float, seconds: float | None, load: float | None) -> None:
        """A send the server answered: its bytes, seconds on the wire, the server's load."""
        self.finished()
        self.delivered += nbytes
        if seconds is not None:
            self.latencies.append(seconds)
        if load is not None:
            self.loads.append(load)

    def congested(self, now: float | None = None) -> bool:
        """Whether the period so far shows congestion (see the class); `now` lets the wait
        of the oldest unanswered send count."""
        if self.asked_to_wait or self.timed_out:
            return True
        if now is not None and self.outstanding and now - self.outstanding[0] > \
                self.latency_target + (min(self.base) if self.base else 0.0):  # fmt: skip
            return True
        if self.loads and float(np.mean(self.loads)) > self.load_limit:
            return True
        if self.latencies and self.base:
            return float(np.median(self.latencies)) - min(self.base) > self.latency_target
        return False

    def update(self, seconds: float, nominal_rate: float | None = None,
               now: float | None = None) -> None:  # fmt: skip
        """End a period of `seconds` at `now`; `nominal_rate` is the bytes/s the full budget
        spends."""
        if self.congested(now):
            factor = 0.7 * self.factor
            if nominal_rate:
                factor = min(factor, 0.85 * self.delivered / seconds / nominal_rate)
            self.factor = max(self.floor, factor)
        else:
            self.factor = min(1.0, 1.25 * self.factor + 0.03)
        if self.latencies:
            self.base.append(float(np.median(self.latencies)))
        self._reset()


class _FollowsFrontier:
    """What both controllers share: the current point's δ and η for the current share from
    the recent uncertainties, the periods of `adapt` seconds at whose ends they adapt, the
    back-pressure of the link and the server, and the pause a server's Retry-After asks
    for. Subclasses set `point` and `share`."""

    point: FrontierPoint
    share: float

    def __init__(self, points: list[FrontierPoint], measure: str, recent: int, adapt: float,
                 pressure: Backpressure | None) -> None:  # fmt: skip
        if not points:
            raise ValueError("the controller needs at least one frontier point")
        self.measure, self.adapt = measure, adapt
        # sending a larger share than any frontier point buys nothing the sweep saw: a
        # budget beyond the frontier's dearest point is not spent
        self.largest_share = max(p.send_share for p in points)
        self.recent = RecentValues(recent)
        self.pressure = pressure or Backpressure()
        self.paused_until = -np.inf
        self.adapted_at: float | None = None

    def _period_ended(self, now: float) -> float | None:
        """The seconds of the period that ends at `now`, or None while it runs."""
        if self.adapted_at is None:
            self.adapted_at = now
            return None
        if now - self.adapted_at < self.adapt:
            return None
        seconds, self.adapted_at = now - self.adapted_at, now
        return seconds

    def operating_point(self) -> tuple[float, float | None]:
        """(masking_th, η) to use now; before any uncertainty is seen, the point's own η
        (None when the frontier has none)."""
        if not len(self.recent):
            return self.point.masking_th, self.point.eta
        return self.point.masking_th, gate_threshold(self.recent, self.share, self.measure)

    def pause(self, until: float) -> None:
        """The server asked to wait: images the gate sends are answered at the edge until
        `until` (a time of the clock `now` is read from), and the period counts as
        congested."""
        self.paused_until = max(self.paused_until, until)
        self.pressure.finished()
        self.pressure.asked_to_wait = True

    def answered(self, nbytes: float, seconds: float | None, load: float | None) -> None:
        """A send came back: its request and response bytes, its seconds on the wire (None
        when unknown), and the server's load hint (None when it gave none)."""
        self.pressure.answered(nbytes, seconds, load)

    def timed_out(self) -> None:
        """A send got no answer within its deadline."""
        self.pressure.finished()
        self.pressure.timed_out = True

    def sent(self, now: float) -> None:
        """An admitted send left at `now`."""
        self.pressure.sent(now)

    def failed(self) -> None:
        """A send ended in another failure (refused, unreachable, rejected...)."""
        self.pressure.finished()


class CostController(_FollowsFrontier):
    """Holds a communication-cost budget (the paper's measure) along the frontier.

    It takes the most accurate frontier point within the budget, with its δ, and lets η
    send as large a share of images as the budget leaves (at least that point's own, at
    most the frontier's largest), with
    η read from the recent uncertainties so the share, and so the cost, holds when the
    images get harder or easier. While the link or the server falls behind, the share
    shrinks by the back-pressure factor (checked every `adapt` seconds of the clock given
    to `observe`).

    Args:
        points: the frontier (Pareto points of a sweep for this pair and codec).
        measure: the gate's uncertainty measure (entropies or margin).
        cost: the budget, in [0, 1].
        recent: uncertainties remembered for η's quantile.
        adapt: seconds between back-pressure updates.
        pressure: the back-pressure (default: Backpressure()).
    """

    def __init__(self, points: list[FrontierPoint], measure: str, cost: float,
                 recent: int = 2048, adapt: float = 1.0,
                 pressure: Backpressure | None = None) -> None:  # fmt: skip
        super().__init__(points, measure, recent, adapt, pressure)
        if not 0.0 <= cost <= 1.0:
            raise ValueError(f"a communication cost budget lies in [0, 1], not {cost}")
        self.cost = cost
        self.point = best_within(points, cost)
        self.full_share = min(self.largest_share, cost * self.point.num_patches
                              / max(self.point.sent_tokens, 1e-9))  # fmt: skip
        self.share = self.full_share

    def observe(self, uncertainties, now: float | None = None) -> None:
        """The uncertainties of a batch of images (every image, sent or not), at `now`."""
        self.recent.add(uncertainties)
        seconds = None if now is None else self._period_ended(now)
        if seconds is not None:
            self.pressure.update(seconds, now=now)
            self.share = self.full_share * self.pressure.factor

    def admit(self, now: float, nbytes: float, uncertainty: float | None = None) -> bool:
        """Whether an image the gate sends goes out: always, unless the server asked to
        wait."""
        return now >= self.paused_until

    def outcome(self, comm_cost: float, images: int, bytes_per_second: float,
                seconds: float) -> BudgetOutcome:  # fmt: skip
        """How a run of `images` images at `comm_cost` kept this budget (bytes unused)."""
        return BudgetOutcome(self.cost, comm_cost, cost_tolerance(self.full_share, images),
                             True, f"on {images:,} images")  # fmt: skip


class BytesController(_FollowsFrontier):
    """Holds bytes per second on the wire: a token bucket decides each send, and the share
    of images the gate asks to send follows what the bucket lets through.

    The bucket (refilled at the budget times the back-pressure factor, holding `burst`
    seconds of it, and at least three sends) admits a send only when it has the send's
    bytes, so the wire never carries more than the budget allows. Every `adapt` seconds the
    share η asks for is set to what the bucket pays for at the images' rate and the learnt
    bytes of a send, times a demand factor adapted so that the bucket refuses 5 to 15 % of
    the sends asked for (those images are answered at the edge): enough demand that the
    bucket, not the chance arrival of uncertain images, sets the bytes. The images beyond
    the share the bucket pays for, the least uncertain of those asked for, go out only
    while the bucket stays half full after them, so the refusals fall on them rather than
    on the most uncertain. The share never exceeds the frontier's largest (a budget
    beyond the frontier's dearest point is not spent). The selection's δ is that of the
    most accurate frontier point whose own share fits. With tens of sends per second the
    bytes of every 10 s window stay within a few per cent of the budget; with a few, the
    granularity of single sends and of their chance arrival shows.

    Args:
        points: the frontier (Pareto points of a sweep for this pair and codec).
        measure: the gate's uncertainty measure (entropies or margin).
        bytes_per_second: the budget.
        burst: seconds of budget the bucket can hold.
        adapt: seconds between adaptations of the share.
        recent: uncertainties remembered for η's quantile.
        pressure: the back-pressure (default: Backpressure()).
    """

    def __init__(self, points: list[FrontierPoint], measure: str, bytes_per_second: float,
                 burst: float = 1.0, adapt: float = 1.0, recent: int = 2048,
                 pressure: Backpressure | None = None) -> None:  # fmt: skip
        super().__init__(points, measure, recent, adapt, pressure)
        if not bytes_per_second > 0:
            raise ValueError(f"a bytes/s budget must be > 0, not {bytes_per_second}")
        self.points = sorted(points, key=lambda p: p.comm_cost)
        self.budget, self.burst = bytes_per_second, burst
        self.tokens = bytes_per_second * burst
        # until the bytes of a send are known: the cheapest point that sends at all
        self.point = next((p for p in self.points if p.send_share > 0), self.points[0])
        self.share = self.point.send_share
        self.demand = 1.1  # the share asked for over the share the bucket pays for
        self.last: float | None = None
        self.wanted = self.refused = 0
        self.images = 0
        self.send_bytes = 0.0  # mean bytes of a send (learnt)
        self.paid_eta: float | None = None  # η of the share the bucket pays for

    @property
    def rate(self) -> float:
        """The bytes/s spent now: the budget times the back-pressure factor."""
        return self.budget * self.pressure.factor

    def observe(self, uncertainties, now: float) -> None:
        """A batch's uncertainties (every image) at time `now`."""
        values = np.asarray(uncertainties, dtype=np.float64).ravel()
        self.recent.add(values)
        self.images += len(values)
        self._refill(now)
        seconds = self._period_ended(now)
        if seconds is not None:
            self._adapt(seconds, now)

    def admit(self, now: float, nbytes: float, uncertainty: float | None = None) -> bool:
        """Whether an image the gate sends may go out now with its `nbytes` on the wire.

        Given its `uncertainty`, an image less uncertain than those the bucket pays for
        (asked for by the extra demand) goes out only if the bucket stays half full after
        it: the lower half is kept for the more uncertain, so the refusals fall on the
        least uncertain."""
        self._refill(now)
        self.wanted += 1
        self.send_bytes = nbytes if not self.send_bytes else 0.9 * self.send_bytes + 0.1 * nbytes
        needed = nbytes
        if uncertainty is not None and self.paid_eta is not None and (
                uncertainty > self.paid_eta if self.measure == "margin"
                else uncertainty < self.paid_eta):  # fmt: skip
            needed += self.capacity / 2
        if now >= self.paused_until and self.tokens >= needed:
            self.tokens -= nbytes
            return True
        self.refused += 1
        return False

    def outcome(self, comm_cost: float, images: int, bytes_per_second: float,
                seconds: float) -> BudgetOutcome:  # fmt: skip
        """How a run of `seconds` at `bytes_per_second` on the wire kept this budget."""
        return BudgetOutcome(self.budget, bytes_per_second, bytes_tolerance(self.burst, seconds),
                             False, f"over {seconds:,.1f} s")  # fmt: skip

    @property
    def capacity(self) -> float:
        """What the bucket holds: `burst` seconds of the rate, and at least three sends (so
        that a budget of a few sends a second is not lost to their chance arrival)."""
        return max(self.rate * self.burst, 3 * self.send_bytes)

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.capacity, self.tokens + self.rate * (now - self.last))
        self.last = now if self.last is None else max(self.last, now)

    def _adapt(self, seconds: float, now: float) -> None:
        self.pressure.update(seconds, nominal_rate=self.budget, now=now)
        rate = self.images / seconds  # images per second in the period
        refused = self.refused / self.wanted if self.wanted else 0.0
        if refused > 0.15:
            self.demand = max(0.8, self.demand * 0.95)
        elif refused < 0.05:
            self.demand = min(2.0, self.demand * 1.05)
        if rate > 0 and self.send_bytes:
            affordable = self.rate / (rate * self.send_bytes)  # the share the budget pays for
            fitting = [p for p in self.points if p.send_share <= affordable]
            self.point = max(fitting, key=lambda p: (p.collab_acc, -p.comm_cost)) if fitting \
                else self.points[0]  # fmt: skip
            paid = min(self.largest_share, affordable)
            self.share = min(self.largest_share, affordable * self.demand)
            self.paid_eta = gate_threshold(self.recent, paid, self.measure)
        self.images = self.wanted = self.refused = 0
