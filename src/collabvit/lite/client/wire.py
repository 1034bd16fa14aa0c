"""Bytes on the wire: an infer request as the edge builds and counts it (request line,
headers, body), a response counted likewise, answers read up to a cap, and the bytes one
offload costs for budgets computed offline."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np

from collabvit.lite.config import ClientConfig
from collabvit.lite.oip import INFERENCE_HEADER, infer_request_body, infer_response_body
from collabvit.lite.protocol import Codec, PatchPayload, WireGeometry, encode_payload

# What the edge reads of an answer at most, so that a broken or hostile server cannot make it
# hold more (times --concurrency). A collabvit server's metadata is under 1 KiB. Its answer
# for one image is a JSON header of about 200 bytes and 4 bytes a class (binary), or at most
# about 25 characters a class as JSON (a float's shortest repr and its comma); 64 bytes a
# class leaves room for either, and 1 MiB for everything else (parameters, timings).
METADATA_CAP = 2**20
ANSWER_CAP = 2**20
ANSWER_CAP_PER_CLASS = 64
# The content codings the edge decodes (it asks for none, so a server should send none):
# zlib's inflate at most about 1,000 times, and is fed DECODE_STEP bytes at a time, so one
# step never holds more than about 1 MiB however the body was made.
DECODED_CODINGS = ("gzip", "deflate")
DECODE_STEP = 1024


def request_wire_bytes(request: httpx.Request) -> int:
    """The bytes of an HTTP/1.1 request as it goes on the wire: request line, headers, body.

    httpx hands headers to h11 in their original spelling and order, and h11 writes
    `name: value\\r\\n` for each, so this is exact for requests with a Content-Length.
    """
    target = request.url.raw_path
    line = len(request.method) + 1 + len(target) + len(b" HTTP/1.1\r\n")
    headers = sum(len(name) + 2 + len(value) + 2 for name, value in request.headers.raw)
    return line + headers + 2 + len(request.content)


def response_wire_bytes(response: httpx.Response, body_bytes: int | None = None) -> int:
    """The bytes of an HTTP/1.1 response with a Content-Length: status line, headers, body
    (`body_bytes` of it as received, by default those of the response's content)."""
    line = len(b"HTTP/1.1 ") + 3 + 1 + len(response.reason_phrase) + 2
    headers = sum(len(name) + 2 + len(value) + 2 for name, value in response.headers.raw)
    return line + headers + 2 + (len(response.content) if body_bytes is None else body_bytes)


def answer_cap(num_classes: int | None) -> int:
    """The most bytes of an infer answer the edge reads (see ANSWER_CAP)."""
    return max(ANSWER_CAP, ANSWER_CAP_PER_CLASS * (num_classes or 0))


async def read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """The body of a streamed response, decoded as its Content-Encoding says, or None as
    soon as more than `cap` bytes have arrived or been decoded: the rest is never read. A
    chunked body declares no length, and a compressed one may decode to far more than
    arrived, so neither Content-Length nor the bytes received alone bound it.

    Raises httpx.DecodingError for a body that does not decode, or a coding not in
    DECODED_CODINGS.
    """
    if response.is_stream_consumed:  # read already, by an in-process transport
        return response.content if len(response.content) <= cap else None
    raw = bytearray()
    async for chunk in response.aiter_raw():
        raw += chunk
        if len(raw) > cap:
            return None
    named = response.headers.get_list("content-encoding", split_commas=True)
    codings = [c for c in (n.strip().lower() for n in named) if c not in ("", "identity")]
    if not codings:
        return bytes(raw)
    if len(codings) > 1 or codings[0] not in DECODED_CODINGS:
        raise httpx.DecodingError(f"Content-Encoding {', '.join(codings)} is not one the edge "
                                  "decodes")  # fmt: skip
    steps = (bytes(raw[i:i + DECODE_STEP]) for i in range(0, len(raw), DECODE_STEP))
    decoder = httpx.Response(200, headers={"content-encoding": codings[0]}, content=steps)
    body = bytearray()
    for chunk in decoder.iter_bytes():
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def infer_request(client: httpx.Client | httpx.AsyncClient, url: str,
                  blob: bytes) -> httpx.Request:  # fmt: skip
    """The infer request carrying one image's wire bytes (binary extension), as sent."""
    body, header_length = infer_request_body([blob])
    return client.build_request("POST", url, content=body,
                                headers={INFERENCE_HEADER: str(header_length)})  # fmt: skip


def trimmed_client_headers(client: httpx.Client | httpx.AsyncClient, token: str | None) -> None:
    """Drop httpx's default headers the server never reads: each costs bytes per image."""
    for name in ("user-agent", "accept", "accept-encoding"):
        client.headers.pop(name, None)
    if token:
        client.headers["authorization"] = f"Bearer {token}"


def offload_bytes(config: ClientConfig, model_name: str, geometry: WireGeometry,
                  num_classes: int) -> Callable[[PatchPayload], int]:  # fmt: skip
    """The bytes on the wire of offloading one image as `collabvit edge` does, for offline
    budgets: its request as ServerLink sends it (exact), and a collabvit server's answer
    (binary logits with the timings and load it reports, and the date, length and type
    headers `collabvit serve` sends, no server header; within a few bytes of a real one,
    whose timings vary in length)."""
    codec = Codec.parse(config.codec)
    builder = httpx.Client()  # builds requests only: it never connects
    trimmed_client_headers(builder, config.token)
    url = f"{config.server.rstrip('/')}/v2/models/{model_name}/infer"
    body, length = infer_response_body(model_name, np.zeros((1, num_classes), np.float32), True,
                                       parameters={"queue_ms": 0.123, "server_ms": 1.234,
                                                   "load": 0.125})  # fmt: skip
    answer = response_wire_bytes(httpx.Response(200, content=body, headers=[
        ("date", "Sun, 06 Dec 2026 09:00:00 GMT"), ("content-length", str(len(body))),
        ("content-type", "application/octet-stream"),
        (INFERENCE_HEADER, str(length))]))  # fmt: skip

    def wire_bytes(payload: PatchPayload) -> int:
        blob = encode_payload(payload, geometry, codec)
        return request_wire_bytes(infer_request(builder, url, blob)) + answer

    return wire_bytes
