"""Tests for collabvit.lite.protocol: patchify, PatchPayload validation, the wire format of one
offloaded image and the Open Inference Protocol v2 bodies."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collabvit.lite.oip import (
    infer_request_body,
    infer_response_body,
    parse_header_length,
    parse_infer_request,
    parse_logits,
)
from collabvit.lite.protocol import (
    Codec,
    PatchPayload,
    ProtocolError,
    WireGeometry,
    build_payloads,
    decode_payload,
    encode_payload,
    patchify,
)


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
    with pytest.raises(ValueError):
        patchify(np.zeros((1, 3, height, width)), (4, 4))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_patchify_keeps_arrays_as_arrays_and_tensors_as_tensors(dtype):
    images = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(dtype)  # fmt: skip
    of_tensor = patchify(images, (4, 2))
    of_array = patchify(images.numpy(), (4, 2))
    assert isinstance(of_tensor, torch.Tensor) and isinstance(of_array, np.ndarray)
    assert of_array.dtype == images.numpy().dtype and of_array.shape == (2, 12, 3, 4, 2)
    assert np.array_equal(of_array, of_tensor.numpy())


# --- PatchPayload ------------------------------------------------------------------------


def _payload(positions, channels=3, patch=(4, 4), dtype=np.uint8) -> PatchPayload:
    positions = np.asarray(positions, dtype=np.int64)
    patches = np.zeros((len(positions), channels, *patch), dtype=dtype)
    return PatchPayload(positions=positions, patches=patches)


def test_payload_validate_accepts_good_payload():
    payload = _payload([0, 5, 15])
    assert payload.size == 3
    payload.validate(3, (4, 4), 16)
    _payload([3, 1], dtype=np.float32).validate(3, (4, 4), 16)


def test_payload_validate_accepts_empty_payload():
    payload = PatchPayload(
        positions=np.empty(0, dtype=np.int64),
        patches=np.empty((0, 3, 4, 4), dtype=np.uint8),
    )
    assert payload.size == 0
    payload.validate(3, (4, 4), 16)


def test_payload_of_torch_tensors_holds_numpy_arrays():
    # The constructor still takes tensors (the torch edge hands them over) and keeps arrays.
    positions = torch.tensor([5, 0, 15], dtype=torch.int64)
    patches = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    payload = PatchPayload(positions=positions, patches=patches)
    assert isinstance(payload.positions, np.ndarray) and payload.positions.dtype == np.int64
    assert isinstance(payload.patches, np.ndarray) and payload.patches.dtype == np.uint8
    assert payload.positions.tolist() == [5, 0, 15]
    assert np.array_equal(payload.patches, patches.numpy())
    payload.validate(3, (4, 4), 16)
    as_float = PatchPayload(positions=positions, patches=patches.float() / 255)
    assert as_float.patches.dtype == np.float32
    as_float.validate(3, (4, 4), 16)


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int16, np.uint64, np.float32, np.float64, np.uint8, torch.int32,
              torch.int16, torch.float32, torch.uint8],
)  # fmt: skip
def test_payload_validate_rejects_wrong_position_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        positions = torch.tensor([0, 1], dtype=dtype)
    else:
        positions = np.array([0, 1], dtype=dtype)
    payload = PatchPayload(positions=positions, patches=np.zeros((2, 3, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        payload.validate(3, (4, 4), 16)


@pytest.mark.parametrize("positions", [np.array([[0, 1]], dtype=np.int64),
                                       torch.tensor([[0, 1]], dtype=torch.int64)])  # fmt: skip
def test_payload_validate_rejects_non_1d_positions(positions):
    payload = PatchPayload(
        positions=positions,
        patches=np.zeros((2, 3, 4, 4), dtype=np.uint8),
    )
    with pytest.raises(ValueError):
        payload.validate(3, (4, 4), 16)


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 4, 4), (2, 3, 4, 5), (2, 3, 8, 8), (3, 3, 4, 4), (1, 3, 4, 4), (2, 48), (2, 3, 4)],
)
def test_payload_validate_rejects_wrong_patch_shape(shape):
    payload = PatchPayload(
        positions=np.array([0, 1], dtype=np.int64),
        patches=np.zeros(shape, dtype=np.uint8),
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
    image = np.random.default_rng(0).integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)
    patches = patchify(image, (4, 4))[0]
    positions = np.array([9, 2, 14], dtype=np.int64)
    payload = PatchPayload(positions=positions, patches=patches[positions])
    payload.validate(3, (4, 4), 16)
    for i, n in enumerate(positions.tolist()):
        r, c = divmod(n, 4)
        assert np.array_equal(
            payload.patches[i], image[0, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4]
        )


# --- wire format: helpers -----------------------------------------------------------------

RAW, PNG = Codec("raw"), Codec("png")
GEOMETRY_1 = WireGeometry(1, (2, 2), (3, 3))  # 9 patches: 1-byte indices
GEOMETRY_3 = WireGeometry(3, (4, 4), (2, 3))  # rectangular grid
GEOMETRY_WIDE = WireGeometry(3, (2, 2), (17, 17))  # 289 patches: 2-byte indices


def _random_image(geometry: WireGeometry, seed: int = 0) -> torch.Tensor:
    """A [1, C, H, W] uint8 image of noise (deterministic per seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (1, geometry.channels, *geometry.image_size), dtype=torch.uint8,
        generator=generator,
    )  # fmt: skip


def _smooth_image(geometry: WireGeometry) -> torch.Tensor:
    """A [1, C, H, W] uint8 gradient, easy for JPEG."""
    height, width = geometry.image_size
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    planes = [40 + 150 * (0.5 * y + 0.5 * x + 0.1 * c * x * y) for c in range(geometry.channels)]
    return torch.stack(planes).round().to(torch.uint8)[None]


def _payload_of(image: torch.Tensor, geometry: WireGeometry, kept) -> PatchPayload:
    keep = torch.zeros(1, geometry.num_patches, dtype=torch.bool)
    keep[0, list(kept)] = True
    return build_payloads(image, keep, [0], geometry.patch_size)[0]


def _assert_same(decoded: PatchPayload, payload: PatchPayload) -> None:
    assert isinstance(decoded.positions, np.ndarray) and isinstance(decoded.patches, np.ndarray)
    assert decoded.positions.dtype == np.int64
    assert np.array_equal(decoded.positions, payload.positions)
    assert decoded.patches.dtype == payload.patches.dtype
    assert decoded.patches.shape == payload.patches.shape
    assert np.array_equal(decoded.patches, payload.patches)


def _blob(
    *, version=1, codec=0, dtype=0, channels=1, patch=(2, 2), grid=(3, 3), indices=(),
    count=None, index_width=1, data=b"", length=None,
) -> bytes:
    """A hand-made wire blob (layout in protocol.py), each field overridable to break it."""
    header = struct.pack(
        "<BBBBBBHHH", version, codec, dtype, channels, *patch, *grid,
        len(indices) if count is None else count,
    )  # fmt: skip
    index_format = "<" + ("B" if index_width == 1 else "H") * len(indices)
    declared = len(data) if length is None else length
    return header + struct.pack(index_format, *indices) + struct.pack("<I", declared) + data


# --- wire format: round trips -------------------------------------------------------------


@pytest.mark.parametrize("codec", [RAW, PNG], ids=str)
@pytest.mark.parametrize("geometry", [GEOMETRY_1, GEOMETRY_3], ids=["1ch", "3ch"])
@pytest.mark.parametrize("selection", ["empty", "some", "full"])
def test_lossless_codecs_round_trip_exactly(codec, geometry, selection):
    kept = {"empty": [], "some": [0, 2, geometry.num_patches - 1],
            "full": range(geometry.num_patches)}[selection]  # fmt: skip
    payload = _payload_of(_random_image(geometry), geometry, kept)
    assert payload.size == len(kept)
    decoded = decode_payload(encode_payload(payload, geometry, codec), geometry)
    _assert_same(decoded, payload)


def test_raw_float32_pixels_round_trip_exactly():
    # float32 pixels in [0, 1] travel bit for bit, including both ends of the range.
    geometry = GEOMETRY_3
    image = torch.rand(1, 3, *geometry.image_size, generator=torch.Generator().manual_seed(1))
    image[0, 0, 0, 0], image[0, 0, 0, 1] = 0.0, 1.0
    payload = _payload_of(image, geometry, [0, 4, 5])
    assert payload.patches.dtype == np.float32
    blob = encode_payload(payload, geometry, RAW)
    assert blob[2] == 1  # the float32 dtype id
    _assert_same(decode_payload(blob, geometry), payload)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kept", [range(16), [0, 3, 5, 6, 10, 12, 15]], ids=["full", "some"])
def test_jpeg_is_close_on_a_smooth_image_and_positions_are_exact(channels, kept):
    geometry = WireGeometry(channels, (8, 8), (4, 4))
    payload = _payload_of(_smooth_image(geometry), geometry, kept)
    blob = encode_payload(payload, geometry, Codec("jpeg", 90))
    assert blob[1] == 2  # the jpeg codec id
    decoded = decode_payload(blob, geometry)
    assert decoded.positions.dtype == np.int64
    assert np.array_equal(decoded.positions, payload.positions)
    assert decoded.patches.dtype == np.uint8
    assert decoded.patches.shape == payload.patches.shape
    error = int(np.abs(decoded.patches.astype(np.int32) - payload.patches.astype(np.int32)).max())
    assert error <= 8, error


def test_grid_of_more_than_256_patches_uses_two_byte_indices():
    geometry = GEOMETRY_WIDE
    assert geometry.num_patches == 289 and geometry.index_width == 2
    kept = [0, 1, 255, 256, 257, 288]  # both sides of the 1-byte limit
    payload = _payload_of(_random_image(geometry), geometry, kept)
    blob = encode_payload(payload, geometry, RAW)
    assert len(blob) == 12 + 2 * len(kept) + 4 + len(kept) * 3 * 2 * 2
    assert list(struct.unpack_from("<6H", blob, 12)) == kept
    _assert_same(decode_payload(blob, geometry), payload)
    _assert_same(decode_payload(encode_payload(payload, geometry, PNG), geometry), payload)



def test_grid_of_exactly_256_patches_still_uses_one_byte_indices():
    geometry = WireGeometry(1, (1, 1), (16, 16))
    assert geometry.index_width == 1
    payload = _payload_of(_random_image(geometry), geometry, [0, 128, 255])
    blob = encode_payload(payload, geometry, RAW)
    assert blob[12:15] == bytes([0, 128, 255]) and len(blob) == 12 + 3 + 4 + 3
    _assert_same(decode_payload(blob, geometry), payload)

@pytest.mark.parametrize(
    "geometry", [GEOMETRY_1, GEOMETRY_3, GEOMETRY_WIDE], ids=["1ch", "3ch", "wide"]
)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_raw_size_is_header_indices_length_and_pixels(geometry, dtype):
    # Byte-exact accounting: 12 header bytes + k*w index bytes + 4 length bytes + pixels.
    image = _random_image(geometry)
    if dtype == torch.float32:
        image = image.float() / 255
    kept = [0, 1, geometry.num_patches - 1]
    payload = _payload_of(image, geometry, kept)
    k, (ph, pw), itemsize = len(kept), geometry.patch_size, 1 if dtype == torch.uint8 else 4
    pixels = k * geometry.channels * ph * pw * itemsize
    blob = encode_payload(payload, geometry, RAW)
    assert len(blob) == 12 + k * geometry.index_width + 4 + pixels
    assert struct.unpack_from("<I", blob, 12 + k * geometry.index_width)[0] == pixels


def test_header_fields_are_what_the_layout_says():
    payload = _payload_of(_random_image(GEOMETRY_3), GEOMETRY_3, [1, 4])
    blob = encode_payload(payload, GEOMETRY_3, PNG)
    assert struct.unpack_from("<BBBBBBHHH", blob) == (1, 1, 0, 3, 4, 4, 2, 3, 2)
    assert blob[12:14] == bytes([1, 4])


# --- wire format: dropped patches are blank -----------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_png_of_few_kept_patches_is_much_smaller_than_the_full_image(channels):
    # Dropped patches are sent as zeros, which compress to almost nothing; noise does not.
    geometry = WireGeometry(channels, (4, 4), (7, 7))
    image = _random_image(geometry, seed=3)
    full = encode_payload(_payload_of(image, geometry, range(49)), geometry, PNG)
    few = encode_payload(_payload_of(image, geometry, [0, 8, 24, 30, 48]), geometry, PNG)
    assert len(few) < len(full) // 2, (len(few), len(full))


def test_dropped_patches_do_not_leak_into_kept_ones():
    # Decoding png returns exactly the kept patches, not their blank neighbours.
    geometry = GEOMETRY_1
    image = torch.full((1, 1, 6, 6), 200, dtype=torch.uint8)
    payload = _payload_of(image, geometry, [4])
    decoded = decode_payload(encode_payload(payload, geometry, PNG), geometry)
    assert decoded.positions.tolist() == [4]
    assert bool((decoded.patches == 200).all())


# --- wire format: decode errors -----------------------------------------------------------


def _decode_error(blob: bytes, geometry: WireGeometry = GEOMETRY_1) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_payload(blob, geometry)
    return str(info.value)


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("size", [0, 1, 11])
def test_decode_short_header(size):
    assert "12-byte header" in _decode_error(_blob()[:size])


def test_decode_wrong_version():
    assert "version 2" in _decode_error(_blob(version=2))
    assert "version 0" in _decode_error(_blob(version=0))


def test_decode_unknown_codec_id():
    assert "unknown codec id 3" in _decode_error(_blob(codec=3))


def test_decode_unknown_dtype_id():
    assert "unknown pixel dtype id 2" in _decode_error(_blob(dtype=2))


@pytest.mark.parametrize(
    "fields",
    [{"channels": 3}, {"patch": (2, 3)}, {"patch": (4, 4)}, {"grid": (3, 4)}, {"grid": (9, 1)}],
    ids=["channels", "patch-width", "patch-size", "grid-columns", "grid-transposed"],
)
def test_decode_geometry_mismatch_names_both_geometries(fields):
    message = _decode_error(_blob(**fields))
    assert "1 channel(s), 2x2 patches on a 3x3 grid" in message  # what the server takes


def test_decode_count_larger_than_the_grid():
    assert "10 patches but the grid has 9" in _decode_error(_blob(count=10))


def test_decode_truncated_indices():
    # Three indices declared, two present and no length field.
    blob = _blob(indices=(0, 1, 2))[: 12 + 2]
    assert "truncated" in _decode_error(blob)


def test_decode_truncated_length_field():
    blob = _blob(indices=(0, 1))[:-2]
    assert "truncated" in _decode_error(blob)


@pytest.mark.parametrize("index", [9, 255])
def test_decode_index_out_of_range(index):
    message = _decode_error(_blob(indices=(0, index), data=bytes(8)))
    assert f"patch index {index}" in message and "9 patches" in message


def test_decode_two_byte_index_out_of_range():
    blob = _blob(
        channels=3, grid=(17, 17), indices=(0, 289), index_width=2, data=bytes(24)
    )  # fmt: skip
    assert "patch index 289" in _decode_error(blob, GEOMETRY_WIDE)


def test_decode_duplicate_indices():
    assert "repeat" in _decode_error(_blob(indices=(3, 1, 3), data=bytes(12)))


@pytest.mark.parametrize("length", [0, 7, 9, 2**32 - 1])
def test_decode_declared_length_differs_from_data(length):
    message = _decode_error(_blob(indices=(0, 1), data=bytes(8), length=length))
    assert f"declares {length} data bytes but carries 8" in message


@pytest.mark.parametrize(("dtype", "size"), [(0, 7), (0, 9), (1, 8), (1, 31), (0, 0)])
def test_decode_raw_data_of_the_wrong_size(dtype, size):
    # Two 1x2x2 patches: 8 bytes as uint8, 32 as float32.
    message = _decode_error(_blob(dtype=dtype, indices=(0, 1), data=bytes(size)))
    assert "raw data" in message and "does not hold 2 patches" in message


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf"), -float("inf")])
def test_decode_float32_pixels_outside_unit_range(bad):
    values = [0.0, 0.5, 1.0, bad, 0.25, 0.0, 0.0, 0.0]
    blob = _blob(dtype=1, indices=(2, 7), data=struct.pack("<8f", *values))
    assert "[0, 1]" in _decode_error(blob)


def test_decode_float32_pixels_at_the_ends_of_the_range_pass():
    data = struct.pack("<8f", 0.0, 1.0, -0.0, 0.5, 1.0, 1.0, 0.0, 1e-45)
    decoded = decode_payload(_blob(dtype=1, indices=(2, 7), data=data), GEOMETRY_1)
    assert decoded.patches.shape == (2, 1, 2, 2)
    assert decoded.patches.dtype == np.float32
    assert decoded.patches.astype("<f4").tobytes() == data


def _image_blob(geometry: WireGeometry, codec: Codec, kept=(0, 1)) -> bytes:
    return encode_payload(_payload_of(_random_image(geometry), geometry, kept), geometry, codec)


def _relabel(blob: bytes, codec_id: int) -> bytes:
    return blob[:1] + bytes([codec_id]) + blob[2:]


def test_decode_png_labelled_jpeg_and_jpeg_labelled_png():
    png = _image_blob(GEOMETRY_3, PNG)
    jpeg = _image_blob(GEOMETRY_3, Codec("jpeg", 90))
    assert "jpeg data does not decode" in _decode_error(_relabel(png, 2), GEOMETRY_3)
    assert "png data does not decode" in _decode_error(_relabel(jpeg, 1), GEOMETRY_3)


def test_decode_image_codecs_refuse_float32_dtype():
    blob = _image_blob(GEOMETRY_3, PNG)
    blob = blob[:2] + bytes([1]) + blob[3:]
    assert "uint8" in _decode_error(blob, GEOMETRY_3)


@pytest.mark.parametrize("codec", [PNG, Codec("jpeg", 80)], ids=str)
def test_decode_image_of_the_wrong_size_or_mode(codec):
    # The header is right for the server but the image inside is of another geometry.
    other = WireGeometry(3, (4, 4), (3, 3))  # 12x12 image, server expects 12x8
    blob = _image_blob(other, codec)
    image = blob[12 + 2 + 4 :]
    message = _decode_error(_blob(channels=3, patch=(4, 4), grid=(2, 3), codec=blob[1],
                                  indices=(0, 1), data=image), GEOMETRY_3)  # fmt: skip
    assert "12x12" in message and "expected 12x8" in message
    gray = WireGeometry(1, (4, 4), (2, 3))  # right size, one channel instead of three
    image = _image_blob(gray, codec)[12 + 2 + 4 :]
    message = _decode_error(_blob(channels=3, patch=(4, 4), grid=(2, 3), codec=blob[1],
                                  indices=(0, 1), data=image), GEOMETRY_3)  # fmt: skip
    assert " L" in message and "RGB" in message


@pytest.mark.parametrize("codec_id", [1, 2])
@pytest.mark.parametrize("data", [b"", b"garbage", bytes(100)])
def test_decode_garbage_image_data(codec_id, data):
    message = _decode_error(_blob(codec=codec_id, indices=(0,), data=data))
    assert "does not decode" in message


@pytest.mark.parametrize("codec", [PNG, Codec("jpeg", 90)], ids=str)
def test_decode_truncated_image_data(codec):
    # A cut image with a consistent declared length is refused when its pixels are read.
    blob = _image_blob(GEOMETRY_3, codec)
    image = blob[12 + 2 + 4 :]
    cut = image[: len(image) * 2 // 3]
    message = _decode_error(_blob(channels=3, patch=(4, 4), grid=(2, 3), codec=blob[1],
                                  indices=(0, 1), data=cut), GEOMETRY_3)  # fmt: skip
    assert "does not decode" in message


# --- wire format: encode errors -----------------------------------------------------------


def test_encode_png_refuses_float32_pixels():
    payload = _payload_of(torch.rand(1, 3, 8, 12), GEOMETRY_3, [0])
    with pytest.raises(ProtocolError, match="uint8"):
        encode_payload(payload, GEOMETRY_3, PNG)
    with pytest.raises(ProtocolError, match="uint8"):
        encode_payload(payload, GEOMETRY_3, Codec("jpeg"))


@pytest.mark.parametrize("codec", [PNG, Codec("jpeg")], ids=str)
def test_encode_image_codecs_refuse_two_channels(codec):
    geometry = WireGeometry(2, (2, 2), (2, 2))
    payload = _payload_of(_random_image(geometry), geometry, [0, 3])
    with pytest.raises(ProtocolError, match="1 or 3 channels"):
        encode_payload(payload, geometry, codec)
    # raw takes any channel count
    _assert_same(decode_payload(encode_payload(payload, geometry, RAW), geometry), payload)


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.float16])
def test_encode_refuses_other_pixel_dtypes(dtype):
    payload = _payload_of(_random_image(GEOMETRY_1).numpy().astype(dtype), GEOMETRY_1, [0])
    assert payload.patches.dtype == dtype
    with pytest.raises(ProtocolError, match="uint8 or float32"):
        encode_payload(payload, GEOMETRY_1, RAW)


def test_encode_validates_the_payload_against_the_geometry():
    payload = _payload_of(_random_image(GEOMETRY_3), GEOMETRY_3, [0, 5])
    with pytest.raises(ValueError):
        encode_payload(payload, WireGeometry(3, (4, 4), (2, 2)), RAW)  # index 5 off the grid
    with pytest.raises(ValueError):
        encode_payload(payload, GEOMETRY_1, RAW)


# --- Codec.parse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "quality"),
    [("raw", "raw", 75), ("png", "png", 75), ("jpeg", "jpeg", 75), ("jpeg:50", "jpeg", 50),
     ("jpeg:1", "jpeg", 1), ("jpeg:95", "jpeg", 95)],
)  # fmt: skip
def test_codec_parse_accepts(text, name, quality):
    codec = Codec.parse(text)
    assert (codec.name, codec.quality) == (name, quality)
    assert Codec.parse(str(codec)) == codec


@pytest.mark.parametrize("text", ["jpeg:0", "jpeg:96", "jpeg:x", "jpeg:-5", "png:50", "raw:1",
                                  "gif", "", "JPEG"])  # fmt: skip
def test_codec_parse_rejects(text):
    with pytest.raises(ValueError):
        Codec.parse(text)


def test_codec_parse_messages_say_what_is_wrong():
    with pytest.raises(ValueError, match="1..95"):
        Codec.parse("jpeg:96")
    with pytest.raises(ValueError, match="integer"):
        Codec.parse("jpeg:x")
    with pytest.raises(ValueError, match="only jpeg"):
        Codec.parse("png:50")
    with pytest.raises(ValueError, match="unknown codec"):
        Codec.parse("gif")


# --- Open Inference Protocol v2 bodies ----------------------------------------------------


@pytest.mark.parametrize(
    "blobs", [[b"\x01\x02\x03"], [b"one", b"", bytes(range(256)) * 3]], ids=["one", "several"]
)
@pytest.mark.parametrize("binary_output", [True, False])
@pytest.mark.parametrize("request_id", [None, "req-7"])
def test_infer_request_round_trip(blobs, binary_output, request_id):
    body, header_length = infer_request_body(blobs, binary_output, request_id)
    json.loads(body[:header_length])  # the header is plain JSON, the rest binary
    parsed = parse_infer_request(body, header_length)
    assert parsed.blobs == blobs
    assert parsed.binary_output is binary_output
    assert parsed.request_id == request_id


def test_infer_request_carries_encoded_payloads():
    payloads = [_payload_of(_random_image(GEOMETRY_3, seed), GEOMETRY_3, kept)
                for seed, kept in ((0, [1]), (1, []), (2, range(6)))]  # fmt: skip
    body, header_length = infer_request_body([encode_payload(p, GEOMETRY_3, PNG) for p in payloads])
    for blob, payload in zip(parse_infer_request(body, header_length).blobs, payloads, strict=True):
        _assert_same(decode_payload(blob, GEOMETRY_3), payload)


def _json_request(data, **tensor) -> bytes:
    tensor = {"name": "payload", "datatype": "BYTES", "shape": [len(data)], "data": data,
              **tensor}  # fmt: skip
    return json.dumps({"inputs": [tensor]}).encode()


def test_json_only_request_with_base64_elements():
    blobs = [b"\x00\xffabc", b"", bytes(range(50))]
    body = json.loads(_json_request([base64.b64encode(b).decode() for b in blobs]))
    body["id"] = "json-1"
    body["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}]
    parsed = parse_infer_request(json.dumps(body).encode(), None)
    assert parsed.blobs == blobs
    assert parsed.request_id == "json-1"
    assert parsed.binary_output is True  # asked for through the output's parameters
    assert parse_infer_request(_json_request(["AA=="]), None).binary_output is False


_SPECIAL_FLOATS = np.array([[0.1, -3.4e38, 1e-45, 3.4028235e38], [-0.0, 1.0, -1e-38, 7.0]],
                           dtype=np.float32)  # fmt: skip


@pytest.mark.parametrize("binary", [True, False])
def test_infer_response_round_trip_is_bit_exact(binary):
    body, header_length = infer_response_body("tiny", _SPECIAL_FLOATS, binary, "r1",
                                              parameters={"server_ms": 1.5})  # fmt: skip
    assert (header_length is not None) is binary
    logits, parameters = parse_logits(body, header_length)
    assert logits.dtype == np.float32 and logits.shape == (2, 4)
    assert np.array_equal(logits.view(np.uint32), _SPECIAL_FLOATS.view(np.uint32))
    assert parameters == {"server_ms": 1.5}


def test_infer_response_binary_is_the_raw_little_endian_floats():
    body, header_length = infer_response_body("tiny", _SPECIAL_FLOATS, True)
    assert body[header_length:] == _SPECIAL_FLOATS.astype("<f4").tobytes()


def _request_error(body: bytes, header_length: int | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_infer_request(body, header_length)
    return str(info.value)


@pytest.mark.parametrize("body", [b"{}", b'{"inputs": []}', b'{"inputs": null}'])
def test_request_without_inputs(body):
    assert "no inputs" in _request_error(body)


def test_request_with_an_unknown_input_name():
    assert "unknown input 'image'" in _request_error(_json_request(["AA=="], name="image"))


def test_request_with_the_payload_input_twice():
    tensor = json.loads(_json_request(["AA=="]))["inputs"][0]
    body = json.dumps({"inputs": [tensor, tensor]}).encode()
    assert "twice" in _request_error(body)


@pytest.mark.parametrize("datatype", ["FP32", "UINT8", None])
def test_request_with_the_wrong_datatype(datatype):
    assert "datatype BYTES" in _request_error(_json_request(["AA=="], datatype=datatype))


@pytest.mark.parametrize("shape", [[2], [0], [1, 1], [], None])
def test_request_json_shape_mismatch(shape):
    assert "shape" in _request_error(_json_request(["AA=="], shape=shape))


def test_request_binary_shape_mismatch():
    body, header_length = infer_request_body([b"a", b"b"])
    header = json.loads(body[:header_length])
    header["inputs"][0]["shape"] = [3]
    text = json.dumps(header).encode()
    assert "carries 2 elements" in _request_error(text + body[header_length:], len(text))


def _rebuild(body: bytes, header_length: int, edit) -> tuple[bytes, int]:
    """The request with its JSON header changed by `edit` (binary part kept)."""
    header = json.loads(body[:header_length])
    edit(header)
    text = json.dumps(header).encode()
    return text + body[header_length:], len(text)


def test_request_binary_data_size_past_the_end():
    body, header_length = infer_request_body([b"abc"])
    body, header_length = _rebuild(
        body, header_length, lambda h: h["inputs"][0]["parameters"].update(binary_data_size=8)
    )  # fmt: skip
    assert "runs past" in _request_error(body, header_length)


@pytest.mark.parametrize("size", [-1, 1.5, "7", True])
def test_request_binary_data_size_not_a_count(size):
    body, header_length = infer_request_body([b"abc"])
    body, header_length = _rebuild(
        body, header_length, lambda h: h["inputs"][0]["parameters"].update(binary_data_size=size)
    )  # fmt: skip
    assert "binary_data_size" in _request_error(body, header_length)


def test_request_trailing_binary_bytes():
    body, header_length = infer_request_body([b"abc"])
    assert "belong to no input" in _request_error(body + b"\x00", header_length)


def test_request_element_running_past_the_data():
    # The element says 200 bytes follow; only 3 do (binary_data_size covers what is there).
    elements = struct.pack("<I", 200) + b"abc"
    header = {"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(elements)}}]}  # fmt: skip
    text = json.dumps(header).encode()
    assert "ends inside an element" in _request_error(text + elements, len(text))


def test_request_element_length_cut_short():
    elements = struct.pack("<I", 1) + b"a" + b"\x05\x00"
    header = {"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": len(elements)}}]}  # fmt: skip
    text = json.dumps(header).encode()
    assert "element's length" in _request_error(text + elements, len(text))


def test_request_with_both_json_and_binary_data():
    body, header_length = infer_request_body([b"abc"])
    body, header_length = _rebuild(
        body, header_length, lambda h: h["inputs"][0].update(data=["AA=="])
    )  # fmt: skip
    assert "both" in _request_error(body, header_length)


@pytest.mark.parametrize("element", ["not base64!", "AAA", "A===", 7, None, ["AA=="]])
def test_request_json_element_not_base64(element):
    assert "base64" in _request_error(_json_request([element]))


def test_request_json_element_with_non_ascii_characters():
    # A JSON string may hold any character; one outside ASCII is no base64 either and must be
    # refused as a ProtocolError like every other malformed element.
    assert "base64" in _request_error(_json_request(["\u00e9AAA"]))


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b'{"inputs": [{"shape": [1]}]}', b"[]", b"\xff\xfe",
             b'{"id": 5}', b'{"inputs": [{"name": "payload", "shape": "1"}]}'],
)  # fmt: skip
def test_request_invalid_json(body):
    assert "malformed inference JSON" in _request_error(body)


def test_request_header_length_larger_than_the_body():
    body, header_length = infer_request_body([b"abc"])
    assert "exceeds" in _request_error(body, len(body) + 1)
    # a header length that cuts the JSON short makes it invalid JSON
    assert "malformed" in _request_error(body, header_length - 1)


def test_parse_header_length():
    assert parse_header_length(None) is None
    assert parse_header_length("0") == 0
    assert parse_header_length(" 123 ") == 123


@pytest.mark.parametrize("value", ["", " ", "abc", "-1", "1.5", "0x10", "1e3", "12a", "\u00b2"])
def test_parse_header_length_rejects_non_numbers(value):
    # "\u00b2" (superscript two) is a Latin-1 header byte that str.isdigit() accepts but int()
    # does not: it too must be a ProtocolError.
    with pytest.raises(ProtocolError, match="non-negative integer"):
        parse_header_length(value)


def _response_error(body: bytes, header_length: int | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_logits(body, header_length)
    return str(info.value)


def _json_response(**output) -> bytes:
    output = {"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0],
              **output}  # fmt: skip
    return json.dumps({"outputs": [output]}).encode()


@pytest.mark.parametrize(
    "output",
    [{"name": "probs"}, {"datatype": "FP64"}, {"shape": [2]}, {"shape": None},
     {"shape": [1, 2, 1]}],
)  # fmt: skip
def test_response_without_fp32_logits(output):
    assert "no FP32 output" in _response_error(_json_response(**output))


@pytest.mark.parametrize("data", [[1.0], [1.0, 2.0, 3.0], []])
def test_response_json_logits_of_the_wrong_count(data):
    assert "declared shape" in _response_error(_json_response(data=data))


@pytest.mark.parametrize("cut", [1, 4])
def test_response_binary_logits_of_the_wrong_size(cut):
    body, header_length = infer_response_body("tiny", _SPECIAL_FLOATS, True)
    assert "declared shape" in _response_error(body[:-cut], header_length)
    assert "declared shape" in _response_error(body + bytes(cut), header_length)


@pytest.mark.parametrize(
    "output",
    [{"data": ["abc", 1.0]}, {"data": [{}, 1.0]}, {"data": [[1.0], [1.0, 2.0]]},
     {"data": [None, 1.0]}, {"shape": [-1, -2]}, {"shape": [-1, -1], "data": [1.0]}],
    ids=["string", "object", "ragged", "null", "negative-shape", "minus-one-shape"],
)  # fmt: skip
def test_response_malformed_json_logits_are_protocol_errors(output):
    # The client only catches ProtocolError from a server's answer: anything malformed must be
    # one, never a numpy ValueError/TypeError or a silent NaN.
    _response_error(_json_response(**output))


# --- property-based fuzzing ---------------------------------------------------------------

# fresh examples every run (no database): each run of the suite adds its 200 to the last
FUZZ = settings(max_examples=200, deadline=None, database=None)


def _valid_blobs() -> list[tuple[WireGeometry, bytes]]:
    """A few valid blobs of every codec and index width, to mutate."""
    blobs = []
    for geometry, kept in ((GEOMETRY_1, [0, 4, 8]), (GEOMETRY_3, [1, 2, 5]),
                           (GEOMETRY_WIDE, [0, 200, 256, 288])):  # fmt: skip
        payload = _payload_of(_random_image(geometry, seed=5), geometry, kept)
        for codec in (RAW, PNG, Codec("jpeg", 90)):
            blobs.append((geometry, encode_payload(payload, geometry, codec)))
    float_payload = _payload_of(torch.rand(1, 1, 6, 6), GEOMETRY_1, [2, 3])
    blobs.append((GEOMETRY_1, encode_payload(float_payload, GEOMETRY_1, RAW)))
    return blobs


VALID_BLOBS = _valid_blobs()

_edits = st.lists(
    st.tuples(st.sampled_from(["set", "delete", "insert", "truncate"]),
              st.integers(0, 10**6), st.integers(0, 255)),
    min_size=1, max_size=8,
)  # fmt: skip


def _mutate(blob: bytes, edits) -> bytes:
    data = bytearray(blob)
    for kind, where, value in edits:
        at = where % (len(data) + 1)
        if kind == "insert":
            data.insert(at, value)
        elif kind == "truncate":
            del data[at:]
        elif data and at < len(data):
            if kind == "set":
                data[at] = value
            else:
                del data[at]
    return bytes(data)


def _fix_length(blob: bytes, geometry: WireGeometry) -> bytes:
    """Rewrite the declared data length to match, so mutations reach the image decoders."""
    if len(blob) < 12:
        return blob
    count = struct.unpack_from("<H", blob, 10)[0]
    start = 12 + count * geometry.index_width
    if start + 4 > len(blob):
        return blob
    return blob[:start] + struct.pack("<I", len(blob) - start - 4) + blob[start + 4 :]


def _decodes_or_refuses(blob: bytes, geometry: WireGeometry) -> None:
    try:
        payload = decode_payload(blob, geometry)
    except ProtocolError:
        return
    payload.validate(geometry.channels, geometry.patch_size, geometry.num_patches)


@FUZZ
@given(blob=st.binary(max_size=2000), which=st.sampled_from([GEOMETRY_1, GEOMETRY_3,
                                                             GEOMETRY_WIDE]))  # fmt: skip
def test_fuzz_decode_arbitrary_bytes(blob, which):
    _decodes_or_refuses(blob, which)
    # the same bytes behind a valid header prefix
    _decodes_or_refuses(b"\x01" + blob[1:], which)


@FUZZ
@given(choice=st.integers(0, len(VALID_BLOBS) - 1), edits=_edits, fix_length=st.booleans())
def test_fuzz_decode_mutated_blobs(choice, edits, fix_length):
    geometry, blob = VALID_BLOBS[choice]
    mutated = _mutate(blob, edits)
    if fix_length:
        mutated = _fix_length(mutated, geometry)
    _decodes_or_refuses(mutated, geometry)


def _parses_or_refuses(body: bytes, header_length: int | None) -> None:
    try:
        request = parse_infer_request(body, header_length)
    except ProtocolError:
        return
    assert request.blobs and all(isinstance(blob, bytes) for blob in request.blobs)
    assert isinstance(request.binary_output, bool)
    assert request.request_id is None or isinstance(request.request_id, str)


def _header_lengths(body: bytes):
    return st.none() | st.integers(0, len(body) + 8)


@FUZZ
@given(data=st.data(), body=st.binary(max_size=1000))
def test_fuzz_parse_infer_request_arbitrary_bytes(data, body):
    _parses_or_refuses(body, data.draw(_header_lengths(body)))


_REQUESTS = [
    infer_request_body([b"abc"]),
    infer_request_body([b"", b"xy", bytes(40)], binary_output=False, request_id="r"),
    infer_request_body([VALID_BLOBS[1][1]], request_id="png"),
    (_json_request(["AAEC", ""]), None),
]


@FUZZ
@given(data=st.data(), choice=st.integers(0, len(_REQUESTS) - 1), edits=_edits)
def test_fuzz_parse_infer_request_mutated_bodies(data, choice, edits):
    body, header_length = _REQUESTS[choice]
    mutated = _mutate(body, edits)
    _parses_or_refuses(mutated, header_length if data.draw(st.booleans()) else
                       data.draw(_header_lengths(mutated)))  # fmt: skip


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip

def _mostly(*plausible):
    """One of the plausible values two times in three, else any JSON value."""
    return st.sampled_from(plausible) | st.sampled_from(plausible) | _json_values


_tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["payload", "payload", "payload", "payload", "logits"]),
     "datatype": _mostly("BYTES", "BYTES", "FP32"),
     "shape": _mostly([1], [2]),
     "data": st.lists(st.sampled_from(["AA==", "AAEC"]) | st.text(max_size=8)
                      | st.binary(max_size=6).map(lambda b: b.decode("latin-1")) | _json_values,
                      max_size=3) | _json_values},
    optional={"parameters": st.fixed_dictionaries(
        {}, optional={"binary_data_size": st.integers(-1, 64) | _json_values,
                      "binary_data": _json_values})},
)  # fmt: skip


@FUZZ
@given(
    inputs=st.lists(_tensors, min_size=1, max_size=2),
    header=st.fixed_dictionaries(
        {}, optional={"id": st.text(max_size=5) | _json_values,
                      "outputs": st.lists(_tensors, max_size=2),
                      "parameters": st.dictionaries(st.text(max_size=20), _json_values,
                                                    max_size=2)}),
    junk_inputs=st.none() | _json_values,
    binary=st.binary(max_size=64),
)  # fmt: skip
def test_fuzz_parse_infer_request_structured_json(inputs, header, junk_inputs, binary):
    # Well-formed JSON with ill-typed fields reaches the checks past the JSON parser.
    for value in (inputs, junk_inputs):
        text = json.dumps({**header, "inputs": value}).encode()
        _parses_or_refuses(text + binary, len(text))
        _parses_or_refuses(text, None)


@st.composite
def _payloads(draw):
    geometry = WireGeometry(
        draw(st.sampled_from([1, 3])),
        (draw(st.integers(1, 8)), draw(st.integers(1, 8))),
        (draw(st.integers(1, 9)), draw(st.integers(1, 9))),
    )
    kept = draw(st.lists(st.integers(0, geometry.num_patches - 1), unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    image = _random_image(geometry, seed)
    # positions in sorted order as build_payloads makes them, or in the drawn order
    if draw(st.booleans()):
        return geometry, _payload_of(image, geometry, kept)
    positions = np.array(kept, dtype=np.int64)
    patches = patchify(image.numpy(), geometry.patch_size)[0, positions]
    return geometry, PatchPayload(positions=positions, patches=patches)


@settings(max_examples=300, deadline=None, database=None)
@given(case=_payloads(), codec=st.sampled_from([RAW, PNG]))
def test_fuzz_lossless_round_trip(case, codec):
    geometry, payload = case
    decoded = decode_payload(encode_payload(payload, geometry, codec), geometry)
    _assert_same(decoded, payload)
