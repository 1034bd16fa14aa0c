"""`collabvit edge` where things go wrong: every failure retried, counted under its own
cause, or a one-line error; configuration errors stop the run instead of falling back."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import pytest
import trustme
from conftest import SHIPPED_SERVER, LiveServer, OneConnection, free_port, shipped_app
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from collabvit.lite.client import (
    ClientError,
    RecordsLock,
    RecordWriter,
    ServerLink,
    backoff_seconds,
)
from collabvit.lite.config import ClientConfig, LinkConfig
from collabvit.lite.oip import INFERENCE_HEADER, infer_response_body
from collabvit.lite.protocol import PatchPayload, WireGeometry, encode_payload

GEOMETRY = WireGeometry(channels=1, patch_size=(4, 4), grid_size=(7, 7))
BLOB = encode_payload(PatchPayload(np.arange(3), np.zeros((3, 1, 4, 4), np.uint8)), GEOMETRY)


def classify(url: str, **config) -> tuple:
    """One image through ServerLink.classify: (answer, seconds, the link)."""
    options = {"retries": 0, "backoff": 0.0, "cooldown": 0.0, **config}
    link_options = {"num_classes": 10}

    async def once():
        async with ServerLink(ClientConfig(server=url, **options), SHIPPED_SERVER,
                              LinkConfig(), **link_options) as link:  # fmt: skip
            started = time.monotonic()
            answer = await link.classify(BLOB)
            return answer, time.monotonic() - started, link

    return asyncio.run(once())


def fake_server(**routes) -> FastAPI:
    """An app answering the infer route with `routes["infer"]()` (a Response), calls counted."""
    app = FastAPI()
    app.state.calls = 0

    @app.post(f"/v2/models/{SHIPPED_SERVER}/infer")
    async def infer():
        app.state.calls += 1
        return routes["infer"](app.state.calls)

    return app


def logits_response(classes: int = 10) -> Response:
    body, length = infer_response_body(SHIPPED_SERVER, np.zeros((1, classes), np.float32), True)
    return Response(body, headers={INFERENCE_HEADER: str(length)},
                    media_type="application/octet-stream")  # fmt: skip


def test_a_body_with_a_wrong_content_encoding_is_a_bad_response_not_a_traceback():
    app = fake_server(infer=lambda n: Response(b"not gzip at all",
                                               headers={"content-encoding": "gzip"}))
    with LiveServer(app) as running:
        answer, _, _ = classify(running.url)
    assert answer.logits is None and answer.cause == "bad_response"


def test_an_answer_with_another_class_count_is_a_bad_response():
    with LiveServer(fake_server(infer=lambda n: logits_response(classes=7))) as running:
        answer, _, _ = classify(running.url)
    assert answer.cause == "bad_response"


def test_retry_after_is_honoured_and_a_long_one_answers_at_the_edge_meanwhile():
    def busy_once(call: int) -> Response:
        if call == 1:
            return Response(b'{"error": "busy"}', status_code=503, headers={"Retry-After": "1"})
        return logits_response()

    with LiveServer(fake_server(infer=busy_once)) as running:
        answer, seconds, _ = classify(running.url, retries=2)
    assert answer.logits is not None and answer.attempts == 2 and seconds >= 0.95

    def busy(call: int) -> Response:
        return Response(b'{"error": "busy"}', status_code=503, headers={"Retry-After": "30"})

    with LiveServer(fake_server(infer=busy)) as running:
        answer, _, link = classify(running.url, retries=2, timeout=2.0)
    # one attempt: the 30 s asked for, longer than the time-out, was not waited for
    assert answer.cause == "unavailable" and answer.attempts == 1
    assert link.down_until - time.monotonic() > 20  # later images answer at the edge


def test_the_back_off_is_jittered():
    rng = random.Random(0)
    pauses = [backoff_seconds(1.0, 2, None, rng) for _ in range(200)]
    assert 1.0 <= min(pauses) < 1.2 and 2.8 < max(pauses) <= 3.0  # 2 s +- 50 %
    assert backoff_seconds(0.1, 1, 4.0, rng) == 4.0  # at least what the server asked


def test_a_server_that_trickles_its_answer_is_cut_off_at_the_total_time_out():
    def trickle(connection, stop):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():  # a byte every 0.3 s: each read is quick, the whole is not
            connection.sendall(b"x")
            time.sleep(0.3)

    with OneConnection(trickle) as server:
        answer, seconds, _ = classify(server.url, timeout=1.0)
    # each read is quick: only the total time-out can end it, long before the 300 s the
    # whole answer would take
    assert answer.cause == "timeout" and seconds < 30


def tls_files(tmp_path):
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    paths = {n: tmp_path / f"{n}.pem" for n in ("cert", "key", "ca")}
    certificate.cert_chain_pems[0].write_to_path(paths["cert"])
    certificate.private_key_pem.write_to_path(paths["key"])
    authority.cert_pem.write_to_path(paths["ca"])
    return paths


def edge_args(url: str, tmp_path, *extra: str) -> list[str]:
    return ["edge", "--server", url, "--limit", "50", "--quiet", "--records",
            str(tmp_path / "r.jsonl"), *extra]  # fmt: skip


def test_tls_and_scheme_mistakes_stop_the_run_with_one_line(run_cli, shipped_server, tmp_path):
    files = tls_files(tmp_path)
    with LiveServer(shipped_app(shipped_server), ssl_certfile=str(files["cert"]),
                    ssl_keyfile=str(files["key"])) as running:  # fmt: skip
        plain_url = running.url.replace("https://", "http://")
        untrusted = run_cli(*edge_args(running.url, tmp_path))
        wrong_scheme = run_cli(*edge_args(plain_url, tmp_path))
        trusted = run_cli(*edge_args(running.url, tmp_path, "--ca-file", str(files["ca"])))
    assert untrusted.returncode == 2 and "certificate verification failed" in untrusted.stderr
    assert "--ca-file" in untrusted.stderr and untrusted.stdout == ""
    assert wrong_scheme.returncode == 2 and "use https://" in wrong_scheme.stderr
    assert trusted.returncode == 0, trusted.stderr
    with LiveServer(shipped_app(shipped_server)) as running:  # https:// against plain HTTP
        result = run_cli(*edge_args(running.url.replace("http://", "https://"), tmp_path))
    assert result.returncode == 2 and "use http://" in result.stderr
    for answer in (untrusted, wrong_scheme, result):  # (the in-process server logs too)
        ours = [line for line in answer.stderr.splitlines() if line.startswith("collabvit")]
        assert len(ours) == 1 and "Traceback" not in answer.stderr


def test_a_plain_web_server_is_named_as_such(run_cli, tmp_path):
    app = FastAPI()

    @app.get("/{anything:path}")
    async def page(anything: str):
        return HTMLResponse("<html><body><h1>Not Found</h1>" + "x" * 2000, status_code=404)

    with LiveServer(app) as running:
        result = run_cli(*edge_args(running.url, tmp_path))
        waited = run_cli(*edge_args(running.url, tmp_path, "--wait", "3"))
    for answer in (result, waited):
        assert answer.returncode == 2 and "is not a collabvit server" in answer.stderr
        assert "<html" not in answer.stderr and len(answer.stderr) < 300


def test_two_runs_on_one_records_file_cannot_interleave(tmp_path):
    path = tmp_path / "records.jsonl"
    first = RecordsLock(path)
    with pytest.raises(ClientError, match="being written by another run"):
        RecordsLock(path)
    first.release()
    RecordsLock(path).release()  # free again


def test_records_are_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr("collabvit.lite.client.records.os.fsync", lambda fd: synced.append(fd))
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"format": "x"}) + "\n")
    writer = RecordWriter(path)
    from collabvit.lite.client import RECORDS_SYNC_LINES, ImageRecord

    record = ImageRecord(index=0, label=0, edge_top=[0], final_top=[0], confident=True,
                         route="edge", cause=None, selected=0, delivered=0, selection_min=0.0,
                         selection_sum=0.0, payload_bytes=0, request_bytes=0, response_bytes=0,
                         full_bytes={}, attempts=0, edge_ms=0.0, transfer_ms=None,
                         server_ms=None, total_ms=0.0)  # fmt: skip
    for _ in range(RECORDS_SYNC_LINES):
        writer.write(record)
    assert len(synced) == 1
    writer.close()
    assert len(synced) == 2


def test_the_server_is_checked_before_the_edge_model_loads(run_cli, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the edge model was loaded before the server was checked")

    monkeypatch.setattr("collabvit.models.pair.load_pair", never)
    port = free_port()
    result = run_cli(*edge_args(f"http://127.0.0.1:{port}", tmp_path))
    assert result.returncode == 2 and "nothing answers at" in result.stderr


def record_line(index: int, route: str) -> str:
    from dataclasses import asdict

    from collabvit.lite.client import ImageRecord

    return json.dumps(asdict(ImageRecord(
        index=index, label=0, edge_top=[0], final_top=[0], confident=route == "edge",
        route=route, cause="refused" if route == "fallback" else None, selected=3, delivered=3,
        selection_min=0.1, selection_sum=0.9, payload_bytes=0, request_bytes=0,
        response_bytes=0, full_bytes={}, attempts=1, edge_ms=1.0, transfer_ms=None,
        server_ms=None, total_ms=1.0)))  # fmt: skip


def test_resuming_sends_the_images_that_did_not_reach_the_server_again(tmp_path):
    from collabvit.lite.client import RECORDS_FORMAT, open_records

    path = tmp_path / "records.jsonl"
    identity = {"run": 1}
    path.write_text("\n".join([json.dumps({"format": RECORDS_FORMAT, "run": identity}),
                               record_line(0, "edge"), record_line(1, "fallback"),
                               record_line(2, "server")]) + "\n")  # fmt: skip
    done = open_records(path, identity, resume=True)
    assert sorted(done) == [0, 2]  # image 1 is tried again
    assert len(path.read_text().splitlines()) == 3


def test_a_records_file_of_an_older_version_is_named_as_such(tmp_path):
    from collabvit.lite.client import open_records

    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"format": "collabvit-edge-records/1", "run": {}}) + "\n")
    with pytest.raises(ClientError, match="older collabvit"):
        open_records(path, {}, resume=True)
