"""Half precision and bfloat16 models: float32 in, float32 scores and logits out."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vit

from collabvit.lite.protocol import patchify
from collabvit.models import vit
from collabvit.models.edge import EdgeConfig, EdgeDevice
from collabvit.models.server import Server

# loose: float16 keeps ~3 significant digits, bfloat16 ~2
LOGIT_ATOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def model():
    return tiny_vit(reg_tokens=2)


def images(batch=4, seed=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def uint8_images(batch, seed=0):
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", ["mean", "rollout"])
def test_edge_forward_of_a_low_precision_model(model, dtype, mode):
    low = copy.deepcopy(model).to(dtype)
    x = images()
    with torch.inference_mode():
        logits, scores = vit.forward_with_scores(low, x, mode)
        want_logits, want_scores = vit.forward_with_scores(model, x, mode)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=LOGIT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-2, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "rollout"])
def test_edge_scores_stay_float32_under_autocast(model, mode):
    x = images()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, scores = vit.forward_with_scores(model, x, mode)
    with torch.inference_mode():
        want_logits, want_scores = vit.forward_with_scores(model, x, mode)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=LOGIT_ATOL[torch.bfloat16], rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_server_forward_on_all_patches_equals_the_model_in_its_dtype(model, dtype):
    low = copy.deepcopy(model).to(dtype)
    x = images()
    with torch.inference_mode():
        subset = vit.forward_selected(low, patchify(x, (8, 8)), torch.arange(16).expand(4, -1))
        plain = low(x.to(dtype))
    assert subset.dtype == torch.float32
    torch.testing.assert_close(subset, plain.float(), atol=LOGIT_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fused", [False, True])
def test_low_precision_ragged_batch_equals_each_image_alone(model, dtype, fused):
    low = copy.deepcopy(model).to(dtype)
    for block in low.blocks:
        block.attn.fused_attn = fused
    every = patchify(images(batch=3), (8, 8))
    sizes = [16, 5, 2]
    positions = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))
                             for i in range(3)])  # fmt: skip
    patches = every[torch.arange(3)[:, None], positions]
    valid = torch.arange(16)[None, :] < torch.tensor(sizes)[:, None]
    with torch.inference_mode():
        batched = vit.forward_selected(low, patches, positions, valid)
        alone = torch.cat([
            vit.forward_selected(low, patches[i : i + 1, :n], positions[i : i + 1, :n])
            for i, n in enumerate(sizes)
        ])  # fmt: skip
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=LOGIT_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_edge_device_and_server_run_low_precision_models(model, dtype):
    config = EdgeConfig(masking_mode="topk", masking_th=6, uncer_mode="none")
    pixels = uint8_images(5)
    reference = EdgeDevice(model, config).process(pixels)
    low_edge = EdgeDevice(copy.deepcopy(model).to(dtype), config).process(pixels)
    assert low_edge.logits.dtype == torch.float32 and low_edge.scores.dtype == torch.float32
    torch.testing.assert_close(low_edge.logits, reference.logits, atol=LOGIT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(low_edge.scores.sum(dim=1), torch.ones(5), atol=1e-6, rtol=0)
    assert len(low_edge.payloads) == 5  # no gate: every image is sent
    # the same payloads through a float32 and a low precision server
    server_model = tiny_vit(name="deit_tiny_distilled_patch16_224")
    want = Server(server_model).classify(reference.payloads)
    got = Server(copy.deepcopy(server_model).to(dtype)).classify(reference.payloads)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL[dtype], rtol=0)
