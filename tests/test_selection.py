"""Tests for collabvit.algo.selection (DESIGN.md section 1, "Patch selection")."""

from __future__ import annotations

import math
import random

import pytest
import torch

from collabvit.algo.selection import (
    MASKING_MODES,
    object_recall,
    select_attention_sum_threshold,
    select_attention_threshold,
    select_patches,
    select_random,
    select_topk,
    selection_composition,
    selection_statistics,
    validate_masking,
)


def _kept(mask_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask_row).flatten().tolist())


def _brute_force_sum_threshold(scores: list[float], threshold: float) -> set[int]:
    """Plain Python: rank descending, keep while the running sum stays <= threshold."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept: set[int] = set()
    running = 0.0
    for index in order:
        running += scores[index]
        if running <= threshold:
            kept.add(index)
    return kept


# --- topk --------------------------------------------------------------------------------


def test_topk_keeps_exactly_the_k_largest():
    scores = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.5, 0.0, 0.2, 0.1, 0.2001]])
    keep = select_topk(scores, 2)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert _kept(keep[0]) == {1, 3}
    assert _kept(keep[1]) == {0, 4}


@pytest.mark.parametrize("k", [0, 1, 4, 9, 10])
def test_topk_random_scores(k):
    scores = torch.rand(5, 10, generator=torch.Generator().manual_seed(k))
    keep = select_topk(scores, k)
    assert keep.sum(dim=1).tolist() == [k] * 5
    for row in range(5):
        expected = set(torch.argsort(scores[row], descending=True)[:k].tolist())
        assert _kept(keep[row]) == expected
        if 0 < k < 10:
            assert scores[row][keep[row]].min() > scores[row][~keep[row]].max()


def test_topk_with_ties_still_keeps_k():
    scores = torch.full((2, 6), 1.0 / 6.0)
    assert select_topk(scores, 4).sum(dim=1).tolist() == [4, 4]


# --- random ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, 16])
def test_random_keeps_k_distinct(k):
    scores = torch.rand(8, 16)
    keep = select_random(scores, k, torch.arange(8), seed=0)
    assert keep.dtype == torch.bool and keep.shape == (8, 16)
    assert keep.sum(dim=1).tolist() == [k] * 8


def test_random_draw_is_pinned():
    # (seed 0, ids [0, 1], N = 8, k = 3): a change of generator or algorithm shows up here
    keep = select_random(torch.zeros(2, 8), 3, torch.tensor([0, 1]), seed=0)
    assert _kept(keep[0]) == {2, 3, 4}
    assert _kept(keep[1]) == {1, 3, 7}


def test_random_image_keeps_its_selection_in_any_batch():
    n, k = 49, 10
    alone = select_random(torch.zeros(1, n), k, torch.tensor([42]), seed=3)
    small = select_random(torch.zeros(3, n), k, torch.tensor([7, 42, 1000]), seed=3)
    large_ids = torch.tensor([5, 6, 9, 11, 0, 42, 13, 2, 8])
    large = select_random(torch.rand(9, n), k, large_ids, seed=3)
    assert torch.equal(small[1], alone[0])
    assert torch.equal(large[5], alone[0])
    # the same id twice in one batch gets the same draw; its neighbours do not matter
    twice = select_random(torch.zeros(2, n), k, torch.tensor([42, 42]), seed=3)
    assert torch.equal(twice[0], alone[0]) and torch.equal(twice[1], alone[0])


def test_random_differs_across_ids_and_seeds():
    ids = torch.arange(6)
    base = select_random(torch.zeros(6, 64), 10, ids, seed=123)
    assert torch.equal(base, select_random(torch.zeros(6, 64), 10, ids, seed=123))
    assert len({tuple(row.tolist()) for row in base}) == 6
    other_seed = select_random(torch.zeros(6, 64), 10, ids, seed=456)
    assert all(not torch.equal(base[i], other_seed[i]) for i in range(6))


def test_random_ignores_scores_values():
    ids = torch.tensor([3, 1, 4])
    a = select_random(torch.rand(3, 20), 5, ids, seed=7)
    b = select_random(torch.zeros(3, 20), 5, ids, seed=7)
    assert torch.equal(a, b)


def test_random_smaller_k_is_a_subset_of_larger_k():
    ids = torch.tensor([10, 20])
    small = select_random(torch.zeros(2, 30), 4, ids, seed=1)
    large = select_random(torch.zeros(2, 30), 12, ids, seed=1)
    assert torch.equal(small & large, small)


def test_random_rejects_bad_image_ids():
    with pytest.raises(ValueError, match="shape"):
        select_random(torch.zeros(3, 8), 2, torch.arange(2), seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        select_random(torch.zeros(2, 8), 2, torch.tensor([0, -1]), seed=0)
    with pytest.raises(TypeError):
        select_random(torch.zeros(2, 8), 2, torch.Generator(), seed=0)
    with pytest.raises(ValueError, match="seed"):
        select_random(torch.zeros(2, 8), 2, torch.arange(2), seed=-1)


def test_random_via_select_patches_uses_int_of_threshold_and_ids():
    scores = torch.rand(2, 10)
    keep = select_patches(scores, "random", 3.9, torch.tensor([5, 9]), seed=2)
    assert keep.sum(dim=1).tolist() == [3, 3]
    assert torch.equal(keep, select_random(scores, 3, torch.tensor([5, 9]), seed=2))
    # without ids, images are numbered by batch position; the default seed is 0
    default = select_patches(torch.zeros(2, 8), "random", 3)
    assert _kept(default[0]) == {2, 3, 4} and _kept(default[1]) == {1, 3, 7}


# --- attention_threshold -----------------------------------------------------------------


def test_attention_threshold_keeps_scores_at_or_above_threshold():
    scores = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0625, 0.5, 0.25, 0.1875]])
    keep = select_attention_threshold(scores, 0.25)
    assert _kept(keep[0]) == {0, 1}  # 0.25 == th is kept
    assert _kept(keep[1]) == {1, 2}
    assert _kept(select_attention_threshold(scores, 0.125)[0]) == {0, 1, 2, 3}
    assert select_attention_threshold(scores, 0.75).sum() == 0
    assert torch.equal(select_patches(scores, "attention_threshold", 0.25), keep)


# --- attention_sum_threshold -------------------------------------------------------------


def test_sum_threshold_crossing_patch_is_not_kept():
    # sorted: 0.5 (c=0.5), 0.25 (c=0.75), 0.125 (c=0.875), 0.125 (c=1.0)
    scores = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    # th = 0.8: 0.5 and 0.25 stay below; the 0.125 reaching 0.875 crosses and is dropped
    assert _kept(select_attention_sum_threshold(scores, 0.8)[0]) == {1, 3}
    # th = 0.75 equals a cumulative sum exactly: that patch is kept
    assert _kept(select_attention_sum_threshold(scores, 0.75)[0]) == {1, 3}
    # th = 0.7: 0.25 brings the sum to 0.75 > 0.7, so only the top patch is kept
    assert _kept(select_attention_sum_threshold(scores, 0.7)[0]) == {1}


def test_sum_threshold_can_be_empty():
    scores = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25]])
    keep = select_attention_sum_threshold(scores, 0.4)
    assert keep.sum(dim=1).tolist() == [0, 0]
    assert select_attention_sum_threshold(scores, 0.0).sum() == 0
    assert torch.equal(select_patches(scores, "attention_sum_threshold", 0.4), keep)


def test_sum_threshold_one_keeps_all_on_exact_scores():
    scores = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]])
    assert select_attention_sum_threshold(scores, 1.0).all()
    assert select_patches(scores, "attention_sum_threshold", 1.0).all()


@pytest.mark.parametrize("num_patches", [49, 196])
def test_sum_threshold_one_keeps_all_on_softmax_rows(num_patches):
    # softmax rows as a ViT produces them; their float32 running sums may round above 1.0
    logits = 3 * torch.randn(64, num_patches, generator=torch.Generator().manual_seed(0))
    scores = torch.softmax(logits, dim=1)
    ranked = scores.sort(dim=1, descending=True, stable=True).values
    over = ranked.cumsum(dim=1)[:, -1] > 1.0
    assert int(over.sum()) >= 5  # rows on which the literal "cumsum <= 1" rule drops a tail
    keep = select_attention_sum_threshold(scores, 1.0)
    assert keep.sum(dim=1).tolist() == [num_patches] * 64
    assert select_patches(scores, "attention_sum_threshold", 1.0).all()


def test_sum_threshold_just_below_one_drops_the_crossing_patch():
    # running sums 0.5, 0.75, 0.875, 0.9375, 1.0; the tied 0.0625s keep patch order
    scores = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    assert _kept(select_attention_sum_threshold(scores, 0.999)[0]) == {0, 1, 2, 3}
    assert _kept(select_attention_sum_threshold(scores, 0.9375)[0]) == {0, 1, 2, 3}
    assert _kept(select_attention_sum_threshold(scores, 0.9374)[0]) == {0, 1, 2}


def test_sum_threshold_all_zero_scores():
    # cumulative sums are all 0 <= th, so an all-zero score row keeps every patch
    keep = select_attention_sum_threshold(torch.zeros(1, 4), 0.5)
    assert keep.all()


@pytest.mark.parametrize("seed", range(5))
def test_sum_threshold_matches_brute_force(seed):
    rng = random.Random(seed)
    batch, patches = 6, 12
    rows = []
    for _ in range(batch):
        # distinct dyadic weights so every partial sum is exact in float32
        weights = rng.sample(range(1, 64), patches)
        total = sum(weights)
        scale = 2 ** math.ceil(math.log2(total))
        rows.append([w / scale for w in weights])
    scores = torch.tensor(rows)
    for threshold in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0] + [rng.random() for _ in range(5)]:
        keep = select_attention_sum_threshold(scores, threshold)
        for row in range(batch):
            assert _kept(keep[row]) == _brute_force_sum_threshold(rows[row], threshold), (
                seed,
                threshold,
                row,
            )
        # also at thresholds equal to each exact cumulative sum (boundary included)
    for row in range(batch):
        ranked = sorted(rows[row], reverse=True)
        running = 0.0
        for position, value in enumerate(ranked):
            running += value
            keep = select_attention_sum_threshold(scores[row : row + 1], running)
            assert int(keep.sum()) == position + 1


# --- select_patches / validate_masking ----------------------------------------------------


def test_select_patches_topk_dispatch():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    assert _kept(select_patches(scores, "topk", 2)[0]) == {1, 3}
    assert _kept(select_patches(scores, "topk", 2.7)[0]) == {1, 3}


@pytest.mark.parametrize("mode", ["topk", "random"])
@pytest.mark.parametrize("threshold", [-1, -0.5])
def test_validate_masking_rejects_negative_k(mode, threshold):
    with pytest.raises(ValueError):
        validate_masking(mode, threshold, 10)


@pytest.mark.parametrize("mode", ["topk", "random"])
def test_validate_masking_k_versus_num_patches(mode):
    validate_masking(mode, 10, 10)
    validate_masking(mode, 0, 10)
    validate_masking(mode, 11, None)  # N unknown: nothing to compare with
    with pytest.raises(ValueError):
        validate_masking(mode, 11, 10)
    with pytest.raises(ValueError):
        select_patches(torch.rand(1, 4), mode, 5)


@pytest.mark.parametrize("delta", [-0.01, 1.01, 2.0])
def test_validate_masking_sum_threshold_outside_unit_interval(delta):
    with pytest.raises(ValueError):
        validate_masking("attention_sum_threshold", delta, 10)


@pytest.mark.parametrize("delta", [0.0, 0.5, 1.0])
def test_validate_masking_sum_threshold_accepts_unit_interval(delta):
    validate_masking("attention_sum_threshold", delta, 10)


def test_validate_masking_unknown_mode():
    with pytest.raises(ValueError, match="unknown masking mode"):
        validate_masking("top_k", 3, 10)
    with pytest.raises(ValueError):
        select_patches(torch.rand(1, 4), "bogus", 1)


@pytest.mark.parametrize("mode", MASKING_MODES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_validate_masking_non_finite(mode, value):
    with pytest.raises(ValueError):
        validate_masking(mode, value, 10)


def test_validate_masking_accepts_attention_threshold_values():
    validate_masking("attention_threshold", 0.0, 10)
    validate_masking("attention_threshold", 0.01, 10)


# --- selection_statistics ----------------------------------------------------------------


def test_selection_statistics_counts_min_sum():
    scores = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    keep = torch.tensor(
        [[True, True, False, False], [False, True, False, True], [False, False, False, False]]
    )
    counts, minimum, total = selection_statistics(scores, keep)
    assert counts.tolist() == [2, 2, 0]
    assert counts.dtype == torch.int64
    assert minimum[0].item() == 0.25
    assert minimum[1].item() == pytest.approx(0.2)
    assert math.isinf(minimum[2].item()) and minimum[2].item() > 0
    assert total[0].item() == 0.75
    assert total[1].item() == pytest.approx(0.6)
    assert total[2].item() == 0.0


def test_selection_statistics_consistent_with_policy():
    scores = torch.softmax(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    keep = select_patches(scores, "attention_sum_threshold", 0.6)
    counts, minimum, total = selection_statistics(scores, keep)
    assert (total <= 0.6 + 1e-6).all()
    for row in range(4):
        assert counts[row] == keep[row].sum()
        if counts[row]:
            assert minimum[row] == scores[row][keep[row]].min()


def test_object_recall_counts_the_kept_share_of_each_objects_patches():
    target = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert object_recall(keep, target).tolist() == [0.5, 1.0, 1.0]
    assert object_recall(torch.zeros_like(keep), target).tolist() == [0.0, 0.0, 1.0]
    # random selections of k patches recall k / N of the object on average
    scores = torch.rand(4000, 49)
    many = torch.rand(4000, 49) < 0.3
    kept = select_random(scores, 16, torch.arange(4000), seed=0)
    assert object_recall(kept, many).mean().item() == pytest.approx(16 / 49, abs=0.01)


def test_selection_composition_splits_the_kept_patches_three_ways():
    target = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    occupied = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    shares = selection_composition(keep, target, occupied)
    assert shares == pytest.approx({"object": 2 / 6, "clutter": 2 / 6, "blank": 2 / 6})
    empty = selection_composition(torch.zeros_like(keep), target, occupied)
    assert empty == {"object": 0.0, "clutter": 0.0, "blank": 0.0}


def test_pairwise_ranks_are_the_stable_sort_ranks_ties_nan_and_infinities_included():
    """The exported graph counts ranks pairwise; eager mode sorts: the same ranks."""
    from collabvit.algo.selection import descending_ranks, pairwise_descending_ranks

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for _ in range(50):
            scores = (torch.randint(0, 5, (4, 17), generator=generator) / 4).to(dtype)
            scores[0, 3] = scores[1, 5] = scores[1, 7] = float("nan")
            scores[1, 2], scores[2, 1], scores[2, 4] = float("inf"), -float("inf"), -0.0
            ranks = descending_ranks(scores)
            assert torch.equal(ranks, pairwise_descending_ranks(scores))
            assert torch.equal(ranks.sort(dim=1).values, torch.arange(17).expand(4, 17))


def test_topk_keeps_exactly_k_even_with_a_nan_score():
    scores = torch.tensor([[0.1, float("nan"), 0.3, 0.2]])
    keep = select_topk(scores, 2)
    assert keep.tolist() == [[False, True, True, False]]
