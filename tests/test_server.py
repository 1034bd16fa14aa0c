"""Server: ragged batches of selections, padding, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_vit

from collabvit.lite.protocol import PatchPayload, patchify
from collabvit.models import vit
from collabvit.models.server import Server, pack_payloads, plan_batches


@pytest.fixture(scope="module")
def server_model():
    return tiny_vit(depth=3, name="deit_tiny_distilled_patch16_224")


def uint8_images(batch, seed=0):
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


def random_payloads(images, sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    patches = patchify(images, (8, 8))
    payloads = []
    for i, size in enumerate(sizes):
        positions = torch.randperm(16, generator=generator)[:size]
        payloads.append(PatchPayload(positions, patches[i, positions]))
    return payloads


def test_all_patches_kept_equals_the_plain_model(server_model):
    images = uint8_images(4)
    server = Server(server_model)
    payloads = random_payloads(images, [16] * 4)  # every patch, in a shuffled order
    with torch.inference_mode():
        plain = server_model(server.normalization(images))
    torch.testing.assert_close(server.classify(payloads), plain, atol=1e-5, rtol=0)


def test_ragged_batch_equals_each_image_alone(server_model):
    sizes = [16, 1, 9, 0, 5, 12, 3, 16]
    images = uint8_images(len(sizes), seed=1)
    payloads = random_payloads(images, sizes, seed=2)
    server = Server(server_model, max_batch=64, max_padding=float("inf"))  # one padded forward
    batched = server.classify(payloads)
    alone = torch.cat([server.classify([p]) for p in payloads])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # results come back in payload order whatever the internal sorting and chunking
    chunked = Server(server_model, max_batch=3, max_padding=float("inf")).classify(payloads)
    torch.testing.assert_close(chunked, batched, atol=1e-5, rtol=0)


def test_empty_selection_sees_only_the_prefix_tokens(server_model):
    server = Server(server_model)
    empty = PatchPayload(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    )
    logits = server.classify([empty])
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    with torch.inference_mode():
        prefix_only = server_model.forward_head(
            server_model.norm(server_model.blocks(torch.cat(
                [server_model.cls_token + server_model.pos_embed[:, :1],
                 server_model.dist_token + server_model.pos_embed[:, 1:2]], dim=1)))
        )  # fmt: skip
    torch.testing.assert_close(logits, prefix_only, atol=1e-5, rtol=0)
    # and the same inside a ragged batch with a full image
    full = random_payloads(uint8_images(1), [16])[0]
    torch.testing.assert_close(server.classify([full, empty])[1:], logits, atol=1e-5, rtol=0)


def test_payload_of_float_pixels_matches_uint8(server_model):
    images = uint8_images(2, seed=3)
    server = Server(server_model)
    as_uint8 = random_payloads(images, [6, 10], seed=4)
    as_float = [PatchPayload(p.positions, p.patches.astype(np.float32) / 255) for p in as_uint8]
    assert all(p.patches.dtype == np.float32 for p in as_float)
    torch.testing.assert_close(
        server.classify(as_float), server.classify(as_uint8), atol=1e-5, rtol=0
    )


def test_bad_payloads_are_rejected(server_model):
    server = Server(server_model)
    good = random_payloads(uint8_images(1), [4])[0]
    with pytest.raises(ValueError, match="shape"):
        server.classify([PatchPayload(good.positions, good.patches[:, :, :4])])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        server.classify([PatchPayload(good.positions + 16, good.patches)])


def test_pack_payloads_pads_and_marks_validity():
    payloads = random_payloads(uint8_images(2), [3, 1])
    patches, positions, valid = pack_payloads(payloads, torch.device("cpu"))
    assert patches.shape == (2, 3, 3, 8, 8) and patches.dtype == torch.uint8
    assert positions.shape == (2, 3) and positions.dtype == torch.int64
    assert valid.dtype == torch.bool
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(positions[1, :1], torch.from_numpy(payloads[1].positions))
    assert torch.equal(patches[0], torch.from_numpy(payloads[0].patches))
    assert torch.equal(patches[1, :1], torch.from_numpy(payloads[1].patches))
    assert not patches[1, 1:].any() and not positions[1, 1:].any()  # zeros where padded
    # uint8 and float32 payloads together: all floats in [0, 1]
    halves = PatchPayload(payloads[1].positions, payloads[1].patches.astype(np.float32) / 2)
    patches, _, _ = pack_payloads([payloads[0], halves], torch.device("cpu"))
    assert patches.dtype == torch.float32
    assert torch.equal(patches[0], torch.from_numpy(payloads[0].patches).float() / 255)
    assert torch.equal(patches[1, :1], torch.from_numpy(halves.patches))


def test_server_rejects_models_it_cannot_serve():
    with pytest.raises(vit.ModelError, match="class-token pooling"):
        Server(tiny_vit(global_pool="avg"))


def test_plan_batches_bounds_padding_and_covers_everything():
    sizes = [196, 100, 101, 150, 0, 3, 120, 196, 130, 99]
    groups = plan_batches(sizes, max_batch=4, prefix_tokens=1, max_padding=1.1)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for group in groups:
        assert 1 <= len(group) <= 4
        tokens = [sizes[i] + 1 for i in group]
        assert tokens == sorted(tokens)
        assert len(group) * max(tokens) <= 1.1 * sum(tokens) or len(group) == 1
    # equal sizes pack fully; wildly different ones never share a forward
    assert plan_batches([10] * 9, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert plan_batches([0, 196], 4, 1) == [[0], [1]]


def test_uint8_and_float_payloads_in_one_batch_are_both_read_right(server_model):
    """Pixels of both kinds meet in one padded forward when requests are batched together."""
    images = uint8_images(2, seed=5)
    server = Server(server_model, max_batch=64, max_padding=float("inf"))
    as_uint8 = random_payloads(images, [9, 12], seed=6)
    as_float = PatchPayload(as_uint8[1].positions, as_uint8[1].patches.astype(np.float32) / 255)
    assert as_float.patches.dtype == np.float32
    mixed = [as_uint8[0], as_float]
    alone = torch.cat([server.classify([p]) for p in as_uint8])
    for batch in (mixed, mixed[::-1]):
        expected = alone if batch is mixed else alone.flip(0)
        torch.testing.assert_close(server.classify(batch), expected, atol=1e-5, rtol=0)
