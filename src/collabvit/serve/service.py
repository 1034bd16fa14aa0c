"""`collabvit serve`: the server model behind the Open Inference Protocol v2 (HTTP/REST).

FastAPI and uvicorn serve the protocol's health, metadata and infer endpoints.
Concurrent infer requests are batched dynamically: a batch collects payloads
until it holds `max_batch` images or `max_delay_ms` has passed since its first
one, then `Server.classify` (the same object the in-process evaluation uses)
runs it in one worker thread. The model loads and warms up after the server
starts listening, so /v2/health/ready answers 503 until it can classify.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from collabvit import __version__
from collabvit.lite.protocol import (
    CODECS,
    INFERENCE_HEADER,
    LOGITS_OUTPUT,
    PAYLOAD_INPUT,
    WIRE_VERSION,
    PatchPayload,
    ProtocolError,
    TooManyImages,
    WireGeometry,
    declared_images,
    decode_payload,
    infer_response_body,
    parse_header_length,
    split_request,
)
from collabvit.models.server import Server
from collabvit.serve.guard import (
    METRICS_STATE,
    CloseUnreadBodies,
    GuardedProtocol,
    ParsePool,
    ParserUnavailable,
    RequestLimit,
    guarded_protocol,
)

log = logging.getLogger("collabvit.serve")

ACCEPTED_CONTENT_TYPES = ("application/json", "application/octet-stream")
ERROR_KINDS = ("bad_request", "unauthorized", "too_large", "not_ready", "not_found",
               "unsupported_media_type", "overloaded", "body_timeout", "disconnected",
               "internal")  # fmt: skip
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceError(Exception):
    """A request the service refuses: an HTTP status, a metrics kind and a one-line reason."""

    def __init__(self, status: int, kind: str, message: str,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


@dataclass
class Metrics:
    """The service's Prometheus metrics, in a registry of its own (no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("collabvit_infer_requests", "Infer requests received",
                                registry=r)  # fmt: skip
        self.images = Counter("collabvit_infer_images", "Images classified", registry=r)
        self.errors = Counter("collabvit_errors", "Refused or failed requests by kind",
                              ["kind"], registry=r)  # fmt: skip
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.bytes_in = Counter("collabvit_request_body_bytes",
                                "Bytes of infer request bodies received", registry=r)  # fmt: skip
        self.batch_size = Histogram("collabvit_batch_images", "Images per dynamic batch",
                                    buckets=_BATCH_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("collabvit_queue_seconds",
                                    "Time an image waits for its batch to start",
                                    buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("collabvit_infer_latency_seconds",
                                 "Infer request latency, body read to answer",
                                 buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.dropped = Counter("collabvit_dropped_images",
                               "Images of requests whose client had gone, dropped before "
                               "the model computed them", registry=r)  # fmt: skip
        self.admitted_images = Gauge("collabvit_admitted_images",
                                     "Images admitted and not yet answered (queued or "
                                     "computing)", registry=r)  # fmt: skip
        self.admitted_bytes = Gauge("collabvit_admitted_bytes",
                                    "Decoded pixel bytes of the admitted images", registry=r)
        self.receiving_bytes = Gauge("collabvit_receiving_bytes",
                                     "Bytes of request bodies read and not yet decoded (they "
                                     "count against the same bound)", registry=r)  # fmt: skip
        self.open_connections = Gauge("collabvit_open_connections", "Open connections",
                                      registry=r)  # fmt: skip
        self.closed_connections = Counter("collabvit_closed_connections",
                                          "Connections the server closed by reason",
                                          ["reason"], registry=r)  # fmt: skip
        for reason in ("head_timeout", "evicted", "refused"):
            self.closed_connections.labels(reason)
        self.parsed_in_process = Counter("collabvit_parsed_in_process",
                                         "Request bodies whose JSON was parsed in the parser "
                                         "process (larger than 64 KiB)", registry=r)  # fmt: skip


@dataclass
class _Pending:
    payloads: list[PatchPayload]
    future: asyncio.Future
    queued_at: float


class Batcher:
    """Dynamic batching of payloads from concurrent requests.

    A batch starts with the oldest waiting request and takes further requests
    until it holds `max_batch` images, or until `max_delay` seconds have passed
    since it started and the model is free. While one batch computes (in a
    worker thread, so the event loop keeps serving HTTP), the next one fills
    up and starts the moment the model is free: request handling overlaps with
    computing. A single request larger than `max_batch` forms a batch alone.
    """

    def __init__(self, classify: Callable[[list[PatchPayload]], torch.Tensor], max_batch: int,
                 max_delay: float, metrics: Metrics) -> None:  # fmt: skip
        self.classify = classify
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.metrics = metrics
        self.pending: deque[_Pending] = deque()
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collabvit-batch")
        self.task: asyncio.Task | None = None
        self.running: asyncio.Task | None = None
        self.images_per_second: float | None = None  # the model's recent rate (Retry-After)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.running is not None:
            await asyncio.gather(self.running, return_exceptions=True)
        self.executor.shutdown(wait=True)

    def enqueue(self, payloads: list[PatchPayload]) -> asyncio.Future:
        """Queue payloads; the future gives (logits [len(payloads), classes] float32, seconds
        spent queued). Cancelling it before its batch starts drops the payloads uncomputed."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(payloads, future, time.perf_counter()))
        self.arrived.set()
        return future

    def _drop_cancelled(self) -> None:
        """Forget queued requests whose future was cancelled (their client went away)."""
        while self.pending and self.pending[0].future.done():
            self.metrics.dropped.inc(len(self.pending.popleft().payloads))
        if any(item.future.done() for item in self.pending):
            kept = deque()
            for item in self.pending:
                if item.future.done():
                    self.metrics.dropped.inc(len(item.payloads))
                else:
                    kept.append(item)
            self.pending = kept

    def _busy(self) -> bool:
        return self.running is not None and not self.running.done()

    async def _wait(self, timeout: float | None) -> None:
        """Until a request arrives, the running batch finishes, or `timeout` passes."""
        self.arrived.clear()
        arrival = asyncio.ensure_future(self.arrived.wait())
        waiters = {arrival, self.running} if self._busy() else {arrival}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrival.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            while not self.pending:
                await self._wait(None)
                self._drop_cancelled()
            batch, images = [], 0
            deadline = time.perf_counter() + self.max_delay
            while True:
                self._drop_cancelled()
                while self.pending and (not batch or images + len(self.pending[0].payloads)
                                        <= self.max_batch):  # fmt: skip
                    item = self.pending.popleft()
                    batch.append(item)
                    images += len(item.payloads)
                if images >= self.max_batch or self.pending:  # full
                    break
                remaining = deadline - time.perf_counter()
                if not self._busy() and remaining <= 0:
                    break
                await self._wait(None if self._busy() else remaining)
            if self._busy():  # full before the model was free
                await asyncio.wait({self.running})
            live = [item for item in batch if not item.future.done()]
            for item in batch:
                if item.future.done():
                    self.metrics.dropped.inc(len(item.payloads))
            if not live:
                continue
            images = sum(len(item.payloads) for item in live)
            self.running = loop.create_task(self._run_batch(loop, live, images))

    async def _run_batch(self, loop, batch: list[_Pending], images: int) -> None:
        started = time.perf_counter()
        payloads = [p for item in batch for p in item.payloads]
        self.metrics.batch_size.observe(images)
        for item in batch:
            self.metrics.queue_time.observe(started - item.queued_at)
        try:
            logits = await loop.run_in_executor(self.executor, self._classify, payloads)
            rate = images / max(time.perf_counter() - started, 1e-6)
            self.images_per_second = rate if self.images_per_second is None else \
                0.8 * self.images_per_second + 0.2 * rate  # fmt: skip
        except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        offset = 0
        for item in batch:
            count = len(item.payloads)
            if not item.future.done():  # the client may have gone away
                item.future.set_result((logits[offset : offset + count],
                                        started - item.queued_at))  # fmt: skip
            offset += count

    def _classify(self, payloads: list[PatchPayload]) -> np.ndarray:
        return self.classify(payloads).cpu().numpy().astype(np.float32, copy=False)


class Admission:
    """Bounds the work admitted and not yet answered, in images, and the memory requests
    hold, in bytes: the bodies being read or parsed and the decoded pixels of the admitted
    images, against one bound.

    A body chunk that would cross the bytes bound is refused (503 with Retry-After, and the
    connection closes), so bodies that arrive slowly or stall cannot hold more memory than
    the bound, whatever the number of connections. A request that would cross a bound is
    refused the same way before its pixels are decoded, so neither the queue nor the
    server's memory grows without bound under overload. Used from the event loop only
    (no lock needed).
    """

    def __init__(self, max_images: int, max_bytes: int, metrics: Metrics) -> None:
        self.max_images, self.max_bytes, self.metrics = max_images, max_bytes, metrics
        self.images = self.bytes = self.receiving = 0

    def reserve(self, images: int, nbytes: int, retry_after: int, own_body: int = 0) -> None:
        """Count a request's images and decoded bytes in, or raise ServiceError 503 (413 if
        it could never fit). `own_body`: the bytes of its body held meanwhile (counted by
        `hold_body` already)."""
        if images > self.max_images or nbytes + own_body > self.max_bytes:
            raise ServiceError(413, "too_large", f"the request's {images} images decode to "
                               f"{nbytes:,} bytes; this server admits at most {self.max_images}"
                               f" images and {self.max_bytes:,} bytes at a time")  # fmt: skip
        if self.images + images > self.max_images or self.held + nbytes > self.max_bytes:
            raise ServiceError(503, "overloaded", f"the server is busy ({self.images} images "
                               f"queued); retry after {retry_after} s",
                               {"Retry-After": str(retry_after)})  # fmt: skip
        self._move(images, nbytes)

    def release(self, images: int, nbytes: int) -> None:
        self._move(-images, -nbytes)

    def hold_body(self, nbytes: int, retry_after: int) -> None:
        """Count `nbytes` more of a body being read, or raise ServiceError 503 (the request
        ends, and its connection: the caller releases what it held)."""
        if self.held + nbytes > self.max_bytes:
            raise ServiceError(503, "overloaded", f"the server holds {self.held:,} bytes of "
                               f"requests (at most {self.max_bytes:,}); retry after "
                               f"{retry_after} s", {"Retry-After": str(retry_after)})
        self.receiving += nbytes
        self.metrics.receiving_bytes.set(self.receiving)

    def release_body(self, nbytes: int) -> None:
        self.receiving -= nbytes
        self.metrics.receiving_bytes.set(self.receiving)

    @property
    def held(self) -> int:
        """Bytes counted against the bound: bodies not yet decoded and decoded pixels."""
        return self.bytes + self.receiving

    @property
    def load(self) -> float:
        """The share of the tighter bound in use (0..1): the load hint each answer carries,
        from which adaptive clients lower their share before the server has to refuse."""
        return max(self.images / self.max_images, self.held / self.max_bytes)

    def _move(self, images: int, nbytes: int) -> None:
        self.images += images
        self.bytes += nbytes
        self.metrics.admitted_images.set(self.images)
        self.metrics.admitted_bytes.set(self.bytes)


class BodyHold:
    """The bytes one request's body holds against the admission bound, released at once
    when the request ends (use as a context manager).

    A body being read also holds the buffers that carry it (asyncio reads up to 256 KiB at
    a time, and h11 and uvicorn each keep what the application has not taken yet, with
    the allocator's slack around them): the first chunk counts `BUFFERS` more, so that
    many stalled uploads stay within the bound in resident memory (measured by
    bench_overload), not only in the bytes the application holds.
    """

    BUFFERS = 2**20

    def __init__(self, admission: Admission, retry_after: Callable[[], int]) -> None:
        self.admission, self.retry_after, self.bytes = admission, retry_after, 0

    def add(self, nbytes: int) -> None:
        if not self.bytes:
            nbytes += self.BUFFERS
        self.admission.hold_body(nbytes, self.retry_after())
        self.bytes += nbytes

    def release(self) -> None:
        self.admission.release_body(self.bytes)
        self.bytes = 0

    def __enter__(self) -> BodyHold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def host_header_form(host: str) -> str:
    """A host as a Host header spells it: IPv6 literals in brackets ([::1])."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host headers a server bound to `host` answers by default: that address and the
    loopback names, and, bound to every interface, the machine's names and addresses."""
    import socket

    names = {host, *LOOPBACK_HOSTS}
    if host in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    return tuple(sorted(host_header_form(name) for name in names if name))


def retry_after_seconds(queued_images: int, images_per_second: float | None) -> int:
    """Seconds until the admitted work has probably drained: 1 to 30."""
    if not images_per_second:
        return 1
    return max(1, min(30, math.ceil(queued_images / images_per_second)))


@dataclass(frozen=True)
class ServiceSettings:
    """How the service answers (the model comes separately, from a loader)."""

    model_name: str
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_request_bytes: int = 16 * 2**20
    max_request_images: int = 1024
    max_queue_images: int = 4096
    max_queue_bytes: int = 512 * 2**20
    body_timeout: float = 30.0
    decode_threads: int = 2
    parse_processes: int = 1  # for JSON over 64 KiB (guard.ParsePool)
    max_requests_in_flight: int = 256  # probes not counted (guard.RequestLimit)
    allowed_hosts: tuple[str, ...] | None = None  # Host headers answered; None: any
    token: str | None = field(default=None, repr=False)  # never in a log


class ModelState:
    """The server model once loaded and warmed; None before."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.geometry: WireGeometry | None = None
        self.error: str | None = None
        self.ready = threading.Event()

    def load(self, load_server: Callable[[], Server]) -> None:
        try:
            server = load_server()
            geometry = WireGeometry.of(server.geometry)
            warm_up(server)
        except Exception as error:  # noqa: BLE001 - reported by /v2/health/ready and the log
            self.error = f"{type(error).__name__}: {error}"
            log.error("the model failed to load: %s", self.error)
            return
        self.server, self.geometry = server, geometry
        self.ready.set()
        log.info("model ready: %s", server.geometry.describe())


def warm_up(server: Server) -> None:
    """One forward with every patch and one with none, so the first request is not slow."""
    g = server.geometry
    full = PatchPayload(np.arange(g.num_patches),
                        np.zeros((g.num_patches, g.in_chans, *g.patch_size), dtype=np.uint8))
    empty = PatchPayload(np.zeros(0, dtype=np.int64),
                         np.zeros((0, g.in_chans, *g.patch_size), dtype=np.uint8))  # fmt: skip
    server.classify([full, empty])


def create_app(settings: ServiceSettings, load_server: Callable[[], Server]) -> FastAPI:
    """The Open Inference Protocol v2 application serving one model.

    Args:
        settings: name, batching, limits and the optional bearer token.
        load_server: builds the Server (model on its device); called in a thread after
            start-up, so health checks answer while it loads; the service warms it up.
    """
    metrics = Metrics()
    state = ModelState()
    admission = Admission(settings.max_queue_images, settings.max_queue_bytes, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, args=(load_server,), daemon=True,
                                  name="collabvit-load")  # fmt: skip
        loader.start()
        batcher = Batcher(lambda payloads: state.server.classify(payloads), settings.max_batch,
                          settings.max_delay_ms / 1000.0, metrics)  # fmt: skip
        batcher.start()
        app.state.batcher = batcher
        # parsing and decoding run here, never on the event loop: health, metrics and the
        # batcher keep answering while a large or hostile request is taken apart
        app.state.decoder = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                               thread_name_prefix="collabvit-decode")
        app.state.parser = ParsePool(settings.parse_processes, app.state.decoder,
                                     sent=metrics.parsed_in_process.inc)  # fmt: skip
        # the lifespan state reaches uvicorn's protocol (GuardedProtocol counts connections)
        yield {METRICS_STATE: metrics}
        # uvicorn has drained the in-flight requests before it gets here
        await batcher.stop()
        app.state.parser.shutdown()
        app.state.decoder.shutdown(wait=True)

    app = FastAPI(title="collabvit", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.metrics = metrics
    app.state.model = state
    app.state.admission = admission
    app.add_middleware(RequestLimit, limit=settings.max_requests_in_flight,
                       refused=metrics.errors.labels("overloaded").inc)  # fmt: skip
    if settings.allowed_hosts is not None:  # DNS rebinding: answer only the names we serve
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=[
            host_header_form(host) for host in settings.allowed_hosts])
    app.add_middleware(CloseUnreadBodies)  # the outermost: it sees every early answer

    def error_response(status: int, kind: str, message: str, headers=None) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else error.headers
        return error_response(error.status, error.kind, error.message, headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        # nobody reads this answer; the disconnect is counted, not logged as an error
        return error_response(499, "disconnected", "the client closed the connection")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code in (404, 405) else "bad_request"
        return error_response(error.status_code, kind, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, "bad_request", "malformed request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, "internal", f"internal error: {type(error).__name__}")

    def authorized(request: Request) -> bool:
        if not settings.token:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), settings.token.strip().encode())

    async def authorize(request: Request) -> None:
        """A FastAPI dependency of every route but the health checks (probes need no token)."""
        if not authorized(request):
            raise ServiceError(401, "unauthorized", "missing or wrong bearer token")

    protected = [Depends(authorize)]

    def check_model(name: str) -> Server:
        if name != settings.model_name:
            raise ServiceError(404, "not_found", f"unknown model {name!r}; this server serves "
                                                 f"{settings.model_name!r}")  # fmt: skip
        if not state.ready.is_set():
            reason = f" (it failed to load: {state.error})" if state.error else ""
            raise ServiceError(503, "not_ready", f"model {name!r} is not ready{reason}")
        return state.server

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        is_ready = state.ready.is_set()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2", dependencies=protected)
    async def server_metadata() -> dict:
        return {"name": "collabvit", "version": __version__,
                "extensions": ["binary_tensor_data"]}  # fmt: skip

    @app.get("/v2/models/{name}/ready")  # a health check (KServe v2): no token
    async def model_ready(name: str, request: Request) -> JSONResponse:
        # without the token, every name answers as the served one: a probe learns whether
        # the server is ready, not which model names it serves
        if name != settings.model_name and authorized(request):
            raise ServiceError(404, "not_found", f"unknown model {name!r}")
        is_ready = state.ready.is_set()
        return JSONResponse({"name": name, "ready": is_ready},
                            status_code=200 if is_ready else 503)  # fmt: skip

    @app.get("/v2/models/{name}", dependencies=protected)
    async def model_metadata(name: str) -> dict:
        server = check_model(name)
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
                "max_batch": settings.max_batch, "max_delay_ms": settings.max_delay_ms,
            },
        }  # fmt: skip

    @app.post("/v2/models/{name}/infer", dependencies=protected)
    async def infer(name: str, request: Request) -> Response:
        started = time.perf_counter()
        check_model(name)
        metrics.requests.inc()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        # A web page can POST cross-site without a CORS preflight only with no content type
        # or a form/text one, and never with a custom header: such requests are refused.
        # tritonclient sends no content type, but the binary extension's header.
        binary_extension = not content_type and INFERENCE_HEADER.lower() in request.headers
        if content_type not in ACCEPTED_CONTENT_TYPES and not binary_extension:
            shown = repr(content_type) if content_type else "missing"
            raise ServiceError(415, "unsupported_media_type",
                               f"content type {shown} is not accepted; send "
                               f"{' or '.join(ACCEPTED_CONTENT_TYPES)}")  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            header_length = parse_header_length(request.headers.get(INFERENCE_HEADER))
        except ProtocolError as error:
            raise ServiceError(400, "bad_request", str(error)) from None
        batcher, parser = app.state.batcher, app.state.parser

        def retry_after() -> int:
            return retry_after_seconds(admission.images, batcher.images_per_second)

        async def parse(json_bytes: int, function, *args):
            """`function(*args)` in the parse pool; JSON over 64 KiB in a parser process."""
            try:
                return await parser.run(json_bytes, function, *args)
            except ParserUnavailable as error:
                raise ServiceError(503, "overloaded", f"{error}; retry after 1 s",
                                   {"Retry-After": "1"}) from None  # fmt: skip

        async def check_header(header: bytes) -> None:
            count = await parse(len(header), declared_images, header)
            if count is not None and count > settings.max_request_images:
                raise ServiceError(413, "too_large", f"{count} images in one request; at most "
                                   f"{settings.max_request_images}")

        with BodyHold(admission, retry_after) as held:
            try:
                body = await asyncio.wait_for(
                    read_limited_body(request, settings.max_request_bytes, header_length,
                                      check_header, held.add), settings.body_timeout)
            except TimeoutError:
                raise ServiceError(408, "body_timeout", "the request body did not arrive "
                                   f"within {settings.body_timeout:g} s") from None
            metrics.bytes_in.inc(len(body))
            try:
                parsed, sizes = await parse(
                    len(body) if header_length is None else header_length, split_request,
                    body, header_length, settings.max_request_images)  # fmt: skip
            except TooManyImages as error:
                raise ServiceError(413, "too_large", str(error)) from None
            except (ProtocolError, ValueError) as error:
                raise ServiceError(400, "bad_request", str(error)) from None
            # the elements are copies of the body's bytes: they stand for it in `held` now
            del body
            blobs, binary_output, request_id = parsed.blobs, parsed.binary_output, parsed.request_id
            del parsed
            count, nbytes = len(blobs), sum(sizes)
            admission.reserve(count, nbytes, retry_after(), own_body=held.bytes)
            try:
                try:
                    payloads = await loop.run_in_executor(app.state.decoder, decode_all,
                                                          blobs, state.geometry)
                except (ProtocolError, ValueError) as error:
                    raise ServiceError(400, "bad_request", str(error)) from None
                del blobs  # what the pixels still need of them is counted in `nbytes`
                held.release()
                logits, queued = await answer_unless_gone(request, batcher.enqueue(payloads))
            finally:
                admission.release(count, nbytes)
        metrics.images.inc(len(payloads))
        elapsed = time.perf_counter() - started
        metrics.latency.observe(elapsed)
        content, header_length = infer_response_body(
            name, logits, binary_output, request_id,
            parameters={"queue_ms": round(queued * 1000, 3),
                        "server_ms": round(elapsed * 1000, 3), "load": round(admission.load, 3)},
        )  # fmt: skip
        headers = {INFERENCE_HEADER: str(header_length)} if header_length is not None else None
        media = "application/octet-stream" if header_length is not None else "application/json"
        return Response(content, media_type=media, headers=headers)

    @app.get("/metrics", dependencies=protected)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def decode_all(blobs: list[bytes], geometry: WireGeometry) -> list[PatchPayload]:
    return [decode_payload(blob, geometry) for blob in blobs]


async def answer_unless_gone(request: Request, answer: asyncio.Future):
    """The batcher's answer, or ClientDisconnect as soon as the client closes the connection
    (the queued work is then cancelled: the batcher drops it uncomputed)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answer.done():
        answer.cancel()
        raise ClientDisconnect()
    return answer.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_limited_body(request: Request, limit: int, header_length: int | None = None,
                            check_header: Callable | None = None,
                            hold: Callable[[int], None] | None = None) -> bytes:  # fmt: skip
    """The request body, refusing (413) one longer than `limit` bytes before reading it all.

    With `check_header`, that coroutine sees the first `header_length` bytes (the binary
    extension's JSON header) as soon as they have arrived, before the rest is read, and may
    refuse the request there. `hold(n)` is told of each chunk's bytes before it is kept
    (and may refuse the request: BodyHold.add).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ServiceError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ServiceError(413, "too_large", f"request body of {declared} bytes exceeds "
                                                 f"the limit of {limit}")  # fmt: skip
    chunks, size = [], 0
    pending_check = check_header is not None and header_length is not None
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, "too_large", f"request body exceeds the limit of {limit} "
                                                 "bytes")  # fmt: skip
        if hold is not None:
            hold(len(chunk))
        chunks.append(chunk)
        if pending_check and size >= header_length:
            pending_check = False
            await check_header(b"".join(chunks)[:header_length])
    return b"".join(chunks)


WORKER_ENV = "COLLABVIT_SERVE_WORKER"  # what each --workers process serves, as JSON


def serve(settings: ServiceSettings, load_server: Callable[[], Server], host: str = "127.0.0.1",
          port: int = 8000, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          access_log: bool = False, graceful_timeout: float = 30.0, max_connections: int = 1024,
          timeout_keep_alive: float = 5.0, timeout_request_head: float = 10.0, workers: int = 1,
          worker: dict | None = None) -> None:  # fmt: skip
    """Serve until SIGINT/SIGTERM; in-flight requests finish before the process exits.

    With `workers` > 1, uvicorn starts that many processes, each loading the model itself
    from `worker` (the model spec, device, threads and precision: worker_app reads them),
    with the same settings; `load_server` is then not used. The requests in progress are
    bounded by the application (settings.max_requests_in_flight, probes exempt), the
    connections by the protocol (GuardedProtocol), never by uvicorn's limit_concurrency,
    which counts idle connections and refuses health checks with them.
    """
    import uvicorn

    max_connections = allow_open_files(max_connections)
    freeze_what_lives_long()
    options = dict(host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                   access_log=access_log, log_level="info",
                   timeout_graceful_shutdown=graceful_timeout, server_header=False,
                   timeout_keep_alive=timeout_keep_alive)  # fmt: skip
    if workers > 1:
        os.environ[WORKER_ENV] = json.dumps({**(worker or {}), "head_timeout":
                                             timeout_request_head, "max_connections":
                                             max_connections,
                                             "settings": settings_to_json(settings)})
        uvicorn.run("collabvit.serve.service:worker_app", factory=True, workers=workers,
                    http="collabvit.serve.guard:GuardedProtocol", **options)  # fmt: skip
        return
    config = uvicorn.Config(create_app(settings, load_server),
                            http=guarded_protocol(timeout_request_head, max_connections),
                            **options)  # fmt: skip
    uvicorn.Server(config).run()


def freeze_what_lives_long() -> None:
    """Exempt every object alive now (torch, timm, the model, the application) from the
    cyclic garbage collector's passes, for the life of this server process.

    Each connection leaves a little cyclic garbage, and the collector's full passes walk
    every object of the process: with torch loaded, a pass stalls the event loop for a
    tenth of a second or more, which a flood of connections triggers again and again.
    Frozen objects are not walked (the same use as CPython's documentation gives for
    gc.freeze: objects made before a server starts serving).
    """
    import gc

    gc.collect()
    gc.freeze()


def allow_open_files(max_connections: int, spare: int = 64) -> int:
    """Raise this process's open-file limit to fit `max_connections` sockets and `spare`
    other files, as far as the hard limit allows; the connections that then fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
        if soft < wanted:
            log.warning("the open-file limit (%d) fits %d connections, not %d", soft,
                        max(soft - spare, 1), max_connections)  # fmt: skip
            return max(soft - spare, 1)
    return max_connections


def settings_to_json(settings: ServiceSettings) -> dict:
    values = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    if values["allowed_hosts"] is not None:
        values["allowed_hosts"] = list(values["allowed_hosts"])
    return values


def worker_app() -> FastAPI:
    """The application of one `collabvit serve --workers N` process: what it serves comes
    from the environment (WORKER_ENV), and it loads the model itself."""
    from collabvit.lite.config import ModelSpec

    spec = json.loads(os.environ[WORKER_ENV])
    values = spec["settings"]
    if values.get("allowed_hosts") is not None:
        values["allowed_hosts"] = tuple(values["allowed_hosts"])
    settings = ServiceSettings(**values)
    GuardedProtocol.head_timeout = spec["head_timeout"]
    GuardedProtocol.max_connections = spec["max_connections"]
    freeze_what_lives_long()  # this process's torch and timm (its model loads later)

    def load_server() -> Server:
        from collabvit.models.pair import load_model, resolve_device

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        model = load_model(ModelSpec(**spec["model"]), server=True)
        if spec.get("bf16"):
            model = model.to(torch.bfloat16)
        return Server(model, resolve_device(spec.get("device", "cpu")),
                      max_batch=settings.max_batch)  # fmt: skip

    return create_app(settings, load_server)
