"""The HTTP side of the Open Inference Protocol v2: the routes (`Endpoints`), each calling
one data-plane method, the bearer token they check, the request body read under its limit
(`read_limited_body`) and watched for the client going away (`answer_unless_gone`), and
the mapping of every failure to a JSON error answer counted by kind.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from collabvit.lite.oip import INFERENCE_HEADER
from collabvit.serve.dataplane import DataPlane
from collabvit.serve.metrics import ServiceError

log = logging.getLogger("collabvit.serve")


class Endpoints:
    """The protocol's routes over one data plane, and the answers to what fails in them."""

    def __init__(self, plane: DataPlane, token: str | None) -> None:
        self.plane, self.token = plane, token

    def register(self, app: FastAPI) -> None:
        """Add the routes and the error answers to `app`."""
        for error, handler in ((ServiceError, self.service_error),
                               (ClientDisconnect, self.client_gone),
                               (StarletteHTTPException, self.http_error),
                               (RequestValidationError, self.validation_error),
                               (Exception, self.internal_error)):  # fmt: skip
            app.add_exception_handler(error, handler)
        protected = [Depends(self.authorize)]  # probes (the health checks) need no token
        app.add_api_route("/v2/health/live", self.live, methods=["GET"])
        app.add_api_route("/v2/health/ready", self.ready, methods=["GET"])
        app.add_api_route("/v2", self.server_metadata, methods=["GET"], dependencies=protected)
        app.add_api_route("/v2/models/{name}/ready", self.model_ready, methods=["GET"])
        app.add_api_route("/v2/models/{name}", self.model_metadata, methods=["GET"],
                          dependencies=protected)  # fmt: skip
        app.add_api_route("/v2/models/{name}/infer", self.infer, methods=["POST"],
                          dependencies=protected)  # fmt: skip
        app.add_api_route("/metrics", self.prometheus_metrics, methods=["GET"],
                          dependencies=protected)  # fmt: skip

    # ------------------------------------------------------------------ routes

    async def live(self) -> dict:
        """GET /v2/health/live."""
        return {"live": self.plane.live()}

    async def ready(self) -> JSONResponse:
        """GET /v2/health/ready: 503 until the model can classify."""
        is_ready = self.plane.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def server_metadata(self) -> dict:
        """GET /v2."""
        return self.plane.server_metadata()

    async def model_ready(self, name: str, request: Request) -> JSONResponse:
        """GET /v2/models/{name}/ready: a health check (KServe v2), so no token needed."""
        is_ready = self.plane.model_ready(name, self.authorized(request))
        return JSONResponse({"name": name, "ready": is_ready},
                            status_code=200 if is_ready else 503)  # fmt: skip

    async def model_metadata(self, name: str) -> dict:
        """GET /v2/models/{name}."""
        return self.plane.model_metadata(name)

    async def infer(self, name: str, request: Request) -> Response:
        """POST /v2/models/{name}/infer: JSON, or the binary extension's JSON and bytes."""
        answer = await self.plane.infer(name, request.headers.get("content-type", ""),
                                        request.headers.get(INFERENCE_HEADER),
                                        HttpBody(request))  # fmt: skip
        binary = answer.header_length is not None
        headers = {INFERENCE_HEADER: str(answer.header_length)} if binary else None
        media = "application/octet-stream" if binary else "application/json"
        return Response(answer.content, media_type=media, headers=headers)

    async def prometheus_metrics(self) -> Response:
        """GET /metrics."""
        return Response(self.plane.prometheus(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ the token

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the bearer token (compared in constant time)."""
        if not self.token:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.token.strip().encode())

    async def authorize(self, request: Request) -> None:
        """A FastAPI dependency of every route but the health checks (probes need no token)."""
        if not self.authorized(request):
            raise ServiceError(401, "unauthorized", "missing or wrong bearer token")

    # ------------------------------------------------------------------ error answers

    def error_response(self, status: int, kind: str, message: str,
                       headers=None) -> JSONResponse:  # fmt: skip
        """A JSON error answer, counted under `kind`."""
        self.plane.metrics.errors.labels(kind).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def service_error(self, request: Request, error: ServiceError) -> JSONResponse:
        """A refusal of the service's own."""
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else error.headers
        return self.error_response(error.status, error.kind, error.message, headers)

    async def client_gone(self, request: Request, error: ClientDisconnect) -> JSONResponse:
        """A request whose client went away."""
        # nobody reads this answer; the disconnect is counted, not logged as an error
        return self.error_response(499, "disconnected", "the client closed the connection")

    async def http_error(self, request: Request,
                         error: StarletteHTTPException) -> JSONResponse:  # fmt: skip
        """Starlette's refusals (no such route or method, a Host not allowed...)."""
        kind = "not_found" if error.status_code in (404, 405) else "bad_request"
        return self.error_response(error.status_code, kind, str(error.detail))

    async def validation_error(self, request: Request,
                               error: RequestValidationError) -> JSONResponse:  # fmt: skip
        """A request FastAPI could not validate."""
        return self.error_response(400, "bad_request", "malformed request")

    async def internal_error(self, request: Request, error: Exception) -> JSONResponse:
        """Anything else: a bug, logged with its trace, answered without it."""
        log.exception("internal error")
        return self.error_response(500, "internal", f"internal error: {type(error).__name__}")


class HttpBody:
    """An HTTP request's body and connection as the data plane reads them
    (dataplane.RequestBody)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    async def read(self, limit: int, header_length: int | None, check_header: Callable,
                   hold: Callable[[int], None]) -> bytes:  # fmt: skip
        """The body, by read_limited_body."""
        return await read_limited_body(self.request, limit, header_length, check_header, hold)

    async def answer_unless_gone(self, answer: asyncio.Future):
        """`answer`'s result, by answer_unless_gone."""
        return await answer_unless_gone(self.request, answer)


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
