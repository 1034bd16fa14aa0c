"""The pacing and admission step evaluate and the edge share: each caller's arrival
convention, and the times the controller is asked at."""

from __future__ import annotations

import pytest

from collabvit.lite.pacing import Pacing


class Recording:
    """A controller that records what it is asked, and refuses the sends it is told to."""

    def __init__(self, refuse: tuple[float, ...] = ()) -> None:
        self.refuse = refuse
        self.calls: list[tuple] = []

    def operating_point(self):
        return 0.5, 1.25

    def observe(self, uncertainties, now=None):
        self.calls.append(("observe", list(uncertainties), now))

    def admit(self, now, nbytes, uncertainty=None):
        self.calls.append(("admit", now, nbytes, uncertainty))
        return uncertainty not in self.refuse


class Edge:
    def __init__(self) -> None:
        self.points: list[tuple] = []

    def set_operating_point(self, masking_th=None, uncer_th=None):
        self.points.append((masking_th, uncer_th))


@pytest.mark.parametrize(("first", "expected"), [
    (0, [[0.0, 0.1, 0.2], [0.3, 0.4]]),  # evaluate's: the first image at time 0
    (1, [[0.1, 0.2, 0.3], [0.4, 0.5]]),  # the edge's: a frame after the run began
])  # fmt: skip
def test_each_caller_keeps_its_arrival_convention(first, expected):
    pacing = Pacing(images_per_second=10.0, first=first)
    assert pacing.arrive(3) == pytest.approx(expected[0])
    assert pacing.arrive(2) == pytest.approx(expected[1])
    assert pacing.seconds == pytest.approx(0.5)


def test_the_controller_observes_at_the_first_arrival_and_admits_at_each():
    controller, edge = Recording(refuse=(0.9,)), Edge()
    pacing = Pacing(controller, images_per_second=4.0, first=1)
    pacing.arrive(2)
    pacing.steer(edge)
    pacing.observe([0.2, 0.9])
    assert [pacing.admit(row, 100, u) for row, u in enumerate([0.2, 0.9])] == [True, False]
    assert edge.points == [(0.5, 1.25)]
    assert controller.calls == [("observe", [0.2, 0.9], 0.25), ("admit", 0.25, 100, 0.2),
                                ("admit", 0.5, 100, 0.9)]  # fmt: skip


def test_unpaced_images_come_at_the_callers_clock_or_at_no_time():
    clock = Recording()
    with_clock = Pacing(clock, now=lambda: 7.5)
    assert with_clock.arrive(2) is None
    with_clock.observe([0.1])
    with_clock.admit(1, 10, 0.1)
    assert clock.calls == [("observe", [0.1], 7.5), ("admit", 7.5, 10, 0.1)]
    timeless = Recording()
    without = Pacing(timeless)
    without.arrive(2)
    without.observe([0.1])
    without.admit(0, 10, 0.1)  # no period ends; admitted at 0
    assert timeless.calls == [("observe", [0.1], None), ("admit", 0.0, 10, 0.1)]
    assert without.seconds == 0.0


def test_without_a_controller_every_send_goes_out_and_the_edge_is_left_alone():
    edge, pacing = Edge(), Pacing(images_per_second=2.0)
    pacing.arrive(1)
    pacing.steer(edge)
    pacing.observe([0.3])
    assert pacing.admit(0, 10**9, 0.3) and edge.points == []
