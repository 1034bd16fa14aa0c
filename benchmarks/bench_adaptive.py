"""Edge clients that hold a bandwidth budget on a shared link, against fixed-point clients.

    python -m benchmarks.bench_adaptive [--clients 4] [--rate 100] [--phase 20] [--quick]

One `collabvit serve` (the shipped Fashion-MNIST server, one thread, `--max-queue-images
QUEUE`) behind one emulated link, `SharedLink`: a TCP relay in which every byte waits its
turn at LINK bit/s, in each direction, whichever connection it belongs to. CLIENTS
`collabvit edge --onnx` processes (the shipped edge, exported) reach the server through it,
each taking RATE test images a second as a camera delivers them, with a deadline of
DEADLINE seconds per image and no retries. The scenario, PHASE seconds each:

1. steady: the link carries LINK bit/s;
2. the link falls to a tenth;
3. it is back;
4. a burst: other devices (raw HTTP senders, not through the link) offer the server twice
   the images per second it answered when measured alone first.

It runs twice: **adaptive** clients (`--budget-bps`, each the link's bytes/s over CLIENTS
times 0.8, along the shipped frontier) and **fixed** clients (the shipped default point).
Per 1 s window, from the clients' records: accuracy, communication cost, bytes/s per client,
p50/p99 latency of the sent images, fallbacks and images the budget answered at the edge.
The offline reference is a sweep of the same series on the test split (`collabvit sweep`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from benchmarks.bench_overload import metric, overload, raw_requests
from benchmarks.bench_serve import free_port, payloads_of_test_images, start_server
from benchmarks.harness import (
    RESULTS,
    add_suite_arguments,
    apply_quick,
    load_average,
    publish,
    section,
)
from collabvit import cpu_model
from collabvit.client import ImageRecord
from collabvit.controller import best_within, read_frontier

SERIES = ("attention_sum_threshold", "min_entropy", "mean")
NUM_PATCHES = 49


class SharedLink:
    """A TCP relay to `target_port` that emulates one link shared by all its connections:
    each chunk read waits for the chunks before it (of any connection) to be transmitted at
    `bandwidth` bit/s, in its direction, then `delay` seconds more; `bandwidth` may change at
    any time (from another thread). Runs its own event loop in a thread."""

    def __init__(self, target_port: int, bandwidth: float, delay: float = 0.005) -> None:
        self.target_port, self.bandwidth, self.delay = target_port, bandwidth, delay
        self.free_at = {"up": 0.0, "down": 0.0}
        self.carried = {"up": 0, "down": 0}
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SharedLink:
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
        server.close()

    async def _pipe(self, reader, writer, direction: str) -> None:
        try:
            while chunk := await reader.read(65536):
                now = self.loop.time()
                start = max(now, self.free_at[direction])
                self.free_at[direction] = start + 8 * len(chunk) / self.bandwidth
                await asyncio.sleep(self.free_at[direction] - now + self.delay)
                self.carried[direction] += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _connection(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1",
                                                                         self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, server_writer, "up"),
                             self._pipe(server_reader, client_writer, "down"))


def export_edge(folder: Path) -> None:
    """The shipped edge exported (its card carries the shipped frontier)."""
    subprocess.run([sys.executable, "-m", "collabvit", "export", "--out-dir", str(folder)],
                   check=True, capture_output=True)  # fmt: skip


def start_clients(folder: Path, port: int, out: Path, args, budget: float | None,
                  images: int) -> list[subprocess.Popen]:  # fmt: skip
    processes = []
    for number in range(args.clients):
        command = [sys.executable, "-m", "collabvit", "edge", "--onnx", str(folder),
                   "--threads", "1", "--server", f"http://127.0.0.1:{port}",
                   "--limit", str(images), "--batch-size", str(args.batch),
                   "--images-per-second", str(args.rate), "--timeout", str(args.deadline),
                   "--retries", "0", "--cooldown", "0", "--quiet",
                   "--records", str(out / f"client{number}.jsonl"),
                   "--results-file", str(out / f"client{number}.json")]  # fmt: skip
        if budget is not None:
            command += ["--budget-bps", f"{budget:.0f}"]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))  # fmt: skip
    return processes


def run_scenario(args, folder: Path, out: Path, budget: float | None, url: str,
                 server_port: int, requests: list[bytes], capacity: float) -> dict:  # fmt: skip
    """One run of the four phases; the server's queue sampled every 50 ms throughout."""
    out.mkdir(parents=True, exist_ok=True)
    phases = 4
    images = int(args.rate * args.phase * phases)
    queue_peak = [0.0]
    sampling = threading.Event()

    def sample_queue() -> None:
        while not sampling.is_set():
            queue_peak[0] = max(queue_peak[0], metric(url, "collabvit_admitted_images"))
            time.sleep(0.05)

    with SharedLink(server_port, args.link) as link:
        processes = start_clients(folder, link.port, out, args, budget, images)
        sampler = threading.Thread(target=sample_queue, daemon=True)
        sampler.start()
        # the clients take a moment to start; their first answers mark the scenario's start
        began = wait_first_records(out, args.clients)
        time.sleep(max(0.0, began + args.phase - time.time()))
        link.bandwidth = args.link / 10
        time.sleep(max(0.0, began + 2 * args.phase - time.time()))
        link.bandwidth = args.link
        time.sleep(max(0.0, began + 3 * args.phase - time.time()))
        answered_before = metric(url, "collabvit_infer_images_total")
        burst_began = time.time()
        burst = asyncio.run(overload(server_port, requests, args.burst_clients,
                                     args.phase, rate=2 * capacity))  # fmt: skip
        burst_seconds = time.time() - burst_began
        served = (metric(url, "collabvit_infer_images_total") - answered_before) / burst_seconds
        errors = [p.communicate(timeout=args.phase * phases + 120)[1] for p in processes]
        sampling.set()
        sampler.join()
    failed = [(p.returncode, e.strip().splitlines()[-1:])
              for p, e in zip(processes, errors, strict=True) if p.returncode != 0]
    if failed:
        raise SystemExit(f"edge clients failed: {failed}")
    records = [read_records(out / f"client{n}.jsonl") for n in range(args.clients)]
    return {"began": began, "records": records, "images": images, "queue_peak": queue_peak[0],
            "burst": {**burst, "served_per_second": served}}


def wait_first_records(out: Path, clients: int, timeout: float = 120.0) -> float:
    """When every client has written its first answer (Unix time)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        firsts = []
        for number in range(clients):
            path = out / f"client{number}.jsonl"
            lines = path.read_text().splitlines() if path.is_file() else []
            if len(lines) > 1:
                firsts.append(json.loads(lines[1])["answered_at"])
        if len(firsts) == clients:
            return min(firsts)
        time.sleep(0.05)
    raise SystemExit("the edge clients did not start")


def read_records(path: Path) -> list[ImageRecord]:
    return [ImageRecord(**json.loads(line)) for line in path.read_text().splitlines()[1:]]


def windows(run: dict, clients: int, seconds: int) -> list[dict]:
    """Per 1 s window of the scenario: accuracy, cost, bytes/s per client, latency of sent
    images, fallbacks and withheld images (all clients together)."""
    rows = []
    every = [r for client in run["records"] for r in client]
    for second in range(seconds):
        start = run["began"] + second
        inside = [r for r in every if start <= r.answered_at < start + 1]
        sent = [r for r in inside if r.offloaded]
        latencies = [r.total_ms for r in sent]
        delivered = [r for r in sent if r.route == "server"]
        rows.append({
            "second": second, "images": len(inside),
            "accuracy": 100 * np.mean([r.final_top[0] == r.label for r in inside])
            if inside else math.nan,
            "cost": sum(r.delivered for r in delivered) / (NUM_PATCHES * len(inside))
            if inside else math.nan,
            "bytes_per_client": sum(r.request_bytes + r.response_bytes for r in inside) / clients,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies else math.nan,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else math.nan,
            "fallbacks": sum(r.route == "fallback" for r in inside),
            "withheld": sum(r.route == "withheld" for r in inside),
        })  # fmt: skip
    return rows


def phase_of(rows: list[dict], phase: int, length: float, skip: int = 0) -> list[dict]:
    """The windows of phase `phase` (0-based), without its first `skip` seconds."""
    lo, hi = phase * length + skip, (phase + 1) * length
    return [r for r in rows if lo <= r["second"] < hi]


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return float(np.mean(values)) if values else math.nan


def tens(rows: list[dict], key: str) -> list[float]:
    """Means of `key` over consecutive 10 s windows (whole ones only)."""
    return [float(np.mean([r[key] for r in rows[i:i + 10]]))
            for i in range(0, len(rows) - 9, 10)]  # fmt: skip


def offline_frontier(out: Path, limit: int) -> list:
    """The series' frontier on the first `limit` test images: what an offline choice gets."""
    subprocess.run([sys.executable, "-m", "collabvit", "sweep", "--quiet", "--no-plots",
                    "--limit", str(limit), "--out-dir", str(out), "--attention-modes", "mean",
                    "--uncer-modes", "min_entropy", "--num-etas", "41", "--policy",
                    "attention_sum_threshold=0.5,0.7,0.8,0.9,0.95,0.97,0.99,0.995,0.999,"
                    "0.9995,1.0"], check=True, capture_output=True)  # fmt: skip
    return read_frontier(out / "frontier.json", *SERIES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="images/s per client")
    parser.add_argument("--phase", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--link", type=float, default=1_000_000.0, help="bit/s")
    parser.add_argument("--deadline", type=float, default=2.0, help="seconds per image")
    parser.add_argument("--batch", type=int, default=10, help="the edges' batch size")
    parser.add_argument("--queue", type=int, default=32, help="--max-queue-images")
    parser.add_argument("--burst-clients", type=int, default=32)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), clients=2, rate=50.0, phase=3.0,
                       burst_clients=4)  # fmt: skip
    began_at, load_at_start = time.perf_counter(), load_average()
    budget = args.link / 8 / args.clients * 0.8
    _, payloads, geometry, _ = payloads_of_test_images(2000 if not args.quick else 200)
    requests = raw_requests(payloads, geometry)
    server_port = free_port()
    url = f"http://127.0.0.1:{server_port}"
    with TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "edge"
        export_edge(folder)
        process = start_server(server_port, "--threads", "1", "--max-queue-images",
                               str(args.queue), "--limit-concurrency", "1024")  # fmt: skip
        try:
            alone = asyncio.run(overload(server_port, requests, args.queue, args.phase / 2))
            capacity = alone["answered"] / alone["seconds"]
            runs = {name: run_scenario(args, folder, tmp / name, budget_bps, url, server_port,
                                       requests, capacity)  # fmt: skip
                    for name, budget_bps in (("adaptive", budget), ("fixed", None))}
        finally:
            process.terminate()
            process.wait(timeout=60)
        seconds = int(4 * args.phase)
        table = {name: windows(run, args.clients, seconds) for name, run in runs.items()}
        frontier = offline_frontier(tmp / "offline", int(args.rate * args.phase * 4))
    results = summarise(args, table, runs, frontier, budget, capacity)
    text = report_text(args, results, capacity, budget)
    figure = None
    if not args.quick:
        from collabvit.plots import plot_scenario

        figure = plot_scenario(table, args.phase, budget, args.link / 8 / args.clients,
                               RESULTS.parent / "adaptive")
    publish(args, "adaptive", section("adaptive", "Budgets that follow the link", [text],
                                      load_at_start, time.perf_counter() - began_at),
            {"results": results, "windows": table,
             "figure": [str(p) for p in figure] if figure else None})  # fmt: skip


def summarise(args, table: dict, runs: dict, frontier: list, budget: float,
              capacity: float) -> dict:  # fmt: skip
    """The targets' figures from the windows of both runs."""
    out = {}
    for name, rows in table.items():
        steady = phase_of(rows, 0, args.phase) + phase_of(rows, 2, args.phase)
        dropped = phase_of(rows, 1, args.phase)
        run = runs[name]
        answered = sum(len(client) for client in run["records"])
        sent = [r for client in run["records"] for r in client if r.offloaded]
        out[name] = {
            "steady_accuracy": mean_of(steady, "accuracy"),
            "steady_cost": mean_of(steady, "cost"),
            "drop_accuracy": mean_of(dropped, "accuracy"),
            "drop_loss": mean_of(steady, "accuracy") - mean_of(dropped, "accuracy"),
            "steady_bytes_windows": tens(phase_of(rows, 0, args.phase, skip=0), "bytes_per_client")
            + tens(phase_of(rows, 2, args.phase), "bytes_per_client"),
            "p99_ms": float(np.percentile([r.total_ms for r in sent], 99)) if sent else 0.0,
            "lost_images": args.clients * run["images"] - answered,
            "queue_peak": run["queue_peak"],
            "burst_served_share": run["burst"]["served_per_second"] / capacity,
            "burst_lost_requests": run["burst"]["lost"],
            "fallbacks": sum(r.route == "fallback" for r in sent),
            "withheld": sum(r.route == "withheld" for c in run["records"] for r in c),
        }
        offline = best_within(frontier, out[name]["steady_cost"]).collab_acc
        out[name]["offline_accuracy_at_cost"] = offline
    return out


HEADER = ("| clients | steady accuracy | steady cost | offline at that cost | accuracy, link at "
          "a tenth | loss | p99 ms (sent) | fallbacks | withheld | lost | peak queue | burst "
          "served |\n|---|" + "---:|" * 11)


def report_text(args, results: dict, capacity: float, budget: float) -> str:
    adaptive, fixed = results["adaptive"], results["fixed"]
    ratio = fixed["drop_loss"] / adaptive["drop_loss"] if adaptive["drop_loss"] > 0 \
        else math.inf  # fmt: skip
    held = [abs(b / budget - 1) for b in adaptive["steady_bytes_windows"]]
    rows = "\n".join(
        f"| {name} | {r['steady_accuracy']:.2f} % | {r['steady_cost']:.3f} | "
        f"{r['offline_accuracy_at_cost']:.2f} % | {r['drop_accuracy']:.2f} % | "
        f"{r['drop_loss']:+.2f} pt | {r['p99_ms']:.0f} | {r['fallbacks']:,} | "
        f"{r['withheld']:,} | {r['lost_images']} | {r['queue_peak']:.0f} | "
        f"{100 * r['burst_served_share']:.0f} % |"
        for name, r in results.items())  # fmt: skip
    return f"""{args.clients} `collabvit edge --onnx` clients (the shipped Fashion-MNIST
edge, exported), {args.rate:g} images/s each, a deadline of {args.deadline:g} s per image and
no retries, share one emulated link of {args.link / 1e6:g} Mbit/s to `collabvit serve --threads
1 --max-queue-images {args.queue}` on this machine ({cpu_model()}). Phases of {args.phase:g} s:
steady, the link at a tenth, back, and a burst of {args.burst_clients} raw senders offering the
server twice its measured capacity ({capacity:,.0f} images/s alone). Adaptive clients hold
`--budget-bps {budget:,.0f}` each (the link's share times 0.8); fixed clients use the shipped
default point.

{HEADER}
{rows}

Budget held: each 10 s window of the steady phases within
{100 * max(held, default=0):.1f} % of the budget (target 5 %). At the steady budget the adaptive
clients reach {adaptive['steady_accuracy']:.2f} % where the offline frontier gives
{adaptive['offline_accuracy_at_cost']:.2f} % at the same cost (target: at least that − 0.2 pt).
With the link at a tenth the adaptive clients lose {adaptive['drop_loss']:.2f} pt, the fixed ones
{fixed['drop_loss']:.2f} pt (**{ratio:.1f}x** less; target 3x)."""


if __name__ == "__main__":
    main()
