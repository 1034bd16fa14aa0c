"""passes.py, frontier.py, calibration.py: one edge pass + a server pass per selection equal
`collabvit eval`'s figures; the frontier, the pick and temperature scaling."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from collabvit.algo.metrics import Summary
from collabvit.algo.selection import selection_statistics
from collabvit.algo.uncertainty import is_confident
from collabvit.lite.frontier import SweepPoint, pareto_optimal, pick_point
from collabvit.models import vit
from collabvit.models.edge import EdgeConfig, EdgeDevice, gate
from collabvit.models.server import Server
from collabvit.research.calibration import (
    expected_calibration_error,
    fit_temperature,
    split_calibration,
)
from collabvit.research.evaluate import evaluate
from collabvit.research.passes import (
    Grid,
    eta_grid,
    gate_decisions,
    gate_grid,
    needed_rows,
    run_edge,
    selections,
    server_logits,
    summarize_decisions,
    sweep_points,
)


def indexed(images, targets, ids=None):
    """A dataset yielding (image, target, dataset index), as the evaluation loaders do."""
    return TensorDataset(images, targets, torch.arange(len(targets)) if ids is None else ids)


def summarize(edge_pass, keep, server_out, measure, eta):
    """The figures of one gate over a pass, from a selection already made."""
    confident = gate(edge_pass.logits, EdgeConfig(uncer_mode=measure, uncer_th=eta))
    statistics = selection_statistics(edge_pass.scores, keep)
    return summarize_decisions(edge_pass, statistics, server_out, confident)


@pytest.mark.parametrize("attention", ["mean", "rollout"])
def test_every_eta_from_one_pass_matches_full_evaluations(golden, attention):
    identity = vit.Normalization.identity()
    edge_model, server = golden.edge_model(), Server(golden.server_model(), normalization=identity)
    loader = DataLoader(indexed(golden.images, golden.targets), batch_size=8)
    base = EdgeConfig(attention, "attention_sum_threshold", 0.9, "min_entropy", 2.2)
    cached = run_edge(EdgeDevice(edge_model, base, normalization=identity), loader, progress=False)
    keep = selections(cached, base)
    server_out = server_logits(server, cached.images, keep, block=5)
    for measure, eta in [
        ("min_entropy", 2.2),
        ("min_entropy", 2.0),
        ("margin", 0.04),
        ("none", 0.0),
    ]:
        config = EdgeConfig(attention, "attention_sum_threshold", 0.9, measure, eta)
        edge = EdgeDevice(edge_model, config, normalization=identity)
        expected = evaluate(edge, server, loader, progress=False).summary
        figures = summarize(cached, keep, server_out, measure, eta)
        assert figures.as_dict() == pytest.approx(expected.as_dict(), abs=1e-9)


def test_server_logits_cover_every_image_in_order(golden):
    identity = vit.Normalization.identity()
    server = Server(golden.server_model(), normalization=identity)
    keep = torch.ones(16, 16, dtype=torch.bool)
    out = server_logits(server, golden.images, keep, block=6)
    expected = torch.tensor(golden.expected["server_full_logits"])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_server_logits_of_some_rows_leave_the_rest_nan(golden):
    identity = vit.Normalization.identity()
    server = Server(golden.server_model(), normalization=identity)
    keep = torch.ones(16, 16, dtype=torch.bool)
    rows = torch.tensor([1, 4, 5, 15])
    out = server_logits(server, golden.images, keep, block=3, rows=rows)
    expected = torch.tensor(golden.expected["server_full_logits"])
    torch.testing.assert_close(out[rows], expected[rows], atol=1e-4, rtol=0)
    others = torch.ones(16, dtype=torch.bool)
    others[rows] = False
    assert out[others].isnan().all()
    assert server_logits(server, golden.images, keep, rows=torch.tensor([], dtype=torch.long)) \
        .isnan().all()  # fmt: skip


@pytest.mark.parametrize("measure", ["min_entropy", "shannon_entropy", "margin"])
def test_eta_grid_spreads_the_sent_fraction_evenly_from_none_to_all(measure):
    logits = torch.randn(400, 10, generator=torch.Generator().manual_seed(1)) * 3
    etas = eta_grid(logits, measure, 5)
    sent = sorted(float((~is_confident(logits, measure, eta)).float().mean()) for eta in etas)
    assert sent == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=0.01)
    assert sent[0] == 0.0 and sent[-1] == 1.0  # edge alone and everything sent, exactly
    assert len(eta_grid(logits, measure, 1)) == 1
    assert eta_grid(logits, "none", 4) == [0.0]


def test_gate_grid_takes_quantiles_of_the_scaled_logits():
    logits = torch.randn(300, 10, generator=torch.Generator().manual_seed(2)) * 3
    gates = gate_grid(logits, ["min_entropy", "margin", "min_entropy"], 4, temperatures=(1.0, 2.0))
    assert list(gates) == [(1.0, "min_entropy"), (1.0, "margin"), (2.0, "min_entropy"),
                           (2.0, "margin")]  # fmt: skip
    assert list(gates[(2.0, "min_entropy")]) == eta_grid(logits / 2.0, "min_entropy", 4)
    assert gates[(2.0, "min_entropy")] != gates[(1.0, "min_entropy")]
    explicit = gate_grid(logits, ["margin", "none"], etas=[0.1, 0.2])
    assert explicit == {(1.0, "margin"): (0.1, 0.2), (1.0, "none"): (0.0,)}


def test_pareto_optimal_keeps_only_undominated_points():
    costs = [0.1, 0.2, 0.2, 0.3, 0.05, 0.3, 0.4]
    accs = [80.0, 85.0, 84.0, 85.0, 70.0, 86.0, 86.0]
    # 0.2/84 loses to 0.2/85; 0.3/85 to 0.2/85; 0.4/86 to 0.3/86.
    assert pareto_optimal(costs, accs) == [True, True, False, False, True, True, False]
    assert pareto_optimal([0.1, 0.1], [80.0, 80.0]) == [True, False]  # duplicates: the first


def _figures(cost, acc):
    return Summary(images=100, num_patches=49, confident_images=50, sent_images=50,
                   sent_tokens=20.0, avg_min_attention=0.01, avg_sum_attention=0.9,
                   comm_cost=cost, client_acc=80.0, client_acc5=95.0, collab_acc=acc,
                   collab_acc5=99.0)  # fmt: skip


def _point(cost, acc, cal_cost, cal_acc):
    return SweepPoint("mean", 1.0, "topk", 20, "min_entropy", 1.0, figures=_figures(cost, acc),
                      subsets={"cal": _figures(cal_cost, cal_acc)})  # fmt: skip


def test_pick_point_by_budget_or_target_accuracy_on_the_chosen_part():
    points = [
        _point(0.1, 80.0, 0.12, 81.0),
        _point(0.2, 85.0, 0.22, 84.0),
        _point(0.25, 85.0, 0.24, 84.0),
        _point(0.3, 90.0, 0.27, 88.0),
    ]
    # On the calibration figures the last fits 0.28; on its own figures it does not.
    assert pick_point(points, "cal", budget=0.28) is points[3]
    assert pick_point(points, budget=0.28) is points[1]
    assert pick_point(points, "cal", budget=0.235) is points[1]
    assert pick_point(points, "cal", budget=0.245) is points[1]  # tie at 84 %: the cheaper
    assert pick_point(points, "cal", budget=0.05) is None
    assert pick_point(points, "cal", target_acc=84.0) is points[1]  # cheapest reaching 84 %
    assert pick_point(points, "cal", target_acc=85.0) is points[3]
    assert pick_point(points, target_acc=85.0) is points[1]
    assert pick_point(points, "cal", target_acc=95.0) is None
    with pytest.raises(ValueError):
        pick_point(points, "cal")
    assert pick_point(points, budget=0.29) is points[1]  # best at a cost, for comparisons
    assert pick_point(points, budget=0.01) is None


def test_split_calibration_is_disjoint_complete_and_seeded():
    calibration, held_out = split_calibration(101, 0.3, seed=4)
    assert len(calibration) == 30 and len(held_out) == 71
    assert sorted(torch.cat([calibration, held_out]).tolist()) == list(range(101))
    again = split_calibration(101, 0.3, seed=4)
    assert torch.equal(again[0], calibration) and torch.equal(again[1], held_out)
    assert not torch.equal(split_calibration(101, 0.3, seed=5)[0], calibration)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            split_calibration(101, fraction, seed=0)
    with pytest.raises(ValueError):
        split_calibration(1, 0.5, seed=0)


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).flatten()
    assert fit_temperature(true_logits * 2.5, labels) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(true_logits / 2, labels) == pytest.approx(0.5, rel=0.05)


def test_expected_calibration_error():
    # Every prediction made with probability ~1 and half of them right: ECE 50 %.
    logits = torch.tensor([[50.0, 0.0]] * 4)
    assert expected_calibration_error(logits, torch.tensor([0, 1, 0, 1])) == pytest.approx(50.0)
    # Confidence 0.75 and exactly 3 of 4 right: calibrated.
    logit = math.log(3.0)
    logits = torch.tensor([[logit, 0.0]] * 4)
    assert expected_calibration_error(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(
        0.0, abs=1e-4
    )


def test_sweep_points_match_collabvit_eval_on_all_and_on_subsets(golden):
    identity = vit.Normalization.identity()
    edge_model, server = golden.edge_model(), Server(golden.server_model(), normalization=identity)
    images, targets = golden.images, golden.targets
    loader = DataLoader(indexed(images, targets), batch_size=8)
    cached = run_edge(EdgeDevice(edge_model, EdgeConfig(), normalization=identity), loader, False)
    # Etas that keep some images at the edge under every gate, so the server skips those.
    gates = {
        (1.0, "min_entropy"): (2.0, 2.2),
        (1.0, "margin"): (0.04,),
        (2.0, "min_entropy"): (2.5,),
    }
    grid = Grid(
        policies=(("attention_sum_threshold", 0.9), ("topk", 5), ("random", 7)), gates=gates
    )
    assert 0 < len(needed_rows(gate_decisions(cached.logits, gates).values())) < 16
    calibration, held_out = split_calibration(16, 0.5, seed=0)
    subsets = {"calibration": calibration, "held_out": held_out}
    points = sweep_points(cached, server, grid, "mean", subsets, seed=3, progress=False)
    assert len(points) == len(grid) == 12
    scaled_points = [p for p in points if p.temperature == 2.0]
    for point in scaled_points:  # the gate sees logits / T; the answers are the edge's own
        keep = selections(cached, EdgeConfig(masking_mode=point.policy,
                                             masking_th=point.threshold), seed=3)  # fmt: skip
        server_out = server_logits(server, images, keep)
        expected = summarize(
            replace(cached, logits=cached.logits / 2.0), keep, server_out, "min_entropy", 2.5
        )
        assert point.figures.as_dict() == pytest.approx(expected.as_dict())
    for point in [p for p in points if p.temperature == 1.0]:
        config = EdgeConfig("mean", point.policy, point.threshold, point.measure, point.eta)
        edge = EdgeDevice(edge_model, config, normalization=identity)
        # `random` draws each image's patches from (seed, dataset index): any batching agrees.
        expected = evaluate(edge, server, DataLoader(indexed(images, targets), batch_size=5),
                            seed=3, progress=False).summary  # fmt: skip
        # (float32 attention sums add up in another order across batches: 1e-7)
        assert point.figures.as_dict() == pytest.approx(expected.as_dict(), abs=1e-7)
        for name, index in subsets.items():
            part = DataLoader(indexed(images[index], targets[index], index), batch_size=3)
            expected = evaluate(edge, server, part, seed=3, progress=False).summary
            assert point.subsets[name].as_dict() == pytest.approx(expected.as_dict(), abs=1e-7)
