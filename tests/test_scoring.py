"""Tests for collabvit.scoring (DESIGN.md section 1, "Attention scores")."""

from __future__ import annotations

import math

import pytest
import torch

from collabvit.scoring import (
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


def _reference_rollout(attentions: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Explicit full-matrix rollout: R = (A_L + I) ... (A_1 + I) per head, no renormalisation."""
    tokens = attentions[0].shape[-1]
    eye = torch.eye(tokens, dtype=attentions[0].dtype)
    rollout = None
    for attention in attentions:  # forward order: each later block multiplies from the left
        augmented = attention + eye
        rollout = augmented if rollout is None else augmented @ rollout
    raw = rollout[:, :, 0, prefix:].mean(dim=1)
    return raw / raw.sum(dim=-1, keepdim=True)


# --- attention_probabilities -------------------------------------------------------------


def test_attention_probabilities_matches_explicit_softmax_and_rows_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    scale = 1.0 / math.sqrt(4)
    probs = attention_probabilities(q, k, scale)
    assert probs.shape == (2, 3, 5, 5)
    expected = torch.softmax(torch.einsum("bhtd,bhsd->bhts", q, k) * scale, dim=-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert (probs >= 0).all()


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
    # logits of row 0: [1 * 2 * 0.5, 0] = [1, 0]
    expected = torch.tensor([math.e, 1.0]) / (math.e + 1.0)
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
    expected = torch.tensor([[0.2, 0.15, 0.35]]) / 0.7
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
    attentions = _random_softmax_maps(depth, batch=3, heads=4, tokens=prefix + 6, seed=depth)
    out = rollout_scores(attentions, prefix)
    expected = _reference_rollout(attentions, prefix)
    assert out.shape == (3, 6)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(3, dtype=out.dtype))


@pytest.mark.parametrize("prefix", [1, 2])
def test_rollout_scores_single_block(prefix):
    attentions = _random_softmax_maps(1, batch=2, heads=3, tokens=prefix + 5, seed=11)
    out = rollout_scores(attentions, prefix)
    torch.testing.assert_close(out, _reference_rollout(attentions, prefix))
    # With one block, the identity only touches the class token's own column, so the
    # patch scores equal the `mean` mode on the same map.
    torch.testing.assert_close(out, mean_scores(attentions[0][:, :, 0], prefix))


def test_rollout_scores_block_order_matters():
    # A non-commuting pair: the reference multiplies the later block on the left.
    attentions = _random_softmax_maps(2, batch=1, heads=2, tokens=5, seed=5)
    forward = rollout_scores(attentions, 1)
    assert not torch.allclose(forward, _reference_rollout(attentions[::-1], 1))
    torch.testing.assert_close(forward, _reference_rollout(attentions, 1))


def test_rollout_scores_is_per_head_not_head_averaged():
    # Per-head products then mean differ from the product of head-averaged maps.
    attentions = _random_softmax_maps(3, batch=1, heads=4, tokens=6, seed=9)
    eye = torch.eye(6, dtype=torch.float64)
    averaged = None
    for attention in attentions:
        augmented = attention.mean(dim=1) + eye
        averaged = augmented if averaged is None else augmented @ averaged
    raw = averaged[:, 0, 1:]
    head_averaged = raw / raw.sum(dim=-1, keepdim=True)
    out = rollout_scores(attentions, 1)
    assert not torch.allclose(out, head_averaged)


def test_rollout_scores_empty_list_raises():
    with pytest.raises(ValueError):
        rollout_scores([], 1)


def test_rollout_scores_does_not_modify_inputs():
    attentions = _random_softmax_maps(3, batch=2, heads=2, tokens=5, seed=4)
    copies = [a.clone() for a in attentions]
    rollout_scores(attentions, 1)
    for original, copy in zip(attentions, copies, strict=True):
        assert torch.equal(original, copy)
