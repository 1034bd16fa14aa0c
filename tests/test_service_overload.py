"""`collabvit serve` under overload and hostile clients: nothing heavy on the event loop,
bounded admission with 503 + Retry-After, work of departed clients dropped, slow clients
cut off, health and origin checks."""

from __future__ import annotations

import functools
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

from collabvit.lite.oip import INFERENCE_HEADER, infer_request_body
from collabvit.lite.protocol import PatchPayload, WireGeometry, encode_payload
from collabvit.models.server import Server
from collabvit.serve import app as serve_app
from collabvit.serve import batching, dataplane
from collabvit.serve import settings as serve_settings
from collabvit.serve.app import create_app
from collabvit.serve.guard import guarded_protocol
from collabvit.serve.settings import ServiceSettings

NAME = "tiny"
GEOMETRY = WireGeometry(channels=3, patch_size=(8, 8), grid_size=(4, 4))


class HeldServer:
    """A real Server whose every batch waits until `gate` is open; records what it computed.
    The gate starts open (for the warm-up): close it to hold the model busy."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.geometry, self.normalization = server.geometry, server.normalization
        self.precision = server.precision
        self.computed: list[int] = []
        self.started, self.gate = threading.Event(), threading.Event()
        self.gate.set()

    def classify(self, payloads):
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
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

    monkeypatch.setattr("collabvit.lite.oip._split_elements", never)
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
    decoding, decoded = threading.Event(), threading.Event()
    real = dataplane.decode_all

    def held_decode(blobs, geometry):
        decoding.set()
        assert decoded.wait(30), "the test never let the decode finish"
        return real(blobs, geometry)

    monkeypatch.setattr(dataplane, "decode_all", held_decode)
    with LiveServer(app_of(server)) as running, ThreadPoolExecutor(1) as pool:
        wait_ready(running.url)
        held = pool.submit(infer, running.url, 16, timeout=30)  # more than are decoded inline
        try:
            assert decoding.wait(10)
            for _ in range(5):
                assert httpx.get(f"{running.url}/v2/health/live", timeout=10).status_code == 200
            assert not held.done()  # liveness answered during the decode, not after it
        finally:
            decoded.set()
        assert held.result().status_code == 200


# ------------------------------------------------------------------ backpressure


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(server):
    """12 requests of 2 images while the model is held: the 4 images the queue admits are
    answered once it is free, the other 10 requests get 503 at once."""
    held = HeldServer(server)
    app = app_of(held, max_batch=2, max_delay_ms=1.0, max_queue_images=4)
    with LiveServer(app) as running, ThreadPoolExecutor(12) as pool:
        wait_ready(running.url)
        held.computed.clear()
        held.gate.clear()
        try:
            pending = [pool.submit(infer, running.url, 2, timeout=30) for _ in range(12)]
            wait_for(lambda: errors(app, "overloaded") == 10)
            assert app.state.admission.images == 4  # queued or held in the model
        finally:
            held.gate.set()
        responses = [answer.result() for answer in pending]
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 2 + [503] * 10
    for refused in (r for r in responses if r.status_code == 503):
        assert int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["error"]
    assert sum(held.computed) == 4  # each admitted image once
    assert app.state.admission.images == 0 and app.state.admission.bytes == 0


def test_a_request_that_could_never_be_admitted_gets_413(server):
    app = app_of(server, max_queue_images=3)
    with LiveServer(app) as running:
        wait_ready(running.url)
        response = infer(running.url, 4)
    assert response.status_code == 413 and "admits at most 3" in response.json()["error"]


def test_work_of_a_client_that_left_is_dropped_before_it_is_computed(server):
    held = HeldServer(server)
    app = app_of(held, max_batch=1, max_delay_ms=0.0)
    with LiveServer(app) as running, ThreadPoolExecutor(1) as pool:
        wait_ready(running.url)
        held.computed.clear()
        held.started.clear()
        held.gate.clear()
        try:
            first = pool.submit(infer, running.url, 1, timeout=30)
            assert held.started.wait(10)  # the model is busy with the first request
            with pytest.raises(httpx.ReadTimeout):  # the second client gives up and leaves
                infer(running.url, 3, timeout=0.3)
        finally:
            held.gate.set()
        assert first.result().status_code == 200
        wait_for(lambda: counter(app.state.metrics.dropped) >= 3)
    assert counter(app.state.metrics.dropped) == 3
    assert held.computed == [1]  # the departed client's 3 images never reached the model
    assert errors(app, "disconnected") == 1 and errors(app, "internal") == 0


# ------------------------------------------------------------------ slow clients


def test_a_request_head_that_trickles_in_is_cut_off(server):
    with LiveServer(app_of(server), http=guarded_protocol(0.5)) as running:
        wait_ready(running.url)
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert trickled_until_closed(sock, b"X-Slow: 1\r\n", every=0.2)
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


def test_an_edge_refused_for_its_host_header_is_told_which_flag_takes_it(server):
    """An edge that reaches the server by a name the server does not answer (a load
    balancer's, an address beside the bound one) hears which name and which flag."""
    from collabvit.lite.client import ClientError, check_server, wait_until_served
    from collabvit.lite.config import ClientConfig

    with LiveServer(app_of(server, allowed_hosts=("example.org",))) as running:
        url = running.url
        for attempt in (lambda: wait_until_served(url, 5),
                        lambda: check_server(ClientConfig(server=url), NAME)):
            with pytest.raises(ClientError, match=r"refused the Host header '127\.0\.0\.1:"
                                                  r"\d+': give the server that name in its "
                                                  r"--allowed-hosts"):
                attempt()


def test_default_hosts_are_the_bound_address_and_loopback():
    assert serve_settings.default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "[::1]", "localhost")
    every = serve_settings.default_allowed_hosts("0.0.0.0")
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= set(every)


@pytest.mark.parametrize("flags, warning", [
    (("--token", "secret"), "clear text over HTTP"),
    (("--host", "0.0.0.0"), "without a token"),
])  # fmt: skip
def test_serve_warns_of_an_exposed_setup(run_cli, monkeypatch, flags, warning):
    started = {}
    monkeypatch.setattr(serve_app, "serve", lambda settings, *a, **k: started.update(s=settings))
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


@pytest.mark.slow  # two server processes that each load torch and the model: about 15 s
def test_workers_each_serve_the_model_with_the_same_limits(tmp_path):
    """`--workers 2`: both processes answer, and the settings reach them (here the head
    time-out, which each worker reads from the environment)."""
    import subprocess
    import sys

    from collabvit.lite.client import wait_until_served

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
        whole = encode_payload(PatchPayload(np.arange(49), np.zeros((49, 1, 4, 4), np.uint8)),
                               fmnist)  # fmt: skip
        large_json = httpx.post(f"{url}/v2/models/collabvit_fmnist_server/infer",
                                content=json_infer_body([whole] * 80), timeout=60,
                                headers={"content-type": "application/json"})  # fmt: skip
        assert large_json.status_code == 200  # over 64 KiB: a worker's own parser process
        assert len(large_json.json()["outputs"][0]["data"]) == 80 * 10
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
    app = app_of(server, allowed_hosts=serve_settings.default_allowed_hosts("127.0.0.1"))
    with LiveServer(app) as running:
        wait_ready(running.url)
        for host in ("[::1]", f"[::1]:{running.port}", f"localhost:{running.port}"):
            answer = httpx.get(f"{running.url}/v2/health/live", headers={"host": host})
            assert answer.status_code == 200, host


# ------------------------------------------------------------------ idle and busy connections


def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` connections that send nothing (the sockets of an idle-connection attack)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def open_connections(app) -> float:
    return app.state.metrics.open_connections._value.get()


def closed_by_server(sock: socket.socket, wait: float = 2.0) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def trickled_until_closed(sock: socket.socket, piece: bytes, every: float,
                          timeout: float = 30.0) -> bool:  # fmt: skip
    """Send `piece` every `every` seconds until the server closes the connection (True), or
    `timeout` seconds pass (False): a slow client that never finishes what it sends."""
    sock.settimeout(every)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:  # nothing from the server yet: the next piece
            try:
                sock.sendall(piece)
            except OSError:
                return True
        except OSError:  # reset
            return True
    return False


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def test_idle_connections_never_shut_out_health_or_work(server):
    """255 sockets that send nothing (uvicorn's own limit would answer everything 503)."""
    app = app_of(server)
    with LiveServer(app, http=guarded_protocol(10.0, 1024)) as running:
        wait_ready(running.url)
        idle = open_idle(running.port, 255)
        try:
            for _ in range(5):
                assert httpx.get(f"{running.url}/v2/health/live").status_code == 200
            assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200
            assert httpx.get(f"{running.url}/metrics").status_code == 200
            assert infer(running.url).status_code == 200
            wait_for(lambda: open_connections(app) >= 255)
        finally:
            for sock in idle:
                sock.close()


def test_past_the_connection_cap_the_longest_idle_connection_makes_room(server):
    app = app_of(server)
    with LiveServer(app, http=guarded_protocol(10.0, 8)) as running:
        wait_ready(running.url)
        idle = []
        for _ in range(20):  # one at a time, so the server sees them in this order
            idle.append(socket.create_connection(("127.0.0.1", running.port), timeout=5))
            wait_for(lambda: open_connections(app) >= min(len(idle), 8))
        try:
            assert [closed_by_server(sock, 0.5) for sock in idle[:12]] == [True] * 12
            for _ in range(5):
                assert httpx.get(f"{running.url}/v2/health/live").status_code == 200
            assert not closed_by_server(idle[-1], 0.2)  # the newest idle ones stay open
        finally:
            for sock in idle:
                sock.close()
    evicted = app.state.metrics.closed_connections.labels("evicted")._value.get()
    assert evicted == 12 + 1  # the first probe made room for itself; each left after it


def hold_unfinished_bodies(port: int, count: int) -> list[socket.socket]:
    """`count` infer requests whose body never finishes: each holds a request in progress."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(UNFINISHED_BODY)
        held.append(sock)
    return held


def test_when_every_connection_has_a_request_in_progress_a_new_one_gets_503(server):
    app = app_of(server, body_timeout=30.0)
    with LiveServer(app, http=guarded_protocol(10.0, 3)) as running:
        wait_ready(running.url)
        held = hold_unfinished_bodies(running.port, 3)
        try:
            # one byte of each body, and the buffers that carry it
            wait_for(lambda: app.state.admission.receiving == 3 * (1 + batching.BodyHold.BUFFERS))
            answer = answer_until_closed(running.port, b"GET /v2/health/live HTTP/1.1\r\n"
                                         b"Host: 127.0.0.1\r\n\r\n", timeout=5)  # fmt: skip
        finally:
            for sock in held:
                sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
    assert "request in progress" in json.loads(body)["error"]
    assert app.state.metrics.closed_connections.labels("refused")._value.get() == 1
    assert errors(app, "overloaded") == 1


def test_requests_past_the_limit_get_503_while_probes_still_answer(server):
    app = app_of(server, max_requests_in_flight=2, body_timeout=30.0)
    with LiveServer(app) as running:
        wait_ready(running.url)
        held = hold_unfinished_bodies(running.port, 2)
        try:
            wait_for(lambda: app.state.admission.receiving == 2 * (1 + batching.BodyHold.BUFFERS))
            refused = infer(running.url)
            probes = [httpx.get(f"{running.url}{path}").status_code for path in (
                "/v2/health/live", "/v2/health/ready", f"/v2/models/{NAME}/ready", "/metrics")]
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: app.state.admission.receiving == 0)
        assert infer(running.url).status_code == 200  # the bound frees with the requests
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "2 requests in progress" in refused.json()["error"]
    assert probes == [200, 200, 200, 200]
    assert errors(app, "overloaded") == 1


# ------------------------------------------------------------------ bodies: parsing and memory


def test_json_over_the_inline_size_is_parsed_in_another_process():
    import os

    from collabvit.serve.guard import ParsePool

    async def where(json_bytes: int) -> int:
        return await parser.run(json_bytes, os.getpid)

    with ThreadPoolExecutor(1) as threads:
        parser = ParsePool(1, threads, inline_bytes=100)
        try:
            import asyncio

            assert asyncio.run(where(100)) == os.getpid()
            assert asyncio.run(where(101)) != os.getpid()
            assert parser.in_process == 1
        finally:
            parser.shutdown()


def json_infer_body(blobs: list[bytes]) -> bytes:
    import base64

    return json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES",
                                   "shape": [len(blobs)],
                                   "data": [base64.b64encode(b).decode() for b in blobs]}]
                       }).encode()  # fmt: skip


def test_a_json_flood_body_is_parsed_off_the_loop_and_large_json_answers_as_binary(server):
    """2 MiB of tiny strings (slow to parse, built to stall the server) and a JSON request
    over 64 KiB go to the parser process; the answers equal the binary extension's."""
    app = app_of(server)
    url = None
    with LiveServer(app) as running:
        wait_ready(running.url)
        url = f"{running.url}/v2/models/{NAME}/infer"
        flood = json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [1],
                                        "data": ["a"] * 400_000}]}).encode()  # fmt: skip
        # a parser process starts on first use: seconds on a busy machine
        refused = httpx.post(url, content=flood, headers={"content-type": "application/json"},
                             timeout=60)  # fmt: skip
        blobs = [blob(16)] * 40  # 40 whole images: about 130 KB of JSON
        answer = httpx.post(url, content=json_infer_body(blobs), timeout=60,
                            headers={"content-type": "application/json"})  # fmt: skip
        binary, length = infer_request_body(blobs, binary_output=False)
        expected = httpx.post(url, content=binary, headers={INFERENCE_HEADER: str(length)})
        small = httpx.post(url, content=json_infer_body(blobs[:1]),
                           headers={"content-type": "application/json"})  # fmt: skip
    assert refused.status_code == 400 and "400000 elements" in refused.json()["error"]
    assert answer.status_code == 200 and small.status_code == 200
    assert answer.json()["outputs"][0]["data"] == expected.json()["outputs"][0]["data"]
    assert counter(app.state.metrics.parsed_in_process) == 2  # the flood and the 40 images
    assert app.state.admission.held == 0


def test_a_parser_process_that_dies_costs_one_503_and_is_started_again(server):
    app = app_of(server)
    with LiveServer(app) as running:
        wait_ready(running.url)
        url = f"{running.url}/v2/models/{NAME}/infer"
        body = json_infer_body([blob(16)] * 40)
        json_headers = {"content-type": "application/json"}
        # a parser process starts on first use, and again after it died: seconds on a busy
        # machine
        post = functools.partial(httpx.post, url, content=body, headers=json_headers, timeout=60)
        assert post().status_code == 200
        for process in list(app.state.parser.pool._processes.values()):
            process.kill()
            process.join()
        died, again = post(), post()
    assert died.status_code == 503 and died.headers["retry-after"] == "1"
    assert again.status_code == 200


def test_bodies_still_arriving_count_against_the_bytes_bound(server):
    """Uploads that stall hold memory: it counts with the admitted pixels against
    --max-queue-mb, and the upload that would cross it gets 503 and is closed."""
    bound = 4608 * 2**10  # two uploads and a small request fit, a third upload does not
    app = app_of(server, max_queue_bytes=bound, body_timeout=30.0)
    part = 600 * 2**10
    head = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n").encode()
    with LiveServer(app, http=guarded_protocol(10.0, 64)) as running:
        wait_ready(running.url)
        uploads = []
        try:
            for number in range(3):
                sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
                sock.sendall(head + b" " * part)
                uploads.append(sock)
                if number < 2:
                    wait_for(lambda: app.state.admission.receiving
                             == (part + batching.BodyHold.BUFFERS) * len(uploads))
            refused = b""
            while chunk := uploads[2].recv(4096):
                refused += chunk
            assert app.state.admission.held <= bound
            assert infer(running.url).status_code == 200  # what is left of the bound admits it
            assert not closed_by_server(uploads[0], 0.2)  # the others keep waiting
        finally:
            for sock in uploads:
                sock.close()
        wait_for(lambda: app.state.admission.receiving == 0)
    head_part, _, body = refused.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 503") and b"retry-after" in head_part.lower()
    assert "holds" in json.loads(body)["error"]


def test_model_ready_without_the_token_tells_no_model_names(server):
    with LiveServer(app_of(server, token="secret")) as running:
        wait_ready(running.url)
        unknown = f"{running.url}/v2/models/other/ready"
        assert httpx.get(unknown).status_code == 200  # as the served model: ready
        authorized = httpx.get(unknown, headers={"authorization": "Bearer secret"})
        assert authorized.status_code == 404


@pytest.mark.parametrize("headers, status", [
    ({INFERENCE_HEADER: ""}, 400), ({"content-type": "text/plain"}, 415)])  # fmt: skip
def test_an_answer_before_the_body_is_read_says_the_connection_closes(server, headers, status):
    """Otherwise a keep-alive client sends its next request on a closing connection."""
    body, header_length = infer_request_body([blob()])
    with LiveServer(app_of(server), http=guarded_protocol(10.0, 64)) as running:
        wait_ready(running.url)
        with httpx.Client() as client:
            refused = client.post(f"{running.url}/v2/models/{NAME}/infer", content=body,
                                  headers=headers)  # fmt: skip
            answered = client.post(f"{running.url}/v2/models/{NAME}/infer", content=body,
                                   headers={"content-type": "application/octet-stream",
                                            INFERENCE_HEADER: str(header_length)})  # fmt: skip
            kept = client.get(f"{running.url}/v2/health/live")
    assert refused.status_code == status and refused.headers["connection"] == "close"
    assert answered.status_code == 200 and "connection" not in answered.headers
    assert kept.status_code == 200
