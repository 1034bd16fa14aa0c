"""`collabvit serve` under overload and hostile clients, and the bfloat16 server.

    python -m benchmarks.bench_overload [--seconds 60] [--clients 64] [--quick]

One `collabvit serve` process with the shipped Fashion-MNIST server, `--max-queue-images
QUEUE`, `--timeout-request-head 2` and `--timeout-body 2`, then:

a. overload: min(CLIENTS, QUEUE) clients sending back to back for SECONDS / 6 measure
   what the server answers; then CLIENTS clients offer twice that for SECONDS, each at a steady pace
   (a refused image is answered at the edge, and the client goes on). Counted: requests
   answered, refused with 503 (and whether each carried Retry-After), lost (no HTTP answer);
   latency of the answered ones; the server's peak RSS (VmHWM) before and after.
b. a hostile body: 16 MiB of about 4.2 million zero-length elements, declared as as many images;
   time to its 413, and the slowest of the liveness probes sent every 10 ms meanwhile.
c. slow clients: a request head that trickles in, and a body that does: seconds until the
   server closes the connection.
d. departed clients: requests whose client closes the connection while the model is busy;
   the server's counter of dropped images against the images it computed.
e. bfloat16: in-process `Server.classify` throughput of the float32 and the bfloat16 server
   on the same payloads, and every accuracy figure of the shipped default point on the test
   set with each (the collaborative figures need the server).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import socket
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.bench_serve import free_port, payloads_of_test_images, start_server
from benchmarks.harness import add_suite_arguments, apply_quick, load_average, publish, section
from collabvit import cpu_model
from collabvit.evaluate import evaluate
from collabvit.protocol import INFERENCE_HEADER, encode_payload, infer_request_body

SERVER = "collabvit_fmnist_server"
PATH = f"/v2/models/{SERVER}/infer"


def peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def raw_requests(payloads, geometry) -> list[bytes]:
    """One raw HTTP/1.1 infer request (binary extension) per payload, for `overload`."""
    requests = []
    for payload in payloads:
        body, length = infer_request_body([encode_payload(payload, geometry)])
        requests.append((f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: "
                         f"{len(body)}\r\n{INFERENCE_HEADER}: {length}\r\n\r\n").encode() + body)
    return requests


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def overload(port: int, requests: list[bytes], clients: int, seconds: float,
                   rate: float | None = None) -> dict:  # fmt: skip
    """Clients for `seconds`, each sending one image every clients / `rate` seconds (as a
    camera produces them; a client that falls behind sends at once), or back to back
    without `rate`; a refused image is answered at the edge and the client goes on. Counts:
    answered, refused (503, with Retry-After or not), lost; latencies of the answered."""
    counts = {"sent": 0, "answered": 0, "refused": 0, "retry_after": 0, "lost": 0}
    latencies: list[float] = []
    began = time.perf_counter()
    deadline = began + seconds
    interval = clients / rate if rate else 0.0

    async def client(number: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        index = number
        due = began + interval * number / clients  # spread the clients' phases
        while time.perf_counter() < deadline:
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due += interval
            request = requests[index % len(requests)]
            index += clients
            started = time.perf_counter()
            counts["sent"] += 1
            try:
                writer.write(request)
                status = await reader.readline()
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get(b"content-length", b"0")))
            except (OSError, asyncio.IncompleteReadError, ValueError):
                counts["lost"] += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status.startswith(b"HTTP/1.1 200"):
                counts["answered"] += 1
                latencies.append(time.perf_counter() - started)
            elif status.startswith(b"HTTP/1.1 503"):
                counts["refused"] += 1
                counts["retry_after"] += b"retry-after" in headers
            else:
                counts["lost"] += 1
        writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    array = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {**counts, "seconds": seconds, "p50_ms": float(np.percentile(array, 50)),
            "p99_ms": float(np.percentile(array, 99)), "max_ms": float(array.max())}


def hostile_body(url: str) -> dict:
    """The 16 MiB body of zero-length elements: time to its answer, slowest liveness probe."""
    count = 4 * 2**20 - 64  # as many as fit the default 16 MiB body limit with the header
    elements = struct.pack("<I", 0) * count
    header = json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [count],
                                     "parameters": {"binary_data_size": len(elements)}}]})
    body = header.encode() + elements
    probes: list[float] = []
    done = False

    def probe() -> None:
        with httpx.Client() as client:
            while not done:
                started = time.perf_counter()
                client.get(f"{url}/v2/health/live")
                probes.append(time.perf_counter() - started)
                time.sleep(0.01)

    import threading

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.1)
    started = time.perf_counter()
    response = httpx.post(f"{url}{PATH}", content=body, timeout=60,
                          headers={INFERENCE_HEADER: str(len(header))})  # fmt: skip
    answered = time.perf_counter() - started
    time.sleep(0.1)
    done = True
    prober.join()
    return {"status": response.status_code, "answer_ms": 1000 * answered,
            "slowest_probe_ms": 1000 * max(probes), "probes": len(probes)}


def closed_after(port: int, first: bytes, trickle: bytes, limit: float = 30.0) -> float:
    """Seconds until the server closes a connection that sends `first`, then `trickle`
    every 0.2 s (never finishing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.sendall(first)
        started = time.monotonic()
        sock.settimeout(0.2)
        while time.monotonic() - started < limit:
            try:
                if sock.recv(4096) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                return time.monotonic() - started
            try:
                sock.sendall(trickle)
            except OSError:
                return time.monotonic() - started
    return float("inf")


def departed(port: int, url: str, request: bytes, count: int) -> dict:
    """`count` requests sent while the model is busy, their connections closed at once."""
    images_before = metric(url, "collabvit_infer_images_total")
    dropped_before = metric(url, "collabvit_dropped_images_total")
    busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for sock in busy:  # keep the model computing
        sock.sendall(request)
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
    for sock in busy:
        sock.recv(65536)
        sock.close()
    time.sleep(1.0)
    dropped = metric(url, "collabvit_dropped_images_total") - dropped_before
    computed = metric(url, "collabvit_infer_images_total") - images_before
    return {"sent": count, "dropped": dropped, "computed": computed}


def bf16_figures(pair, payloads, repeats: int) -> dict:
    """Throughput of the float32 and bfloat16 servers and the default point's figures."""
    fp32 = pair.server()
    bf16_model = copy.deepcopy(pair.server_model).to(torch.bfloat16)
    from collabvit.server import Server

    bf16 = Server(bf16_model)
    rates = {}
    for name, server in (("float32", fp32), ("bfloat16", bf16)):
        server.classify(payloads[:32])
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, len(payloads), 32):
                server.classify(payloads[start : start + 32])
            best = max(best, len(payloads) / (time.perf_counter() - started))
        rates[name] = best
    edge = pair.edge(pair.default_config())
    figures = {name: evaluate(edge, server, pair.loader(), progress=False).summary.as_dict()
               for name, server in (("float32", fp32), ("bfloat16", bf16))}  # fmt: skip
    return {"rates": rates, "figures": figures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--queue", type=int, default=32, help="--max-queue-images")
    parser.add_argument("--images", type=int, default=10_000, help="test images for (e)")
    parser.add_argument("--repeats", type=int, default=3)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), seconds=2.0, clients=8, queue=4, images=300,
                       repeats=1)  # fmt: skip
    began, load_at_start = time.perf_counter(), load_average()
    pair, payloads, geometry, default = payloads_of_test_images(args.images)
    requests = raw_requests(payloads[:2000], geometry)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(port, "--max-queue-images", str(args.queue), "--timeout-request-head",
                           "2", "--timeout-body", "2", "--limit-concurrency", "1024", "--max-connections", "2048")
    try:
        rss_before = peak_rss_mb(process.pid)
        # as many back-to-back clients as the queue admits: the server's own rate
        calibration = asyncio.run(overload(port, requests, min(args.clients, args.queue),
                                           args.seconds / 6))  # fmt: skip
        capacity = calibration["answered"] / calibration["seconds"]
        load = asyncio.run(overload(port, requests, args.clients, args.seconds,
                                    rate=2 * capacity))  # fmt: skip
        rss_after = peak_rss_mb(process.pid)
        hostile = hostile_body(url)
        head = closed_after(port, b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                            b"X-Slow: 1\r\n")  # fmt: skip
        body = closed_after(port, (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length:"
                                   " 100000\r\nContent-Type: application/json\r\n\r\n{").encode(),
                            b"x")  # fmt: skip
        gone = departed(port, url, requests[0], 16)
    finally:
        process.terminate()
        process.wait(timeout=60)
    precision = bf16_figures(pair, payloads[:2000], args.repeats)
    rate = load["answered"] / load["seconds"]
    offered = load["sent"] / load["seconds"]
    f32, b16 = precision["figures"]["float32"], precision["figures"]["bfloat16"]
    accuracy_rows = [
        f"| {label} | {f32[key]:.2f} % | {b16[key]:.2f} % | {b16[key] - f32[key]:+.2f} pt |"
        for key, label in (("client_acc", "edge alone"), ("collab_acc", "collaborative"),
                           ("collab_acc5", "collaborative top-5"))]  # fmt: skip
    changes = [abs(b16[k] - f32[k]) for k in ("client_acc", "client_acc5", "collab_acc",
                                               "collab_acc5")]
    body_text = f"""`collabvit serve` with the shipped Fashion-MNIST server, `--max-queue-images
{args.queue} --timeout-request-head 2 --timeout-body 2`, on this machine ({cpu_model()}).

**a. Overload.** First {min(args.clients, args.queue)} clients sending back to back for
{args.seconds / 6:.0f} s measure what the server answers: {capacity:,.0f} images/s (one image
per request; {calibration['refused']:,} refused, {calibration['lost']} lost). Then
{args.clients} clients offered twice that, each sending one image at a steady pace for
{args.seconds:g} s ({offered:,.0f} requests/s offered); a refused image is answered at the
edge. The server answered {rate:,.0f}/s ({load['answered']:,} requests) and refused
{load['refused']:,} with 503 ({load['retry_after']:,} of them with Retry-After).
**{load['lost']} requests lost** (no HTTP answer). Latency of the answered requests: p50
{load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms, max {load['max_ms']:.0f} ms; the queue
bound of {args.queue} images at {rate:,.0f} images/s is {1000 * args.queue / max(rate, 1):.0f} ms
of work. The server's
peak RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after.

**b. Hostile body.** 16 MiB of zero-length elements, declared as as many images: answered
{hostile['status']} after {hostile['answer_ms']:.1f} ms; the slowest of {hostile['probes']}
liveness probes meanwhile took {hostile['slowest_probe_ms']:.1f} ms.

**c. Slow clients.** A request head that trickles in was closed after {head:.1f} s, a body
that trickles in after {body:.1f} s (time-outs 2 s).

**d. Departed clients.** {gone['sent']} requests whose clients left while the model was busy:
{gone['dropped']:.0f} images dropped uncomputed; the model computed {gone['computed']:.0f}
images in that time (the 8 busy requests').

**e. bfloat16.** In-process `Server.classify`, batches of 32: float32
{precision['rates']['float32']:,.0f} images/s, bfloat16 {precision['rates']['bfloat16']:,.0f}
images/s (**{precision['rates']['bfloat16'] / precision['rates']['float32']:.2f}x**). The
shipped default point on the first {len(pair.dataset):,} test images:

| figure | float32 server | bfloat16 server | change |
|---|---:|---:|---:|
{chr(10).join(accuracy_rows)}

Largest change of an accuracy figure: {max(changes):.2f} pt."""
    text = section("bench_overload", "Serving under overload and hostile clients; bfloat16",
                   body_text.splitlines(), load_at_start, time.perf_counter() - began)
    publish(args, "bench_overload", text, {
        "overload": load, "capacity": capacity, "calibration": calibration,
        "rss_mb": [rss_before, rss_after], "hostile": hostile,
        "head_closed_s": head, "body_closed_s": body, "departed": gone,
        "bf16": precision, "bf16_largest_change": max(changes), "queue": args.queue,
    })


if __name__ == "__main__":
    main()
