"""The Open Inference Protocol v2 service against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as http
import trustme
from conftest import LiveServer, free_port, tiny_vit, wait_ready
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collabvit.lite.client import wait_until_served
from collabvit.lite.oip import (
    BINARY_CONTENT_TYPE,
    INFERENCE_HEADER,
    infer_request_body,
    parse_logits,
)
from collabvit.lite.protocol import Codec, WireGeometry, encode_payload, patchify
from collabvit.lite.protocol import PatchPayload as Payload
from collabvit.models.server import Server
from collabvit.serve.app import create_app
from collabvit.serve.guard import guarded_protocol
from collabvit.serve.settings import ServiceSettings

NAME = "tiny"
GEOMETRY = WireGeometry(channels=3, patch_size=(8, 8), grid_size=(4, 4))


@pytest.fixture(scope="module")
def server():
    return Server(tiny_vit(depth=2, name="vit_tiny_patch16_224"))


def make_app(server, **options):
    settings_ = ServiceSettings(model_name=NAME, **options)
    return create_app(settings_, lambda: server)


@pytest.fixture(scope="module")
def live(server):
    with LiveServer(make_app(server, max_delay_ms=2.0)) as running:
        wait_ready(running.url)
        yield running


def payloads(count: int, seed: int = 0) -> list[Payload]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    patches = patchify(images, (8, 8))
    result = []
    for i in range(count):
        size = int(torch.randint(0, 17, (1,), generator=generator))
        positions = torch.randperm(16, generator=generator)[:size]
        result.append(Payload(positions, patches[i, positions]))
    return result


def infer(url: str, blobs: list[bytes], binary_output: bool = True, **options) -> httpx.Response:
    body, header_length = infer_request_body(blobs, binary_output=binary_output)
    headers = {INFERENCE_HEADER: str(header_length), "content-type": BINARY_CONTENT_TYPE,
               **options.pop("headers", {})}  # fmt: skip
    return httpx.post(f"{url}/v2/models/{NAME}/infer", content=body, headers=headers, **options)


def logits_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return parse_logits(response.content, (int(response.headers[INFERENCE_HEADER])
                                           if INFERENCE_HEADER in response.headers else None))[0]


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words in response.json()["error"]


# ------------------------------------------------------------------ endpoints


def test_ready_is_503_until_the_model_is_warm(server):
    release = threading.Event()

    def slow_load():
        release.wait(20)
        return server

    with LiveServer(create_app(ServiceSettings(model_name=NAME), slow_load)) as running:
        assert httpx.get(f"{running.url}/v2/health/live").json() == {"live": True}
        assert httpx.get(f"{running.url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{running.url}/v2/models/{NAME}/ready").status_code == 503
        blob = encode_payload(payloads(1)[0], GEOMETRY)
        assert_error(infer(running.url, [blob]), 503, "not ready")
        release.set()
        wait_ready(running.url)
        assert httpx.get(f"{running.url}/v2/models/{NAME}/ready").json()["ready"] is True
        assert logits_of(infer(running.url, [blob])).shape == (1, 7)


def test_a_model_that_fails_to_load_says_why(server):
    def broken():
        raise RuntimeError("weights are corrupt")

    with LiveServer(create_app(ServiceSettings(model_name=NAME), broken)) as running:
        deadline = time.monotonic() + 20  # the load fails in the background, soon
        while "weights are corrupt" not in (answer := infer(running.url, [b"x"])).text:
            assert_error(answer, 503, "not ready")  # still loading
            assert time.monotonic() < deadline, "the failure was never reported"
            time.sleep(0.01)
        assert_error(answer, 503, "weights are corrupt")
        assert httpx.get(f"{running.url}/v2/health/ready").status_code == 503


def test_server_and_model_metadata(live, server):
    meta = httpx.get(f"{live.url}/v2").json()
    assert meta["name"] == "collabvit" and "binary_tensor_data" in meta["extensions"]
    model = httpx.get(f"{live.url}/v2/models/{NAME}").json()
    assert model["name"] == NAME
    assert model["inputs"] == [{"name": "payload", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 7]}]
    parameters = model["parameters"]
    assert parameters["grid_size"] == [4, 4] and parameters["patch_size"] == [8, 8]
    assert parameters["channels"] == 3 and parameters["codecs"] == ["raw", "png", "jpeg"]
    assert parameters["normalization"]["mean"] == list(server.normalization.mean)
    assert_error(httpx.get(f"{live.url}/v2/models/other"), 404, "unknown model")


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_infer_answers_what_the_server_computes_in_process(live, server, codec):
    batch = payloads(6, seed=1)
    blobs = [encode_payload(p, GEOMETRY, Codec.parse(codec)) for p in batch]
    expected = server.classify(batch).numpy()
    np.testing.assert_array_equal(logits_of(infer(live.url, blobs)), expected)
    # plain JSON both ways: base64 elements in, float32 values out, the same numbers
    request = {"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [len(blobs)],
                           "data": [base64.b64encode(b).decode() for b in blobs]}]}  # fmt: skip
    response = httpx.post(f"{live.url}/v2/models/{NAME}/infer", json=request)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["outputs"][0]["shape"] == [6, 7]
    np.testing.assert_array_equal(
        np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(6, 7), expected
    )


def test_concurrent_requests_share_batches_and_keep_their_own_answers(server):
    batch = payloads(24, seed=2)
    alone = torch.cat([server.classify([p]) for p in batch]).numpy()
    app = make_app(server, max_batch=8, max_delay_ms=100.0)
    with LiveServer(app) as running:
        wait_ready(running.url)
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(
                lambda p: logits_of(infer(running.url, [encode_payload(p, GEOMETRY)])), batch))
        metrics = httpx.get(f"{running.url}/metrics").text
    np.testing.assert_allclose(np.concatenate(answers), alone, atol=1e-5, rtol=0)
    histogram = app.state.metrics.batch_size
    count = sample_value(histogram, "_count")
    assert sample_value(histogram, "_sum") == 24
    assert count < 24, "concurrent requests were never batched together"
    assert "collabvit_batch_images_bucket" in metrics
    assert sample_value(app.state.metrics.images, "_total") == 24


def sample_value(metric, suffix: str, **labels) -> float:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and all(sample.labels.get(k) == v
                                                    for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {suffix} {labels}")


def test_a_request_larger_than_max_batch_is_answered_whole(server):
    batch = payloads(10, seed=3)
    with LiveServer(make_app(server, max_batch=4)) as running:
        wait_ready(running.url)
        answer = logits_of(infer(running.url, [encode_payload(p, GEOMETRY) for p in batch]))
    np.testing.assert_allclose(answer, server.classify(batch).numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ refusing, safely


def test_bearer_token(server, caplog):
    token = "s3cret-token-value"
    blob = encode_payload(payloads(1)[0], GEOMETRY)
    caplog.set_level(logging.DEBUG)
    with LiveServer(make_app(server, token=token)) as running:
        wait_ready(running.url)  # health stays open for probes
        response = infer(running.url, [blob])
        assert_error(response, 401, "bearer token")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(infer(running.url, [blob], headers={"Authorization": "Bearer wrong"}), 401,
                     "bearer token")  # fmt: skip
        assert_error(httpx.get(f"{running.url}/v2/models/{NAME}"), 401, "bearer token")
        good = infer(running.url, [blob], headers={"Authorization": f"Bearer {token}"})
        assert logits_of(good).shape == (1, 7)
    assert token not in caplog.text
    assert token not in repr(ServiceSettings(model_name=NAME, token=token))


def test_oversized_requests_get_413_and_the_server_goes_on(server):
    blob = encode_payload(payloads(1)[0], GEOMETRY)
    with LiveServer(make_app(server, max_request_bytes=4096)) as running:
        wait_ready(running.url)
        assert_error(infer(running.url, [blob] * 10), 413, "exceeds the limit")

        def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(10):
                yield b"x" * 1000

        response = httpx.post(f"{running.url}/v2/models/{NAME}/infer", content=chunks(),
                              headers={"content-type": BINARY_CONTENT_TYPE})  # fmt: skip
        assert_error(response, 413, "exceeds the limit")
        assert logits_of(infer(running.url, [blob])).shape == (1, 7)


@pytest.mark.parametrize(
    ("content", "headers", "status", "words"),
    [
        (b"{not json", {}, 400, "malformed inference JSON"),
        (b'{"inputs": []}', {}, 400, "no inputs"),
        (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}]}', {},
         400, "unknown input"),
        (b'{"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [1], "data": ["!"]}]}',
         {}, 400, "not base64"),
        (b'{"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [1], "data": ["AQ=="]}]}',
         {}, 400, "shorter than its"),
        (b"{}", {INFERENCE_HEADER: "99"}, 400, "exceeds the body"),
        (b"{}", {INFERENCE_HEADER: "two"}, 400, "non-negative integer"),
        (b"{}", {"content-type": "text/plain"}, 415, "is not accepted"),
        # a web page's simple cross-site POST carries none of the accepted types
        (b"{}", {"content-type": ""}, 415, "content type missing"),
    ],
)  # fmt: skip
def test_malformed_requests_get_a_json_4xx(live, content, headers, status, words):
    headers = {"content-type": "application/json", **headers}
    if not headers["content-type"]:
        del headers["content-type"]
    response = httpx.post(f"{live.url}/v2/models/{NAME}/infer", content=content, headers=headers)
    assert_error(response, status, words)


def test_a_payload_for_another_geometry_is_refused(live):
    other = WireGeometry(channels=3, patch_size=(4, 4), grid_size=(8, 8))
    patches = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    blob = encode_payload(Payload(torch.tensor([0, 5]), patches), other)
    assert_error(infer(live.url, [blob]), 400, "the server's model takes")


def test_errors_are_counted_by_kind(server):
    app = make_app(server)
    with LiveServer(app) as running:
        wait_ready(running.url)
        httpx.post(f"{running.url}/v2/models/{NAME}/infer", content=b"nonsense",
                   headers={"content-type": "application/json"})  # fmt: skip
        httpx.get(f"{running.url}/v2/models/missing")
        body, header_length = infer_request_body([encode_payload(payloads(1)[0], GEOMETRY)])
        httpx.post(f"{running.url}/v2/models/{NAME}/infer", content=body,
                   headers={INFERENCE_HEADER: str(header_length),
                            "content-type": BINARY_CONTENT_TYPE})  # fmt: skip
        text = httpx.get(f"{running.url}/metrics").text
    errors = app.state.metrics.errors
    assert sample_value(errors, "_total", kind="bad_request") == 1
    assert sample_value(errors, "_total", kind="not_found") == 1
    assert sample_value(errors, "_total", kind="unauthorized") == 0
    assert sample_value(app.state.metrics.bytes_in, "_total") == len(b"nonsense") + len(body)
    for name in ("collabvit_infer_requests_total", "collabvit_queue_seconds_bucket",
                 "collabvit_infer_latency_seconds_bucket", 'collabvit_errors_total{kind="'):
        assert name in text


def test_https_with_a_certificate_made_here(server, tmp_path):
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    certificate.cert_chain_pems[0].write_to_path(cert_file)
    certificate.private_key_pem.write_to_path(key_file)
    authority.cert_pem.write_to_path(ca_file)
    blob = encode_payload(payloads(1)[0], GEOMETRY)
    # through the protocol `collabvit serve` uses (its transport wrapper over TLS)
    with LiveServer(make_app(server), ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
                    http=guarded_protocol(10.0, 64)) as running:  # fmt: skip
        assert running.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(ca_file))
        wait_ready(running.url, verify=trusted)
        assert logits_of(infer(running.url, [blob], verify=trusted)).shape == (1, 7)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            infer(running.url, [blob])


def test_tritonclient_calls_the_infer_endpoint(live, server):
    batch = payloads(3, seed=5)
    blobs = np.array([encode_payload(p, GEOMETRY) for p in batch], dtype=np.object_)
    client = http.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert client.get_model_metadata(NAME)["outputs"][0]["name"] == "logits"
    request = http.InferInput("payload", [3], "BYTES")
    request.set_data_from_numpy(blobs, binary_data=True)
    result = client.infer(NAME, [request],
                          outputs=[http.InferRequestedOutput("logits", binary_data=True)])
    np.testing.assert_array_equal(result.as_numpy("logits"), server.classify(batch).numpy())
    client.close()


# ------------------------------------------------------------------ fuzz


def _mutations(valid: bytes):
    return st.one_of(
        st.binary(max_size=600),
        st.tuples(st.integers(0, len(valid)), st.binary(max_size=8)).map(
            lambda cut: valid[: cut[0]] + cut[1] + valid[cut[0] + len(cut[1]):]),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
    )


VALID_BODY, VALID_HEADER = infer_request_body([encode_payload(payloads(1)[0], GEOMETRY)])


@pytest.mark.slow  # 150 requests against a live server; CI runs it (make test-all)
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_mutations(VALID_BODY),
       header=st.one_of(st.none(), st.integers(0, 400).map(str), st.text(max_size=5)),
       content_type=st.sampled_from([None, "application/json", "application/octet-stream",
                                     "text/html", "multipart/form-data"]))  # fmt: skip
def test_fuzzed_requests_get_a_4xx_json_error_or_an_answer(live, body, header, content_type):
    headers = {}
    # what an HTTP client can send at all: h11 refuses values with surrounding whitespace
    if header is not None and header.isascii() and header.isprintable() \
            and header == header.strip():
        headers[INFERENCE_HEADER] = header
    if content_type:
        headers["content-type"] = content_type
    response = httpx.post(f"{live.url}/v2/models/{NAME}/infer", content=body, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        assert isinstance(json.loads(response.content)["error"], str)
    assert httpx.get(f"{live.url}/v2/health/live").status_code == 200


# ------------------------------------------------------------------ the command


def test_sigterm_drains_in_flight_requests(tmp_path):
    """`collabvit serve` with the shipped model: a request waiting in a batch when SIGTERM
    arrives still gets its answer, and the process exits cleanly."""
    import signal
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "collabvit", "serve", "--port", str(port), "--max-delay-ms",
         "1500"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until_served(url, 60, alive=lambda: process.poll() is None)
        fmnist = WireGeometry(channels=1, patch_size=(4, 4), grid_size=(7, 7))
        blob = encode_payload(Payload(torch.arange(3), torch.zeros(3, 1, 4, 4,
                                                                   dtype=torch.uint8)), fmnist)
        body, header_length = infer_request_body([blob])
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v2/models/collabvit_fmnist_server/infer",
                                  content=body, headers={INFERENCE_HEADER: str(header_length)},
                                  timeout=30)  # fmt: skip
            deadline = time.monotonic() + 30
            while "collabvit_admitted_images 1.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the request never reached the server"
                time.sleep(0.01)
            # the request now waits for its batch to fill
            process.send_signal(signal.SIGTERM)
            response = pending.result()
        assert response.status_code == 200
        assert logits_of(response).shape == (1, 10)
        # after draining, uvicorn re-raises the signal so the exit status tells how it ended
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    assert "token" not in process.stderr.read().lower().replace("auth off", "")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--ssl-certfile", "/nonexistent/cert.pem", "--ssl-keyfile", "/nonexistent/k.pem"],
         "certificate /nonexistent/cert.pem does not exist"),
        (["--ssl-certfile", "c.pem"], "needs both --ssl-certfile and --ssl-keyfile"),
        (["--port", "70000"], "a port in 1..65535"),  # the last --port wins
        (["--max-batch", "0"], "a whole number >= 1"),
        (["--server-model", "no_such_model"], "no_such_model"),
    ],
)
def test_serve_user_mistakes_are_one_line_errors(run_cli, args, words):
    import socket

    with socket.socket() as probe:  # the default port may be busy here
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    result = run_cli("serve", "--port", port, *args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_port_in_use(run_cli):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--codec", "gif"], "unknown codec 'gif'"),
        (["--codec", "jpeg:120"], "jpeg quality must be in 1..95"),
        (["--server", "localhost:8000"], "must start with http:// or https://"),
        (["--server", "http://127.0.0.1:80000"], "has no valid host and port"),
        (["--loss", "1"], "a number in [0, 1)"),
        (["--resume", "--records", "/nonexistent/r.jsonl"], "does not exist yet"),
        (["--ca-file", "/nonexistent/ca.pem"], "CA certificate /nonexistent/ca.pem"),
    ],
)
def test_edge_user_mistakes_are_one_line_errors(run_cli, args, words):
    result = run_cli("edge", *args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_the_readme_curl_call_works(shipped_live):
    """The README's curl example, sent as written, gets logits from `collabvit serve`."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    call = re.search(r"curl -s (\S+) \\\n\s+-H '([^']+)' \\\n\s+-d '([^']+)'", readme)
    assert call, "README has no curl example"
    url, header, data = call.groups()
    name, value = header.split(": ")
    response = httpx.post(url.replace("http://127.0.0.1:8000", shipped_live.url),
                          content=data.encode(), headers={name: value})  # fmt: skip
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "logits" and output["shape"] == [1, 10]


def test_too_many_images_in_one_request_get_413(server):
    blob = encode_payload(payloads(1)[0], GEOMETRY)
    with LiveServer(make_app(server, max_request_images=4)) as running:
        wait_ready(running.url)
        assert_error(infer(running.url, [blob] * 5), 413, "at most 4")
        assert logits_of(infer(running.url, [blob] * 4)).shape == (4, 7)


def test_serve_refuses_a_certificate_it_cannot_load(run_cli, tmp_path):

    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("not a certificate\n")
    port = str(free_port())
    result = run_cli("serve", "--port", port, "--ssl-certfile", str(tmp_path / "cert.pem"),
                     "--ssl-keyfile", str(tmp_path / "key.pem"))  # fmt: skip
    assert result.returncode == 2 and "collabvit serve: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_names_a_swapped_certificate_and_key(run_cli, tmp_path):

    certificate = trustme.CA().issue_cert("127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    certificate.private_key_pem.write_to_path(tmp_path / "key.pem")
    port = str(free_port())
    result = run_cli("serve", "--port", port, "--ssl-certfile", str(tmp_path / "key.pem"),
                     "--ssl-keyfile", str(tmp_path / "cert.pem"))  # fmt: skip
    assert result.returncode == 2 and "its private key to --ssl-keyfile" in result.stderr
    assert "PEM lib" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_the_served_precision_is_in_the_metadata_and_in_low_precision_answers(server,
                                                                              precision):
    """The metadata names what the model computes in; an answer computed in less than float32
    says so, and a float32 answer stays as short as it was."""
    from collabvit.models.precision import with_precision

    model = with_precision(server.model, precision, torch.device("cpu"))
    with LiveServer(make_app(Server(model))) as running:
        wait_ready(running.url)
        metadata = httpx.get(f"{running.url}/v2/models/{NAME}").json()
        blob = encode_payload(payloads(1)[0], GEOMETRY)
        response = infer(running.url, [blob])
    assert metadata["parameters"]["precision"] == precision
    _, parameters = parse_logits(response.content, int(response.headers[INFERENCE_HEADER]))
    assert parameters.get("precision") == (None if precision == "float32" else precision)
