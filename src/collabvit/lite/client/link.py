"""Talking to one served model: ServerLink (TLS, retries with back-off, the circuit breaker
that answers at the edge while a server is down, the emulated link's delay) and what a run
checks of the server before it starts (metadata, geometry, readiness)."""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

from collabvit.lite.client.emulation import transmission_time
from collabvit.lite.client.errors import (
    ClientError,
    ServerUnavailable,
    certificate_failure,
    connection_refused,
    first_line,
    json_or_none,
    model_not_served,
    not_a_server,
    shown,
    tls_failure,
    tls_refused,
    token_refused,
)
from collabvit.lite.client.wire import (
    METADATA_CAP,
    answer_cap,
    infer_request,
    read_capped,
    request_wire_bytes,
    response_wire_bytes,
    trimmed_client_headers,
)
from collabvit.lite.config import ClientConfig, LinkConfig
from collabvit.lite.oip import INFERENCE_HEADER, parse_header_length, parse_logits
from collabvit.lite.protocol import ProtocolError, WireGeometry
from collabvit.lite.specs import PRECISIONS

# a replica's name is an identifier (Ray's are 8 characters), never a document
REPLICA_NAME_CAP = 128


def tls_verification(ca_file: str | None) -> bool | ssl.SSLContext:
    """httpx's `verify`: the system's CAs, and also a private CA's certificate when given."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a 503/429 answer asks to wait (Retry-After in seconds), else None."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isascii() and value.isdigit() else None


def backoff_seconds(backoff: float, attempt: int, asked: float | None, rng: random.Random) -> float:
    """Pause before retry `attempt` (1, 2, ...): the doubling back-off with ±50 % jitter (so
    clients that failed together do not retry together), at least what the server asked."""
    pause = backoff * 2 ** (attempt - 1) * rng.uniform(0.5, 1.5)
    return max(pause, asked or 0.0)


def _number(value, low: float = -math.inf, high: float = math.inf) -> float | None:
    """A finite number a server sent, brought within [low, high]; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return min(max(number, low), high) if math.isfinite(number) else None


@dataclass(frozen=True)
class ServerAnswer:
    """What one offloaded image got back: logits [classes] or a fallback cause, and the
    server's load hint (0..1) or the seconds a 503/429 asked to wait, when given. Of an
    answer, `server_ms` is the server's time for the request, `queue_ms` the part of it
    the image waited for a batch, and `replica` which of several replicas answered (None
    when the server did not say)."""

    logits: np.ndarray | None
    cause: str | None
    attempts: int
    request_bytes: int
    response_bytes: int
    transfer_ms: float | None
    server_ms: float | None
    load: float | None = None
    retry_after: float | None = None
    queue_ms: float | None = None
    replica: str | None = None


def _replica(value) -> str | None:
    """The replica a server named, as a short printable string; None for anything else."""
    if not isinstance(value, str) or not value or len(value) > REPLICA_NAME_CAP:
        return None
    return value if value.isprintable() else None


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
                              f"({first_line(error)})") from None  # fmt: skip
        except httpx.HTTPError as error:
            tls = tls_failure(error)
            if tls:
                raise tls_refused(url, tls) from None
            if connection_refused(error):
                raise ServerUnavailable(f"nothing answers at {url} (connection refused): is "
                                        "`collabvit serve` running there? "
                                        f"{ServerUnavailable.HINT}") from None  # fmt: skip
            if isinstance(error, httpx.RemoteProtocolError):
                raise ClientError(f"{url} closed the connection without an HTTP answer: if "
                                  "the server serves HTTPS, use https://") from None
            raise ServerUnavailable(f"cannot reach {url}: {first_line(error)}; "
                                    f"{ServerUnavailable.HINT}") from None  # fmt: skip
        if response.status_code in (401, 403):
            raise token_refused(response.status_code)
        if content is None:
            raise ClientError(f"{url} answered {asked} with over {METADATA_CAP:,} bytes: not "
                              "a collabvit server's metadata")  # fmt: skip
        body = json_or_none(content)
        if response.status_code == 404 and isinstance(body, dict) and "error" in body:
            raise model_not_served(self.model_name, shown(body["error"]))
        if not isinstance(body, dict) or (response.status_code == 200 and "name" not in body):
            raise not_a_server(url, asked, response, content)
        if response.status_code != 200:
            why = shown(body.get("error", ""))
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
                    raise tls_refused(self.base, tls) from None
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
                raise token_refused(status)
            if status == 404:
                raise model_not_served(self.model_name, "it answered 404")
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
            # the server's own figures, within what the edge saw: its time within the
            # exchange, and its queue within its time
            server_ms = _number(parameters.get("server_ms"), 0.0, 1000.0 * elapsed)
            queue_ms = _number(parameters.get("queue_ms"), 0.0,
                               1000.0 * elapsed if server_ms is None else server_ms)  # fmt: skip
            transfer_ms = 1000.0 * (elapsed + delay) - (server_ms or 0.0)
            return ServerAnswer(logits, None, attempts, sent, received, transfer_ms,
                                server_ms, load=_number(parameters.get("load"), 0.0, 1.0),
                                queue_ms=queue_ms,
                                replica=_replica(parameters.get("replica")))  # fmt: skip
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


# ------------------------------------------------------------------ before a run


def check_server(config: ClientConfig, model_name: str) -> dict:
    """The served model's metadata, or ClientError with a one-line reason (no server, TLS,
    another server, token, model): what a run checks before it loads its own model."""

    async def ask() -> dict:
        async with ServerLink(config, model_name, LinkConfig()) as link:
            return await link.metadata()

    return asyncio.run(ask())


def reach_server(config: ClientConfig, model_name: str) -> dict:
    """Before the edge's model loads: wait for the server (`config.wait` seconds, health
    checks need no token), then check it, its certificate, the token and the model; the
    served model's metadata, or {} where --allow-edge-only accepts a run without it."""
    if config.wait:
        wait_until_served(config.server.rstrip("/"), config.wait,
                          verify=tls_verification(config.ca_file))  # fmt: skip
    return {} if config.allow_edge_only else check_server(config, model_name)


# What the edge reads of the served model's metadata parameters, and how many positive
# integers each holds (the sizes are [height, width] lists).
SERVED_GEOMETRY = (("channels", 1), ("patch_size", 2), ("grid_size", 2), ("num_classes", 1))


def served_geometry(metadata) -> tuple:
    """(channels, patch size, grid size, classes) of the served model's metadata; ClientError
    naming the first that is missing or malformed."""
    parameters = metadata.get("parameters") if isinstance(metadata, dict) else None
    if not isinstance(parameters, dict):
        raise ClientError("the server's model metadata has no parameters object (it has "
                          f"{shown(parameters)}): is it a collabvit server?")  # fmt: skip
    served = []
    for name, count in SERVED_GEOMETRY:
        value = parameters.get(name)
        values = value if count > 1 and isinstance(value, list) else [value]
        if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool)
                                           and v > 0 for v in values):  # fmt: skip
            wanted = "a positive integer" if count == 1 else f"{count} positive integers"
            given = shown(value) if name in parameters else "missing"
            raise ClientError(f"the server's model metadata is malformed: parameters.{name} "
                              f"must be {wanted}, not {given}")  # fmt: skip
        served.append(tuple(values) if count > 1 else value)
    return tuple(served)


def served_precision(metadata: dict) -> str | None:
    """What the served model computes in, as its metadata says (one of PRECISIONS; None for
    a server that does not say, or says something else)."""
    parameters = metadata.get("parameters") if isinstance(metadata, dict) else None
    precision = parameters.get("precision") if isinstance(parameters, dict) else None
    return precision if precision in PRECISIONS else None


def check_server_geometry(metadata: dict, geometry: WireGeometry, num_classes: int) -> None:
    """ClientError unless the served model takes the edge's patches and classes."""
    served = served_geometry(metadata)
    expected = (geometry.channels, geometry.patch_size, geometry.grid_size, num_classes)
    if served != expected:
        name = shown(metadata.get("name"), quoted=True)
        raise ClientError(
            f"the served model {name} takes {served[0]} channel(s), "
            f"patches {served[1]} on a grid {served[2]}, {served[3]} classes; the edge sends "
            f"{expected[0]} channel(s), patches {expected[1]} on a grid {expected[2]}, "
            f"{expected[3]} classes"
        )


def deploying_on_ray(response: httpx.Response) -> bool:
    """A Ray Serve proxy whose application has no route yet (replicas still starting): it
    answers 404 in plain text, pointing at its routes list. Worth waiting for."""
    return (response.status_code == 404
            and response.headers.get("content-type", "").startswith("text/plain")
            and b"/-/routes" in response.content[:512])  # fmt: skip


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
            body = json_or_none(response.content)
            if not (response.status_code == 503 and isinstance(body, dict)
                    or deploying_on_ray(response)):  # fmt: skip
                raise not_a_server(url, "GET /v2/health/ready", response, response.content)
        except httpx.TransportError as error:
            tls = tls_failure(error)
            if certificate_failure(tls):  # waiting will not fix the certificate
                raise tls_refused(url, tls) from None
        if alive is not None and not alive():
            raise ClientError(f"the server for {url} stopped before it was ready")
        if time.monotonic() > deadline:
            raise ClientError(f"{url} was not ready within {timeout:g} s")
        time.sleep(0.05)
