"""Tests for collabvit.protocol: patchify and PatchPayload validation."""

from __future__ import annotations

import pytest
import torch

from collabvit.protocol import PatchPayload, patchify


@pytest.mark.parametrize(
    ("channels", "height", "width", "patch"),
    [(3, 8, 12, 4), (1, 28, 28, 7), (3, 32, 32, 16), (2, 6, 6, 1)],
)
def test_patchify_row_major_order(channels, height, width, patch):
    image = torch.arange(channels * height * width).reshape(1, channels, height, width)
    patches = patchify(image, (patch, patch))
    columns = width // patch
    count = (height // patch) * columns
    assert patches.shape == (1, count, channels, patch, patch)
    for n in range(count):
        r, c = divmod(n, columns)
        expected = image[0, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
        assert torch.equal(patches[0, n], expected), n


def test_patchify_rectangular_patches_and_batch():
    images = torch.randint(0, 256, (3, 2, 6, 8), dtype=torch.uint8)
    patches = patchify(images, (3, 2))
    assert patches.shape == (3, 8, 2, 3, 2)
    assert patches.dtype == torch.uint8
    for b in range(3):
        for n in range(8):
            r, c = divmod(n, 4)
            assert torch.equal(
                patches[b, n], images[b, :, r * 3 : (r + 1) * 3, c * 2 : (c + 1) * 2]
            )


def test_patchify_first_patch_is_top_left_and_second_is_to_its_right():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 2] = 1.0  # in the top-right patch of a 2 x 2 grid
    image[0, 0, 2, 0] = 2.0  # in the bottom-left patch
    patches = patchify(image, (2, 2))
    assert patches[0, 1].sum() == 1.0
    assert patches[0, 2].sum() == 2.0
    assert patches[0, 0].sum() == 0.0 and patches[0, 3].sum() == 0.0


@pytest.mark.parametrize(("height", "width"), [(10, 12), (12, 10), (7, 7)])
def test_patchify_non_multiple_sizes_raise(height, width):
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 3, height, width), (4, 4))


# --- PatchPayload ------------------------------------------------------------------------


def _payload(positions, channels=3, patch=(4, 4), dtype=torch.uint8) -> PatchPayload:
    positions = torch.as_tensor(positions, dtype=torch.int64)
    patches = torch.zeros(len(positions), channels, *patch, dtype=dtype)
    return PatchPayload(positions=positions, patches=patches)


def test_payload_validate_accepts_good_payload():
    payload = _payload([0, 5, 15])
    assert payload.size == 3
    payload.validate(3, (4, 4), 16)
    _payload([3, 1], dtype=torch.float32).validate(3, (4, 4), 16)


def test_payload_validate_accepts_empty_payload():
    payload = PatchPayload(
        positions=torch.empty(0, dtype=torch.int64),
        patches=torch.empty(0, 3, 4, 4, dtype=torch.uint8),
    )
    assert payload.size == 0
    payload.validate(3, (4, 4), 16)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.float32, torch.uint8])
def test_payload_validate_rejects_wrong_position_dtype(dtype):
    payload = PatchPayload(
        positions=torch.tensor([0, 1], dtype=dtype),
        patches=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
    )
    with pytest.raises(ValueError):
        payload.validate(3, (4, 4), 16)


def test_payload_validate_rejects_non_1d_positions():
    payload = PatchPayload(
        positions=torch.tensor([[0, 1]], dtype=torch.int64),
        patches=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
    )
    with pytest.raises(ValueError):
        payload.validate(3, (4, 4), 16)


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 4, 4), (2, 3, 4, 5), (2, 3, 8, 8), (3, 3, 4, 4), (1, 3, 4, 4), (2, 48), (2, 3, 4)],
)
def test_payload_validate_rejects_wrong_patch_shape(shape):
    payload = PatchPayload(
        positions=torch.tensor([0, 1], dtype=torch.int64),
        patches=torch.zeros(shape, dtype=torch.uint8),
    )
    with pytest.raises(ValueError):
        payload.validate(3, (4, 4), 16)


@pytest.mark.parametrize("positions", [[16], [0, 16], [-1, 2], [3, 100]])
def test_payload_validate_rejects_out_of_range_positions(positions):
    with pytest.raises(ValueError):
        _payload(positions).validate(3, (4, 4), 16)


def test_payload_validate_boundary_positions():
    _payload([0, 15]).validate(3, (4, 4), 16)


@pytest.mark.parametrize("positions", [[1, 1], [0, 3, 0], [7, 7, 7]])
def test_payload_validate_rejects_duplicate_positions(positions):
    with pytest.raises(ValueError):
        _payload(positions).validate(3, (4, 4), 16)


def test_payload_round_trip_from_patchify():
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    patches = patchify(image, (4, 4))[0]
    positions = torch.tensor([9, 2, 14], dtype=torch.int64)
    payload = PatchPayload(positions=positions, patches=patches[positions])
    payload.validate(3, (4, 4), 16)
    for i, n in enumerate(positions.tolist()):
        r, c = divmod(n, 4)
        assert torch.equal(
            payload.patches[i], image[0, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4]
        )
