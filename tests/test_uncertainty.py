"""Tests for collabvit.algo.uncertainty (DESIGN.md section 1, the transmission gate)."""

from __future__ import annotations

import math

import pytest
import torch

from collabvit.algo.uncertainty import (
    UNCERTAINTY_MODES,
    canonical_uncertainty_mode,
    is_confident,
    margin,
    min_entropy,
    shannon_entropy,
    uncertainty,
)

NEG_INF = -math.inf


def _logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is the given rows (log p, with log 0 = -inf)."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


# --- measures ----------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3, 10, 1000])
def test_shannon_entropy_uniform_is_log2_classes(classes):
    logits = torch.full((3, classes), 0.7)
    out = shannon_entropy(logits)
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.full((3,), math.log2(classes)), rtol=1e-5, atol=1e-5)


def test_shannon_entropy_one_hot_is_zero_without_nan():
    logits = torch.tensor([[0.0, NEG_INF, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, 5.0, NEG_INF]])
    out = shannon_entropy(logits)
    assert not torch.isnan(out).any()
    assert out.abs().max().item() == 0.0
    # a very peaked but finite distribution is close to 0, also without NaN
    peaked = shannon_entropy(torch.tensor([[1000.0, 0.0, 0.0]]))
    assert not torch.isnan(peaked).any() and peaked.item() == pytest.approx(0.0, abs=1e-6)


def test_shannon_entropy_hand_computed_in_bits():
    probs = [[0.5, 0.25, 0.125, 0.125], [0.7, 0.2, 0.1, 0.0]]
    # row 0: 1/2 * 1 + 1/4 * 2 + 2 * (1/8 * 3) = 1.75 bits exactly
    # row 1: 0.7 log2(10/7) + 0.2 log2(5) + 0.1 log2(10), the 0 class adding nothing
    expected = [1.75, 1.1567796494470395]
    out = shannon_entropy(_logits_for(probs))
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    assert out[0].item() == pytest.approx(1.75, abs=1e-6)


def test_shannon_entropy_is_shift_invariant():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shannon_entropy(logits), shannon_entropy(logits + 12.5))


def test_min_entropy_is_minus_log2_max_probability():
    probs = [[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    out = min_entropy(_logits_for(probs))
    # max p = 1/2, 0.4, 1/4: 1 bit, log2(5/2) bits, 2 bits
    expected = [1.0, 1.3219280948873622, 2.0]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    one_hot = min_entropy(torch.tensor([[NEG_INF, 3.0, NEG_INF]]))
    assert not torch.isnan(one_hot).any() and one_hot.item() == 0.0


def test_min_entropy_not_above_shannon_entropy():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(1)) * 3
    assert (min_entropy(logits) <= shannon_entropy(logits) + 1e-5).all()


def test_margin_is_gap_between_two_largest_probabilities():
    probs = [[0.125, 0.5, 0.25, 0.125], [0.3, 0.3, 0.4, 0.0], [0.25, 0.25, 0.25, 0.25]]
    out = margin(_logits_for(probs))
    assert out.tolist() == pytest.approx([0.25, 0.1, 0.0], abs=1e-6)
    assert margin(torch.tensor([[NEG_INF, 0.0, NEG_INF]])).item() == 1.0


def test_uncertainty_dispatch():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(uncertainty(logits, "shannon_entropy"), shannon_entropy(logits))
    assert torch.equal(uncertainty(logits, "min_entropy"), min_entropy(logits))
    assert torch.equal(uncertainty(logits, "margin"), margin(logits))
    with pytest.raises(ValueError):
        uncertainty(logits, "none")


# --- the gate ----------------------------------------------------------------------------


def test_is_confident_entropy_direction():
    # low entropy (peaked) is confident, high entropy (uniform) is not
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for mode in ("shannon_entropy", "min_entropy"):
        assert is_confident(logits, mode, 1.0).tolist() == [True, False]


def test_is_confident_margin_direction():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert is_confident(logits, "margin", 0.5).tolist() == [True, False]


def test_is_confident_entropy_equality_is_not_confident():
    # one-hot: both entropies are exactly 0, and 0 < 0 is false
    one_hot = torch.tensor([[0.0, NEG_INF, NEG_INF]])
    for mode in ("shannon_entropy", "min_entropy"):
        assert not is_confident(one_hot, mode, 0.0).item()
        assert is_confident(one_hot, mode, 0.5).item()


def test_is_confident_margin_equality_is_not_confident():
    one_hot = torch.tensor([[0.0, NEG_INF, NEG_INF]])  # margin exactly 1
    assert not is_confident(one_hot, "margin", 1.0).item()
    assert is_confident(one_hot, "margin", 0.5).item()
    tie = torch.tensor([[0.0, 0.0, NEG_INF]])  # p = (0.5, 0.5, 0): margin exactly 0
    assert not is_confident(tie, "margin", 0.0).item()
    assert is_confident(tie, "margin", -0.25).item()
    # for arbitrary logits, put eta exactly on the computed margin
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    values = margin(logits)
    for row in range(5):
        eta = float(values[row])
        assert not is_confident(logits[row : row + 1], "margin", eta).item()


@pytest.mark.parametrize("mode", ["shannon_entropy", "min_entropy"])
def test_is_confident_entropy_boundary_from_computed_value(mode):
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    values = uncertainty(logits, mode)
    for row in range(5):
        eta = float(values[row])
        assert not is_confident(logits[row : row + 1], mode, eta).item()
        assert is_confident(logits[row : row + 1], mode, eta + 1e-3).item()


def test_is_confident_uniform_two_classes_boundary():
    # p = (0.5, 0.5): Shannon and min-entropy are 1 bit
    uniform = torch.zeros(1, 2)
    for mode in ("shannon_entropy", "min_entropy"):
        value = float(uncertainty(uniform, mode))
        assert value == pytest.approx(1.0, abs=1e-6)
        assert not is_confident(uniform, mode, value).item()
        assert is_confident(uniform, mode, 1.0 + 1e-3).item()
        assert not is_confident(uniform, mode, 1.0 - 1e-3).item()


@pytest.mark.parametrize("mode", ["none", "", None])
def test_no_gate_means_no_image_is_confident(mode):
    logits = torch.tensor([[100.0, 0.0], [0.0, NEG_INF], [0.0, 0.0]])
    out = is_confident(logits, mode, 1e9)
    assert out.dtype == torch.bool
    assert out.tolist() == [False, False, False]
    assert canonical_uncertainty_mode(mode) == "none"


def test_is_confident_returns_bool_per_image():
    logits = torch.randn(7, 4)
    for mode in ("shannon_entropy", "min_entropy", "margin"):
        out = is_confident(logits, mode, 0.5)
        assert out.dtype == torch.bool and out.shape == (7,)


@pytest.mark.parametrize("mode", ["entropy", "Shannon_Entropy", "max_prob", "random"])
def test_unknown_mode_raises(mode):
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown uncertainty mode"):
        is_confident(logits, mode, 1.0)
    with pytest.raises(ValueError):
        canonical_uncertainty_mode(mode)


def test_known_modes_are_canonical():
    for mode in UNCERTAINTY_MODES:
        assert canonical_uncertainty_mode(mode) == mode
