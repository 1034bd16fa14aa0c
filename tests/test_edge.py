"""EdgeDevice: gate, selection and payloads; EdgeConfig validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_vit

from collabvit.lite.protocol import patchify
from collabvit.models.edge import EdgeConfig, EdgeDevice


@pytest.fixture(scope="module")
def edge_model():
    return tiny_vit()


def uint8_images(batch, seed=0):
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_mode="max"), "attention mode"),
        (dict(masking_mode="best"), "masking mode"),
        (dict(masking_mode="topk", masking_th=-1), "k must be >= 0"),
        (dict(masking_mode="attention_sum_threshold", masking_th=1.5), r"\[0, 1\]"),
        (dict(uncer_mode="variance"), "uncertainty mode"),
        (dict(uncer_th=float("nan")), "number"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EdgeConfig(**kwargs)


def test_config_accepts_the_reference_spelling_of_no_gate():
    assert EdgeConfig(uncer_mode="").uncer_mode == "none"


def test_k_larger_than_the_patch_grid_is_rejected(edge_model):
    with pytest.raises(ValueError, match="only 16"):
        EdgeDevice(edge_model, EdgeConfig(masking_mode="topk", masking_th=17))


def test_payloads_carry_the_selected_pixels_of_the_sent_images(edge_model):
    images = uint8_images(6)
    edge = EdgeDevice(edge_model, EdgeConfig(masking_mode="topk", masking_th=5,
                                             uncer_mode="margin", uncer_th=0.01))  # fmt: skip
    result = edge.process(images)
    sent = torch.nonzero(result.sent).flatten().tolist()
    assert 0 < len(sent) < 6, "pick a threshold that splits this batch"
    assert len(result.payloads) == len(sent)
    patches = patchify(images, (8, 8))
    for image, payload in zip(sent, result.payloads, strict=True):
        assert payload.patches.dtype == np.uint8  # shipped losslessly, unnormalised
        assert payload.positions.dtype == np.int64
        assert set(payload.positions.tolist()) == set(
            torch.nonzero(result.keep[image]).flatten().tolist()
        )
        assert payload.size == 5
        assert np.array_equal(payload.patches,
                              patches[image, torch.from_numpy(payload.positions)].numpy())
        top5 = result.scores[image].topk(5).indices
        assert set(top5.tolist()) == set(payload.positions.tolist())


def test_no_gate_sends_everything(edge_model):
    edge = EdgeDevice(edge_model, EdgeConfig(uncer_mode="none"))
    result = edge.process(uint8_images(4))
    assert result.sent.all() and len(result.payloads) == 4


def test_random_policy_draws_per_image_from_seed_and_index(edge_model):
    edge = EdgeDevice(
        edge_model, EdgeConfig(masking_mode="random", masking_th=4, uncer_mode="none")
    )
    images = uint8_images(3)
    ids = torch.tensor([10, 11, 12])
    first = edge.process(images, ids, seed=7).keep
    again = edge.process(images, ids, seed=7).keep
    other = edge.process(images, ids, seed=8).keep
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.sum(dim=1).tolist() == [4, 4, 4]
    # An image's patches do not depend on the batch it is in.
    alone = edge.process(images[1:2], ids[1:2], seed=7).keep
    assert torch.equal(alone[0], first[1])


def test_inputs_outside_the_contract_are_rejected(edge_model):
    edge = EdgeDevice(edge_model, EdgeConfig())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        edge.process(uint8_images(2).float())  # 0..255 floats
    with pytest.raises(ValueError):
        edge.process(uint8_images(2).long())


def test_images_of_the_wrong_size_are_rejected(edge_model):
    edge = EdgeDevice(edge_model, EdgeConfig())
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        edge.process(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
