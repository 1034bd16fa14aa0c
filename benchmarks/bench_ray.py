"""`collabvit serve --replicas N` on Ray Serve against the one-process server, in one run.

Measured on one machine with the shipped Fashion-MNIST server:

1. Ray's proxy overhead: one replica of one torch thread behind Ray's proxy against
   `collabvit serve --threads 1`, the same load (bench_serve's payloads and its lean client,
   one image per request, `--concurrency` in flight).
2. Two replicas of one thread each against one process of two threads, on the machine's
   cores.
3. A replica killed: `collabvit edge` over `--edge-images` images against two replicas;
   SIGKILL of one when a fifth of the images are answered. Counted: images lost (that kept
   the edge's answer, or have none), the images retried, the seconds until a new replica
   answers, the p99 of the images answered meanwhile against the run's.
4. On paper: what N machines give, from the measured per-replica throughput and the proxy's
   CPU time per request (the assumptions are printed with the figures).

Writes its section of benchmarks/RESULTS.md.

Usage:
    python -m benchmarks.bench_ray [--requests 2000] [--concurrency 32] [--edge-images 2000]
        [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.bench_serve import SERVER, free_port, payloads_of_test_images, served, start_server
from benchmarks.harness import add_suite_arguments, apply_quick, load_average, publish, section
from collabvit.lite.client import infer_request
from collabvit.lite.oip import INFERENCE_HEADER, parse_header_length, parse_logits
from collabvit.lite.protocol import encode_payload

ONE_REPLICA = ("--replicas", "1", "--replica-cpus", "1", "--threads", "1")
TWO_REPLICAS = ("--replicas", "2", "--replica-cpus", "1", "--threads", "1")


def replica_answering(client: httpx.Client, url: str, blob: bytes) -> str | None:
    """The replica that answers one infer request now (None for a failed request)."""
    try:
        response = client.send(infer_request(client, url, blob))
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    _, parameters = parse_logits(response.content,
                                 parse_header_length(response.headers.get(INFERENCE_HEADER)))
    return parameters.get("replica")


def replica_pids() -> set[int]:
    """The processes of Ray Serve replicas of collabvit on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ServeReplica:collabvit" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def killed_replica(images: int, blob: bytes) -> dict:
    """SIGKILL one of two replicas while `collabvit edge` runs over `images` images."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, *TWO_REPLICAS)
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    records = folder / "records.jsonl"
    try:
        edge = subprocess.Popen([sys.executable, "-m", "collabvit", "edge", "--server", url,
                                 "--limit", str(images), "--quiet", "--records", str(records)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        while not records.exists() or records.read_text().count("\n") < images // 5:
            if edge.poll() is not None:
                raise RuntimeError(edge.stderr.read())
            time.sleep(0.02)
        before = replica_pids()
        os.kill(min(before), signal.SIGKILL)
        killed_at = time.time()
        # the pool is whole again when a replica Ray started after the kill answers
        infer = f"{url}/v2/models/{SERVER}/infer"
        with httpx.Client(timeout=10) as client:
            seen = {replica_answering(client, infer, blob) for _ in range(20)} - {None}
            while (name := replica_answering(client, infer, blob)) in seen | {None}:
                if time.time() - killed_at > 120:
                    raise RuntimeError("no new replica answered within 120 s")
                time.sleep(0.1)
        whole_after = time.time() - killed_at
        _, stderr = edge.communicate(timeout=600)
        if edge.returncode != 0:
            raise RuntimeError(stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = [json.loads(line) for line in records.read_text().splitlines()[1:] if line]
    sent = [r for r in rows if r["route"] in ("server", "fallback")]
    meanwhile = [r["total_ms"] for r in sent if killed_at <= r["answered_at"] <=
                 killed_at + whole_after]  # fmt: skip
    return {"images": images, "answered": len({r["index"] for r in rows}),
            "lost": images - len({r["index"] for r in rows})
            + sum(r["route"] == "fallback" for r in rows),
            "sent": len(sent), "retried": sum(r["attempts"] > 1 for r in sent),
            "whole_after_s": whole_after, "replacement": name,
            "p99_ms": float(np.percentile([r["total_ms"] for r in sent], 99)),
            "p99_meanwhile_ms": float(np.percentile(meanwhile, 99)) if meanwhile else None,
            "answered_meanwhile": len(meanwhile)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--edge-images", type=int, default=2000)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), requests=100, edge_images=300)
    began = time.perf_counter()
    load_at_start = load_average()
    _, payloads, geometry, default = payloads_of_test_images(args.requests)
    blobs = [encode_payload(p, geometry) for p in payloads]
    runs = {}
    for name, flags in [("direct, 1 thread", ("--threads", "1")),
                        ("Ray, 1 replica x 1 thread", ONE_REPLICA),
                        ("direct, 1 process x 2 threads", ("--threads", "2")),
                        ("Ray, 2 replicas x 1 thread", TWO_REPLICAS)]:
        runs[name] = served(blobs, args.concurrency, *flags)
        print(f"{name}: {runs[name][0]:.0f} requests/s, failures {runs[name][2]}", flush=True)
    kill = killed_replica(args.edge_images, blobs[0])
    print(f"killed replica: {kill}", flush=True)
    direct, proxied = runs["direct, 1 thread"][0], runs["Ray, 1 replica x 1 thread"][0]
    two_threads, two_replicas = (runs["direct, 1 process x 2 threads"][0],
                                 runs["Ray, 2 replicas x 1 thread"][0])  # fmt: skip
    # the proxy's CPU per request: what one replica behind it loses against the same
    # replica alone, on a machine whose cores the proxy shares
    proxy_ms = 1000 * (1 / proxied - 1 / direct)
    proxy_bound = 1000 / proxy_ms if proxy_ms > 0 else float("inf")

    def row(name: str) -> str:
        rate, latencies, failures = runs[name]
        return (f"| {name} | {rate:.0f} | {rate / direct:.2f} | "
                f"{1000 * statistics.median(latencies):.1f} | "
                f"{1000 * float(np.percentile(latencies, 99)):.1f} | {failures} |")  # fmt: skip

    meanwhile = (f"{kill['p99_meanwhile_ms']:.0f} ms over the {kill['answered_meanwhile']} "
                 "images answered meanwhile" if kill["p99_meanwhile_ms"] is not None
                 else "no image was answered meanwhile")  # fmt: skip
    body = f"""The shipped Fashion-MNIST server (`{SERVER}`), one image per request,
{args.concurrency} in flight from one lean client process on the same machine (bench_serve's),
the shipped edge's
selections ({default.masking_mode} {default.masking_th}) of {len(blobs)} test images, raw
codec. "Ray" is `collabvit serve --replicas N --replica-cpus 1 --threads 1`: Ray Serve's
proxy in front of N replicas, each the one-process application around its own model.

| variant | images/s | / direct, 1 thread | p50 latency (ms) | p99 latency (ms) | failed |
|---|---:|---:|---:|---:|---:|
{row("direct, 1 thread")}
{row("Ray, 1 replica x 1 thread")}
{row("direct, 1 process x 2 threads")}
{row("Ray, 2 replicas x 1 thread")}

- **Ray's proxy overhead** (1 replica against the same process alone): **{proxied / direct:.2f}x**
  the throughput, {proxy_ms:.2f} ms of the machine's time per request.
- **2 replicas x 1 thread against 1 process x 2 threads: {two_replicas / two_threads:.2f}x.**
  On {os.cpu_count()} cores the proxy, Ray's own processes and the client share the cores
  with the replicas.
- **A replica killed** (SIGKILL of one of two, a fifth of the way through `collabvit edge` over
  {kill['images']} images, default retries): **{kill['lost']} images lost**
  ({kill['answered']} answered, {kill['sent']} sent to the server, {kill['retried']} of them
  retried); a new replica answered **{kill['whole_after_s']:.1f} s** after the kill; p99
  latency {meanwhile}, against {kill['p99_ms']:.0f} ms over the whole run.

What N machines give, on paper: one machine of {os.cpu_count()} cores serves about
{two_replicas:.0f} images/s with its replicas and its proxy (the 2-replica figure above, the
proxy's share included), and a proxy costs about {proxy_ms:.2f} ms of the machine per request,
so one proxy alone cannot pass about {proxy_bound:,.0f} requests/s per core it gets. With a
load balancer spreading the edges over the N machines' proxies (Ray runs one on every node),
N machines serve about N x {two_replicas:.0f} images/s; sending every edge to one machine's
proxy instead caps the fleet at that proxy's bound, whatever N is. Assumed: one
image per request as here (several per request divide the proxy's share); a network between
the edges and the machines that is not the bound (the payload is about 1.1 kB per sent
image); the same CPUs; replicas of one thread each, and the client on other machines (here it
takes part of the cores, so the figure is a lower one). Ray's head node holds the cluster's
state: it is one point of failure unless its state store is made fault tolerant."""
    text = section("bench_ray", "Replicas on Ray Serve: the proxy, two replicas, a kill",
                   body.splitlines(), load_at_start, time.perf_counter() - began)
    publish(args, "bench_ray", text, {
        "direct": direct, "proxied": proxied, "two_threads": two_threads,
        "two_replicas": two_replicas, "proxy_ms": proxy_ms, **{f"kill_{k}": v for k, v in
                                                               kill.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
