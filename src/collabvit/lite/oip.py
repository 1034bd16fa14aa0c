"""The Open Inference Protocol v2 bodies that carry the wire format (protocol.py).

An infer request carries images as the BYTES input `payload`, shape [B], one
wire-format byte string per image. With the binary tensor data extension the
elements follow the JSON header, each prefixed by its 4-byte little-endian
length; in plain JSON they are base64 strings. The answer is the FP32 output
`logits`, shape [B, classes], binary when the request asks for it.
Everything decoded is validated here and fails with ProtocolError.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from collabvit.lite.protocol import LENGTH_PREFIX, ProtocolError, TooManyImages, decoded_size

INFERENCE_HEADER = "Inference-Header-Content-Length"
PAYLOAD_INPUT = "payload"
LOGITS_OUTPUT = "logits"
BINARY_CONTENT_TYPE = "application/octet-stream"


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    datatype: str | None = None
    shape: list[int] | None = None
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None

    @property
    def binary_size(self) -> int | None:
        size = (self.parameters or {}).get("binary_data_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ProtocolError(f"{self.name}: binary_data_size must be a non-negative integer")
        return size


class _InferenceBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    model_name: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[_Tensor] | None = None
    outputs: list[_Tensor] | None = None


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: the images' wire bytes and how to answer."""

    blobs: list[bytes]
    request_id: str | None
    binary_output: bool


def infer_request_body(blobs: list[bytes], binary_output: bool = True,
                       request_id: str | None = None) -> tuple[bytes, int]:  # fmt: skip
    """The body of an infer request carrying `blobs` with the binary extension.

    Returns (body, length of its JSON header) for the Inference-Header-Content-Length header.
    """
    elements = b"".join(LENGTH_PREFIX.pack(len(blob)) + blob for blob in blobs)
    header: dict[str, Any] = {
        "inputs": [{"name": PAYLOAD_INPUT, "shape": [len(blobs)], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(elements)}}],
    }  # fmt: skip
    if request_id is not None:
        header["id"] = request_id
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + elements, len(text)


def parse_infer_request(body: bytes, header_length: int | None,
                        max_images: int | None = None) -> InferRequest:  # fmt: skip
    """The images of an infer request (JSON, or JSON + binary data). Raises ProtocolError,
    TooManyImages as soon as the JSON header declares more than `max_images` images (before
    any element is split or decoded)."""
    header, binary = _split_body(body, header_length)
    if not header.inputs:
        raise ProtocolError(f"the request has no inputs; send the BYTES input {PAYLOAD_INPUT!r}")
    offset = 0
    blobs = None
    for tensor in header.inputs:
        size = tensor.binary_size
        chunk = None
        if size is not None:
            if offset + size > len(binary):
                raise ProtocolError(f"{tensor.name}: binary_data_size {size} runs past the "
                                    f"{len(binary)} bytes of binary data")  # fmt: skip
            chunk = binary[offset : offset + size]
            offset += size
        if tensor.name != PAYLOAD_INPUT:
            raise ProtocolError(f"unknown input {tensor.name!r}; this model takes the BYTES "
                                f"input {PAYLOAD_INPUT!r}")  # fmt: skip
        if blobs is not None:
            raise ProtocolError(f"input {PAYLOAD_INPUT!r} given twice")
        blobs = _payload_elements(tensor, chunk, max_images)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(blobs=blobs, request_id=header.id,
                        binary_output=_wants_binary_output(header))  # fmt: skip


def split_request(body: bytes, header_length: int | None,
                  max_images: int) -> tuple[InferRequest, list[int]]:  # fmt: skip
    """The request's elements and the decoded size of each (from their headers alone).
    A module-level function of a torch-free module: the server runs it in a parser process."""
    parsed = parse_infer_request(body, header_length, max_images)
    return parsed, [decoded_size(blob) for blob in parsed.blobs]


def declared_images(header: bytes) -> int | None:
    """The image count the JSON header of an infer request declares for its payload input
    (None when the header does not parse or declares none: the full parse says why), so a
    server can refuse too many before reading the binary data behind the header."""
    try:
        parsed = _InferenceBody.model_validate_json(header)
    except ValidationError:
        return None
    for tensor in parsed.inputs or ():
        if tensor.name == PAYLOAD_INPUT and tensor.shape and len(tensor.shape) == 1:
            return tensor.shape[0]
    return None


def infer_response_body(model_name: str, logits: np.ndarray, binary: bool,
                        request_id: str | None = None,
                        parameters: dict | None = None) -> tuple[bytes, int | None]:  # fmt: skip
    """The body answering an infer request: logits [B, classes] float32 (and `parameters`,
    e.g. the server's timings).

    Returns (body, JSON header length) with binary output, else (JSON body, None).
    """
    logits = np.ascontiguousarray(logits, dtype="<f4")
    output: dict[str, Any] = {"name": LOGITS_OUTPUT, "datatype": "FP32",
                              "shape": list(logits.shape)}  # fmt: skip
    header: dict[str, Any] = {"model_name": model_name, "outputs": [output]}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    if binary:
        data = logits.tobytes()
        output["parameters"] = {"binary_data_size": len(data)}
        text = json.dumps(header, separators=(",", ":")).encode()
        return text + data, len(text)
    output["data"] = logits.ravel().tolist()  # float32 -> float64 -> float32 is exact
    return json.dumps(header, separators=(",", ":")).encode(), None


def parse_logits(body: bytes, header_length: int | None) -> tuple[np.ndarray, dict]:
    """The logits [B, classes] float32 of an infer response and its parameters.

    Raises ProtocolError.
    """
    header, binary = _split_body(body, header_length)
    outputs = [t for t in header.outputs or () if t.name == LOGITS_OUTPUT]
    if len(outputs) != 1 or outputs[0].datatype != "FP32" or not outputs[0].shape \
            or len(outputs[0].shape) != 2:  # fmt: skip
        raise ProtocolError(f"the response has no FP32 output {LOGITS_OUTPUT!r} of shape "
                            "[B, classes]")  # fmt: skip
    tensor = outputs[0]
    if any(size < 0 for size in tensor.shape):
        raise ProtocolError(f"logits have a negative dimension: {tensor.shape}")
    count = tensor.shape[0] * tensor.shape[1]
    if tensor.binary_size is not None:
        if tensor.binary_size != 4 * count or len(binary) != 4 * count:
            raise ProtocolError("binary logits do not match their declared shape")
        values = np.frombuffer(binary, dtype="<f4")
    else:
        data = tensor.data or []
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
            raise ProtocolError("JSON logits must be a flat list of numbers")
        values = np.asarray(data, dtype=np.float32)
    if values.size != count:
        raise ProtocolError("logits do not match their declared shape")
    return values.reshape(tensor.shape).astype(np.float32), dict(header.parameters or {})


def parse_header_length(value: str | None) -> int | None:
    """The Inference-Header-Content-Length header as an int (None when absent)."""
    if value is None:
        return None
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise ProtocolError(f"{INFERENCE_HEADER} must be a non-negative integer, not {value!r}")
    return int(value)


def _split_body(body: bytes, header_length: int | None) -> tuple[_InferenceBody, bytes]:
    if header_length is None:
        header_length = len(body)
    if header_length < 0:
        raise ProtocolError(f"{INFERENCE_HEADER} must not be negative")
    if header_length > len(body):
        raise ProtocolError(f"{INFERENCE_HEADER} {header_length} exceeds the body's "
                            f"{len(body)} bytes")  # fmt: skip
    try:
        header = _InferenceBody.model_validate_json(body[:header_length])
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise ProtocolError(f"malformed inference JSON at {where}: {first['msg']}") from None
    return header, body[header_length:]


def _payload_elements(tensor: _Tensor, chunk: bytes | None,
                      max_images: int | None) -> list[bytes]:  # fmt: skip
    if tensor.datatype != "BYTES":
        raise ProtocolError(f"input {PAYLOAD_INPUT!r} must have datatype BYTES, not "
                            f"{tensor.datatype!r}")  # fmt: skip
    if tensor.shape is None or len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise ProtocolError(f"input {PAYLOAD_INPUT!r} must have shape [B] with B >= 1, not "
                            f"{tensor.shape}")  # fmt: skip
    declared = tensor.shape[0]
    if max_images is not None and declared > max_images:
        raise TooManyImages(f"{declared} images in one request; at most {max_images}")
    if chunk is not None:
        if tensor.data is not None:
            raise ProtocolError(f"input {PAYLOAD_INPUT!r} has both JSON data and binary data")
        blobs = _split_elements(chunk, declared)
    else:
        if tensor.data is None:
            raise ProtocolError(f"input {PAYLOAD_INPUT!r} carries no data")
        if len(tensor.data) != declared:
            raise ProtocolError(f"input {PAYLOAD_INPUT!r} declares shape {tensor.shape} but "
                                f"carries {len(tensor.data)} elements")  # fmt: skip
        blobs = []
        for element in tensor.data:
            if not isinstance(element, str):
                raise ProtocolError(f"JSON elements of {PAYLOAD_INPUT!r} must be base64 strings")
            try:
                blobs.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError) as error:  # ValueError: non-ASCII text
                raise ProtocolError(f"an element of {PAYLOAD_INPUT!r} is not base64: "
                                    f"{error}") from None  # fmt: skip
    if len(blobs) != tensor.shape[0]:
        raise ProtocolError(f"input {PAYLOAD_INPUT!r} declares shape {tensor.shape} but "
                            f"carries {len(blobs)} elements")  # fmt: skip
    return blobs


def _split_elements(chunk: bytes, declared: int) -> list[bytes]:
    """BYTES tensor data: 4-byte little-endian length, then the bytes, repeated; an element
    beyond the `declared` count is refused at once (not after splitting them all)."""
    elements, offset = [], 0
    while offset < len(chunk):
        if len(elements) == declared:
            raise ProtocolError(f"input {PAYLOAD_INPUT!r} declares shape [{declared}] but "
                                "carries more elements")  # fmt: skip
        if offset + LENGTH_PREFIX.size > len(chunk):
            raise ProtocolError("BYTES data ends inside an element's length")
        (size,) = LENGTH_PREFIX.unpack_from(chunk, offset)
        offset += LENGTH_PREFIX.size
        if offset + size > len(chunk):
            raise ProtocolError("BYTES data ends inside an element")
        elements.append(bytes(chunk[offset : offset + size]))
        offset += size
    return elements


def _wants_binary_output(header: _InferenceBody) -> bool:
    if (header.parameters or {}).get("binary_data_output") is True:
        return True
    for output in header.outputs or ():
        if output.name == LOGITS_OUTPUT and (output.parameters or {}).get("binary_data") is True:
            return True
    return False
