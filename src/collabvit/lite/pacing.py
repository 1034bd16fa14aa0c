"""The images' arrival at a camera's pace, and a budget's controller asked at those times:
the one pacing and admission step that `evaluate` (offline, on a virtual clock) and
`collabvit edge` (over HTTP) share. No HTTP and no waiting: the edge waits for the arrival
times itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Pacing:
    """Arrival times and a controller's decisions for the batches of one run, in order.

    Per batch: `arrive(count)` gives its images' arrival times; `steer(edge)` moves the
    edge to the controller's operating point before the batch runs; `observe(u)` shows the
    controller every image's uncertainty at the batch's first arrival; `admit(row, nbytes,
    u)` asks whether the send of the batch's image `row` goes out at its own arrival.
    Without a controller nothing is steered or observed and every send goes out.

    Args:
        controller: a controller.CostController or BytesController, or None.
        images_per_second: the images' pace; None: they are not paced.
        first: when the first image arrives, in frames: the k-th image (from 0) arrives at
            (k + first) / images_per_second. Each caller keeps its own so that no figure it
            published moves: evaluate's is 0 (the first image at time 0), the edge's is 1
            (a frame after the run began, so that a batch of B images waits B frames).
        now: the time on the caller's clock, for images that are not paced (the edge's:
            they arrive when the batch runs); without it such images have no time, and the
            controller observes them without one (no period ends) and admits them at 0.
    """

    def __init__(self, controller: Any = None, images_per_second: float | None = None,
                 first: int = 0, now: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.controller = controller
        self.images_per_second = images_per_second or None
        self.first = first
        self.now = now
        self.images = 0  # images that have arrived
        self.times: list[float] | None = None  # the current batch's arrival times [B]

    @property
    def seconds(self) -> float:
        """The paced images' time so far: images / images_per_second (0 when not paced)."""
        return self.images / self.images_per_second if self.images_per_second else 0.0

    def arrive(self, count: int) -> list[float] | None:
        """The next `count` images' arrival times [count] in seconds (None when not
        paced), which the batch's observe and admit then use."""
        start = self.images
        self.images += count
        if not self.images_per_second:
            self.times = None
        else:
            self.times = [(start + row + self.first) / self.images_per_second
                          for row in range(count)]  # fmt: skip
        return self.times

    def time(self, row: int = 0) -> float | None:
        """When the current batch's image `row` arrived; unpaced, now (None without a
        clock)."""
        if self.times is not None:
            return self.times[row]
        return self.now() if self.now is not None else None

    def steer(self, edge: Any) -> None:
        """Move the edge (set_operating_point) to the controller's (δ, η) for this batch."""
        if self.controller is not None:
            edge.set_operating_point(*self.controller.operating_point())

    def observe(self, uncertainties: Any) -> None:
        """Show the controller the batch's uncertainties [B] (every image, sent or not)."""
        if self.controller is not None:
            self.controller.observe(uncertainties, self.time())

    def admit(self, row: int, nbytes: float, uncertainty: float | None = None) -> bool:
        """Whether the send of the batch's image `row`, `nbytes` on the wire, goes out."""
        if self.controller is None:
            return True
        when = self.time(row)
        return self.controller.admit(0.0 if when is None else when, nbytes, uncertainty)
