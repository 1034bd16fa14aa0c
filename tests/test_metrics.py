"""Tests for collabvit.algo.metrics (DESIGN.md section 1, "Summary metrics")."""

from __future__ import annotations

import math

import pytest
import torch

from collabvit.algo.metrics import RunningSummary, Summary, format_summary, topk_correct

INF = math.inf


def _ranked_logits(rankings: list[list[int]]) -> torch.Tensor:
    """Logits whose descending order of classes is each given ranking (best first)."""
    classes = len(rankings[0])
    logits = torch.zeros(len(rankings), classes)
    for row, ranking in enumerate(rankings):
        assert sorted(ranking) == list(range(classes))
        for place, cls in enumerate(ranking):
            logits[row, cls] = float(classes - place)
    return logits


def _two_batch_summary() -> RunningSummary:
    """Five images over two batches, 6 classes, N = 4 patches (figures in the test below)."""
    running = RunningSummary(num_patches=4)
    # batch 1: targets 0, 1, 2; image 0 confident
    edge = _ranked_logits(
        [
            [0, 1, 2, 3, 4, 5],  # top-1 right
            [3, 2, 0, 4, 5, 1],  # target 1 last: top-1 and top-5 wrong
            [5, 2, 0, 1, 3, 4],  # top-1 wrong, top-5 right
        ]
    )
    server = _ranked_logits(
        [
            [5, 4, 3, 2, 1, 0],  # unused (confident image)
            [1, 0, 2, 3, 4, 5],  # top-1 right
            [0, 2, 1, 3, 4, 5],  # top-1 wrong, top-5 right
        ]
    )
    confident = torch.tensor([True, False, False])
    final = torch.where(confident.unsqueeze(1), edge, server)
    running.update(
        targets=torch.tensor([0, 1, 2]),
        edge_logits=edge,
        final_logits=final,
        confident=confident,
        selection_size=torch.tensor([4, 2, 0]),  # the confident image's 4 must not count
        selection_min=torch.tensor([0.01, 0.2, INF]),
        selection_sum=torch.tensor([1.0, 0.6, 0.0]),
    )
    # batch 2: targets 4, 5; image 1 confident
    edge = _ranked_logits(
        [
            [4, 0, 1, 2, 3, 5],  # top-1 right
            [0, 5, 1, 2, 3, 4],  # top-1 wrong, top-5 right
        ]
    )
    server = _ranked_logits(
        [
            [4, 3, 2, 1, 0, 5],  # top-1 right
            [1, 2, 3, 4, 0, 5],  # unused (confident image); would be top-5 wrong
        ]
    )
    confident = torch.tensor([False, True])
    final = torch.where(confident.unsqueeze(1), edge, server)
    running.update(
        targets=torch.tensor([4, 5]),
        edge_logits=edge,
        final_logits=final,
        confident=confident,
        selection_size=torch.tensor([3, 1]),
        selection_min=torch.tensor([0.05, 0.9]),
        selection_sum=torch.tensor([0.8, 0.9]),
    )
    return running


def test_running_summary_two_batches_hand_computed():
    summary = _two_batch_summary().summary()
    assert summary.images == 5
    assert summary.num_patches == 4
    assert summary.confident_images == 2
    assert summary.sent_images == 3
    # client: top-1 right on 2 of 5, top-5 right on 4 of 5
    assert summary.client_acc == pytest.approx(40.0)
    assert summary.client_acc5 == pytest.approx(80.0)
    # collaborative: top-1 right on 3 of 5, top-5 right on 5 of 5
    assert summary.collab_acc == pytest.approx(60.0)
    assert summary.collab_acc5 == pytest.approx(100.0)
    # sent images have selections of 2, 0 and 3 patches
    assert summary.sent_tokens == pytest.approx(5.0 / 3.0)
    # non-empty sent selections: (min 0.2, sum 0.6) and (min 0.05, sum 0.8)
    assert summary.avg_min_attention == pytest.approx(0.125)
    assert summary.avg_sum_attention == pytest.approx(0.7)
    # (3 / 5) * ((5 / 3) / 4)
    assert summary.comm_cost == pytest.approx(0.25)


def test_running_summary_batches_accumulate_like_one_batch():
    generator = torch.Generator().manual_seed(0)
    n, classes, patches = 12, 7, 9
    targets = torch.randint(0, classes, (n,), generator=generator)
    edge = torch.randn(n, classes, generator=generator)
    server = torch.randn(n, classes, generator=generator)
    # hand-made selections; image 5 (the middle batch on its own) is confident
    confident = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    final = torch.where(confident.unsqueeze(1), edge, server)
    size = torch.tensor([3, 9, 0, 5, 2, 7, 9, 1, 0, 4, 0, 6])
    minimum = torch.tensor([0.02, 0.09, INF, 0.01, 0.08, 0.07, 0.005, 0.06, INF, 0.015, INF, 0.01])
    total = torch.tensor([0.3, 0.95, 0.0, 0.5, 0.2, 0.6, 0.9, 0.06, 0.0, 0.4, 0.0, 0.84])
    whole = RunningSummary(num_patches=patches)
    whole.update(targets, edge, final, confident, size, minimum, total)
    split = RunningSummary(num_patches=patches)
    for part in (slice(0, 5), slice(5, 6), slice(6, 12)):
        split.update(
            targets[part], edge[part], final[part], confident[part],
            size[part], minimum[part], total[part],
        )  # fmt: skip
    a, b = whole.summary().as_dict(), split.summary().as_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key]), key
    # 8 sent images (0, 2, 3, 6, 7, 9, 10, 11) with sizes 3, 0, 5, 9, 1, 4, 0, 6: 28 patches
    assert a["confident_images"] == 4 and a["sent_images"] == 8
    assert a["sent_tokens"] == pytest.approx(3.5)
    # 6 non-empty sent selections, minima summing to 0.12 and sums to 3.0
    assert a["avg_min_attention"] == pytest.approx(0.02)
    assert a["avg_sum_attention"] == pytest.approx(0.5)
    # (8 / 12) * (3.5 / 9)
    assert a["comm_cost"] == pytest.approx(7 / 27)


def test_nothing_sent_gives_zeros():
    running = RunningSummary(num_patches=16)
    logits = _ranked_logits([[0, 1, 2], [2, 1, 0]])
    running.update(
        targets=torch.tensor([0, 1]),
        edge_logits=logits,
        final_logits=logits,
        confident=torch.tensor([True, True]),
        selection_size=torch.tensor([5, 3]),
        selection_min=torch.tensor([0.1, 0.2]),
        selection_sum=torch.tensor([0.5, 0.5]),
    )
    summary = running.summary()
    assert summary.confident_images == 2
    assert summary.sent_images == 0
    assert summary.sent_tokens == 0.0
    assert summary.avg_min_attention == 0.0
    assert summary.avg_sum_attention == 0.0
    assert summary.comm_cost == 0.0
    assert summary.client_acc == pytest.approx(50.0)
    assert summary.collab_acc == pytest.approx(50.0)


def test_sent_but_all_empty_selections():
    running = RunningSummary(num_patches=16)
    logits = _ranked_logits([[0, 1, 2], [2, 1, 0]])
    running.update(
        targets=torch.tensor([0, 0]),
        edge_logits=logits,
        final_logits=logits,
        confident=torch.tensor([False, False]),
        selection_size=torch.tensor([0, 0]),
        selection_min=torch.tensor([INF, INF]),
        selection_sum=torch.tensor([0.0, 0.0]),
    )
    summary = running.summary()
    assert summary.sent_images == 2
    assert summary.sent_tokens == 0.0
    assert summary.avg_min_attention == 0.0
    assert summary.avg_sum_attention == 0.0
    assert summary.comm_cost == 0.0
    assert all(math.isfinite(float(value)) for value in summary.as_dict().values())


def test_empty_summary_has_no_division_errors():
    summary = RunningSummary(num_patches=196).summary()
    assert summary.images == 0
    for key in ("sent_tokens", "avg_min_attention", "avg_sum_attention", "comm_cost",
                "client_acc", "client_acc5", "collab_acc", "collab_acc5"):  # fmt: skip
        assert getattr(summary, key) == 0.0, key


def test_full_transmission_comm_cost_is_one():
    running = RunningSummary(num_patches=4)
    logits = _ranked_logits([[0, 1], [1, 0]])
    running.update(
        torch.tensor([0, 1]), logits, logits, torch.tensor([False, False]),
        torch.tensor([4, 4]), torch.tensor([0.25, 0.25]), torch.tensor([1.0, 1.0]),
    )  # fmt: skip
    summary = running.summary()
    assert summary.sent_tokens == 4.0
    assert summary.comm_cost == 1.0
    assert summary.avg_sum_attention == 1.0


def test_top5_capped_at_number_of_classes():
    # C = 3 < 5: every target is within the "top 5"
    logits = _ranked_logits([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    targets = torch.tensor([2, 1, 0])
    assert topk_correct(logits, targets, 5) == 3
    assert topk_correct(logits, targets, 1) == 1
    assert topk_correct(logits, targets, 2) == 2
    running = RunningSummary(num_patches=4)
    running.update(
        targets, logits, logits, torch.tensor([True, True, True]),
        torch.zeros(3, dtype=torch.long), torch.full((3,), INF), torch.zeros(3),
    )  # fmt: skip
    summary = running.summary()
    assert summary.client_acc5 == pytest.approx(100.0)
    assert summary.collab_acc5 == pytest.approx(100.0)
    assert summary.client_acc == pytest.approx(100.0 / 3.0)


# --- format_summary ----------------------------------------------------------------------

DESIGN_EXAMPLE = [
    "* Masking mode:: attention_sum_threshold, 0.97 / Confidence criterion:: min_entropy, 1.0",
    "* Sent token number:: 148.8113 / Averaged minimum attention:: 0.0011 / "
    "Averaged sum of attention:: 0.9694",
    "* Total confident image:: 32171",
    "* Communication cost:: 0.27073030612244897",
    "Client only accuracy: 72.13 %",
    "Collaborative accuracy: 80.23 %",
]


def test_format_summary_reproduces_design_example():
    summary = Summary(
        images=50000,
        num_patches=196,
        confident_images=32171,
        sent_images=17829,
        sent_tokens=148.81131,
        avg_min_attention=0.00112,
        avg_sum_attention=0.96943,
        comm_cost=0.27073030612244897,
        client_acc=72.12999999,
        client_acc5=91.0,
        collab_acc=80.2300001,
        collab_acc5=95.0,
    )
    text = format_summary(summary, "attention_sum_threshold", 0.97, "min_entropy", 1.0)
    lines = text.splitlines()
    assert lines[:6] == DESIGN_EXAMPLE


def test_format_summary_from_running_summary():
    text = format_summary(_two_batch_summary().summary(), "topk", 2, "margin", 0.5)
    lines = text.splitlines()
    assert lines[:6] == [
        "* Masking mode:: topk, 2 / Confidence criterion:: margin, 0.5",
        "* Sent token number:: 1.6667 / Averaged minimum attention:: 0.125 / "
        "Averaged sum of attention:: 0.7",
        "* Total confident image:: 2",
        "* Communication cost:: 0.25",
        "Client only accuracy: 40.0 %",
        "Collaborative accuracy: 60.0 %",
    ]
    # the communication cost is printed unrounded: (3 / 5) * ((5 / 3) / 4)
    assert float(lines[3].split(":: ")[1]) == 0.25


def test_format_summary_comm_cost_not_rounded():
    summary = Summary(
        images=1, num_patches=8, confident_images=0, sent_images=1, sent_tokens=1.0,
        avg_min_attention=0.0, avg_sum_attention=0.0, comm_cost=0.123456789012345,
        client_acc=0.0, client_acc5=0.0, collab_acc=0.0, collab_acc5=0.0,
    )
    lines = format_summary(summary, "topk", 1, "none", 0.0).splitlines()
    assert lines[3] == "* Communication cost:: 0.123456789012345"
