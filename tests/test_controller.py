"""The budget controller on synthetic streams: quantiles, frontier choice, budgets held
through a change of difficulty and a change of what a send costs."""

from __future__ import annotations

import numpy as np
import pytest

from collabvit.lite.controller import (
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
    FrontierPoint(masking_th=1.0, send_share=0.45, sent_tokens=49, num_patches=N,
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
    assert delta == 0.95  # of 0.024, 0.055, 0.153 and 0.45, the best within 0.12
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


def stream(controller, seconds, difficulty, patch_bytes, start=0.0, rate=100, step=0.05,
           seed=3):  # fmt: skip
    """Images at `rate` per second through a BytesController; bytes sent per 10 s window."""
    from collabvit.lite.controller import BytesController  # noqa: F401 - the type driven here

    rng = np.random.default_rng(seed)
    tokens_of = {p.masking_th: p.sent_tokens for p in POINTS}
    windows, sent = [], 0.0
    steps = round(seconds / step)
    for i in range(steps):
        now = start + i * step
        values = rng.uniform(difficulty(now), difficulty(now) + 1, round(rate * step))
        controller.observe(values, now)
        delta, eta = controller.operating_point()
        for value in values:
            if eta is None or value >= eta:
                nbytes = 260.0 + patch_bytes * max(1.0, rng.normal(tokens_of[delta], 2.0))
                if controller.admit(now, nbytes):
                    sent += nbytes
        if (i + 1) % round(10 / step) == 0:
            windows.append(sent / 10)
            sent = 0.0
    return windows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bytes_budget_is_held_in_every_window_through_harder_images_and_dearer_sends(seed):
    """1,000 images/s (about 70 sends/s: one send is a 700th of a window's bytes)."""
    from collabvit.lite.controller import BytesController

    budget = 30000.0  # eta follows the last 5 s of uncertainties
    controller = BytesController(POINTS, "min_entropy", bytes_per_second=budget, recent=5000)
    first = stream(controller, 60, lambda t: 0.0, 14.0, rate=1000, seed=seed)
    harder = stream(controller, 60, lambda t: 3.0, 14.0, start=60.0, rate=1000,
                    seed=seed + 10)  # fmt: skip
    dearer = stream(controller, 60, lambda t: 3.0, 28.0, start=120.0, rate=1000,
                    seed=seed + 20)  # fmt: skip
    for realised in first[2:] + harder + dearer:
        assert realised == pytest.approx(budget, rel=0.05)


def test_a_larger_bytes_budget_buys_a_more_accurate_point():
    from collabvit.lite.controller import BytesController

    small = BytesController(POINTS, "min_entropy", bytes_per_second=1500.0)
    large = BytesController(POINTS, "min_entropy", bytes_per_second=20000.0)
    stream(small, 30, lambda t: 0.0, 14.0)
    stream(large, 30, lambda t: 0.0, 14.0)
    assert large.point.collab_acc > small.point.collab_acc


def sweep_point(policy, threshold, measure, eta, sent, tokens, accuracy):
    from collabvit.lite.frontier import SweepPoint
    from collabvit.lite.summary import Summary

    figures = Summary(images=1000, num_patches=N, confident_images=1000 - sent, sent_images=sent,
                      sent_tokens=tokens, avg_min_attention=0.0, avg_sum_attention=0.9,
                      comm_cost=sent / 1000 * tokens / N, client_acc=89.0, client_acc5=99.0,
                      collab_acc=accuracy, collab_acc5=99.5)  # fmt: skip
    return SweepPoint("mean", 1.0, policy, threshold, measure, eta, figures)


def test_the_frontier_file_holds_each_series_pareto_points(tmp_path):
    """What `collabvit sweep` writes beside its points (frontier.json), read one series at a
    time, from the file or from the document a model card carries."""
    import json

    from collabvit.lite.controller import CostController, frontier_document, read_frontier

    points = [sweep_point("attention_sum_threshold", 0.9, "min_entropy", 0.5, 100, 12, 90.0),
              sweep_point("attention_sum_threshold", 0.99, "min_entropy", 0.5, 100, 30, 91.0),
              sweep_point("attention_sum_threshold", 0.99, "min_entropy", 0.3, 250, 30, 92.5),
              sweep_point("attention_sum_threshold", 0.9, "min_entropy", 0.3, 250, 12, 90.5),
              sweep_point("attention_sum_threshold", 1.0, "min_entropy", 0.3, 250, 49, 92.0),
              sweep_point("topk", 20, "min_entropy", 0.3, 250, 20, 99.0)]  # another series
    document = frontier_document([p.as_dict() for p in points], {"command": "sweep"})
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(document))
    frontier = read_frontier(path, "attention_sum_threshold", "min_entropy")
    kept = [(p.masking_th, p.send_share) for p in frontier]
    # (0.9, 25 %) costs what (0.99, 10 %) costs for less accuracy, and 1.0 is beaten too;
    # the points come cheapest first
    assert kept == [(0.9, 0.1), (0.99, 0.1), (0.99, 0.25)]
    assert all(p.num_patches == N for p in frontier) and frontier[0].eta == 0.5
    assert read_frontier(document, "topk", "min_entropy")[0].collab_acc == 99.0
    controller = CostController(frontier, "min_entropy", cost=0.1)
    assert controller.point.masking_th == 0.99 and controller.point.collab_acc == 91.0
    with pytest.raises(ValueError, match="holds no point of topk with margin.*it holds"):
        read_frontier(path, "topk", "margin")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a frontier file"):
        read_frontier(tmp_path / "other.json", "topk", "margin")
    with pytest.raises(ValueError, match="cannot read"):
        read_frontier(tmp_path / "missing.json", "topk", "margin")


def test_an_evaluation_held_at_a_cost_budget(run_cli, tmp_path):
    """The frontier of a sweep over some images; an in-process evaluation of the same images
    held at a cost between its points spends about that cost."""
    from collabvit.config import DataSpec, ModelSpec
    from collabvit.lite.controller import CostController, read_frontier
    from collabvit.models.pair import load_pair
    from collabvit.research.evaluate import evaluate

    swept = run_cli("sweep", "--limit", "384", "--quiet", "--no-plots", "--out-dir", str(tmp_path),
                    "--attention-modes", "mean", "--uncer-modes", "min_entropy",
                    "--policy", "attention_sum_threshold=0.95,0.999", "--etas",
                    "0.1,0.2,0.3,0.5,1.0")  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    frontier = read_frontier(tmp_path / "frontier.json", "attention_sum_threshold",
                             "min_entropy")  # fmt: skip
    pair = load_pair(ModelSpec(name="collabvit_fmnist_edge"),
                     ModelSpec(name="collabvit_fmnist_server"), DataSpec(limit=384))
    edge = pair.edge(pair.default_config())
    controller = CostController(frontier, "min_entropy", cost=0.1)
    held = evaluate(edge, pair.server(), pair.loader(), progress=False, controller=controller)
    assert held.summary.comm_cost == pytest.approx(0.1, rel=0.15), held.summary.comm_cost
    assert edge.config == pair.default_config()  # the edge's own point is back


# ------------------------------------------------------------------ back-pressure


def test_a_queue_building_on_the_link_drops_the_spend_to_what_it_delivered_then_recovers():
    from collabvit.lite.controller import Backpressure

    pressure = Backpressure(latency_target=0.2)
    for _ in range(5):  # a clear link: 0.05 s on the wire, the whole budget delivered
        for _ in range(10):
            pressure.answered(1000.0, 0.05, 0.1)
        pressure.update(1.0, nominal_rate=10000.0)
    assert pressure.factor == 1.0
    for _ in range(10):  # the link fell to a tenth: sends queue, a tenth arrives
        pressure.answered(100.0, 0.9, 0.1)
    assert pressure.congested()
    pressure.update(1.0, nominal_rate=10000.0)
    assert pressure.factor == pytest.approx(0.085)  # 85 % of what was delivered
    factors = []
    for _ in range(15):  # the link is back
        pressure.answered(800.0, 0.05, 0.1)
        pressure.update(1.0, nominal_rate=10000.0)
        factors.append(pressure.factor)
    assert factors == sorted(factors) and factors[-1] == 1.0 and factors[5] < 1.0


@pytest.mark.parametrize("signal", ["load", "wait", "timeout"])
def test_a_loaded_server_a_retry_after_or_a_time_out_each_lower_the_spend(signal):
    from collabvit.lite.controller import Backpressure

    pressure = Backpressure(load_limit=0.5)
    pressure.answered(1000.0, 0.05, 0.9 if signal == "load" else 0.1)
    pressure.asked_to_wait = signal == "wait"
    pressure.timed_out = signal == "timeout"
    pressure.update(1.0)
    assert pressure.factor == pytest.approx(0.7)
    pressure.answered(1000.0, 0.05, 0.1)  # and a clear period raises it again
    pressure.update(1.0)
    assert pressure.factor == pytest.approx(min(1.0, 0.7 * 1.25 + 0.03))


def test_a_paused_controller_withholds_every_send_until_the_server_said():
    from collabvit.lite.controller import BytesController

    for controller in (CostController(POINTS, "min_entropy", cost=0.05),
                       BytesController(POINTS, "min_entropy", bytes_per_second=1e6)):
        controller.observe(np.linspace(0, 1, 100), 0.0)
        assert controller.admit(0.0, 100.0)
        controller.pause(until=3.0)
        assert not controller.admit(1.0, 100.0) and not controller.admit(2.99, 100.0)
        assert controller.admit(3.0, 100.0)
        assert controller.pressure.asked_to_wait  # and the period counts as congested


def test_a_cost_budget_sends_a_smaller_share_while_the_server_is_loaded():
    controller = CostController(POINTS, "min_entropy", cost=0.05)
    full = controller.share
    controller.observe(np.linspace(0, 1, 100), 0.0)
    controller.answered(1000.0, 0.01, 0.95)  # a nearly full queue
    controller.observe(np.linspace(0, 1, 100), 1.0)
    assert controller.share == pytest.approx(0.7 * full)
    for second in range(2, 20):  # the queue empties
        controller.answered(1000.0, 0.01, 0.0)
        controller.observe(np.linspace(0, 1, 100), float(second))
    assert controller.share == pytest.approx(full)


def test_eval_holds_a_budget_offline(run_cli, tmp_path):
    """`collabvit eval --budget-*`: the in-process evaluation at a cost budget, and at a
    bytes budget for images at a camera's pace; mistakes are one line."""
    import json

    held = run_cli("eval", "--limit", "640", "--quiet", "--budget-cost", "0.1",
                   "--results-file", str(tmp_path / "cost.json"))  # fmt: skip
    assert held.returncode == 0, held.stderr
    summary = json.loads((tmp_path / "cost.json").read_text())["summary"]
    assert summary["comm_cost"] == pytest.approx(0.1, rel=0.2)
    assert "Budget cost 0.1: communication cost" in held.stdout
    paced = run_cli("eval", "--limit", "640", "--quiet", "--budget-bps", "3000",
                    "--images-per-second", "30")  # fmt: skip
    assert paced.returncode == 0, paced.stderr
    line = paced.stdout.splitlines()[-1]
    realised = float(line.split(": ")[1].split(" B/s")[0].replace(",", ""))
    assert 0.7 * 3000 < realised <= 3000 * (1 + 3 / 21.3)  # within the bucket's three sends
    for flags, message in ((["--budget-bps", "3000"], "--images-per-second"),
                           (["--images-per-second", "30"], "go with --budget-bps"),
                           (["--codec", "png"], "go with --budget-bps")):  # fmt: skip
        wrong = run_cli("eval", "--limit", "64", "--quiet", *flags)
        assert wrong.returncode == 2 and message in wrong.stderr


def test_a_bytes_budget_refuses_the_least_uncertain_of_the_images_asked_for():
    """The bucket pays for fewer sends than eta asks for: the refused images are the less
    uncertain ones, without the priority's budget being exceeded."""
    from collabvit.lite.controller import BytesController

    rng = np.random.default_rng(5)
    controller = BytesController(POINTS, "min_entropy", bytes_per_second=20000.0)
    admitted, refused, spent = [], [], 0.0
    for step in range(1200):  # 60 s of 1,000 images/s, in 50 ms batches
        now = step * 0.05
        values = rng.uniform(0, 1, 50)
        controller.observe(values, now)
        _, eta = controller.operating_point()
        for value in values:
            if eta is None or value >= eta:
                if controller.admit(now, 700.0, float(value)):
                    spent += 700.0 if now >= 10 else 0.0
                    (admitted if now >= 10 else []).append(value)
                elif now >= 10:
                    refused.append(value)
    assert len(refused) > 0.03 * (len(refused) + len(admitted))
    assert np.mean(refused) < np.mean(admitted) - 0.01  # the refusals fall on the least sure
    assert np.quantile(refused, 0.9) < np.median(admitted)
    assert spent / 50 == pytest.approx(20000.0, rel=0.05)


def test_sends_that_get_no_answer_count_as_congestion():
    from collabvit.lite.controller import Backpressure

    pressure = Backpressure(latency_target=0.2)
    pressure.sent(0.0)
    pressure.answered(1000.0, 0.05, 0.0)  # answered quickly: clear
    pressure.update(1.0, now=1.0)
    assert pressure.factor == 1.0
    pressure.sent(1.1)  # then nothing comes back for 0.9 s
    pressure.update(1.0, now=2.0)
    assert pressure.factor == pytest.approx(0.7)
    pressure.finished()  # it failed: nothing is waiting any more
    pressure.update(1.0, now=3.0)
    assert pressure.factor == pytest.approx(0.7 * 1.25 + 0.03)
