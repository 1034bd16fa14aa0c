"""What the edge sends the server: the selected patches' pixels and their grid positions.

Pixels travel unnormalised (uint8 stays uint8, losslessly), so edge and server
may normalise differently. This module holds the in-memory payload, its wire
format with the `raw`, `png` and `jpeg` codecs; everything decoded from bytes is
validated here and fails with ProtocolError. The Open Inference Protocol bodies
that carry it are in oip.py.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from collabvit.lite.arrays import Array, as_array


def patchify(images: Array, patch_size: tuple[int, int]) -> Array:
    """Cut images into row-major patches (a numpy array or a torch tensor, kept as it is).

    Args:
        images: [B, C, H, W] with H, W multiples of the patch size.
        patch_size: (P_h, P_w).

    Returns:
        [B, N, C, P_h, P_w], N = (H / P_h) * (W / P_w).
    """
    batch, channels, height, width = images.shape
    ph, pw = patch_size
    if height % ph or width % pw:
        raise ValueError(f"image {height}x{width} is not a whole number of {ph}x{pw} patches")
    grid = images.reshape(batch, channels, height // ph, ph, width // pw, pw)
    axes = (0, 2, 4, 1, 3, 5)
    grid = grid.permute(*axes) if hasattr(grid, "permute") else grid.transpose(axes)
    return grid.reshape(batch, -1, channels, ph, pw)


def build_payloads(images: Array, keep: Array, rows: list[int],
                   patch_size: tuple[int, int]) -> list[PatchPayload]:  # fmt: skip
    """The payloads of the chosen images: their kept patches' pixels and grid positions.

    Args:
        images: unnormalised [B, C, H, W] (uint8, or float32 in [0, 1]).
        keep: selections [B, N] bool.
        rows: which images to build payloads for, in order.
        patch_size: (P_h, P_w).
    """
    if not rows:
        return []
    patches = patchify(as_array(images[rows]), patch_size)
    keep = as_array(keep[rows])
    return [
        PatchPayload(positions=positions, patches=patches[i, positions])
        for i, positions in enumerate(np.flatnonzero(row) for row in keep)
    ]


@dataclass(frozen=True)
class PatchPayload:
    """One image's transmission, as numpy arrays (torch tensors given are read as arrays).

    Attributes:
        positions: row-major grid indices of the kept patches [k] int64, distinct.
        patches: their pixels [k, C, P_h, P_w], uint8 or float32.
    """

    positions: np.ndarray
    patches: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", as_array(self.positions))
        object.__setattr__(self, "patches", np.ascontiguousarray(as_array(self.patches)))

    @property
    def size(self) -> int:
        return int(self.positions.shape[0])

    def validate(self, channels: int, patch_size: tuple[int, int], num_patches: int) -> None:
        """Raise ValueError unless the payload fits a model with this geometry."""
        if self.positions.ndim != 1 or self.positions.dtype != np.int64:
            raise ValueError("payload positions must be a 1-D int64 array")
        expected = (self.size, channels, *patch_size)
        if tuple(self.patches.shape) != expected:
            raise ValueError(
                f"payload patches have shape {tuple(self.patches.shape)}, expected {expected}"
            )
        # At most a few hundred indices: as Python ints these checks cost microseconds,
        # a fraction of what array reductions cost per call (they run once per image).
        indices = self.positions.tolist()
        if indices and (min(indices) < 0 or max(indices) >= num_patches):
            raise ValueError(f"payload positions must lie in [0, {num_patches})")
        if len(set(indices)) != len(indices):
            raise ValueError("payload positions must be distinct")


# ------------------------------------------------------------------ wire format
#
# One offloaded image travels as one self-describing byte string:
#
#   offset  size  field
#   0       1     format version (1)
#   1       1     codec: 0 raw, 1 png, 2 jpeg
#   2       1     pixel dtype: 0 uint8, 1 float32 (raw only)
#   3       1     channels C
#   4       1     patch height P_h
#   5       1     patch width P_w
#   6       2     grid rows G_h        (little-endian, as every integer here)
#   8       2     grid columns G_w
#   10      2     kept patches k
#   12      k*w   kept grid indices, row-major; w = 1 byte when G_h*G_w <= 256, else 2
#   12+k*w  4     data length D
#   16+k*w  D     data: raw = the k patches' pixels [k, C, P_h, P_w] in index order;
#                 png / jpeg = the masked image [G_h*P_h, G_w*P_w] with dropped patches 0
#
# Indices are sent explicitly for every codec: a lossy codec cannot tell a blank
# patch from a dropped one.

WIRE_VERSION = 1
CODECS = ("raw", "png", "jpeg")
DEFAULT_JPEG_QUALITY = 75
_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
_HEADER = struct.Struct("<BBBBBBHHH")
# the 4-byte little-endian length before a byte string: of a payload's pixels here, of each
# image in a binary infer body (oip.py)
LENGTH_PREFIX = struct.Struct("<I")
_IMAGE_MODES = {1: "L", 3: "RGB"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}


class ProtocolError(ValueError):
    """Bytes that are not a valid transmission for this server (a one-line reason)."""


class TooManyImages(ProtocolError):
    """A request declaring more images than the server takes in one request."""


@dataclass(frozen=True)
class WireGeometry:
    """What the bytes of one image declare and the server checks against its model."""

    channels: int
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]

    @classmethod
    def of(cls, geometry) -> WireGeometry:
        """What a model's geometry (vit.Geometry) expects on the wire."""
        return cls(geometry.in_chans, tuple(geometry.patch_size), tuple(geometry.grid_size))

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    @property
    def index_width(self) -> int:
        return 1 if self.num_patches <= 256 else 2


@dataclass(frozen=True)
class Codec:
    """How the pixels are coded: `raw`, `png` (both lossless) or `jpeg` at a quality 1..95."""

    name: str = "raw"
    quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose from {', '.join(CODECS)}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"jpeg quality must be in 1..95, not {self.quality}")

    @classmethod
    def parse(cls, text: str) -> Codec:
        """'raw', 'png', 'jpeg' or 'jpeg:Q' (quality Q)."""
        name, _, quality = text.partition(":")
        if quality and name != "jpeg":
            raise ValueError(f"only jpeg takes a quality, not {text!r}")
        try:
            return cls(name, int(quality) if quality else DEFAULT_JPEG_QUALITY)
        except ValueError as error:
            if quality and not quality.isdigit():
                raise ValueError(f"jpeg quality must be an integer, not {quality!r}") from error
            raise

    def __str__(self) -> str:
        return f"jpeg:{self.quality}" if self.name == "jpeg" else self.name

    def carries(self, channels: int) -> bool:
        """Whether this codec can carry images of `channels` channels (png/jpeg: 1 or 3)."""
        return self.name == "raw" or channels in _IMAGE_MODES

    def check(self, channels: int) -> None:
        """ProtocolError unless this codec can carry images of `channels` channels."""
        if not self.carries(channels):
            raise ProtocolError(f"the {self.name} codec takes 1 or 3 channels, not {channels}; "
                                "use raw")  # fmt: skip


def encode_payload(payload: PatchPayload, geometry: WireGeometry, codec: Codec = Codec()) -> bytes:
    """One image's transmission as bytes (see the layout above).

    Args:
        payload: positions [k] int64 and patches [k, C, P_h, P_w] uint8 (or float32 in
            [0, 1] for `raw`).
        geometry: the grid the positions refer to.
        codec: how the pixels are coded.
    """
    payload.validate(geometry.channels, geometry.patch_size, geometry.num_patches)
    dtype = payload.patches.dtype
    if dtype not in _DTYPES:
        raise ProtocolError(f"pixels of dtype {dtype} cannot be sent; use uint8 or float32")
    if codec.name != "raw" and dtype != np.uint8:
        raise ProtocolError(f"the {codec.name} codec takes uint8 pixels, not {dtype}")
    codec.check(geometry.channels)
    patches, positions = payload.patches, payload.positions
    if codec.name == "raw":
        data = patches.astype(patches.dtype.newbyteorder("<"), copy=False).tobytes()
    else:
        data = _encode_image(_masked_image(patches, positions, geometry), codec)
    index_type = np.uint8 if geometry.index_width == 1 else np.dtype("<u2")
    header = _HEADER.pack(
        WIRE_VERSION, CODECS.index(codec.name), _DTYPES.index(dtype), geometry.channels,
        *geometry.patch_size, *geometry.grid_size, payload.size,
    )  # fmt: skip
    indices = positions.astype(index_type).tobytes()
    return header + indices + LENGTH_PREFIX.pack(len(data)) + data


def decode_payload(blob: bytes, expected: WireGeometry) -> PatchPayload:
    """The payload carried by `blob`, checked against the server's geometry.

    Raises ProtocolError for anything malformed: an unknown version, codec or
    dtype, a grid, patch size or channel count other than `expected`, an index
    out of range or repeated, a declared length that differs from the data, or
    image data that does not decode to the declared image.
    """
    version, codec_id, dtype_id, channels, ph, pw, gh, gw, count = _read_header(blob)
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported payload version {version} (this server reads "
                            f"{WIRE_VERSION})")  # fmt: skip
    if codec_id >= len(CODECS):
        raise ProtocolError(f"unknown codec id {codec_id}")
    if dtype_id >= len(_DTYPES):
        raise ProtocolError(f"unknown pixel dtype id {dtype_id}")
    declared = WireGeometry(channels, (ph, pw), (gh, gw))
    if declared != expected:
        raise ProtocolError(
            f"payload declares {_describe(declared)} but the server's model takes "
            f"{_describe(expected)}"
        )
    codec, dtype = CODECS[codec_id], _DTYPES[dtype_id]
    if count > expected.num_patches:
        raise ProtocolError(f"payload declares {count} patches but the grid has "
                            f"{expected.num_patches}")  # fmt: skip
    start = _HEADER.size
    index_end = start + count * expected.index_width
    if len(blob) < index_end + LENGTH_PREFIX.size:
        raise ProtocolError(f"payload of {len(blob)} bytes is truncated before its data")
    index_type = np.uint8 if expected.index_width == 1 else np.dtype("<u2")
    positions = np.frombuffer(blob, dtype=index_type, count=count, offset=start).astype(np.int64)
    if count and int(positions.max()) >= expected.num_patches:
        raise ProtocolError(f"patch index {int(positions.max())} is outside the grid of "
                            f"{expected.num_patches} patches")  # fmt: skip
    if len(np.unique(positions)) != count:
        raise ProtocolError("patch indices repeat")
    (length,) = LENGTH_PREFIX.unpack_from(blob, index_end)
    data = blob[index_end + LENGTH_PREFIX.size :]
    if len(data) != length:
        raise ProtocolError(f"payload declares {length} data bytes but carries {len(data)}")
    if codec == "raw":
        patches = _raw_patches(data, dtype, count, expected)
    else:
        if dtype != np.uint8:
            raise ProtocolError(f"the {codec} codec carries uint8 pixels only")
        image = _decode_image(data, codec, expected)
        patches = patchify(image[None], expected.patch_size)[0, positions]
    return PatchPayload(positions=positions, patches=patches)


def _read_header(blob: bytes) -> tuple[int, ...]:
    if len(blob) < _HEADER.size:
        raise ProtocolError(f"payload of {len(blob)} bytes is shorter than its "
                            f"{_HEADER.size}-byte header")  # fmt: skip
    return _HEADER.unpack_from(blob)


def decoded_size(blob: bytes) -> int:
    """Bytes the decoded pixels of `blob` will hold, read from its header alone (before any
    pixel is decompressed): kept patches x channels x patch area x pixel size. A server
    bounds its memory with it; decode_payload checks the header against the model."""
    _, _, dtype_id, channels, ph, pw, _, _, count = _read_header(blob)
    itemsize = _DTYPES[dtype_id].itemsize if dtype_id < len(_DTYPES) else 1
    return count * channels * ph * pw * itemsize


def _describe(geometry: WireGeometry) -> str:
    return (f"{geometry.channels} channel(s), {geometry.patch_size[0]}x{geometry.patch_size[1]} "
            f"patches on a {geometry.grid_size[0]}x{geometry.grid_size[1]} grid")  # fmt: skip


def _raw_patches(data: bytes, dtype: np.dtype, count: int, geometry: WireGeometry):
    shape = (count, geometry.channels, *geometry.patch_size)
    itemsize = dtype.itemsize
    expected = int(np.prod(shape)) * itemsize
    if len(data) != expected:
        raise ProtocolError(f"raw data of {len(data)} bytes does not hold {count} patches of "
                            f"{_describe(geometry)} ({expected} bytes)")  # fmt: skip
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    patches = array.reshape(shape).astype(dtype)  # a native-order, writable copy
    if dtype == np.float32 and count and not (
        bool(np.isfinite(patches).all()) and 0.0 <= float(patches.min())
        and float(patches.max()) <= 1.0
    ):  # fmt: skip
        raise ProtocolError("float32 pixels must be finite and lie in [0, 1]")
    return patches


def _masked_image(patches: np.ndarray, positions: np.ndarray, geometry: WireGeometry):
    """[k, C, P_h, P_w] uint8 at grid positions -> the image [C, H, W] with the rest 0."""
    (gh, gw), (ph, pw), channels = geometry.grid_size, geometry.patch_size, geometry.channels
    grid = np.zeros((gh * gw, channels, ph, pw), dtype=np.uint8)
    grid[positions] = patches
    return grid.reshape(gh, gw, channels, ph, pw).transpose(2, 0, 3, 1, 4).reshape(
        channels, gh * ph, gw * pw
    )


def _encode_image(image: np.ndarray, codec: Codec) -> bytes:
    """[C, H, W] uint8 -> PNG or JPEG bytes."""
    array = np.ascontiguousarray(image.transpose(1, 2, 0))
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array,
                              mode=_IMAGE_MODES[image.shape[0]])  # fmt: skip
    buffer = io.BytesIO()
    if codec.name == "png":
        picture.save(buffer, format="PNG", optimize=True)
    else:
        picture.save(buffer, format="JPEG", quality=codec.quality)
    return buffer.getvalue()


def _decode_image(data: bytes, codec: str, geometry: WireGeometry) -> np.ndarray:
    """PNG or JPEG bytes -> [C, H, W] uint8, checked to be the declared image.

    The header is read before any pixel is decoded, so an oversized image is
    refused without being decompressed.
    """
    try:
        picture = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[codec]])
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ProtocolError(f"{codec} data does not decode: {error}") from error
    height, width = geometry.image_size
    mode = _IMAGE_MODES.get(geometry.channels)
    if picture.size != (width, height) or picture.mode != mode:
        raise ProtocolError(f"{codec} image is {picture.size[0]}x{picture.size[1]} {picture.mode}"
                            f", expected {width}x{height} {mode}")  # fmt: skip
    try:
        picture.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise ProtocolError(f"{codec} data does not decode: {error}") from error
    array = np.asarray(picture, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))
