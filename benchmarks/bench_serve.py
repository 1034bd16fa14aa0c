"""Served throughput, latency, reliability under load and fuzz for `collabvit serve`.

Measured in one run on one machine, with the shipped Fashion-MNIST models:

1. Payloads: the shipped edge's selections (attention_sum_threshold at the shipped
   delta, every image sent) of the first `--requests` Fashion-MNIST test images,
   encoded raw. Realistic, ragged selection sizes.
2. In-process baseline: `Server.classify` on the same payloads in batches of
   `--max-batch` (the server's own size planning), no HTTP.
3. Served, dynamic batching: `collabvit serve --max-batch 32` in its own process;
   a client process sends one image per request, `--concurrency` in flight,
   over keep-alive connections (a minimal HTTP/1.1 client, so that the load
   generator takes little CPU from the server). Throughput = requests / wall
   time; latency per request, client side.
4. Served, batching off: the same with `--max-batch 1`.
5. Fuzz: `--fuzz-cases` hypothesis cases against the live infer endpoint
   (mutated, truncated and random bodies, header lengths, content types), then
   as many against the decoder in-process. Counted: 5xx answers, non-JSON
   errors, exceptions other than ProtocolError, and whether the server still
   answers health checks.

The load generator shares the machine's cores with the server, as an edge
fleet's traffic would not; it is kept lean for that reason. Writes its section
of benchmarks/RESULTS.md.

Usage:
    python -m benchmarks.bench_serve [--requests 2000] [--concurrency 32] [--fuzz-cases 10000]
        [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.harness import add_suite_arguments, apply_quick, load_average, publish, section
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.client import wait_until_served
from collabvit.lite.oip import INFERENCE_HEADER, infer_request_body, parse_infer_request
from collabvit.lite.protocol import ProtocolError, WireGeometry, decode_payload, encode_payload
from collabvit.lite.specs import EdgeConfig
from collabvit.models.pair import load_pair

EDGE, SERVER = "collabvit_fmnist_edge", "collabvit_fmnist_server"


def payloads_of_test_images(count: int):
    pair = load_pair(ModelSpec(EDGE), ModelSpec(SERVER), DataSpec(limit=count, batch_size=256))
    default = pair.default_config()
    edge = pair.edge(EdgeConfig(masking_mode=default.masking_mode,
                                masking_th=default.masking_th, uncer_mode="none"))  # fmt: skip
    payloads = []
    for images, _, indices in pair.loader():
        payloads.extend(edge.process(images, indices).payloads)
    g = edge.geometry
    return pair, payloads, WireGeometry.of(g), default


def in_process(pair, payloads, max_batch: int, repeats: int) -> float:
    """Images per second of Server.classify in batches of max_batch (best of repeats)."""
    server = pair.server()
    server.max_batch = max_batch
    server.classify(payloads[:max_batch])
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(payloads), max_batch):
            server.classify(payloads[start : start + max_batch])
        best = max(best, len(payloads) / (time.perf_counter() - started))
    return best


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerThread:
    """A TCP server on 127.0.0.1 with its own event loop in a thread, for the duration of a
    `with` block; a subclass answers each connection in `_connection(reader, writer)`.
    Leaving the block stops the loop and cancels the connections still open."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _connection(self, reader, writer) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=1024))
        self.ready.set()
        self.loop.run_forever()
        server.close()  # stopped: end the connections while the loop can still run
        connections = asyncio.all_tasks(self.loop)
        for task in connections:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*connections, return_exceptions=True))
        self.loop.close()


def start_server(port: int, *flags: str) -> subprocess.Popen:
    """`collabvit serve` with `flags`, in float32 unless they say otherwise (against which the
    in-process figures, float32, compare)."""
    process = subprocess.Popen([sys.executable, "-m", "collabvit", "serve", "--port", str(port),
                                "--precision", "float32", *flags],
                               stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until_served(f"http://127.0.0.1:{port}", 120, alive=lambda: process.poll() is None)
    return process


async def load(port: int, path: str, blobs: list[bytes], concurrency: int):
    """Send every blob as its own request over `concurrency` keep-alive connections.

    A minimal HTTP/1.1 client on asyncio streams (about 0.05 ms of CPU a request,
    where httpx takes about 3 ms): on a 2-core machine the load generator would
    otherwise take a core away from the server it measures.
    """
    requests = []
    for blob in blobs:
        body, header_length = infer_request_body([blob])
        head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
                f"{INFERENCE_HEADER}: {header_length}\r\n\r\n")
        requests.append(head.encode() + body)
    todo = list(reversed(requests))
    latencies: list[float] = []
    failures = 0

    async def connection() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while todo:
            request = todo.pop()
            started = time.perf_counter()
            try:
                writer.write(request)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                failures += not status.startswith(b"HTTP/1.1 200")
            except (OSError, asyncio.IncompleteReadError, ValueError):
                failures += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies.append(time.perf_counter() - started)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return len(requests) / (time.perf_counter() - started), latencies, failures


def served(blobs, concurrency: int, *flags: str):
    port = free_port()
    process = start_server(port, *flags)
    try:
        path = f"/v2/models/{SERVER}/infer"
        asyncio.run(load(port, path, blobs[: 2 * concurrency], concurrency))  # warm-up
        return asyncio.run(load(port, path, blobs, concurrency))
    finally:
        process.terminate()
        process.wait(timeout=60)


def mutations(valid: bytes):
    """Random bytes, and `valid` overwritten in places, truncated or with bytes appended."""
    return st.one_of(
        st.binary(max_size=2000),
        st.tuples(st.integers(0, len(valid)), st.binary(max_size=16)).map(
            lambda c: valid[: c[0]] + c[1] + valid[c[0] + len(c[1]):]),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.binary(min_size=1, max_size=64).map(lambda b: valid + b),
    )  # fmt: skip


def fuzz_http(blob: bytes, cases: int) -> dict:
    port = free_port()
    process = start_server(port)
    url = f"http://127.0.0.1:{port}/v2/models/{SERVER}/infer"
    valid_body, valid_header = infer_request_body([blob])
    counts = {"cases": 0, "ok": 0, "4xx": 0, "5xx": 0, "non_json_errors": 0}
    client = httpx.Client(timeout=30)

    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=mutations(valid_body),
           header=st.one_of(st.none(), st.just(str(valid_header)),
                            st.integers(0, 3000).map(str), st.sampled_from(["-1", "x", ""])),
           content_type=st.sampled_from([None, "application/json", "application/octet-stream",
                                         "text/plain", "image/png"]))  # fmt: skip
    def case(body, header, content_type):
        headers = {}
        if header is not None:
            headers[INFERENCE_HEADER] = header
        if content_type:
            headers["content-type"] = content_type
        response = client.post(url, content=body, headers=headers)
        counts["cases"] += 1
        status = response.status_code
        if status == 200:
            counts["ok"] += 1
        elif 400 <= status < 500:
            counts["4xx"] += 1
            try:
                assert isinstance(response.json()["error"], str)
            except (ValueError, KeyError, AssertionError):
                counts["non_json_errors"] += 1
        else:
            counts["5xx"] += 1

    try:
        case()
        counts["alive_after"] = httpx.get(
            f"http://127.0.0.1:{port}/v2/health/live").status_code == 200
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=60)
    return counts


def fuzz_decoder(blob: bytes, geometry: WireGeometry, cases: int) -> dict:
    counts = {"cases": 0, "decoded": 0, "protocol_errors": 0, "other_exceptions": 0}

    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=mutations(blob))
    def case(data):
        counts["cases"] += 1
        try:
            decode_payload(data, geometry)
            counts["decoded"] += 1
        except ProtocolError:
            counts["protocol_errors"] += 1
        except Exception:  # noqa: BLE001 - counted: any of these is a bug
            counts["other_exceptions"] += 1
        try:
            parse_infer_request(data, None)
        except ProtocolError:
            pass
        except Exception:  # noqa: BLE001
            counts["other_exceptions"] += 1

    case()
    return counts


def percentile_ms(values: list[float], q: float) -> float:
    return 1000.0 * float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--fuzz-cases", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), requests=100, fuzz_cases=200, repeats=1)
    began = time.perf_counter()
    load_at_start = load_average()
    pair, payloads, geometry, default = payloads_of_test_images(args.requests)
    blobs = [encode_payload(p, geometry) for p in payloads]
    sizes = [p.size for p in payloads]
    print(f"{len(blobs)} payloads, {statistics.mean(sizes):.1f} patches on average", flush=True)

    baseline = in_process(pair, payloads, args.max_batch, args.repeats)
    print(f"in-process Server.classify: {baseline:.0f} images/s", flush=True)
    batched = served(blobs, args.concurrency, "--max-batch", str(args.max_batch))
    print(f"served, dynamic batching: {batched[0]:.0f} requests/s, failures {batched[2]}",
          flush=True)  # fmt: skip
    workers = served(blobs, args.concurrency, "--max-batch", str(args.max_batch), "--workers",
                     "2", "--threads", "1")  # fmt: skip
    print(f"served, 2 workers: {workers[0]:.0f} requests/s, failures {workers[2]}", flush=True)
    unbatched = served(blobs, args.concurrency, "--max-batch", "1")
    print(f"served, batching off: {unbatched[0]:.0f} requests/s, failures {unbatched[2]}",
          flush=True)  # fmt: skip
    http = fuzz_http(blobs[0], args.fuzz_cases)
    print(f"HTTP fuzz: {http}", flush=True)
    decoder = fuzz_decoder(blobs[0], geometry, args.fuzz_cases)
    print(f"decoder fuzz: {decoder}", flush=True)

    def row(name, result):
        rate, latencies, failures = result
        return (f"| {name} | {rate:.0f} | {rate / baseline:.2f} | "
                f"{percentile_ms(latencies, 50):.1f} | {percentile_ms(latencies, 99):.1f} | "
                f"{len(latencies)} | {failures} |")  # fmt: skip

    body = f"""The shipped Fashion-MNIST server (`{SERVER}`) behind `collabvit serve`, one image per
request, {args.concurrency} requests in flight from one client process on the same machine
(keep-alive connections; a minimal HTTP/1.1 client on asyncio streams, about 0.05 ms of CPU
per request, so that the load generator takes little from the server). Payloads: the shipped
edge's selections
({default.masking_mode} {default.masking_th}) of the first {len(blobs)} Fashion-MNIST test
images, raw codec, {statistics.mean(sizes):.1f} of 49 patches on average. The in-process
baseline is `Server.classify` on the same payloads in batches of {args.max_batch}, no HTTP,
best of {args.repeats}.

| variant | images/s | / in-process | p50 latency (ms) | p99 latency (ms) | requests | failed |
|---|---:|---:|---:|---:|---:|---:|
| in-process `Server.classify`, batches of {args.max_batch} | {baseline:.0f} | 1.00 | | | | |
{row(f"served, dynamic batching (max batch {args.max_batch}, max delay 5 ms)", batched)}
{row("served, dynamic batching, `--workers 2 --threads 1`", workers)}
{row("served, batching off (max batch 1)", unbatched)}

Dynamic batching over batching off: **{batched[0] / unbatched[0]:.2f}x** the throughput.
With {args.concurrency} clients and batches of up to {args.max_batch}, every client waits on
the same batch, so the server alternates: its single event-loop thread reads, decodes and
answers the batch's requests while the model waits, then the model computes. Served time per
image minus in-process time per image: {1000 / batched[0] - 1000 / baseline:.2f} ms, the
Python HTTP handling of one request (uvicorn, FastAPI, decoding, metrics) that cannot overlap
with computing at this concurrency.

Fuzz ({http['cases']} HTTP cases against the live infer endpoint, hypothesis): {http['ok']}
answered, {http['4xx']} refused with 4xx, **{http['5xx']} with 5xx**,
{http['non_json_errors']} errors without a JSON body; the server
{'still answered' if http.get('alive_after') else 'did NOT answer'} its health check after.
Decoder fuzz ({decoder['cases']} cases in-process, `decode_payload` and
`parse_infer_request`): {decoder['decoded']} decoded, {decoder['protocol_errors']}
ProtocolError, **{decoder['other_exceptions']} other exceptions**."""
    text = section("bench_serve", "Serving: throughput, latency, load and fuzz",
                   body.splitlines(), load_at_start, time.perf_counter() - began)
    publish(args, "bench_serve", text, {
        "in_process": baseline, "batched": batched[0], "unbatched": unbatched[0],
        "workers": workers[0],
        "http_5xx": http["5xx"], "decoder_other": decoder["other_exceptions"],
    })  # fmt: skip


if __name__ == "__main__":
    main()
