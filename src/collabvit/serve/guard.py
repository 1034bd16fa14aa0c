"""What keeps `collabvit serve` answering whatever its clients do.

- `GuardedProtocol`: uvicorn's h11 protocol with a time-out for request heads (slowloris)
  and a cap on open connections, at which the longest-idle connection makes room; a new
  connection is refused (503 with Retry-After) only when every open one has a request in
  progress. Idle connections therefore never shut anybody out.
- `RequestLimit`: ASGI middleware bounding the requests in progress; health, readiness
  and metrics are never counted or refused, so probes answer whatever else is held.
- `CloseUnreadBodies`: an answer given before its request's body was read says
  `Connection: close`, since the connection ends after it.
- `ParsePool`: request JSON larger than a few pages is parsed in a separate process, so
  a body built to be slow to parse (millions of tiny strings) never holds the
  interpreter lock that the event loop, health checks and admitted work need.

The application (app.py) assembles them; this module knows nothing of the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import re
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("collabvit.serve")

# the lifespan state key under which the service hands its metrics to the protocol
METRICS_STATE = "collabvit_metrics"
# routes a probe or a scraper calls: never counted against the request limit
PROBE_PATHS = re.compile(r"^/(v2/health/(live|ready)|v2/models/[^/]+/ready|metrics)$")
INLINE_JSON_BYTES = 64 * 2**10
LINGER_SECONDS = 1.0  # a refused connection drops what it is sent this long before closing


def is_probe(path: str) -> bool:
    return PROBE_PATHS.match(path) is not None


def refusal_bytes(message: str, retry_after: int = 1) -> bytes:
    """A whole HTTP/1.1 503 answer with Retry-After that closes its connection, for
    refusals made before any request has been read (no ASGI app is involved)."""
    body = json.dumps({"error": message}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"retry-after: {retry_after}\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, guarded against connections that hold without asking.

    - A connection whose request line and headers have not all arrived `head_timeout`
      seconds after it opened (or after its last answer) is closed: uvicorn times out
      idle keep-alive connections, but not a head that trickles in, byte by byte.
    - At most `max_connections` stay open. A new connection past the cap closes the
      connection idle the longest (one with no request in progress: never answered
      anything, or waiting between keep-alive requests); only when none is idle is the
      new one answered 503 with Retry-After and closed. Idle sockets thus cost a file
      descriptor each, never the service.

    Subclass per server with `guarded_protocol`; the idle connections are kept in order
    on uvicorn's per-server state, so finding the oldest costs nothing.
    """

    head_timeout = 10.0
    max_connections: int | None = None
    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self))
        self._mark_idle()
        # each connection past the cap closes one (itself at worst), so the count of those
        # not yet closed stays at the cap without scanning them
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._make_room()
        self._count_open()

    def handle_events(self) -> None:
        super().handle_events()
        if self.head_timer is not None and self.conn.their_state is not h11.IDLE:
            self.head_timer.cancel()  # the request head is complete
            self.head_timer = None
            self._idle().pop(self, None)

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # answered before its body arrived (a refusal): the rest of the body could
            # trickle in under no time-out at all, so the connection ends here
            self.transport.close()
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._mark_idle()  # the next request's head gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)
        self._count_open()

    def _idle(self) -> dict[GuardedProtocol, None]:
        """This server's idle connections, the longest idle first (a dict keeps order)."""
        state = self.server_state
        if not hasattr(state, "collabvit_idle"):
            state.collabvit_idle = {}
        return state.collabvit_idle

    def _mark_idle(self) -> None:
        idle = self._idle()
        idle.pop(self, None)
        idle[self] = None
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _make_room(self) -> None:
        idle = self._idle()
        oldest = next((c for c in idle if c is not self and not c.transport.is_closing()),
                      None)  # fmt: skip
        if oldest is not None:
            oldest._close("evicted")
            return
        self.transport.write(refusal_bytes(
            f"the server has {self.max_connections} connections open, each with a request "
            "in progress; retry later"))  # fmt: skip
        self._forget()
        self.transport.linger()
        metrics = self._metrics()
        if metrics is not None:
            metrics.closed_connections.labels("refused").inc()
            metrics.errors.labels("overloaded").inc()

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # what arrives after the last answer is dropped
            super().data_received(data)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            log.debug("closed a connection whose request head took over %g s",
                      self.head_timeout)  # fmt: skip
            self._close("head_timeout")

    def _forget(self) -> None:
        """No longer idle, no longer timed."""
        self._idle().pop(self, None)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _close(self, reason: str) -> None:
        self._forget()
        metrics = self._metrics()
        if metrics is not None:
            metrics.closed_connections.labels(reason).inc()
        self.transport.close()

    def _metrics(self):
        return self.app_state.get(METRICS_STATE) if self.app_state else None

    def _count_open(self) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics.open_connections.set(len(self.connections))


class LingeringTransport:
    """A connection's transport whose close() lingers while the client may still be sending.

    A client that is sending a body (or a request the server refuses before reading it)
    would have its next bytes answered with a reset once the socket is closed, and a reset
    can destroy the answer before the client reads it: the 503 or 413 it should see
    becomes a connection error. So the sending side closes at once and what arrives is
    dropped until the client closes or LINGER_SECONDS pass (a lingering close, as web
    servers do). Everything else is the asyncio transport's own.
    """

    def __init__(self, transport, protocol: GuardedProtocol) -> None:
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if self._protocol.conn.their_state is h11.SEND_BODY:  # a body still arriving
            self.linger()
        else:
            self._transport.close()

    def linger(self) -> None:
        self.lingering = True
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._transport.resume_reading()  # drained, not left to fill the socket's buffer
        self._protocol.loop.call_later(LINGER_SECONDS, self._transport.close)


def guarded_protocol(head_timeout: float, max_connections: int | None = None) -> type:
    """GuardedProtocol with these limits, a class of its own per server."""
    return type("GuardedProtocol", (GuardedProtocol,), {"head_timeout": head_timeout,
                                                          "max_connections": max_connections})


class RequestLimit:
    """ASGI middleware: at most `limit` requests in progress, past it 503 + Retry-After.

    Probes (health, readiness, metrics) are neither counted nor refused: they do no work
    worth bounding, and a liveness probe that fails under load restarts a server that
    was only busy. `refused()` is called for each refusal (the service counts them).
    """

    def __init__(self, app, limit: int, refused: Callable[[], None] | None = None) -> None:
        self.app, self.limit, self.refused = app, limit, refused
        self.in_progress = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or is_probe(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            if self.refused is not None:
                self.refused()
            body = json.dumps({"error": f"the server has {self.limit} requests in progress; "
                               "retry later"}).encode()  # fmt: skip
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"),
                (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class CloseUnreadBodies:
    """ASGI middleware: an answer sent before its request's body has been read whole says
    `Connection: close`.

    Such an answer (a refusal: 400, 401, 413, 415, 503) leaves body bytes on the
    connection that nobody will read, so the connection ends after it (GuardedProtocol);
    saying so in the answer keeps a client from sending its next request on a connection
    that is closing, which it would see as a server that hung up without answering.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        read = (b"transfer-encoding" not in headers
                and headers.get(b"content-length", b"0").strip() in (b"0", b""))  # fmt: skip

        async def tracked_receive():
            nonlocal read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read = True
            return message

        async def marked_send(message) -> None:
            headers = message.get("headers", [])
            if message["type"] == "http.response.start" and not read and not any(
                    name.lower() == b"connection" for name, _ in headers):  # fmt: skip
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracked_receive, marked_send)


class ParserUnavailable(RuntimeError):
    """The parser process died (it is started again for the next request)."""


class ParsePool:
    """Runs a parsing function in threads when the JSON it parses is small, else in a
    separate process.

    Python's JSON parsers hold the interpreter lock for the whole parse, in any thread:
    16 MiB of tiny strings hold it for about half a second, and with it the event loop.
    A parser process holds its own. Small JSON (most requests: the binary extension's
    header, or a few images) stays in the threads, where the round trip to a process
    would cost more than the parse. The processes start with the first large body.

    Args:
        processes: parser processes at most.
        threads: the executor for small parses (and whatever else the caller runs there).
        inline_bytes: JSON up to this size is parsed in `threads`.
        sent: called for each parse sent to a parser process (the service counts them).
    """

    def __init__(self, processes: int, threads: Executor, inline_bytes: int = INLINE_JSON_BYTES,
                 sent: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.processes, self.threads, self.inline_bytes = processes, threads, inline_bytes
        self.sent = sent
        self.pool: ProcessPoolExecutor | None = None
        self.in_process = 0  # parses sent to a parser process

    async def run(self, json_bytes: int, parse: Callable[..., Any], *args) -> Any:
        """`parse(*args)` where it belongs for `json_bytes` of JSON. `parse` must be a
        module-level function of a module that does not import torch (it is pickled)."""
        loop = asyncio.get_running_loop()
        if json_bytes <= self.inline_bytes:
            return await loop.run_in_executor(self.threads, parse, *args)
        if self.pool is None:
            # spawn, not fork: the server process has model threads whose locks a fork copies
            self.pool = ProcessPoolExecutor(self.processes,
                                            mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_yield_to_the_server)  # fmt: skip
        self.in_process += 1
        if self.sent is not None:
            self.sent()
        try:
            return await loop.run_in_executor(self.pool, parse, *args)
        except BrokenProcessPool:
            self.pool = None
            raise ParserUnavailable("the parser process ended unexpectedly") from None

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _yield_to_the_server() -> None:
    """A parser process runs at a lower priority than the server: on a machine with few
    cores, a flood of bodies to parse then takes the CPU time the server leaves, not the
    time its event loop needs."""
    import os

    try:
        os.nice(10)
    except OSError:
        pass
