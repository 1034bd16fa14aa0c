"""`collabvit serve` under overload and hostile clients: nothing heavy on the event loop,
bounded admission with 503 + Retry-After, work of departed clients dropped, slow clients
cut off, health and origin checks."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import LiveServer, free_port, tiny_vit, wait_ready

from collabvit import service
from collabvit.protocol import (
    INFERENCE_HEADER,
    PatchPayload,
    WireGeometry,
    encode_payload,
    infer_request_body,
)
from collabvit.server import Server
from collabvit.guard import guarded_protocol
from collabvit.service import ServiceSettings, create_app

NAME = "tiny"
GEOMETRY = WireGeometry(channels=3, patch_size=(8, 8), grid_size=(4, 4))


class SlowServer:
    """A real Server whose every batch takes `delay` seconds more; records what it computed."""

    def __init__(self, server: Server, delay: float) -> None:
        self.server, self.delay = server, delay
        self.geometry, self.normalization = server.geometry, server.normalization
        self.computed: list[int] = []
        self.started = threading.Event()

    def classify(self, payloads):
        self.started.set()
        time.sleep(self.delay)
        self.computed.append(len(payloads))
        return self.server.classify(payloads)


@pytest.fixture(scope="module")
def server():
    return Server(tiny_vit(depth=2, name="vit_tiny_patch16_224"))


def app_of(server, **options):
    return create_app(ServiceSettings(model_name=NAME, **options), lambda: server)


def blob(size: int = 4) -> bytes:
    patches = np.zeros((size, 3, 8, 8), dtype=np.uint8)
    return encode_payload(PatchPayload(np.arange(size), patches), GEOMETRY)


def infer(url: str, count: int = 1, headers: dict | None = None, **options) -> httpx.Response:
    body, header_length = infer_request_body([blob()] * count)
    return httpx.post(f"{url}/v2/models/{NAME}/infer", content=body,
                      headers={INFERENCE_HEADER: str(header_length), **(headers or {})},
                      **options)  # fmt: skip


def errors(app, kind: str) -> float:
    for family in app.state.metrics.errors.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("kind") == kind:
                return sample.value
    raise AssertionError(kind)


# a request head promising 100 bytes of body, then only the first of them
UNFINISHED_BODY = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()


def answer_until_closed(port: int, request: bytes, timeout: float) -> bytes:
    """Send `request` and read until the server closes the connection (socket.timeout
    when it has not within `timeout` seconds of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def counter(metric) -> float:
    return next(s.value for f in metric.collect() for s in f.samples if s.name.endswith("_total"))


# ------------------------------------------------------------------ the event loop


def test_a_declared_image_count_over_the_limit_is_refused_before_any_element_is_split(
        server, monkeypatch):  # fmt: skip
    def never(*args):
        raise AssertionError("an element was split")

    monkeypatch.setattr("collabvit.protocol._split_elements", never)
    elements = struct.pack("<I", 0) * (4 * 2**20)  # 16 MiB of zero-length elements
    header = json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES",
                                     "shape": [4 * 2**20],
                                     "parameters": {"binary_data_size": len(elements)}}]})
    app = app_of(server, max_request_bytes=17 * 2**20)
    with LiveServer(app) as running:
        wait_ready(running.url)
        response = httpx.post(f"{running.url}/v2/models/{NAME}/infer",
                              content=header.encode() + elements, timeout=30,
                              headers={INFERENCE_HEADER: str(len(header))})  # fmt: skip
    assert response.status_code == 413 and "at most 1024" in response.json()["error"]


def test_more_elements_than_declared_stop_the_split_at_the_first_extra_one(server):
    elements = struct.pack("<I", 0) * (2**20)
    header = json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(elements)}}]})
    with LiveServer(app_of(server)) as running:
        wait_ready(running.url)
        response = httpx.post(f"{running.url}/v2/models/{NAME}/infer",
                              content=header.encode() + elements,
                              headers={INFERENCE_HEADER: str(len(header))})  # fmt: skip
    assert response.status_code == 400 and "carries more elements" in response.json()["error"]


def test_health_answers_while_a_request_is_being_decoded(server, monkeypatch):
    """Decoding runs in a worker thread: the loop serves liveness meanwhile."""
    decoding = threading.Event()
    real = service.decode_all

    def slow_decode(blobs, geometry):
        decoding.set()
        time.sleep(2.0)
        return real(blobs, geometry)

    monkeypatch.setattr(service, "decode_all", slow_decode)
    with LiveServer(app_of(server)) as running, ThreadPoolExecutor(1) as pool:
        wait_ready(running.url)
        slow = pool.submit(infer, running.url, 16, timeout=30)  # more than are decoded inline
        assert decoding.wait(10)
        for _ in range(5):
            assert httpx.get(f"{running.url}/v2/health/live", timeout=1.0).status_code == 200
        assert not slow.done()  # liveness answered during the decode, not after it
        assert slow.result().status_code == 200


# ------------------------------------------------------------------ backpressure


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(server):
    slow = SlowServer(server, delay=0.4)
    app = app_of(slow, max_batch=2, max_delay_ms=1.0, max_queue_images=4)
    with LiveServer(app) as running, ThreadPoolExecutor(12) as pool:
        wait_ready(running.url)
        responses = list(pool.map(lambda _: infer(running.url, 2, timeout=30), range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and 200 in statuses
    for refused in (r for r in responses if r.status_code == 503):
        assert int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["error"]
    assert errors(app, "overloaded") == statuses.count(503)
    assert sum(slow.computed) - 2 == 2 * statuses.count(200)  # warm-up: 2 payloads
    assert app.state.admission.images == 0 and app.state.admission.bytes == 0


def test_a_request_that_could_never_be_admitted_gets_413(server):
    app = app_of(server, max_queue_images=3)
    with LiveServer(app) as running:
        wait_ready(running.url)
        response = infer(running.url, 4)
    assert response.status_code == 413 and "admits at most 3" in response.json()["error"]


def test_work_of_a_client_that_left_is_dropped_before_it_is_computed(server):
    slow = SlowServer(server, delay=1.0)
    app = app_of(slow, max_batch=1, max_delay_ms=0.0)
    with LiveServer(app) as running, ThreadPoolExecutor(1) as pool:
        wait_ready(running.url)
        slow.computed.clear()
        slow.started.clear()
        first = pool.submit(infer, running.url, 1, timeout=30)
        assert slow.started.wait(10)  # the model is busy with the first request
        with pytest.raises(httpx.ReadTimeout):  # the second client gives up and leaves
            infer(running.url, 3, timeout=0.3)
        assert first.result().status_code == 200
        deadline = time.monotonic() + 10
        while counter(app.state.metrics.dropped) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert counter(app.state.metrics.dropped) == 3
    assert slow.computed == [1]  # the departed client's 3 images never reached the model
    assert errors(app, "disconnected") == 1 and errors(app, "internal") == 0


# ------------------------------------------------------------------ slow clients


def test_a_request_head_that_trickles_in_is_cut_off(server):
    with LiveServer(app_of(server), http=guarded_protocol(0.5)) as running:
        wait_ready(running.url)
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            for _ in range(4):  # a header every 0.2 s, never the end of the head
                time.sleep(0.2)
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 3
        # a well-behaved client on a kept-alive connection is not affected
        with httpx.Client() as client:
            for _ in range(3):
                assert client.get(f"{running.url}/v2/health/live").status_code == 200
                time.sleep(0.3)


def test_a_body_that_trickles_in_gets_408_and_the_connection_closes(server):
    app = app_of(server, body_timeout=0.5)
    with LiveServer(app) as running:
        wait_ready(running.url)
        answer = answer_until_closed(running.port, UNFINISHED_BODY, timeout=5)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
    assert errors(app, "body_timeout") == 1


# ------------------------------------------------------------------ health and origin


def test_model_ready_is_a_health_check_without_the_token(server):
    with LiveServer(app_of(server, token="secret")) as running:
        wait_ready(running.url)
        assert httpx.get(f"{running.url}/v2/models/{NAME}/ready").status_code == 200
        assert httpx.get(f"{running.url}/v2/models/{NAME}").status_code == 401


def test_other_host_headers_are_refused(server):
    app = app_of(server, allowed_hosts=("127.0.0.1", "localhost"))
    with LiveServer(app) as running:
        wait_ready(running.url)
        assert httpx.get(f"{running.url}/v2/health/live").status_code == 200
        rebound = httpx.get(f"{running.url}/v2/health/live", headers={"host": "evil.example"})
        assert rebound.status_code == 400
        assert infer(running.url, headers={"host": "evil.example:8000"}).status_code == 400


def test_default_hosts_are_the_bound_address_and_loopback():
    assert service.default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "[::1]", "localhost")
    every = service.default_allowed_hosts("0.0.0.0")
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= set(every)


@pytest.mark.parametrize("flags, warning", [
    (("--token", "secret"), "clear text over HTTP"),
    (("--host", "0.0.0.0"), "without a token"),
])  # fmt: skip
def test_serve_warns_of_an_exposed_setup(run_cli, monkeypatch, flags, warning):
    started = {}
    monkeypatch.setattr(service, "serve", lambda settings, *a, **k: started.update(s=settings))
    port = free_port()
    result = run_cli("serve", "--port", str(port), "--max-request-images", "7", *flags)
    assert result.returncode == 0, result.stderr
    assert warning in result.stderr
    assert started["s"].max_request_images == 7


def test_too_many_images_are_refused_from_the_header_before_the_body_arrives(server):
    header = json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [5000],
                                     "parameters": {"binary_data_size": 4 * 5000}}]}).encode()
    with LiveServer(app_of(server)) as running:
        wait_ready(running.url)
        answer = answer_until_closed(running.port, (  # the 20,000 bytes never come
            f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(header) + 4 * 5000}\r\n"
            f"{INFERENCE_HEADER}: {len(header)}\r\n\r\n").encode() + header, timeout=10)
    assert answer.startswith(b"HTTP/1.1 413") and b"at most 1024" in answer


def test_workers_each_serve_the_model_with_the_same_limits(tmp_path):
    """`--workers 2`: both processes answer, and the settings reach them (here the head
    time-out, which each worker reads from the environment)."""
    import subprocess
    import sys

    from collabvit.client import wait_until_served

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "collabvit", "serve", "--port", str(port),
                                "--workers", "2", "--threads", "1", "--timeout-request-head",
                                "1"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_served(url, 120, alive=lambda: process.poll() is None)
        fmnist = WireGeometry(channels=1, patch_size=(4, 4), grid_size=(7, 7))
        body, length = infer_request_body([encode_payload(
            PatchPayload(np.arange(3), np.zeros((3, 1, 4, 4), np.uint8)), fmnist)])
        answered = 0
        deadline = time.monotonic() + 60
        while answered < 6 and time.monotonic() < deadline:  # until both workers are warm
            response = httpx.post(f"{url}/v2/models/collabvit_fmnist_server/infer",
                                  content=body, headers={INFERENCE_HEADER: str(length)})
            answered += response.status_code == 200
        assert answered == 6
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            assert sock.recv(1024) == b""  # closed after the 1 s head time-out
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Started parent process" in process.stderr.read()


def test_a_refusal_before_the_body_ends_the_connection(server):
    """A request answered early (here 401) must not leave a connection whose body can then
    trickle in under no time-out."""
    app = app_of(server, token="secret")
    with LiveServer(app, http=guarded_protocol(30.0), timeout_keep_alive=30) as running:
        wait_ready(running.url)
        answer = answer_until_closed(running.port, UNFINISHED_BODY, timeout=3)
    assert answer.startswith(b"HTTP/1.1 401")  # and then the server closed the connection


def test_ipv6_loopback_host_headers_are_answered(server):
    app = app_of(server, allowed_hosts=service.default_allowed_hosts("127.0.0.1"))
    with LiveServer(app) as running:
        wait_ready(running.url)
        for host in ("[::1]", f"[::1]:{running.port}", f"localhost:{running.port}"):
            answer = httpx.get(f"{running.url}/v2/health/live", headers={"host": host})
            assert answer.status_code == 200, host
