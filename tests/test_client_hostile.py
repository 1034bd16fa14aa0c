"""`collabvit edge` against a broken or hostile server: whatever it answers, every image
gets the edge's answer or a finite server answer, and a bad start is one line, never a
traceback or an unbounded read."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import numpy as np
import pytest
from conftest import SHIPPED_SERVER, LiveServer, OneConnection
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from collabvit.lite.client import (
    ANSWER_CAP,
    METADATA_CAP,
    ClientError,
    ServerLink,
    ServerUnavailable,
    answer_cap,
    check_server,
    check_server_geometry,
    response_wire_bytes,
    retry_after,
)
from collabvit.lite.config import ClientConfig, LinkConfig, is_loopback
from collabvit.lite.oip import INFERENCE_HEADER, infer_response_body
from collabvit.lite.protocol import PatchPayload, WireGeometry, encode_payload

GEOMETRY = WireGeometry(channels=1, patch_size=(4, 4), grid_size=(7, 7))  # the shipped pair's
BLOB = encode_payload(PatchPayload(np.arange(3), np.zeros((3, 1, 4, 4), np.uint8)), GEOMETRY)
URL = "http://server.test:8000"
METADATA = {"name": SHIPPED_SERVER, "parameters": {
    "channels": 1, "patch_size": [4, 4], "grid_size": [7, 7], "num_classes": 10}}  # fmt: skip


def through(handler, ask: str = "classify", num_classes: int = 10):
    """One classify (or metadata) call of a ServerLink whose server is `handler`
    (request -> httpx.Response, as httpx.MockTransport takes it)."""

    async def once():
        async with ServerLink(ClientConfig(server=URL, retries=0, backoff=0.0, cooldown=0.0),
                              SHIPPED_SERVER, LinkConfig(), num_classes) as link:  # fmt: skip
            await link.client.aclose()
            link.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            return await (link.classify(BLOB) if ask == "classify" else link.metadata())

    return asyncio.run(once())


def served(body: bytes, status: int = 200, headers: dict | None = None) -> httpx.Response:
    """An answer as a transport hands it over: its headers, and a body not read yet."""
    return httpx.Response(status, headers={"content-length": str(len(body)), **(headers or {})},
                          stream=httpx.ByteStream(body))  # fmt: skip


def binary_answer(logits, headers: dict | None = None) -> httpx.Response:
    body, length = infer_response_body(SHIPPED_SERVER, np.asarray(logits, np.float32)[None], True)
    return served(body, headers={INFERENCE_HEADER: str(length), **(headers or {})})


def json_answer(data: str, classes: int = 10, parameters: str = "{}") -> httpx.Response:
    """A JSON infer answer whose logits are the JSON text `data` (a list's elements)."""
    return served(f'{{"model_name":"{SHIPPED_SERVER}","parameters":{parameters},"outputs":[{{'
                  f'"name":"logits","datatype":"FP32","shape":[1,{classes}],"data":[{data}]}}]}}'
                  .encode())  # fmt: skip


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# ------------------------------------------------------------------ logits that are not finite


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_binary_logits_are_a_bad_response(value):
    logits = np.zeros(10, np.float32)
    logits[3] = value
    answer = through(lambda request: binary_answer(logits))
    assert answer.logits is None and answer.cause == "bad_response" and answer.attempts == 1


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e39", "1" + "0" * 400])
def test_non_finite_json_logits_are_a_bad_response(value):
    # 1e39 is a finite JSON number but no float32; a 400-digit integer is no float at all
    data = ",".join([value] + ["0.5"] * 9)
    answer = through(lambda request: json_answer(data))
    assert answer.logits is None and answer.cause == "bad_response"


def test_finite_answers_are_still_answers_and_their_bytes_are_counted():
    answer_seen = []

    def handler(request):
        answer = binary_answer(np.arange(10), {"x-pad": "y" * 33})
        answer_seen.append(response_wire_bytes(answer, int(answer.headers["content-length"])))
        return answer

    answer = through(handler)
    assert answer.cause is None and answer.logits.tolist() == list(range(10))
    assert answer.response_bytes == answer_seen[0]  # as received: status, headers, body
    assert through(lambda request: json_answer(",".join(["-1.5e-30"] * 10))).cause is None


def test_hostile_timings_and_load_stay_numbers_within_range():
    answer = through(lambda request: json_answer(
        ",".join(["0"] * 10), parameters='{"server_ms": 1e308, "load": -5}'))  # fmt: skip
    assert answer.cause is None and 0 <= answer.server_ms < 60_000 and answer.load == 0.0
    assert answer.transfer_ms >= 0
    answer = through(lambda request: json_answer(
        ",".join(["0"] * 10), parameters='{"server_ms": NaN, "load": Infinity}'))  # fmt: skip
    assert answer.cause is None and answer.server_ms is None and answer.load is None


def test_header_fields_beyond_any_number_are_a_bad_response_or_ignored():
    body, _ = infer_response_body(SHIPPED_SERVER, np.zeros((1, 10), np.float32), True)
    answer = through(lambda request: served(body, headers={INFERENCE_HEADER: "9" * 5000}))
    assert answer.cause == "bad_response"  # int() refuses 5,000 digits: not a traceback
    assert retry_after(httpx.Response(503, headers={"retry-after": b"\xb2"})) is None


def run_args(url: str, tmp_path, *extra: str) -> list[str]:
    return ["edge", "--server", url, "--limit", "50", "--quiet", "--records",
            str(tmp_path / "r.jsonl"), "--results-file", str(tmp_path / "r.json"),
            *extra]  # fmt: skip


def hostile_app(metadata, infer) -> FastAPI:
    """A server answering the shipped model's metadata with `metadata` and each infer request
    with `infer()`."""
    app = FastAPI()

    @app.get(f"/v2/models/{SHIPPED_SERVER}")
    async def model_metadata():
        return JSONResponse(metadata)

    @app.post(f"/v2/models/{SHIPPED_SERVER}/infer")
    async def classify():
        return infer()

    return app


def test_a_run_against_a_server_answering_nan_keeps_every_edge_answer(run_cli, tmp_path):
    def nan_answer() -> Response:
        body, length = infer_response_body(SHIPPED_SERVER, np.full((1, 10), np.nan, np.float32),
                                           True)  # fmt: skip
        return Response(body, headers={INFERENCE_HEADER: str(length)},
                        media_type="application/octet-stream")  # fmt: skip

    with LiveServer(hostile_app(METADATA, nan_answer)) as running:
        result = run_cli(*run_args(running.url, tmp_path))
    written = json.loads((tmp_path / "r.json").read_text())
    summary, sent = written["summary"], written["attempted"]["sent_images"]
    assert sent > 0 and written["fallbacks"]["bad_response"] == sent
    assert summary["sent_images"] == 0 and summary["undelivered_images"] == sent
    assert summary["collab_acc"] == summary["client_acc"]  # the edge's answers, every one
    assert f"Fallbacks to the edge's answer: bad_response {sent}" in result.stdout
    assert "none" not in result.stdout.split("Fallbacks to the edge's answer:")[1].split("\n")[0]
    assert result.returncode == 1 and "no image reached the server" in result.stderr


# ------------------------------------------------------------------ malformed metadata


@pytest.mark.parametrize("parameters, named", [
    ([1, 2], "no parameters object"), ("x", "no parameters object"),
    (None, "no parameters object"), ({**METADATA["parameters"], "patch_size": 4}, "patch_size"),
    ({**METADATA["parameters"], "patch_size": [4, "4"]}, "patch_size"),
    ({**METADATA["parameters"], "patch_size": [4, 4, 4]}, "patch_size"),
    ({**METADATA["parameters"], "grid_size": None}, "grid_size"),
    ({**METADATA["parameters"], "num_classes": "10"}, "num_classes"),
    ({**METADATA["parameters"], "num_classes": True}, "num_classes"),
    ({**METADATA["parameters"], "channels": [[[[1]]]] * 1000}, "channels"),
    ({k: v for k, v in METADATA["parameters"].items() if k != "channels"}, "channels"),
])  # fmt: skip
def test_malformed_metadata_is_a_one_line_error(parameters, named):
    with pytest.raises(ClientError) as error:
        check_server_geometry({**METADATA, "parameters": parameters}, GEOMETRY, 10)
    assert named in one_line(error)


@pytest.mark.parametrize("metadata", [[1, 2], "x", None, 7])
def test_metadata_that_is_no_object_is_a_one_line_error(metadata):
    with pytest.raises(ClientError) as error:
        check_server_geometry(metadata, GEOMETRY, 10)
    assert "no parameters object" in one_line(error)
    with pytest.raises(ClientError) as error:
        through(lambda request: served(json.dumps(metadata).encode()), "metadata")
    assert "is not a collabvit server" in one_line(error)


def test_what_a_server_says_in_an_error_is_shown_on_one_short_line():
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than Python's JSON parser goes
    with pytest.raises(ClientError) as error:
        through(lambda request: served(nested), "metadata")
    assert "is not a collabvit server" in one_line(error)
    shouting = {"error": "no\nsuch\x1b[31m model " + "!" * 10_000}
    for status in (404, 500):
        with pytest.raises(ClientError) as error:
            through(lambda request, status=status: served(json.dumps(shouting).encode(), status),
                    "metadata")  # fmt: skip
        assert "\x1b" not in one_line(error)
    with pytest.raises(ClientError) as error:
        check_server_geometry({"name": "\n" * 1000, "parameters": {
            **METADATA["parameters"], "num_classes": 7}}, GEOMETRY, 10)  # fmt: skip
    assert "7 classes" in one_line(error)


def test_malformed_metadata_stops_the_run_with_one_line(run_cli, tmp_path):
    with LiveServer(hostile_app({**METADATA, "parameters": [1, 2]}, Response)) as running:
        result = run_cli(*run_args(running.url, tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("collabvit")]
    assert len(ours) == 1 and "metadata has no parameters object" in ours[0]


# ------------------------------------------------------------------ size caps


def test_the_caps_are_generous_for_real_answers_and_bounded():
    assert METADATA_CAP == ANSWER_CAP == 2**20 and answer_cap(None) == answer_cap(10) == 2**20
    # an ImageNet-22k answer as JSON, each logit a float's longest repr: read in full
    classes = 21_843
    assert answer_cap(classes) >= 25 * classes + 2**16
    logits = np.full(10, -1.2345678e-30, np.float32)
    data = ",".join(repr(float(v)) for v in logits)
    assert len(data) / 10 < 25 and through(lambda request: json_answer(data)).cause is None


def endless(chunk: bytes, pulled: list):
    async def body():
        while True:
            pulled.append(len(chunk))
            yield chunk

    return body()


def test_an_endless_infer_answer_is_cut_off_at_its_cap_and_counted():
    pulled: list[int] = []
    answer = through(lambda request: httpx.Response(200, content=endless(b"0" * 65536, pulled),
                                                    headers={INFERENCE_HEADER: "10"}))
    assert answer.cause == "bad_response" and answer.logits is None
    assert ANSWER_CAP < sum(pulled) <= ANSWER_CAP + 65536  # no more was read
    assert ANSWER_CAP < answer.response_bytes < ANSWER_CAP + 65536 + 1024


def test_a_compressed_answer_is_capped_as_decoded():
    bomb = gzip.compress(b"\0" * (64 * 2**20))  # 64 MiB in about 64 KiB
    assert len(bomb) < ANSWER_CAP
    answer = through(lambda request: served(bomb, headers={"content-encoding": "gzip"}))
    assert answer.cause == "bad_response"
    twice = gzip.compress(gzip.compress(b"{}"))
    assert through(lambda request: served(twice, headers={"content-encoding": "gzip, gzip"})
                   ).cause == "bad_response"  # one coding at most  # fmt: skip
    body, length = infer_response_body(SHIPPED_SERVER, np.zeros((1, 10), np.float32), True)
    zipped = gzip.compress(body)
    answer = through(lambda request: served(zipped, headers={
        "content-encoding": "gzip", INFERENCE_HEADER: str(length)}))  # fmt: skip
    assert answer.cause is None  # a real gzip answer still decodes


def test_an_endless_chunked_metadata_answer_is_a_one_line_error():
    def flood(connection, stop):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")  # no length to go by
        while not stop.is_set():
            connection.sendall(b"10000\r\n" + b" " * 65536 + b"\r\n")

    with OneConnection(flood) as server, pytest.raises(ClientError) as error:
        check_server(ClientConfig(server=server.url, timeout=5.0), SHIPPED_SERVER)
    assert f"over {METADATA_CAP:,} bytes" in one_line(error)


# ------------------------------------------------------------------ encodings


def test_metadata_that_does_not_decode_is_a_bad_answer_not_a_missing_server():
    body = json.dumps(METADATA).encode()
    with pytest.raises(ClientError) as error:
        through(lambda request: served(body, headers={"content-encoding": "gzip"}), "metadata")
    text = one_line(error)
    assert "could not be decoded" in text and "cannot reach" not in text
    assert not isinstance(error.value, ServerUnavailable)  # --allow-edge-only does not hide it
    zipped = gzip.compress(body)
    assert through(lambda request: served(zipped, headers={"content-encoding": "gzip"}),
                   "metadata") == METADATA  # fmt: skip


# ------------------------------------------------------------------ a token in clear text


def test_the_loopback_rule():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost"]))
    assert not any(map(is_loopback, ["10.0.0.1", "0.0.0.0", "example.com", "127.example.com"]))
    assert ClientConfig(server="http://10.0.0.1:8000", token="t").token_in_clear
    assert ClientConfig(server="http://[fe80::1]:8000", token="t").token_in_clear
    assert not ClientConfig(server="http://[::1]:8000", token="t").token_in_clear
    assert not ClientConfig(server="https://10.0.0.1:8000", token="t").token_in_clear
    assert not ClientConfig(server="http://10.0.0.1:8000").token_in_clear


def test_a_token_over_plain_http_to_another_machine_is_warned_about(run_cli, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    def stop(*args):
        raise ClientError("stopped before the network")

    monkeypatch.setattr("collabvit.lite.client.link.check_server", stop)
    monkeypatch.delenv("COLLABVIT_TOKEN", raising=False)
    warned = {}
    for url, token in [("http://203.0.113.7:8000", "secret"), ("http://127.0.0.1:8000", "secret"),
                       ("https://203.0.113.7:8000", "secret"), ("http://203.0.113.7:8000", None)]:
        result = run_cli(*run_args(url, tmp_path, *(["--token", token] if token else [])))
        assert result.returncode == 2 and "stopped before the network" in result.stderr
        warned[url, token] = [line for line in result.stderr.splitlines() if "clear text" in line]
    lines = warned["http://203.0.113.7:8000", "secret"]
    assert len(lines) == 1 and lines[0].startswith("collabvit edge: warning:")
    assert "secret" not in lines[0]
    assert sum(map(len, warned.values())) == 1


def test_a_served_precision_is_read_only_when_it_is_one_of_ours():
    from collabvit.lite.client import served_precision

    assert served_precision({"parameters": {"precision": "bfloat16"}}) == "bfloat16"
    for metadata in ({"parameters": {"precision": "x" * 10_000}}, {"parameters": {}},
                     {"parameters": ["precision"]}, {"parameters": {"precision": ["int8"]}},
                     None):
        assert served_precision(metadata) is None


def test_the_torch_edge_checks_the_server_before_torch_loads():
    """A server that cannot be reached (or is not a collabvit server) is refused in one line
    before the edge imports torch: with torch made unimportable, the error is the server's."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from collabvit.cli import main; "
            "sys.exit(main(['edge', '--server', 'http://127.0.0.1:9', '--retries', '0', "
            "'--quiet']))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
