"""Tests for collabvit.algo.scoring (DESIGN.md section 1, "Attention scores")."""

from __future__ import annotations

import math

import pytest
import torch

from collabvit.algo.scoring import (
    attention_probabilities,
    mean_scores,
    normalize_scores,
    rollout_scores,
)


def _random_softmax_maps(
    depth: int, batch: int, heads: int, tokens: int, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            3.0
            * torch.randn(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64)
        ).softmax(dim=-1)
        for _ in range(depth)
    ]


# Five hand-made blocks of one image, 2 heads, T = 4 tokens, entries in quarters (each row
# sums to 4). Block b is _QUARTERS[b] / 4; the expected rollout scores below are the exact
# rational values of row 0 of R = (A_L + I) ... (A_1 + I) per head, head mean over the
# patch columns, divided by its sum.
_QUARTERS = [
    [
        [[2, 1, 1, 0], [0, 4, 0, 0], [1, 0, 2, 1], [0, 0, 0, 4]],
        [[0, 0, 1, 3], [1, 1, 1, 1], [0, 2, 0, 2], [3, 0, 0, 1]],
    ],
    [
        [[1, 3, 0, 0], [0, 0, 4, 0], [2, 0, 0, 2], [1, 1, 1, 1]],
        [[4, 0, 0, 0], [0, 1, 3, 0], [0, 0, 1, 3], [2, 2, 0, 0]],
    ],
    [
        [[0, 2, 2, 0], [1, 0, 0, 3], [0, 4, 0, 0], [0, 1, 2, 1]],
        [[1, 1, 0, 2], [0, 0, 2, 2], [3, 1, 0, 0], [0, 0, 4, 0]],
    ],
    [
        [[2, 0, 0, 2], [0, 1, 1, 2], [4, 0, 0, 0], [0, 3, 1, 0]],
        [[0, 1, 2, 1], [2, 0, 2, 0], [0, 0, 0, 4], [1, 2, 0, 1]],
    ],
    [
        [[1, 0, 3, 0], [0, 2, 0, 2], [1, 1, 1, 1], [0, 0, 2, 2]],
        [[3, 0, 0, 1], [0, 0, 0, 4], [0, 3, 1, 0], [1, 0, 1, 2]],
    ],
]

# (depth, prefix) -> scores of the first `depth` blocks. Depth 2, prefix 1, written out:
# head 0: [5/4, 3/4, 0, 0] @ (A_1 + I) = [15/8, 29/16, 5/16, 0]
# head 1: [2, 0, 0, 0] @ (A_1 + I) = [2, 0, 1/2, 3/2]
# patch columns of the head mean, in sixteenths: [29, 13, 24] / 2, over their sum 66 / 2.
_ROLLOUT_EXPECTED = {
    (1, 1): [1 / 6, 1 / 3, 1 / 2],
    (1, 2): [2 / 5, 3 / 5],
    (2, 1): [29 / 66, 13 / 66, 4 / 11],
    (2, 2): [13 / 37, 24 / 37],
    (3, 1): [47 / 131, 37 / 131, 47 / 131],
    (3, 2): [37 / 84, 47 / 84],
    (5, 1): [15079 / 46941, 4775 / 15647, 17537 / 46941],
    (5, 2): [14325 / 31862, 17537 / 31862],
}


def _hand_blocks(depth: int) -> list[torch.Tensor]:
    """The first `depth` hand-made blocks, each [1, 2, 4, 4] float64."""
    return [
        torch.tensor(_QUARTERS[block], dtype=torch.float64).unsqueeze(0) / 4
        for block in range(depth)
    ]


def _scores(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


# --- attention_probabilities -------------------------------------------------------------


def test_attention_probabilities_matches_explicit_softmax_and_rows_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    scale = 1.0 / math.sqrt(4)
    probs = attention_probabilities(q, k, scale)
    assert probs.shape == (2, 3, 5, 5)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert (probs >= 0).all()
    # hand-made [1, 2, 3, 4]: head 0 has scaled logits q k^T / 2 = [[0, 1, 0], [0, 0, 1],
    # [0, 1, 1]]; head 1 has zero queries, so every logit is 0
    q = torch.tensor(
        [[[[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], [[0, 0, 0, 0]] * 3]], dtype=torch.float64
    )
    k = torch.tensor(
        [[[[0, 0, 0, 0], [2, 0, 0, 0], [0, 2, 0, 0]], [[1, 2, 3, 4]] * 3]], dtype=torch.float64
    )
    probs = attention_probabilities(q, k, scale)
    # softmax([0, 1, 0]) = [1, e, 1] / (2 + e); softmax([0, 1, 1]) = [1, e, e] / (1 + 2e)
    a, b = 0.21194155761708547, 0.5761168847658291
    c, d = 0.15536240349696362, 0.4223187982515182
    expected = torch.tensor(
        [[[[a, b, a], [a, a, b], [c, d, d]], [[1 / 3, 1 / 3, 1 / 3]] * 3]], dtype=torch.float64
    )
    torch.testing.assert_close(probs, expected)


def test_attention_probabilities_class_row_equals_row_zero_of_full_map():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 7, 8, generator=generator)
    k = torch.randn(2, 4, 7, 8, generator=generator)
    full = attention_probabilities(q, k, 0.125)
    row = attention_probabilities(q, k, 0.125, rows=slice(0, 1))
    assert row.shape == (2, 4, 1, 7)
    torch.testing.assert_close(row[:, :, 0], full[:, :, 0])
    torch.testing.assert_close(row.sum(dim=-1), torch.ones(2, 4, 1))


def test_attention_probabilities_uses_scale():
    q = torch.tensor([[[[1.0], [0.0]]]])  # [1, 1, 2, 1]
    k = torch.tensor([[[[2.0], [0.0]]]])
    probs = attention_probabilities(q, k, 0.5, rows=slice(0, 1))
    # logits of row 0: [1 * 2 * 0.5, 0] = [1, 0]; softmax = [e, 1] / (e + 1)
    expected = torch.tensor([0.7310585786300049, 0.2689414213699951])
    torch.testing.assert_close(probs[0, 0, 0], expected)


# --- normalize_scores --------------------------------------------------------------------


def test_normalize_scores_rows_sum_to_one_and_zero_rows_stay_zero():
    raw = torch.tensor([[1.0, 3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    out = normalize_scores(raw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[0], torch.tensor([0.125, 0.375, 0.0, 0.5]))
    assert torch.equal(out[1], torch.zeros(4))
    torch.testing.assert_close(out[2], torch.full((4,), 0.25))
    torch.testing.assert_close(out[[0, 2]].sum(dim=-1), torch.ones(2))


def test_normalize_scores_random_rows_sum_to_one():
    raw = torch.rand(6, 10, generator=torch.Generator().manual_seed(3))
    out = normalize_scores(raw)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(6))
    torch.testing.assert_close(out * raw.sum(dim=-1, keepdim=True), raw)


def test_normalize_scores_all_zero_batch_has_no_nan():
    out = normalize_scores(torch.zeros(3, 5))
    assert torch.equal(out, torch.zeros(3, 5))


# --- mean_scores -------------------------------------------------------------------------


def test_mean_scores_prefix_one_hand_computed():
    # B = 1, H = 2, T = 4 (class token + 3 patches)
    class_row = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.2, 0.1, 0.1, 0.6]]])
    # head mean over patches: [0.2, 0.15, 0.35], sum 0.7
    expected = torch.tensor([[2 / 7, 3 / 14, 1 / 2]])
    out = mean_scores(class_row, 1)
    assert out.shape == (1, 3)
    torch.testing.assert_close(out, expected)


def test_mean_scores_prefix_two_drops_distillation_token():
    # T = 5 (class + distillation token + 3 patches)
    class_row = torch.tensor(
        [
            [[0.1, 0.5, 0.1, 0.1, 0.2], [0.3, 0.1, 0.2, 0.0, 0.4]],
            [[0.2, 0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]],
        ]
    )
    out = mean_scores(class_row, 2)
    assert out.shape == (2, 3)
    # image 0: head mean of patches [0.15, 0.05, 0.3], sum 0.5
    torch.testing.assert_close(out[0], torch.tensor([0.3, 0.1, 0.6]))
    torch.testing.assert_close(out[1], torch.full((3,), 1.0 / 3.0))


def test_mean_scores_zero_patch_attention_stays_zero():
    class_row = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    out = mean_scores(class_row, 1)
    assert torch.equal(out, torch.zeros(1, 2))


# --- rollout_scores ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize("prefix", [1, 2])
def test_rollout_scores_matches_full_matrix_reference(depth, prefix):
    image = torch.cat(_hand_blocks(5))  # [5, 2, 4, 4]: the blocks as a batch axis
    # image 1: image 0 with tokens 2 and 3 swapped, which swaps their scores
    swap = [0, 1, 3, 2]
    attentions = [
        torch.stack([image[block], image[block][:, swap][:, :, swap]]) for block in range(depth)
    ]
    out = rollout_scores(attentions, prefix)
    expected = _ROLLOUT_EXPECTED[(depth, prefix)]
    swapped = expected[:-2] + [expected[-1], expected[-2]]
    assert out.shape == (2, 4 - prefix)
    torch.testing.assert_close(out, torch.tensor([expected, swapped], dtype=torch.float64))
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(2, dtype=out.dtype))


@pytest.mark.parametrize("prefix", [1, 2])
def test_rollout_scores_single_block(prefix):
    attentions = _hand_blocks(1)
    out = rollout_scores(attentions, prefix)
    torch.testing.assert_close(out, _scores(_ROLLOUT_EXPECTED[(1, prefix)]))
    # With one block, the identity only touches the class token's own column, so the
    # patch scores equal the `mean` mode on the same map.
    torch.testing.assert_close(out, mean_scores(attentions[0][:, :, 0], prefix))


def test_rollout_scores_block_order_matters():
    # A non-commuting pair: the later block multiplies on the left.
    attentions = _hand_blocks(2)
    forward = rollout_scores(attentions, 1)
    # the product in the other order, (A_1 + I)(A_2 + I), exactly
    reversed_order = _scores([14 / 29, 13 / 58, 17 / 58])
    assert not torch.allclose(forward, reversed_order)
    torch.testing.assert_close(forward, _scores(_ROLLOUT_EXPECTED[(2, 1)]))
    torch.testing.assert_close(rollout_scores(attentions[::-1], 1), reversed_order)


def test_rollout_scores_is_per_head_not_head_averaged():
    # Per-head products then mean differ from the product of head-averaged maps.
    attentions = _hand_blocks(3)
    # rollout of the head-averaged maps of the same three blocks, exactly
    head_averaged = _scores([989 / 2641, 724 / 2641, 928 / 2641])
    out = rollout_scores(attentions, 1)
    assert not torch.allclose(out, head_averaged)
    torch.testing.assert_close(out, _scores(_ROLLOUT_EXPECTED[(3, 1)]))


def test_rollout_scores_empty_list_raises():
    with pytest.raises(ValueError):
        rollout_scores([], 1)


def test_rollout_scores_does_not_modify_inputs():
    attentions = _random_softmax_maps(3, batch=2, heads=2, tokens=5, seed=4)
    copies = [a.clone() for a in attentions]
    rollout_scores(attentions, 1)
    for original, copy in zip(attentions, copies, strict=True):
        assert torch.equal(original, copy)
