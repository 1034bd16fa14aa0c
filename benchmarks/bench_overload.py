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
e. idle sockets: 255 connections that send nothing, reopened as the server closes them, and
   256 more than --max-connections: liveness probes every 20 ms meanwhile.
f. JSON bodies built to be slow to parse (16 MiB of two-letter strings): three at once, then
   clients sending them back to back while one client sends one-image requests: its latency,
   liveness.
g. stalled uploads: connections that each send all but the last byte of a 16 MiB body: how
   they end, and the server's resident memory before and at its peak.
h. a hostile server, seen from the edge: `collabvit edge` against this server, then against
   servers answering NaN logits, 200 MB answers, 300 MB of metadata, malformed metadata:
   exit status, the edge's peak memory, its accuracy and fallbacks.
i. bfloat16: in-process `Server.classify` throughput of the float32 and the bfloat16 server
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.bench_serve import (
    ServerThread,
    free_port,
    payloads_of_test_images,
    start_server,
)
from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    current_rss_mb,
    load_average,
    peak_rss_mb,
    publish,
    reset_peak_rss,
    section,
)
from collabvit import cpu_model
from collabvit.lite.oip import INFERENCE_HEADER, infer_request_body, infer_response_body
from collabvit.lite.protocol import encode_payload
from collabvit.research.evaluate import evaluate

SERVER = "collabvit_fmnist_server"
MAX_CONNECTIONS = 2048
PATH = f"/v2/models/{SERVER}/infer"


def raw_requests(payloads, geometry) -> list[bytes]:
    """One raw HTTP/1.1 infer request (binary extension) per payload, for `overload`."""
    requests = []
    for payload in payloads:
        body, length = infer_request_body([encode_payload(payload, geometry)])
        requests.append((f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: "
                         f"{len(body)}\r\n{INFERENCE_HEADER}: {length}\r\n\r\n").encode() + body)
    return requests


def metric(url: str, name: str) -> float:
    """A metric's value; `name` may carry its labels: 'x_total{kind="a"}'."""
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# Timed requests run in a process of their own: in this one, the threads that send the
# attack would hold the interpreter lock and add their waits to the latencies measured.
TIMER_SCRIPT = r"""
import json, re, select, socket, sys, time
port, every = int(sys.argv[1]), float(sys.argv[2])
request = sys.stdin.buffer.read(int(sys.stdin.buffer.readline()))
latencies, failed = [], 0
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    started, answer = time.perf_counter(), b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            while True:
                head, sep, rest = answer.partition(b"\r\n\r\n")
                size = re.search(rb"content-length: *(\d+)", head, re.I) if sep else None
                if size and len(rest) >= int(size.group(1)):
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        pass
    latencies.append(time.perf_counter() - started)
    failed += not answer.startswith(b"HTTP/1.1 200")
    time.sleep(every)
print(json.dumps({"latencies": latencies, "failed": failed}), flush=True)
"""


class TimedRequests:
    """One raw HTTP request (default: liveness) sent again and again, each on a new
    connection, every `every` seconds while the block runs, from a process of its own:
    the latencies and the answers that were not 200 (or no answer)."""

    LIVENESS = b"GET /v2/health/live HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"

    def __init__(self, port: int, request: bytes = LIVENESS, every: float = 0.01) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-c", TIMER_SCRIPT, str(port),
                                         str(every)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)  # fmt: skip
        self.process.stdin.write(f"{len(request)}\n".encode() + request)
        self.process.stdin.flush()
        self.result: dict = {}

    def __enter__(self) -> TimedRequests:
        assert self.process.stdout.readline().strip() == b"ready"
        time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)
        output, _ = self.process.communicate(b"stop\n", timeout=60)
        self.result = json.loads(output.decode().strip().splitlines()[-1])

    def figures(self) -> dict:
        array = 1000 * np.array(self.result["latencies"])
        return {"probes": len(array), "failed": self.result["failed"],
                "p50_ms": float(np.percentile(array, 50)),
                "p99_ms": float(np.percentile(array, 99)), "max_ms": float(array.max())}


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


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def hostile_body(url: str) -> dict:
    """The 16 MiB body of zero-length elements: time to its answer, slowest liveness probe."""
    count = 4 * 2**20 - 64  # as many as fit the default 16 MiB body limit with the header
    elements = struct.pack("<I", 0) * count
    header = json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [count],
                                     "parameters": {"binary_data_size": len(elements)}}]})
    body = header.encode() + elements
    with TimedRequests(port_of(url)) as probes:
        started = time.perf_counter()
        response = httpx.post(f"{url}{PATH}", content=body, timeout=60,
                              headers={INFERENCE_HEADER: str(len(header))})  # fmt: skip
        answered = time.perf_counter() - started
    figures = probes.figures()
    return {"status": response.status_code, "answer_ms": 1000 * answered,
            "slowest_probe_ms": figures["max_ms"], "probes": figures["probes"]}


def idle_sockets(port: int, url: str, count: int, seconds: float) -> dict:
    """`count` connections that send nothing, each reopened as soon as the server closes
    it, held for `seconds` while liveness is probed every 20 ms; the server's evictions."""
    evicted_before = metric(url, 'collabvit_closed_connections_total{reason="evicted"}')
    import select

    watch = select.poll()
    held: dict[int, socket.socket] = {}

    def open_one() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        held[sock.fileno()] = sock
        watch.register(sock, select.POLLIN | select.POLLRDHUP)

    for _ in range(count):
        open_one()
    reopened = 0
    with TimedRequests(port, every=0.02) as probes:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for fd, _ in watch.poll(50):  # an idle socket turns readable only when closed
                watch.unregister(fd)
                held.pop(fd).close()
                open_one()
                reopened += 1
    for sock in held.values():
        sock.close()
    evicted = metric(url, 'collabvit_closed_connections_total{reason="evicted"}')
    return {"sockets": count, "reopened": reopened, "evicted": evicted - evicted_before,
            **probes.figures()}


def json_flood_body(size: int = 16 * 2**20 - 256) -> bytes:
    """A JSON infer body of `size` bytes made of about size / 5 two-letter strings."""
    count = (size - 100) // 5
    return json.dumps({"inputs": [{"name": "payload", "datatype": "BYTES", "shape": [1],
                                   "data": ["ab"] * count}]}, separators=(",", ":")).encode()


def json_bodies(url: str, request: bytes, port: int, concurrent: int, flooders: int,
                seconds: float) -> dict:  # fmt: skip
    """(1) `concurrent` 16 MiB JSON bodies of tiny strings at once: their answers and the
    slowest liveness probe; (2) `flooders` clients sending such bodies back to back for
    `seconds` while one client sends one-image binary requests: its latency and liveness."""
    body = json_flood_body()
    headers = {"content-type": "application/json"}

    def post(_=None) -> tuple[int, float]:
        started = time.perf_counter()
        status = httpx.post(f"{url}{PATH}", content=body, headers=headers,
                            timeout=120).status_code  # fmt: skip
        return status, time.perf_counter() - started

    with TimedRequests(port) as probes, ThreadPoolExecutor(concurrent) as pool:
        answers = list(pool.map(post, range(concurrent)))
    at_once = {"bodies": concurrent, "statuses": sorted({s for s, _ in answers}),
               "slowest_answer_ms": 1000 * max(t for _, t in answers), **probes.figures()}
    stop = threading.Event()
    statuses: list[int] = []

    def flood(_) -> None:
        while not stop.is_set():
            statuses.append(post()[0])

    with ThreadPoolExecutor(flooders) as pool:
        floods = [pool.submit(flood, n) for n in range(flooders)]
        time.sleep(1.0)  # the flood is under way
        with TimedRequests(port) as flood_probes, TimedRequests(port, request) as work:
            time.sleep(seconds)
        stop.set()
        for future in floods:
            future.result()
    served = work.figures()
    return {"at_once": at_once, "flood": {
        "flooders": flooders, "seconds": seconds, "bodies": len(statuses),
        "statuses": sorted(set(statuses)), "requests": served["probes"],
        "failed": served["failed"], "p50_ms": served["p50_ms"], "p99_ms": served["p99_ms"],
        "liveness": flood_probes.figures()}}


def stalled_uploads(port: int, pid: int, connections: int,
                    size: int = 16 * 2**20) -> dict:  # fmt: skip
    """`connections` uploads that each send all but the last byte of a `size` body, then
    stall: how each ended, and the server's resident memory before and at its peak."""
    reset_peak_rss(pid)
    before = current_rss_mb(pid)
    head = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json"
            f"\r\ncontent-length: {size}\r\n\r\n").encode()
    payload = b" " * (size - 1)

    def upload(_) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            try:
                sock.sendall(head + payload)
            except OSError:  # refused and closed while sending
                pass
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except OSError:
                pass
        match = re.match(rb"HTTP/1.1 (\d+)", answer)
        return int(match.group(1)) if match else 0

    with ThreadPoolExecutor(connections) as pool:
        statuses = list(pool.map(upload, range(connections)))
    return {"connections": connections, "offered_mb": connections * size / 2**20,
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "rss_before_mb": before, "rss_peak_mb": peak_rss_mb(pid)}


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


class HostileServer(ServerThread):
    """An HTTP server on 127.0.0.1 (its own event loop, in a thread) that answers the shipped
    server's metadata and infer requests as a broken or hostile server would: `mode` is
    "nan" (NaN logits), "huge_answer" (a 200 MB answer), "huge_metadata" (300 MB of
    metadata) or "malformed" ("parameters": [1, 2])."""

    HUGE = {"huge_answer": 200 * 10**6, "huge_metadata": 300 * 10**6}

    def __init__(self, mode: str, metadata: dict) -> None:
        super().__init__()
        self.mode, self.metadata = mode, metadata

    async def _connection(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", head, re.I)
                await reader.readexactly(int(length.group(1)) if length else 0)
                await self._answer(head.startswith(b"POST"), writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _answer(self, infer: bool, writer) -> None:
        if infer and self.mode == "nan":
            body, length = infer_response_body(SERVER, np.full((1, 10), np.nan, np.float32), True)
            extra = f"{INFERENCE_HEADER}: {length}\r\n"
        elif not infer and self.mode == "malformed":
            body, extra = json.dumps({**self.metadata, "parameters": [1, 2]}).encode(), ""
        elif (self.mode == "huge_answer") == infer and self.mode in self.HUGE:
            size = self.HUGE[self.mode]
            writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         f"content-length: {size}\r\n\r\n".encode())  # fmt: skip
            chunk = b" " * 2**20
            for _ in range(size // len(chunk)):  # until the client stops reading
                writer.write(chunk)
                await writer.drain()
            return
        else:
            body, extra = json.dumps(self.metadata).encode(), ""
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        await writer.drain()


def edge_against(url: str, images: int, scratch: Path) -> dict:
    """`collabvit edge` (the shipped pair's edge, `images` test images) against `url`: its exit
    status, seconds, peak resident memory, the last line it printed on stderr, and its
    results (collaborative and edge-alone accuracy, fallbacks) when it wrote them."""
    import subprocess
    import sys

    run = scratch / f"edge_{free_port()}"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "collabvit", "edge", "--server", url,
                                "--limit", str(images), "--quiet", "--retries", "0",
                                "--results-file", f"{run}.json", "--records",
                                f"{run}.jsonl"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    # the edge's own peak, read while it runs (its rusage would also count the pages of
    # this process that the fork before its exec shared)
    peak = 0.0
    errors = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read().decode()))
    reader.start()
    while process.poll() is None:
        try:
            peak = max(peak, peak_rss_mb(process.pid))
        except OSError:  # between exit and reaping
            pass
        time.sleep(0.02)
    reader.join()
    stderr = errors[0]
    figures = {"exit": process.returncode, "seconds": time.perf_counter() - started,
               "peak_rss_mb": peak,
               "stderr": (stderr.strip().splitlines() or [""])[-1][:200]}
    if Path(f"{run}.json").exists():
        written = json.loads(Path(f"{run}.json").read_text())
        figures.update(collab_acc=written["summary"]["collab_acc"],
                       client_acc=written["summary"]["client_acc"],
                       fallbacks=written.get("fallbacks", {}))  # fmt: skip
    return figures


def hostile_servers(url: str, images: int) -> dict:
    """The edge against the real server, then against each kind of HostileServer."""
    import tempfile

    metadata = httpx.get(f"{url}/v2/models/{SERVER}").json()
    with tempfile.TemporaryDirectory() as scratch:
        figures = {"honest": edge_against(url, images, Path(scratch))}
        for mode in ("nan", "huge_answer", "huge_metadata", "malformed"):
            with HostileServer(mode, metadata) as hostile:
                figures[mode] = edge_against(f"http://127.0.0.1:{hostile.port}", images,
                                             Path(scratch))  # fmt: skip
    return figures


EDGE_TABLE_HEAD = ("| server | exit | seconds | edge peak RSS | collaborative | edge alone | "
                   "fallbacks | last line on stderr |\n|---|---:|---:|---:|---:|---:|---|---|")


def edge_row(name: str, e: dict) -> str:
    """One row of section h's table."""
    if "collab_acc" in e:
        fallbacks = ", ".join(f"{k} {v}" for k, v in e["fallbacks"].items() if v) or "none"
        figures = f"{e['collab_acc']:.2f} % | {e['client_acc']:.2f} % | {fallbacks}"
    else:
        figures = " | | "
    line = e["stderr"].replace("|", "\\|")
    return (f"| {name.replace('_', ' ')} | {e['exit']} | {e['seconds']:.1f} | "
            f"{e['peak_rss_mb']:,.0f} MB | {figures} | {line} |")


def bf16_figures(pair, payloads, repeats: int) -> dict:
    """Throughput of the float32 and bfloat16 servers and the default point's figures."""
    fp32 = pair.server()
    bf16_model = copy.deepcopy(pair.server_model).to(torch.bfloat16)
    from collabvit.models.server import Server

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
    parser.add_argument("--attack-seconds", type=float, default=10.0,
                        help="how long the idle-socket and JSON-flood attacks last")
    parser.add_argument("--flooders", type=int, default=16, help="JSON-flood clients")
    parser.add_argument("--uploads", type=int, default=48, help="stalled uploads")
    parser.add_argument("--edge-images", type=int, default=1000,
                        help="test images of each edge run against a hostile server")
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), seconds=2.0, clients=8, queue=4, images=300,
                       repeats=1, attack_seconds=2.0, flooders=4, uploads=8,
                       edge_images=100)  # fmt: skip
    began, load_at_start = time.perf_counter(), load_average()
    pair, payloads, geometry, default = payloads_of_test_images(args.images)
    requests = raw_requests(payloads[:2000], geometry)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(port, "--max-queue-images", str(args.queue), "--timeout-request-head",
                           "2", "--timeout-body", "2", "--limit-concurrency", "1024",
                           "--max-connections", str(MAX_CONNECTIONS))  # fmt: skip
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
        idle = [idle_sockets(port, url, count, args.attack_seconds)
                for count in (255, MAX_CONNECTIONS + 256)]  # fmt: skip
        flood = json_bodies(url, requests[0], port, 3, args.flooders, args.attack_seconds)
        stalled = stalled_uploads(port, process.pid, args.uploads)
        edges = hostile_servers(url, args.edge_images)
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

**e. Idle sockets.** Connections that send nothing, each reopened as soon as the server closes
it (the 2 s head time-out), held for {args.attack_seconds:g} s while liveness was probed every
20 ms on new connections:

| sockets held | reopened | evicted by the server | probes | not 200 | p50 | slowest |
|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(f"| {i['sockets']:,} | {i['reopened']:,} | {i['evicted']:,.0f} | {i['probes']} | "
              f"{i['failed']} | {i['p50_ms']:.1f} ms | {i['max_ms']:.1f} ms |" for i in idle)}

The second row holds more sockets than `--max-connections {MAX_CONNECTIONS}`: the longest-idle
connections made room for the probes.

**f. JSON bodies built to be slow to parse.** {flood['at_once']['bodies']} bodies of 16 MiB
(3.4 million two-letter strings each) at once: answered {flood['at_once']['statuses']} within
{flood['at_once']['slowest_answer_ms']:,.0f} ms (parsed in the parser process); the slowest of
{flood['at_once']['probes']} liveness probes meanwhile took
{flood['at_once']['max_ms']:.1f} ms. Then {flood['flood']['flooders']} clients sent such bodies
back to back for {flood['flood']['seconds']:g} s ({flood['flood']['bodies']} bodies, answered
{flood['flood']['statuses']}) while one client sent one-image binary requests: p50
{flood['flood']['p50_ms']:.1f} ms, p99 {flood['flood']['p99_ms']:.1f} ms over
{flood['flood']['requests']} requests; liveness p50 {flood['flood']['liveness']['p50_ms']:.1f} ms,
slowest {flood['flood']['liveness']['max_ms']:.1f} ms.

**g. Stalled uploads.** {stalled['connections']} connections each sent all but the last byte of a
16 MiB body ({stalled['offered_mb']:,.0f} MiB in all) and stalled; their answers by status:
{", ".join(f"{count} × {status}" for status, count in stalled['statuses'].items())} (503: the
bytes bound of `--max-queue-mb` 512 was reached; 408: the 2 s body time-out). The server's
resident memory: {stalled['rss_before_mb']:,.0f} MB before, peak
{stalled['rss_peak_mb']:,.0f} MB (**+{stalled['rss_peak_mb'] - stalled['rss_before_mb']:,.0f}
MB** against the 512 MB bound).

**h. A hostile server, seen from the edge.** `collabvit edge` on the first
{args.edge_images:,} test images (the shipped edge, `--retries 0`) against this server, then
against servers that answer every infer request with NaN logits or with 200 MB, that answer
the metadata with 300 MB, or with `"parameters": [1, 2]`:

{EDGE_TABLE_HEAD}
{chr(10).join(edge_row(name, e) for name, e in edges.items())}

**i. bfloat16.** In-process `Server.classify`, batches of 32: float32
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
        "idle_sockets": idle, "json_bodies": flood, "stalled_uploads": stalled,
        "hostile_servers": edges,
    })


if __name__ == "__main__":
    main()
