"""The budget controller on synthetic streams: quantiles, frontier choice, budgets held
through a change of difficulty and a change of what a send costs."""

from __future__ import annotations

import numpy as np
import pytest

from collabvit.controller import (
    CostController,
    FrontierPoint,
    RecentValues,
    best_within,
    gate_threshold,
)

N = 49
POINTS = [  # a frontier: more patches and more sends buy accuracy
    FrontierPoint(masking_th=0.9, send_share=0.10, sent_tokens=12, num_patches=N, collab_acc=90.0),
    FrontierPoint(masking_th=0.95, send_share=0.15, sent_tokens=18, num_patches=N,
                  collab_acc=91.0),
    FrontierPoint(masking_th=0.99, send_share=0.25, sent_tokens=30, num_patches=N,
                  collab_acc=92.5),
    FrontierPoint(masking_th=1.0, send_share=0.30, sent_tokens=49, num_patches=N,
                  collab_acc=93.0),
]


def test_recent_values_hold_a_bounded_window_and_its_quantiles():
    recent = RecentValues(size=100)
    recent.add(np.arange(1000))
    assert len(recent) == 100 and recent.quantile(0.0) == 900 and recent.quantile(1.0) == 999
    with pytest.raises(ValueError, match="no values"):
        RecentValues().quantile(0.5)


def test_a_harder_stream_moves_eta_not_the_send_share():
    rng = np.random.default_rng(0)
    recent = RecentValues(size=4000)
    recent.add(rng.uniform(0, 1, 4000))
    easy = gate_threshold(recent, 0.3, "min_entropy")
    assert easy == pytest.approx(0.7, abs=0.03)
    recent.add(rng.uniform(1, 2, 4000))  # the images got harder
    hard = gate_threshold(recent, 0.3, "min_entropy")
    assert hard == pytest.approx(1.7, abs=0.03)
    fresh = rng.uniform(1, 2, 20000)
    assert (fresh >= hard).mean() == pytest.approx(0.3, abs=0.02)  # still 30 % sent
    assert gate_threshold(recent, 0.3, "margin") == pytest.approx(1.3, abs=0.03)


def test_the_most_accurate_point_within_a_cost():
    assert best_within(POINTS, 0.05).masking_th == 0.9  # 0.024 and 0.055: only the first fits
    assert best_within(POINTS, 0.2).masking_th == 0.99
    assert best_within(POINTS, 1.0).masking_th == 1.0
    assert best_within(POINTS, 0.0).masking_th == 0.9  # nothing fits: the cheapest


def test_a_cost_budget_sends_what_it_allows_with_the_point_it_picks():
    controller = CostController(POINTS, "min_entropy", cost=0.12)
    assert controller.operating_point() == (0.95, None)  # no uncertainty seen yet
    controller.observe(np.linspace(0, 1, 1001))
    delta, eta = controller.operating_point()
    assert delta == 0.95  # of 0.024, 0.055, 0.153 and 0.3, the best within 0.12
    share = 0.12 * N / 18  # more sends than the point's own 15 %: the cost allows them
    assert eta == pytest.approx(1 - share, abs=1e-3)


def test_a_cost_budget_holds_when_the_images_get_harder():
    rng = np.random.default_rng(2)
    controller = CostController(POINTS, "min_entropy", cost=0.12)
    realised = []
    for difficulty in (0.0, 0.0, 3.0, 3.0, 3.0):  # the images get harder half-way
        for _ in range(10):
            values = rng.uniform(difficulty, difficulty + 1, 500)
            controller.observe(values)
        fresh = rng.uniform(difficulty, difficulty + 1, 20000)
        _, eta = controller.operating_point()
        realised.append((fresh >= eta).mean() * 18 / N)
    assert realised[0] == pytest.approx(0.12, rel=0.05)
    assert realised[-1] == pytest.approx(0.12, rel=0.05)  # eta moved, the cost did not


@pytest.mark.parametrize("cost, message", [(1.5, "lies in"), (-0.1, "lies in")])
def test_bad_budgets_are_refused(cost, message):
    with pytest.raises(ValueError, match=message):
        CostController(POINTS, "min_entropy", cost=cost)
    with pytest.raises(ValueError, match="at least one"):
        CostController([], "min_entropy", cost=0.1)
