"""The service's data plane, free of HTTP: what each Open Inference Protocol v2 call does
(`DataPlane`), from health and metadata to an infer request's whole way: its body read
under the admission bound, parsed and decoded off the event loop, batched, answered.

The routes (routes.py) hand it strings and a `RequestBody` and turn what it returns, or
the ServiceError it raises, into HTTP answers; it owns the worker pools and the batcher
for the life of the application (`start`, `stop`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import generate_latest

from collabvit import __version__
from collabvit.lite.oip import (
    LOGITS_OUTPUT,
    PAYLOAD_INPUT,
    InferRequest,
    declared_images,
    infer_response_body,
    parse_header_length,
    split_request,
)
from collabvit.lite.protocol import (
    CODECS,
    WIRE_VERSION,
    PatchPayload,
    ProtocolError,
    TooManyImages,
    WireGeometry,
    decode_payload,
)
from collabvit.models.server import Server
from collabvit.serve.batching import Admission, Batcher, BodyHold, retry_after_seconds
from collabvit.serve.guard import ParsePool, ParserUnavailable
from collabvit.serve.metrics import Metrics, ServiceError
from collabvit.serve.model import ModelState
from collabvit.serve.settings import ServiceSettings

ACCEPTED_CONTENT_TYPES = ("application/json", "application/octet-stream")


class RequestBody(Protocol):
    """What the data plane needs of an infer request's transport (routes.HttpBody)."""

    async def read(self, limit: int, header_length: int | None,
                   check_header: Callable[[bytes], Awaitable[None]],
                   hold: Callable[[int], None]) -> bytes:  # fmt: skip
        """The body, refused (ServiceError 413) past `limit` bytes; `check_header` sees the
        first `header_length` bytes as soon as they arrive, `hold(n)` each chunk's bytes."""

    async def answer_unless_gone(self, answer: asyncio.Future):
        """`answer`'s result, or an exception as soon as the client has gone (cancelling
        `answer`)."""


@dataclass(frozen=True)
class InferAnswer:
    """An infer answer's body, and its JSON header's length with binary output (else None)."""

    content: bytes
    header_length: int | None


def decode_all(blobs: list[bytes], geometry: WireGeometry) -> list[PatchPayload]:
    """Every wire blob of a request decoded (run in the decode pool)."""
    return [decode_payload(blob, geometry) for blob in blobs]


class DataPlane:
    """The protocol's calls on one served model, each a method the routes call once."""

    def __init__(self, settings: ServiceSettings, state: ModelState, metrics: Metrics,
                 admission: Admission) -> None:  # fmt: skip
        self.settings, self.state, self.metrics, self.admission = (settings, state, metrics,
                                                                   admission)  # fmt: skip
        self.batcher: Batcher | None = None
        self.decoder: ThreadPoolExecutor | None = None
        self.parser: ParsePool | None = None

    def start(self) -> None:
        """Start the batcher and the pools (on the running event loop, at start-up)."""
        settings = self.settings
        self.batcher = Batcher(lambda payloads: self.state.server.classify(payloads),
                               settings.max_batch, settings.max_delay_ms / 1000.0,
                               self.metrics)  # fmt: skip
        self.batcher.start()
        # parsing and decoding run here, never on the event loop: health, metrics and the
        # batcher keep answering while a large or hostile request is taken apart
        self.decoder = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                          thread_name_prefix="collabvit-decode")
        self.parser = ParsePool(settings.parse_processes, self.decoder,
                                sent=self.metrics.parsed_in_process.inc)  # fmt: skip

    async def stop(self) -> None:
        """Finish the running batch and end the pools (the requests in flight have ended)."""
        await self.batcher.stop()
        self.parser.shutdown()
        self.decoder.shutdown(wait=True)

    def live(self) -> bool:
        """Whether the server is live: it is, whenever it answers."""
        return True

    def ready(self) -> bool:
        """Whether the model can classify."""
        return self.state.ready.is_set()

    def model_ready(self, name: str, authorized: bool) -> bool:
        """Whether model `name` can classify; ServiceError 404 for another name, told only
        to an `authorized` caller."""
        # without the token, every name answers as the served one: a probe learns whether
        # the server is ready, not which model names it serves
        if name != self.settings.model_name and authorized:
            raise ServiceError(404, "not_found", f"unknown model {name!r}")
        return self.ready()

    def server_metadata(self) -> dict:
        """The server's metadata: its name, version and protocol extensions."""
        return {"name": "collabvit", "version": __version__,
                "extensions": ["binary_tensor_data"]}  # fmt: skip

    def model_metadata(self, name: str) -> dict:
        """The served model's metadata: its tensors, geometry, codecs and batching."""
        server = self.check_model(name)
        g, norm = server.geometry, server.normalization
        return {
            "name": name,
            "versions": ["1"],
            "platform": "pytorch_timm",
            "inputs": [{"name": PAYLOAD_INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": LOGITS_OUTPUT, "datatype": "FP32",
                         "shape": [-1, g.num_classes]}],
            "parameters": {
                "channels": g.in_chans, "image_size": list(g.img_size),
                "patch_size": list(g.patch_size), "grid_size": list(g.grid_size),
                "num_classes": g.num_classes,
                "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
                "codecs": list(CODECS), "wire_version": WIRE_VERSION,
                "max_batch": self.settings.max_batch,
                "max_delay_ms": self.settings.max_delay_ms,
                "precision": server.precision,
                **({"class_names": server.class_names} if server.class_names else {}),
            },
        }  # fmt: skip

    def prometheus(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.metrics.registry)

    def check_model(self, name: str) -> Server:
        """The Server of model `name`; ServiceError 404 for another name, 503 until ready."""
        settings, state = self.settings, self.state
        if name != settings.model_name:
            raise ServiceError(404, "not_found", f"unknown model {name!r}; this server serves "
                                                 f"{settings.model_name!r}")  # fmt: skip
        if not state.ready.is_set():
            reason = f" (it failed to load: {state.error})" if state.error else ""
            raise ServiceError(503, "not_ready", f"model {name!r} is not ready{reason}")
        return state.server

    async def infer(self, name: str, content_type: str, inference_header: str | None,
                    body: RequestBody) -> InferAnswer:  # fmt: skip
        """Classify the images of one infer request.

        Args:
            name: the model the request names.
            content_type: its Content-Type header ("" when absent).
            inference_header: its Inference-Header-Content-Length header (the binary
                extension), None when absent.
            body: its body and connection.
        """
        started = time.perf_counter()
        self.check_model(name)
        self.metrics.requests.inc()
        header_length = self._accepted(content_type, inference_header)
        with BodyHold(self.admission, self._retry_after) as held:
            parsed, sizes = await self._receive(body, header_length, held)
            # the elements are copies of the body's bytes: they stand for it in `held` now
            blobs, binary_output, request_id = parsed.blobs, parsed.binary_output, parsed.request_id
            del parsed
            count, nbytes = len(blobs), sum(sizes)
            self.admission.reserve(count, nbytes, self._retry_after(), own_body=held.bytes)
            try:
                payloads = await self._decode(blobs)
                del blobs  # what the pixels still need of them is counted in `nbytes`
                held.release()
                logits, queued = await body.answer_unless_gone(self.batcher.enqueue(payloads))
            finally:
                self.admission.release(count, nbytes)
        self.metrics.images.inc(len(payloads))
        elapsed = time.perf_counter() - started
        self.metrics.latency.observe(elapsed)
        content, header_length = infer_response_body(
            name, logits, binary_output, request_id,
            parameters={"queue_ms": round(queued * 1000, 3),
                        "server_ms": round(elapsed * 1000, 3),
                        "load": round(self.admission.load, 3),
                        # an answer computed in less than float32 says so (float32 answers
                        # equal eval's, and stay as short as they were)
                        **({"precision": self.state.server.precision}
                           if self.state.server.precision != "float32" else {}),
                        **({"replica": self.settings.replica} if self.settings.replica
                           else {})},
        )  # fmt: skip
        return InferAnswer(content, header_length)

    def _accepted(self, content_type: str, inference_header: str | None) -> int | None:
        """The binary extension's JSON header length (None without it) of a request whose
        content type is accepted; ServiceError 415 or 400 otherwise."""
        content_type = content_type.split(";")[0].strip().lower()
        # A web page can POST cross-site without a CORS preflight only with no content type
        # or a form/text one, and never with a custom header: such requests are refused.
        # tritonclient sends no content type, but the binary extension's header.
        binary_extension = not content_type and inference_header is not None
        if content_type not in ACCEPTED_CONTENT_TYPES and not binary_extension:
            shown = repr(content_type) if content_type else "missing"
            raise ServiceError(415, "unsupported_media_type",
                               f"content type {shown} is not accepted; send "
                               f"{' or '.join(ACCEPTED_CONTENT_TYPES)}")  # fmt: skip
        try:
            return parse_header_length(inference_header)
        except ProtocolError as error:
            raise ServiceError(400, "bad_request", str(error)) from None

    async def _receive(self, body: RequestBody, header_length: int | None,
                       held: BodyHold) -> tuple[InferRequest, list[int]]:  # fmt: skip
        """The request's elements and their decoded sizes, its body read within the time-out
        and held against the bound by `held` meanwhile."""
        settings = self.settings
        try:
            raw = await asyncio.wait_for(
                body.read(settings.max_request_bytes, header_length, self._check_header,
                          held.add), settings.body_timeout)  # fmt: skip
        except TimeoutError:
            raise ServiceError(408, "body_timeout", "the request body did not arrive "
                               f"within {settings.body_timeout:g} s") from None
        self.metrics.bytes_in.inc(len(raw))
        try:
            return await self._parse(len(raw) if header_length is None else header_length,
                                     split_request, raw, header_length,
                                     settings.max_request_images)  # fmt: skip
        except TooManyImages as error:
            raise ServiceError(413, "too_large", str(error)) from None
        except (ProtocolError, ValueError) as error:
            raise ServiceError(400, "bad_request", str(error)) from None

    async def _check_header(self, header: bytes) -> None:
        """Refuse (413) a request whose JSON header declares too many images."""
        count = await self._parse(len(header), declared_images, header)
        if count is not None and count > self.settings.max_request_images:
            raise ServiceError(413, "too_large", f"{count} images in one request; at most "
                               f"{self.settings.max_request_images}")

    async def _parse(self, json_bytes: int, function, *args):
        """`function(*args)` in the parse pool; JSON over 64 KiB in a parser process."""
        try:
            return await self.parser.run(json_bytes, function, *args)
        except ParserUnavailable as error:
            raise ServiceError(503, "overloaded", f"{error}; retry after 1 s",
                               {"Retry-After": "1"}) from None  # fmt: skip

    async def _decode(self, blobs: list[bytes]) -> list[PatchPayload]:
        """The request's payloads, decoded in the decode pool; ServiceError 400 if one fails."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.decoder, decode_all, blobs,
                                              self.state.geometry)  # fmt: skip
        except (ProtocolError, ValueError) as error:
            raise ServiceError(400, "bad_request", str(error)) from None

    def _retry_after(self) -> int:
        return retry_after_seconds(self.admission.images, self.batcher.images_per_second)
