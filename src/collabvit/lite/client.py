"""`collabvit edge`: the edge half of a deployment, talking to `collabvit serve` over HTTP.

The edge model classifies each batch; confident images keep its answer, the
others send their selected patches (wire format of protocol.py) to the server,
at most `concurrency` requests at a time. A request that fails for a reason
that may pass (unreachable, timeout, 5xx) is retried with doubling back-off;
when it still fails, or the server refuses it, the image keeps the edge's
answer and the cause is counted: every image gets exactly one answer.

Each answer is appended to a JSON Lines file as soon as it is known, so an
interrupted run resumes without repeating or losing an image. The summary is
computed from that file, with the same RunningSummary as `collabvit eval`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import reprlib
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from collabvit.lite.arrays import as_array
from collabvit.lite.config import ClientConfig, LinkConfig
from collabvit.lite.protocol import (
    INFERENCE_HEADER,
    Codec,
    PatchPayload,
    ProtocolError,
    WireGeometry,
    build_payloads,
    encode_payload,
    infer_request_body,
    infer_response_body,
    parse_header_length,
    parse_logits,
)
from collabvit.lite.summary import RunningSummary, Summary, ranked_classes


class EdgeRunner(Protocol):
    """What `run_edge` needs of an edge: `EdgeDevice` (torch) and `OnnxEdge` (ONNX Runtime).

    `geometry` has in_chans, patch_size, grid_size, num_patches and num_classes;
    `process(images [B, C, H, W], image_ids [B], seed)` returns a result with `logits`
    [B, classes], `uncertainty` [B], `confident` [B], `payloads` (one per image not
    confident, in order) and `selection_statistics()` -> (size, minimum, sum) [B] each;
    `set_operating_point(masking_th, uncer_th)` moves its (δ or k, η), None keeping one.
    """

    geometry: Any

    def process(self, images: Any, image_ids: Any, seed: int = 0) -> Any: ...

    def set_operating_point(self, masking_th: float | None = None,
                            uncer_th: float | None = None) -> None: ...  # fmt: skip


# Why an image kept the edge's answer although it was not confident: no answer within the
# time-out; connection refused (nothing listens); another network failure; another 5xx;
# 503/429 (the server is full or not ready); another 4xx; an answer that does not decode
# (malformed, over its size cap, or holding a logit that is not finite); the cool-down
# after the server proved unreachable or asked to wait (Retry-After). A TLS verification
# failure, a refused token and an unknown model are not fallbacks: they stop the run.
FALLBACK_CAUSES = ("timeout", "refused", "unreachable", "server_error", "unavailable", "rejected",
                   "bad_response", "server_down")  # fmt: skip
LOSS_STREAM = 0x1055  # separates the loss draws from the `random` policy's draws
RECORDS_FORMAT = "collabvit-edge-records/3"
RECORDS_SYNC_LINES = 64  # the records are fsynced every this many lines, and at the end
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


class ClientError(ValueError):
    """The run cannot start or continue (a one-line reason): e.g. a server whose model does
    not fit the edge's, or a records file of another run."""


class ServerUnavailable(ClientError):
    """No server answers at the URL now (refused, unreachable, silent): unlike a wrong
    server, token or certificate, --allow-edge-only runs on without it."""

    HINT = "--wait S waits for it, --allow-edge-only runs without it"


@dataclass(frozen=True)
class ImageRecord:
    """One image's outcome: a line of the records file.

    Attributes:
        index: dataset index. label: its class.
        edge_top, final_top: the edge's and the final answer's best classes, best first.
        confident: answered at the edge by the gate.
        route: "edge" (confident), "server", "fallback" (sent, but the edge answered), or
            "withheld" (the gate would send it, the budget did not: the edge answered).
        cause: for a fallback, one of FALLBACK_CAUSES; for a withheld image "budget" (the
            controller refused the send) or "busy" (every request slot was taken).
        selected: patches selected. delivered: patches that reached the server (loss).
        selection_min, selection_sum: of the selected scores.
        payload_bytes: the wire-format bytes of the image; request_bytes: the whole HTTP
            request (request line, headers, body); response_bytes: the whole response.
        full_bytes: request bytes of sending the full image instead, per codec name.
        attempts: requests made. edge_ms, transfer_ms, server_ms, total_ms: latencies;
            with --images-per-second, total_ms counts from the image's arrival.
        answered_at: when the answer was final (Unix time, seconds), so that the records of
            several clients line up.
    """

    index: int
    label: int
    edge_top: list[int]
    final_top: list[int]
    confident: bool
    route: str
    cause: str | None
    selected: int
    delivered: int
    selection_min: float
    selection_sum: float
    payload_bytes: int
    request_bytes: int
    response_bytes: int
    full_bytes: dict[str, int]
    attempts: int
    edge_ms: float
    transfer_ms: float | None
    server_ms: float | None
    total_ms: float
    answered_at: float = 0.0

    @property
    def offloaded(self) -> bool:
        """Sent to the server (whether or not it answered)."""
        return self.route in ("server", "fallback")

    @property
    def answered_at_edge(self) -> bool:
        """Not sent: the gate found it confident, or the budget withheld it."""
        return self.confident or self.route == "withheld"


# ------------------------------------------------------------------ bytes on the wire


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


def tls_verification(ca_file: str | None) -> bool | ssl.SSLContext:
    """httpx's `verify`: the system's CAs, and also a private CA's certificate when given."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def trimmed_client_headers(client: httpx.AsyncClient, token: str | None) -> None:
    """Drop httpx's default headers the server never reads: each costs bytes per image."""
    for name in ("user-agent", "accept", "accept-encoding"):
        client.headers.pop(name, None)
    if token:
        client.headers["authorization"] = f"Bearer {token}"


# ------------------------------------------------------------------ link emulation


def lose_patches(payload: PatchPayload, loss: float, seed: int, index: int) -> PatchPayload:
    """The payload without the patches an emulated link loses, each with probability `loss`,
    drawn from (seed, image index) so that reruns lose the same patches."""
    if loss <= 0 or payload.size == 0:
        return payload
    rng = np.random.default_rng([seed, index, LOSS_STREAM])
    kept = rng.random(payload.size) >= loss
    return PatchPayload(positions=payload.positions[kept], patches=payload.patches[kept])


def transmission_time(link: LinkConfig, request_bytes: int, response_bytes: int) -> float:
    """Seconds the emulated link takes to carry one exchange's bytes (0 without a bandwidth)."""
    if link.bandwidth is None:
        return 0.0
    return 8.0 * (request_bytes + response_bytes) / link.bandwidth


def link_delay(link: LinkConfig, request_bytes: int, response_bytes: int) -> float:
    """Seconds an emulated link adds to one exchange alone: its round trip plus transmission."""
    return link.rtt / 1000.0 + transmission_time(link, request_bytes, response_bytes)


# ------------------------------------------------------------------ talking to the server


def _causes(error: BaseException):
    """The error and the chain of errors behind it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def tls_failure(error: BaseException) -> str | None:
    """A one-line reason when a connection failed in TLS (verification, wrong protocol)."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed ({cause.reason or cause})"
    return None


def connection_refused(error: BaseException) -> bool:
    return any(isinstance(cause, ConnectionRefusedError) for cause in _causes(error))


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a 503/429 answer asks to wait (Retry-After in seconds), else None."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isascii() and value.isdigit() else None


def backoff_seconds(backoff: float, attempt: int, asked: float | None, rng: random.Random) -> float:
    """Pause before retry `attempt` (1, 2, ...): the doubling back-off with ±50 % jitter (so
    clients that failed together do not retry together), at least what the server asked."""
    pause = backoff * 2 ** (attempt - 1) * rng.uniform(0.5, 1.5)
    return max(pause, asked or 0.0)


@dataclass(frozen=True)
class ServerAnswer:
    """What one offloaded image got back: logits [classes] or a fallback cause, and the
    server's load hint (0..1) or the seconds a 503/429 asked to wait, when given."""

    logits: np.ndarray | None
    cause: str | None
    attempts: int
    request_bytes: int
    response_bytes: int
    transfer_ms: float | None
    server_ms: float | None
    load: float | None = None
    retry_after: float | None = None


class ServerLink:
    """The connection to one served model: retries, back-off and a short circuit breaker.

    Owns an httpx.AsyncClient; use as an async context manager. Failures that may pass
    become fallbacks with a cause (FALLBACK_CAUSES); those that will not (TLS verification,
    a refused token, an unknown model) raise ClientError and stop the run. With `shed`, a
    503 or 429 is not retried: the answer carries the seconds it asked to wait (at least
    1), and the caller answers at the edge meanwhile instead of retrying into the queue.
    """

    def __init__(self, config: ClientConfig, model_name: str, link: LinkConfig,
                 num_classes: int | None = None, seed: int = 0,
                 shed: bool = False) -> None:  # fmt: skip
        self.config = config
        self.shed = shed
        self.link = link
        self.model_name = model_name
        self.num_classes = num_classes
        base = config.server.rstrip("/")
        self.base = base
        self.infer_url = f"{base}/v2/models/{model_name}/infer"
        self.metadata_url = f"{base}/v2/models/{model_name}"
        self.client = httpx.AsyncClient(
            timeout=config.timeout, verify=tls_verification(config.ca_file),
            limits=httpx.Limits(max_connections=config.concurrency,
                                max_keepalive_connections=config.concurrency),
        )  # fmt: skip
        trimmed_client_headers(self.client, config.token)
        self.down_until = 0.0
        self.link_free_at = 0.0
        self.jitter = random.Random(seed)

    async def __aenter__(self) -> ServerLink:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    async def exchange(self, request: httpx.Request,
                       cap: int) -> tuple[httpx.Response, bytes | None]:  # fmt: skip
        """Send `request`; its response and body, read up to `cap` bytes (None beyond)."""
        response = await self.client.send(request, stream=True)
        try:
            return response, await read_capped(response, cap)
        finally:
            await response.aclose()

    async def metadata(self) -> dict:
        """The served model's metadata. ClientError with a one-line reason when there is no
        collabvit server serving it at the URL (refused, unreachable, TLS, another server,
        an answer that does not decode or exceeds METADATA_CAP)."""
        url = self.base
        asked = f"GET /v2/models/{self.model_name}"
        try:
            response, content = await asyncio.wait_for(self.exchange(
                self.client.build_request("GET", self.metadata_url), METADATA_CAP),
                self.config.timeout)  # fmt: skip
        except (TimeoutError, httpx.TimeoutException):
            raise ServerUnavailable(f"{url} did not answer within {self.config.timeout:g} s; "
                                    f"{ServerUnavailable.HINT}") from None  # fmt: skip
        except httpx.DecodingError as error:  # it answered: not a server that is missing
            raise ClientError(f"{url} answered {asked} with a body that could not be decoded "
                              f"({_first_line(error)})") from None  # fmt: skip
        except httpx.HTTPError as error:
            tls = tls_failure(error)
            if tls and "verif" in tls:
                raise ClientError(f"{url}: {tls}; for a private CA pass --ca-file with its "
                                  "certificate") from None  # fmt: skip
            if tls:
                raise ClientError(f"{url}: {tls}: does the server speak HTTPS? for a plain "
                                  "HTTP server use http://") from None  # fmt: skip
            if connection_refused(error):
                raise ServerUnavailable(f"nothing answers at {url} (connection refused): is "
                                        "`collabvit serve` running there? "
                                        f"{ServerUnavailable.HINT}") from None  # fmt: skip
            if isinstance(error, httpx.RemoteProtocolError):
                raise ClientError(f"{url} closed the connection without an HTTP answer: if "
                                  "the server serves HTTPS, use https://") from None
            raise ServerUnavailable(f"cannot reach {url}: {_first_line(error)}; "
                                    f"{ServerUnavailable.HINT}") from None  # fmt: skip
        if response.status_code in (401, 403):
            raise ClientError(f"the server refused the token ({response.status_code}); "
                              "pass --token or set COLLABVIT_TOKEN")  # fmt: skip
        if content is None:
            raise ClientError(f"{url} answered {asked} with over {METADATA_CAP:,} bytes: not "
                              "a collabvit server's metadata")  # fmt: skip
        body = _json_or_none(content)
        if response.status_code == 404 and isinstance(body, dict) and "error" in body:
            raise ClientError(f"the server does not serve {self.model_name!r}: "
                              f"{_shown(body['error'])}")  # fmt: skip
        if not isinstance(body, dict) or (response.status_code == 200 and "name" not in body):
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise ClientError(f"{url} is not a collabvit server: {asked} answered "
                              f"{response.status_code} ({_shown(kind)})")  # fmt: skip
        if response.status_code != 200:
            why = _shown(body.get("error", ""))
            raise ClientError(f"the server cannot serve {self.model_name!r} now "
                              f"({response.status_code}): {why}")  # fmt: skip
        return body

    def build_request(self, blob: bytes) -> httpx.Request:
        return infer_request(self.client, self.infer_url, blob)

    def emulated_delay(self, request_bytes: int, response_bytes: int) -> float:
        """Seconds one exchange waits on the emulated link: its round trip, plus its bytes'
        turn on a link that carries one transmission at a time (shared by every request)."""
        now = time.monotonic()
        self.link_free_at = max(now, self.link_free_at) + transmission_time(
            self.link, request_bytes, response_bytes)  # fmt: skip
        return self.link.rtt / 1000.0 + self.link_free_at - now

    async def classify(self, blob: bytes, counted_bytes: int | None = None,
                       request: httpx.Request | None = None) -> ServerAnswer:  # fmt: skip
        """The server's logits for one image's wire bytes, retrying what may pass.

        Each attempt has `timeout` seconds in all (not per read). Retries wait a jittered,
        doubling back-off, and at least what a 503/429 asks (Retry-After); when it asks for
        longer than the time-out, the image answers at the edge and so do later ones until
        then. The bytes reported are those of every attempt that reached the server, and of
        every response, failed ones included.

        Args:
            blob: the image's wire-format bytes.
            counted_bytes: the request bytes to report per attempt (the pre-loss request
                under an emulated lossy link); default: this request's own bytes.
            request: `blob`'s request (build_request) when the caller already built it.
        """
        if time.monotonic() < self.down_until:
            return ServerAnswer(None, "server_down", 0, 0, 0, None, None)
        request = request or self.build_request(blob)  # the same request on every attempt
        cap = answer_cap(self.num_classes)
        one_request = counted_bytes if counted_bytes is not None else request_wire_bytes(request)
        sent = received = attempts = 0
        cause, asked = "unreachable", None
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(backoff_seconds(self.config.backoff, attempt, asked,
                                                    self.jitter))  # fmt: skip
            asked = None
            attempts += 1
            started = time.perf_counter()
            try:
                response, content = await asyncio.wait_for(self.exchange(request, cap),
                                                           self.config.timeout)  # fmt: skip
            except httpx.ConnectTimeout:
                cause = "unreachable"  # nothing went out
                continue
            except (TimeoutError, httpx.TimeoutException):
                cause, sent = "timeout", sent + one_request
                continue
            except httpx.ConnectError as error:
                tls = tls_failure(error)
                if tls:
                    raise ClientError(f"{self.base}: {tls}") from None
                cause = "refused" if connection_refused(error) else "unreachable"
                continue
            except httpx.DecodingError:  # e.g. a Content-Encoding the body does not have
                sent += one_request
                return ServerAnswer(None, "bad_response", attempts, sent, received, None, None)
            except (httpx.TransportError, OSError):
                cause, sent = "unreachable", sent + one_request  # the connection broke
                continue
            elapsed = time.perf_counter() - started
            sent += one_request
            received += response_wire_bytes(response, response.num_bytes_downloaded)
            status = response.status_code
            if status in (401, 403):
                raise ClientError(f"the server refused the token ({status}); pass --token or "
                                  "set COLLABVIT_TOKEN")  # fmt: skip
            if status == 404:
                raise ClientError(f"the server does not serve {self.model_name!r} (404)")
            if status in (429, 503):
                cause, asked = "unavailable", retry_after(response)
                if self.shed:
                    return ServerAnswer(None, cause, attempts, sent, received, None, None,
                                        retry_after=max(asked or 1.0, 1.0))  # fmt: skip
                if asked is not None and asked > self.config.timeout:
                    self.down_until = time.monotonic() + asked  # answer here meanwhile
                    break
                continue
            if status >= 500:
                cause = "server_error"
                continue
            if status != 200:
                return ServerAnswer(None, "rejected", attempts, sent, received, None, None)
            logits, parameters = self.answer_logits(response, content)
            if logits is None:
                return ServerAnswer(None, "bad_response", attempts, sent, received, None, None)
            delay = self.emulated_delay(one_request, response_wire_bytes(
                response, response.num_bytes_downloaded))  # fmt: skip
            if delay:
                await asyncio.sleep(delay)
            # the server's own figures, within what the edge saw: its time within the exchange
            server_ms = _number(parameters.get("server_ms"), 0.0, 1000.0 * elapsed)
            transfer_ms = 1000.0 * (elapsed + delay) - (server_ms or 0.0)
            return ServerAnswer(logits, None, attempts, sent, received, transfer_ms,
                                server_ms, _number(parameters.get("load"), 0.0, 1.0))  # fmt: skip
        if cause in ("unreachable", "refused", "timeout") and self.config.cooldown > 0:
            self.down_until = time.monotonic() + self.config.cooldown
        return ServerAnswer(None, cause, attempts, sent, received, None, None)

    def answer_logits(self, response: httpx.Response,
                      content: bytes | None) -> tuple[np.ndarray | None, dict]:  # fmt: skip
        """One image's logits [classes] and the parameters of a 200 answer; (None, {}) for
        an answer that is not one: over its cap, malformed, of another shape, or holding a
        logit that is not finite (NaN or infinite, also after the cast to float32)."""
        if content is None:
            return None, {}
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a float32 overflow is checked
                logits, parameters = parse_logits(content, parse_header_length(
                    response.headers.get(INFERENCE_HEADER)))  # fmt: skip
            if logits.shape[0] != 1:
                raise ProtocolError("the answer holds another number of images")
            if self.num_classes is not None and logits.shape[1] != self.num_classes:
                raise ProtocolError("the answer holds another number of classes")
            if not np.isfinite(logits).all():
                raise ProtocolError("the answer holds logits that are not finite")
        except (ValueError, OverflowError):  # ProtocolError, or numbers beyond any float
            return None, {}
        return logits[0], parameters


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _json_or_none(content: bytes):
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python goes
        return None


def _number(value, low: float = -math.inf, high: float = math.inf) -> float | None:
    """A finite number a server sent, brought within [low, high]; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return min(max(number, low), high) if math.isfinite(number) else None


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 160


def _shown(value) -> str:
    """Something a server sent, for a one-line message: a string's text, anything else as
    Python writes it, escaped (no line breaks or control characters) and cut short."""
    text = _SHOWN.repr(value)
    return text[1:-1] if isinstance(value, str) else text


def check_server(config: ClientConfig, model_name: str) -> dict:
    """The served model's metadata, or ClientError with a one-line reason (no server, TLS,
    another server, token, model): what a run checks before it loads its own model."""

    async def ask() -> dict:
        async with ServerLink(config, model_name, LinkConfig()) as link:
            return await link.metadata()

    return asyncio.run(ask())


def log_warning(message: str) -> None:
    """A one-line warning on stderr, as the command line prints them."""
    print(f"collabvit edge: warning: {message}", file=sys.stderr)


# What the edge reads of the served model's metadata parameters, and how many positive
# integers each holds (the sizes are [height, width] lists).
SERVED_GEOMETRY = (("channels", 1), ("patch_size", 2), ("grid_size", 2), ("num_classes", 1))


def served_geometry(metadata) -> tuple:
    """(channels, patch size, grid size, classes) of the served model's metadata; ClientError
    naming the first that is missing or malformed."""
    parameters = metadata.get("parameters") if isinstance(metadata, dict) else None
    if not isinstance(parameters, dict):
        raise ClientError("the server's model metadata has no parameters object (it has "
                          f"{_shown(parameters)}): is it a collabvit server?")  # fmt: skip
    served = []
    for name, count in SERVED_GEOMETRY:
        value = parameters.get(name)
        values = value if count > 1 and isinstance(value, list) else [value]
        if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool)
                                           and v > 0 for v in values):  # fmt: skip
            wanted = "a positive integer" if count == 1 else f"{count} positive integers"
            given = _shown(value) if name in parameters else "missing"
            raise ClientError(f"the server's model metadata is malformed: parameters.{name} "
                              f"must be {wanted}, not {given}")  # fmt: skip
        served.append(tuple(values) if count > 1 else value)
    return tuple(served)


def check_server_geometry(metadata: dict, geometry: WireGeometry, num_classes: int) -> None:
    """ClientError unless the served model takes the edge's patches and classes."""
    served = served_geometry(metadata)
    expected = (geometry.channels, geometry.patch_size, geometry.grid_size, num_classes)
    if served != expected:
        name = _SHOWN.repr(metadata.get("name"))
        raise ClientError(
            f"the served model {name} takes {served[0]} channel(s), "
            f"patches {served[1]} on a grid {served[2]}, {served[3]} classes; the edge sends "
            f"{expected[0]} channel(s), patches {expected[1]} on a grid {expected[2]}, "
            f"{expected[3]} classes"
        )


# ------------------------------------------------------------------ the records file


def run_identity(**parts) -> dict:
    """What must match for a records file to be continued: models, data, knobs, codec."""
    return json.loads(json.dumps(parts, default=str))


def open_records(path: Path, identity: dict, resume: bool,
                 count: int | None = None) -> dict[int, ImageRecord]:  # fmt: skip
    """Prepare the records file; return the images it already answers (when resuming).

    A resumed file must come from a run with the same identity. A last line cut off by
    an interruption is dropped (that image is done again), and so are records of images
    beyond `count` (the dataset of this run, e.g. a smaller --limit) and fallbacks (images
    that did not reach the server are sent again). Without `resume` an existing file is
    refused rather than emptied.
    """
    done: dict[int, ImageRecord] = {}
    if path.exists() and path.stat().st_size and not resume:
        raise ClientError(f"{path} holds the records of an earlier run: pass --resume to "
                          "continue it, or another --records file")  # fmt: skip
    if resume and path.exists():
        lines = path.read_bytes().split(b"\n")
        try:
            head = json.loads(lines[0])
        except ValueError:
            head = None
        if isinstance(head, dict) and str(head.get("format", "")).startswith(
                RECORDS_FORMAT.split("/")[0]) and head.get("format") != RECORDS_FORMAT:
            raise ClientError(f"{path} was written by an older collabvit ({head['format']}); "
                              "start a new run with another --records file")  # fmt: skip
        if not isinstance(head, dict) or head.get("format") != RECORDS_FORMAT:
            raise ClientError(f"{path} is not a collabvit edge records file")
        if head.get("run") != identity:
            changed = sorted(k for k in set(identity) | set(head.get("run") or {})
                             if identity.get(k) != (head.get("run") or {}).get(k))  # fmt: skip
            raise ClientError(f"{path} is from a run with other settings ({', '.join(changed)}); "
                              "use another --records file or drop --resume")  # fmt: skip
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                record = ImageRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue  # an interrupted write
            # an image that kept the edge's answer because the server was not reached is
            # tried again: resuming after the server is back delivers it
            if record.index not in done and record.route != "fallback" and (
                    count is None or record.index < count):  # fmt: skip
                done[record.index] = record
                kept.append(line)
        temporary = path.with_name(path.name + ".tmp")  # a crash here keeps the old file
        with temporary.open("wb") as handle:
            handle.write(b"\n".join(kept) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it replaces the old file
        temporary.replace(path)
        return done
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": RECORDS_FORMAT, "run": identity}) + "\n")
    return done


class RecordsLock:
    """An exclusive lock on a records file for one run (a `.lock` file beside it, since a
    resumed file is replaced): a second run on the same file stops instead of interleaving
    its lines with the first's."""

    def __init__(self, path: Path) -> None:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.with_name(path.name + ".lock").open("a")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise ClientError(f"{path} is being written by another run; wait for it or use "
                              "another --records file") from None  # fmt: skip

    def release(self) -> None:
        self.handle.close()  # closing releases the lock


class RecordWriter:
    """Appends one JSON line per answered image, flushed at once and fsynced every
    RECORDS_SYNC_LINES lines and on close, so a crash loses at most those."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("a", buffering=1)
        self.unsynced = 0

    def write(self, record: ImageRecord) -> None:
        self.handle.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self.handle.flush()
        self.unsynced += 1
        if self.unsynced >= RECORDS_SYNC_LINES:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.handle.fileno())
        self.unsynced = 0

    def close(self) -> None:
        self.sync()
        self.handle.close()


# ------------------------------------------------------------------ the run


@dataclass
class EdgeReport:
    """A run's figures: the paper's summary, bytes, fallbacks and latencies."""

    summary: Summary
    records: list[ImageRecord]
    fallbacks: dict[str, int]
    bytes: dict[str, dict[str, float]]
    latency_ms: dict[str, dict[str, float]]
    codec: str
    attempted: Summary  # as if every image the gate sent had reached the server
    withheld: int = 0  # images the gate would send that the budget answered at the edge
    seconds: float = 0.0  # from the first answer to the last

    def as_dict(self) -> dict:
        return {"summary": self.summary.as_dict(), "codec": self.codec,
                "fallbacks": self.fallbacks, "bytes_per_image": self.bytes,
                "latency_ms": self.latency_ms,
                "attempted": {"sent_images": self.attempted.sent_images,
                              "sent_tokens": self.attempted.sent_tokens,
                              "comm_cost": self.attempted.comm_cost},
                "withheld": self.withheld, "seconds": self.seconds,
                "wire_bytes_per_second": self.wire_bytes_per_second}  # fmt: skip

    @property
    def wire_bytes_per_second(self) -> float:
        """Requests and responses on the wire per second of the run (0 for an instant)."""
        total = self.bytes["collaborative"]
        wire = total["total_request_bytes"] + total["total_response_bytes"]
        return wire / self.seconds if self.seconds > 0 else 0.0

    @property
    def none_delivered(self) -> bool:
        """The gate sent images, and not one of them reached the server."""
        return self.attempted.sent_images > 0 and self.summary.sent_images == 0


def summarize(records: Iterable[ImageRecord], num_patches: int,
              delivered_only: bool = True) -> Summary:  # fmt: skip
    """The paper's figures of answered images, through the same RunningSummary as eval:
    sends that never reached the server count as undelivered (or, with `delivered_only`
    False, as sent: what the run attempted)."""
    records = list(records)
    running = RunningSummary(num_patches=num_patches)
    if records:
        running.update_ranked(
            np.array([r.label for r in records]),
            np.array([r.edge_top for r in records]),
            np.array([r.final_top for r in records]),
            np.array([r.answered_at_edge for r in records]),
            np.array([r.selected for r in records]),
            np.array([r.selection_min for r in records], dtype=np.float32),
            np.array([r.selection_sum for r in records], dtype=np.float32),
            delivered=np.array([r.route != "fallback" or not delivered_only
                                for r in records]),
        )
    return running.summary()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean of `values` in their unit (empty when there are none)."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(array.mean())}


def report(records: list[ImageRecord], num_patches: int, codec: Codec) -> EdgeReport:
    """Summary, fallbacks by cause, bytes per image and latency percentiles of a run."""
    sent = [r for r in records if r.offloaded]
    delivered = [r for r in sent if r.route == "server"]  # "per sent image": those that arrived
    count = max(len(records), 1)
    full_names = list(dict.fromkeys(name for r in records for name in r.full_bytes))
    bytes_table = {
        "collaborative": {"all_images": sum(r.request_bytes for r in records) / count,
                          "sent_images": (sum(r.request_bytes for r in delivered)
                                          / len(delivered) if delivered else 0.0),
                          "payload_all_images": sum(r.payload_bytes for r in records) / count,
                          "response_all_images": sum(r.response_bytes for r in records) / count,
                          "total_request_bytes": sum(r.request_bytes for r in records),
                          "total_response_bytes": sum(r.response_bytes for r in records)},
        **{f"full_{name}": {"all_images": sum(r.full_bytes[name] for r in records) / count}
           for name in full_names},
    }  # fmt: skip
    causes = Counter(r.cause for r in records if r.route == "fallback")
    latency = {
        "edge": percentiles([r.edge_ms for r in records]),
        "transfer": percentiles([r.transfer_ms for r in sent if r.transfer_ms is not None]),
        "server": percentiles([r.server_ms for r in sent if r.server_ms is not None]),
        "end_to_end_sent": percentiles([r.total_ms for r in sent]),
        "end_to_end_all": percentiles([r.total_ms for r in records]),
    }
    times = [r.answered_at for r in records]
    return EdgeReport(summarize(records, num_patches), records,
                      {cause: causes.get(cause, 0) for cause in FALLBACK_CAUSES}, bytes_table,
                      latency, str(codec), summarize(records, num_patches, False),
                      withheld=sum(r.route == "withheld" for r in records),
                      seconds=max(times) - min(times) if times else 0.0)  # fmt: skip


def settle(tasks: set[asyncio.Task]) -> None:
    """Forget the finished tasks, raising the first error among them: an image whose
    offloading failed must stop the run, not vanish from it."""
    for task in [t for t in tasks if t.done()]:
        tasks.discard(task)
        task.result()


def full_image_bytes(link: ServerLink, images: Any, geometry: WireGeometry,
                     codecs: dict[str, Codec]) -> list[dict[str, int]]:  # fmt: skip
    """Request bytes of sending each whole image instead, per codec: [B] dicts."""
    everything = np.ones((images.shape[0], geometry.num_patches), dtype=bool)
    payloads = build_payloads(images, everything, list(range(images.shape[0])),
                              geometry.patch_size)  # fmt: skip
    return [{name: request_wire_bytes(link.build_request(encode_payload(p, geometry, codec)))
             for name, codec in codecs.items()} for p in payloads]  # fmt: skip


async def run_edge(
    edge: EdgeRunner,
    batches: Iterable[tuple[Any, Any, Any]],
    config: ClientConfig,
    link_config: LinkConfig,
    model_name: str,
    identity: dict,
    seed: int = 0,
    count: int | None = None,
    metadata: dict | None = None,
    controller: Any = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> EdgeReport:
    """Run the edge over batches, offloading uncertain images to the server.

    Args:
        edge: the edge (model, gate, selection): an EdgeDevice or an OnnxEdge.
        batches: (unnormalised images [B, C, H, W] uint8, targets [B], dataset indices [B]),
            torch tensors or numpy arrays as the edge takes them.
        config: server URL, codec, concurrency, retries, records file.
        link_config: the emulated link (none by default).
        model_name: the served model's name.
        identity: the run's settings, stored with the records (see run_identity).
        seed: seeds the `random` policy and the emulated loss.
        count: the dataset's size (records of other images are not resumed).
        metadata: the served model's metadata when the caller already read it (check_server
            before loading the edge); else it is read here.
        controller: a controller.CostController or BytesController holding a budget: each
            batch runs at the (δ, η) it gives, it sees every image's uncertainty, admits or
            withholds each send, and hears back each answer's bytes, time on the wire and
            the server's load; a 503 or 429 then pauses the sends for the Retry-After
            asked instead of being retried.
        clock, sleep: the run's clock (seconds) and how it waits for a camera's next images
            (images_per_second); the images' arrival times and the controller's times are on
            this clock. Simulated ones run a paced run without waiting for it.
    """
    codec = Codec.parse(config.codec)
    g = edge.geometry
    geometry = WireGeometry.of(g)
    codec.check(geometry.channels)  # before any image is sent
    records_path = Path(config.records)
    jpeg = Codec("jpeg", codec.quality if codec.name == "jpeg" else Codec().quality)
    full_codecs = {str(c): c for c in (Codec("raw"), Codec("png"), jpeg)
                   if c.carries(geometry.channels)}  # fmt: skip
    slots = asyncio.Semaphore(config.concurrency)
    tasks: set[asyncio.Task] = set()
    began, began_counter = clock(), time.perf_counter()

    def now() -> float:
        """Seconds since the run began, on the run's clock."""
        return clock() - began

    def finish(record: ImageRecord) -> None:
        records.append(record)
        writer.write(record)

    async def offload(row: dict, payload: PatchPayload, blob: bytes, request: httpx.Request,
                      started: float) -> None:  # fmt: skip
        try:
            row["payload_bytes"] = len(blob)
            counted = None
            if link_config.loss > 0:  # the edge sent it all; the server gets what survives
                counted = request_wire_bytes(request)
                delivered = lose_patches(payload, link_config.loss, seed, row["index"])
                row["delivered"] = delivered.size
                blob, request = encode_payload(delivered, geometry, codec), None
            answer = await link.classify(blob, counted, request)
        finally:
            slots.release()
        if answer.logits is not None:
            final_top = ranked_classes(answer.logits[None])[0].tolist()
            route = "server"
        else:
            final_top, route = row["edge_top"], "fallback"
        if controller is not None:
            tell_controller(answer)
        finish(ImageRecord(**{**row, "final_top": final_top, "route": route,
                              "cause": answer.cause, "request_bytes": answer.request_bytes,
                              "response_bytes": answer.response_bytes,
                              "attempts": answer.attempts, "transfer_ms": answer.transfer_ms,
                              "server_ms": answer.server_ms,
                              "total_ms": 1000.0 * (time.perf_counter() - started),
                              "answered_at": time.time()}))

    def tell_controller(answer: ServerAnswer) -> None:
        nonlocal response_bytes
        if answer.logits is not None:
            response_bytes = answer.response_bytes / max(answer.attempts, 1)
            controller.answered(answer.request_bytes + answer.response_bytes,
                                None if answer.transfer_ms is None else answer.transfer_ms / 1000,
                                answer.load)  # fmt: skip
        elif answer.retry_after is not None:
            controller.pause(now() + answer.retry_after)
        elif answer.cause == "timeout":
            controller.timed_out()
        else:
            controller.failed()

    response_bytes = 0.0  # the last answer's response bytes, counted in each admission

    async with ServerLink(config, model_name, link_config, g.num_classes, seed,
                          shed=controller is not None) as link:  # fmt: skip
        try:  # no server, another server, a wrong model, token or geometry: stop here
            check_server_geometry(metadata or await link.metadata(), geometry, g.num_classes)
        except ServerUnavailable as error:
            if not config.allow_edge_only:
                raise
            log_warning(f"{str(error).split('; ')[0]}; answering at the edge "
                        "(--allow-edge-only)")  # fmt: skip
        lock = RecordsLock(records_path)
        try:
            done = open_records(records_path, identity, config.resume, count)
        except BaseException:
            lock.release()
            raise
        records = list(done.values())
        writer = RecordWriter(records_path)
        taken = 0
        try:
            for images, targets, indices in batches:
                todo = [row for row, i in enumerate(indices.tolist()) if int(i) not in done]
                if not todo:
                    continue
                if len(todo) < len(indices):
                    images, targets, indices = images[todo], targets[todo], indices[todo]
                # a camera: the images arrive at their pace, each at its own time (those of
                # the run's clock); a batch waits for its last one
                arrived, times = time.perf_counter(), None
                if config.images_per_second:
                    times = [(taken + row + 1) / config.images_per_second
                             for row in range(images.shape[0])]  # fmt: skip
                    taken += images.shape[0]
                    await sleep(max(0.0, times[-1] - now()))
                    arrived = min(time.perf_counter(), began_counter + times[-1])  # late: waited
                if controller is not None:
                    edge.set_operating_point(*controller.operating_point())
                started = time.perf_counter()
                result = await asyncio.to_thread(edge.process, images, indices, seed)
                edge_ms = 1000.0 * (time.perf_counter() - started) / images.shape[0]
                if controller is not None:  # paced, it sees each image at its arrival
                    uncertainties = as_array(result.uncertainty)
                    controller.observe(uncertainties, times[0] if times else now())
                full = await asyncio.to_thread(full_image_bytes, link, images, geometry,
                                               full_codecs)  # fmt: skip
                size, minimum, total = result.selection_statistics()
                edge_top = ranked_classes(result.logits).tolist()
                payloads = iter(result.payloads)
                for row_index, index in enumerate(indices.tolist()):
                    confident = bool(result.confident[row_index])
                    row = {"index": int(index), "label": int(targets[row_index]),
                           "edge_top": edge_top[row_index], "confident": confident,
                           "selected": int(size[row_index]), "delivered": int(size[row_index]),
                           "selection_min": float(minimum[row_index]),
                           "selection_sum": float(total[row_index]), "payload_bytes": 0,
                           "full_bytes": full[row_index], "edge_ms": edge_ms}  # fmt: skip
                    withheld = None
                    if not confident:
                        payload = next(payloads)
                        blob = encode_payload(payload, geometry, codec)
                        request = link.build_request(blob)
                        if controller is not None and config.images_per_second \
                                and slots.locked():  # fmt: skip
                            withheld = "busy"  # a budget never lets a camera wait
                        elif controller is not None and not controller.admit(
                                times[row_index] if times else now(),
                                request_wire_bytes(request) + response_bytes,
                                float(uncertainties[row_index])):  # fmt: skip
                            withheld = "budget"
                    if confident or withheld:
                        waited = 1000.0 * (started - arrived)
                        finish(ImageRecord(**row, final_top=row["edge_top"],
                                           route="withheld" if withheld else "edge",
                                           cause=withheld, request_bytes=0, response_bytes=0,
                                           attempts=0, transfer_ms=None, server_ms=None,
                                           total_ms=waited + edge_ms,
                                           answered_at=time.time()))  # fmt: skip
                        continue
                    await slots.acquire()
                    settle(tasks)
                    if controller is not None:
                        controller.sent(now())
                    tasks.add(asyncio.create_task(offload(row, payload, blob, request,
                                                          arrived)))  # fmt: skip
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            lock.release()
    return report(records, g.num_patches, codec)


def fallback_text(report: EdgeReport) -> str:
    """The fallbacks by cause, e.g. 'refused 300, timeout 20' ('' when there were none)."""
    return ", ".join(f"{cause} {n}" for cause, n in report.fallbacks.items() if n)


def format_report(report: EdgeReport) -> str:
    """Bytes per image, fallbacks and latency percentiles, for people."""
    b = report.bytes
    collab = b["collaborative"]
    lines = [
        f"Bytes per image (HTTP request incl. headers, codec {report.codec}): "
        f"{collab['all_images']:.1f} over all images, {collab['sent_images']:.1f} per sent "
        f"image (wire payload {collab['payload_all_images']:.1f} over all images); in total "
        f"{collab['total_request_bytes']:,} bytes sent, {collab['total_response_bytes']:,} "
        "received",
        "Sending every full image instead: " + " / ".join(
            f"{name[5:]} {values['all_images']:.1f}" for name, values in b.items()
            if name.startswith("full_")),
    ]  # fmt: skip
    lines.append("Fallbacks to the edge's answer: " + (fallback_text(report) or "none"))
    if report.summary.undelivered_images:
        attempted = report.attempted
        lines.append(f"Not delivered: {report.summary.undelivered_images} of "
                     f"{attempted.sent_images} sent images kept the edge's answer; the figures "
                     f"above count delivered images (attempted: communication cost "
                     f"{attempted.comm_cost:.4f}, sent token number "
                     f"{attempted.sent_tokens:.4f})")  # fmt: skip
    names = {"edge": "edge compute", "transfer": "transfer", "server": "server",
             "end_to_end_sent": "end to end (sent)", "end_to_end_all": "end to end (all)"}
    lines.append(f"Latency (ms)        {'p50':>9}{'p90':>9}{'p99':>9}")
    for key, label in names.items():
        values = report.latency_ms.get(key)
        if values:
            lines.append(f"  {label:<18}" + "".join(f"{values[p]:>9.2f}"
                                                    for p in ("p50", "p90", "p99")))
    return "\n".join(lines)


def wait_until_served(url: str, timeout: float, alive: Callable[[], bool] | None = None,
                      **httpx_options) -> None:  # fmt: skip
    """Block until `url`/v2/health/ready answers 200 (for scripts that start a server).

    Raises ClientError after `timeout` seconds, or as soon as `alive()` says the server
    process has stopped.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(f"{url}/v2/health/ready", **httpx_options)
            if response.status_code == 200:
                return
            body = _json_or_none(response.content)
            if response.status_code != 503 or not isinstance(body, dict):
                kind = response.headers.get("content-type", "no content type").split(";")[0]
                raise ClientError(f"{url} is not a collabvit server: GET /v2/health/ready "
                                  f"answered {response.status_code} ({kind})")  # fmt: skip
        except httpx.TransportError as error:
            tls = tls_failure(error)
            if tls and "verif" in tls:  # waiting will not fix the certificate
                raise ClientError(f"{url}: {tls}; for a private CA pass --ca-file with its "
                                  "certificate") from None  # fmt: skip
        if alive is not None and not alive():
            raise ClientError(f"the server for {url} stopped before it was ready")
        if time.monotonic() > deadline:
            raise ClientError(f"{url} was not ready within {timeout:g} s")
        time.sleep(0.05)
