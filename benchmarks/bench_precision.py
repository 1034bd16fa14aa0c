"""Each precision this CPU runs natively (float32, bfloat16 where it has AVX512-BF16 or AMX,
float16 where it has AVX512-FP16 or AMX-FP16, int8) against float32 and the reference loop,
in one run. float16 is the GPUs' (bench_gpu).

1. **Eval throughput**: `evaluate` (what `collabvit eval --precision P` runs) with both models
   in P, interleaved with the paper's loop (`reference_loop.reference_evaluate`, float32)
   on the same batches: the shipped Fashion-MNIST and cluttered pairs, and the DeiT sizes
   (bench_eval's workloads). The collaborative accuracy each precision reaches on these
   images is printed beside it.
2. **Server images/s**: `Server.classify` in-process on the shipped edge's payloads at each
   precision, and `collabvit serve --precision P` under bench_serve's load.
3. **Edge batch-1 latency**: the torch edge (`EdgeDevice.process`, one image) at each
   precision against the ONNX edge's float32 and int8 graphs of the same model.
4. **What bounds the half precisions**: this CPU's matrix-multiply rate in each precision.

The accuracy of each precision over every test image is scripts/precision_report.py's
(benchmarks/precision_results.json). Writes its section of benchmarks/RESULTS.md.

Usage:
    python -m benchmarks.bench_precision [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_compute import matmul_gflops
from benchmarks.bench_eval import deit_workload, fmnist_workload
from benchmarks.bench_serve import payloads_of_test_images, served
from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    interleaved,
    load_average,
    publish,
    section,
)
from benchmarks.reference_loop import reference_evaluate
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.onnx_edge import OnnxEdge
from collabvit.lite.protocol import encode_payload
from collabvit.lite.specs import PRECISIONS
from collabvit.models.edge import EdgeDevice
from collabvit.models.export import export_edge, quantize_edge, uint8_images
from collabvit.models.pair import load_pair
from collabvit.models.precision import HALF, runs_natively, with_precision
from collabvit.models.server import Server
from collabvit.research.evaluate import evaluate
from collabvit.research.precision import precision_table

CPU = torch.device("cpu")
# what this CPU runs natively: an emulated precision would only measure the emulation
PRECISIONS = tuple(p for p in PRECISIONS if runs_natively(p, CPU))
PRECISION_RESULTS = Path(__file__).resolve().parent / "precision_results.json"
FULL_IMAGES = {"fmnist": 2000, "cluttered": 1000, "deit": 32}
QUICK_IMAGES = {"fmnist": 64, "cluttered": 32, "deit": 2}


def eval_throughput(name: str, images: int, repeats: int, seed: int) -> dict:
    """Images/s of evaluate at each precision and of the reference loop (float32)."""
    workload = (deit_workload(images, seed) if name == "deit" else fmnist_workload(
        images, seed, "fmnist-cluttered" if name == "cluttered" else "fmnist"))
    edge_model, server_model, normalization, config, batches_of = (
        workload.edge_model, workload.server_model, workload.normalization, workload.config,
        workload.batches)  # fmt: skip
    batches = batches_of(64)
    models = {p: (with_precision(edge_model, p, CPU), with_precision(server_model, p, CPU))
              for p in PRECISIONS}  # fmt: skip

    def ours(precision: str):
        edge, server = models[precision]
        return evaluate(EdgeDevice(edge, config, normalization=normalization),
                        Server(server, normalization=normalization), batches,
                        progress=False).summary  # fmt: skip

    accuracy = {p: ours(p).collab_acc for p in PRECISIONS}
    variants = {p: (lambda p=p: ours(p)) for p in PRECISIONS}
    variants["reference"] = lambda: reference_evaluate(edge_model, server_model, batches, config,
                                                       normalization=normalization)
    timings = interleaved(variants, repeats, warmup=0)
    count = sum(len(b[1]) for b in batches)
    return {"images": count, "accuracy": accuracy,
            "images_per_second": {v: count / statistics.median(timings.seconds[v])
                                  for v in variants},
            "over_reference": {p: 1 / timings.ratio(p, "reference") for p in PRECISIONS}}


def server_throughput(requests: int, repeats: int, concurrency: int) -> dict:
    """In-process and served images/s of the shipped Fashion-MNIST server at each precision:
    the best of `repeats`, the precisions taking turns in each repetition (a server started
    anew each time), so that a burst of load from elsewhere cannot favour one of them."""
    pair, payloads, geometry, _ = payloads_of_test_images(requests)
    blobs = [encode_payload(p, geometry) for p in payloads]
    servers = {p: Server(with_precision(pair.server_model, p, CPU)) for p in PRECISIONS}
    in_process = {p: 0.0 for p in PRECISIONS}
    over_http = {p: 0.0 for p in PRECISIONS}
    for repeat in range(repeats):
        turn = PRECISIONS[repeat % len(PRECISIONS):] + PRECISIONS[:repeat % len(PRECISIONS)]
        for precision in turn:
            server = servers[precision]
            server.classify(payloads[:32])

            def classify_all(server=server) -> None:
                for start in range(0, len(payloads), 32):
                    server.classify(payloads[start : start + 32])

            in_process[precision] = max(in_process[precision],
                                        len(payloads) / _seconds(classify_all))  # fmt: skip
            over_http[precision] = max(over_http[precision], served(
                blobs, concurrency, "--precision", precision)[0])  # fmt: skip
            print(f"server {precision}: {in_process[precision]:.0f} in-process, "
                  f"{over_http[precision]:.0f} served images/s", flush=True)
    return {"in_process": in_process, "served": over_http, "requests": len(blobs)}


def edge_latency(repeats: int) -> dict:
    """Batch-1 latency (ms, median) of the torch edge at each precision and of the ONNX
    edge's float32 and int8 graphs, on the shipped Fashion-MNIST edge."""
    pair = load_pair(ModelSpec("collabvit_fmnist_edge"), ModelSpec("collabvit_fmnist_server"),
                     DataSpec(split="val", limit=256), with_server=False)  # fmt: skip
    config = pair.default_config()
    image = uint8_images(pair.dataset, 1)
    latency = {}
    for precision in PRECISIONS:
        edge = EdgeDevice(with_precision(pair.edge_model, precision, CPU), config)
        latency[f"torch {precision}"] = _median_ms(
            lambda edge=edge: edge.process(torch.from_numpy(image)), repeats)
    with tempfile.TemporaryDirectory() as folder:
        exported = export_edge(pair.edge_model, config, Path(folder), name="collabvit_fmnist_edge")
        quantize_edge(exported, uint8_images(pair.dataset, 256), "the first 256 val images")
        for graph, int8 in (("float32", False), ("int8", True)):
            edge = OnnxEdge(folder, int8=int8)
            latency[f"ONNX {graph}"] = _median_ms(lambda edge=edge: edge.process(image), repeats)
    return latency


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _median_ms(work, repeats: int) -> float:
    for _ in range(10):
        work()
    return 1000 * statistics.median(_seconds(work) for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-repeats", type=int, default=300)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), repeats=1, requests=100, latency_repeats=20,
                       matmul_size=256)  # fmt: skip
    began, load_at_start = time.perf_counter(), load_average()
    sizes = QUICK_IMAGES if args.quick else FULL_IMAGES
    evals = {}
    for name in ("fmnist", "cluttered", "deit"):
        evals[name] = eval_throughput(name, sizes[name], args.repeats, args.seed)
        print(f"eval {name}: {evals[name]['over_reference']}", flush=True)
    servers = server_throughput(args.requests, args.repeats, args.concurrency)
    latency = edge_latency(args.latency_repeats)
    print(f"edge latency: {latency}", flush=True)
    matmul = {p: matmul_gflops(args.matmul_size, args.repeats + 2, HALF.get(p, torch.float32))
              for p in PRECISIONS if p != "int8"}  # fmt: skip
    print(f"matmul GFLOP/s: {matmul}", flush=True)

    rows = []
    for name, r in evals.items():
        for p in PRECISIONS:
            accuracy = "random weights" if name == "deit" else f"{r['accuracy'][p]:.2f}"
            rows.append(f"| {name} ({r['images']} images) | {p} | "
                        f"{r['images_per_second'][p]:.1f} | **{r['over_reference'][p]:.2f}x** | "
                        f"{accuracy} |")
    server_rows = [f"| {p} | {servers['in_process'][p]:.0f} | "
                   f"{servers['in_process'][p] / servers['in_process']['float32']:.2f} | "
                   f"{servers['served'][p]:.0f} | "
                   f"{servers['served'][p] / servers['served']['float32']:.2f} |"
                   for p in PRECISIONS]  # fmt: skip
    latency_rows = [f"| {name} | {ms:.2f} |" for name, ms in latency.items()]
    matmul_rows = [f"| {p} | {rate:.0f} | {rate / matmul['float32']:.2f}x |"
                   for p, rate in matmul.items()]
    accuracy = json.loads(PRECISION_RESULTS.read_text())
    body = [
        "`evaluate` at each precision (both models in it) against the paper's loop in float32 on",
        "the same batches of 64, interleaved, median of "
        f"{args.repeats}; the DeiT sizes are bench_eval's random-weight deit_tiny/deit_base pair.",
        "Collaborative accuracy is on these images only (every test image: "
        "benchmarks/precision_results.json).", "",
        "| workload | precision | images/s | / reference loop (float32) | collaborative "
        "accuracy (%) |",
        "|---|---|---:|---:|---:|", *rows, "",
        f"The shipped Fashion-MNIST server on {servers['requests']} of the shipped edge's "
        "payloads: in-process `Server.classify` in batches of 32, and `collabvit serve "
        f"--precision P` under bench_serve's load ({args.concurrency} requests in flight); "
        f"each the best of {args.repeats}, the precisions taking turns.", "",
        "| precision | in-process images/s | / float32 | served images/s | / float32 |",
        "|---|---:|---:|---:|---:|", *server_rows, "",
        "Batch-1 latency of the shipped Fashion-MNIST edge (one image, the whole decision), "
        f"median of {args.latency_repeats}:", "",
        "| edge | ms |", "|---|---:|", *latency_rows, "",
        f"This CPU's matrix multiply ({args.matmul_size} x {args.matmul_size}, median of "
        f"{args.repeats + 2}): what the half precisions can gain at most where the matrix "
        "products take the time.", "",
        "| precision | GFLOP/s | / float32 |", "|---|---:|---:|", *matmul_rows, "",
        "What each precision changes on every test image of the shipped pairs at their default "
        "points (scripts/precision_report.py, against float32):", "",
        precision_table(accuracy)]
    text = section("bench_precision", "Precision: bfloat16 and int8 against float32", body,
                   load_at_start, time.perf_counter() - began)
    publish(args, "bench_precision", text, {"eval": evals, "server": servers,
                                            "edge_latency_ms": latency, "matmul_gflops": matmul,
                                            "accuracy": accuracy["pairs"]})


if __name__ == "__main__":
    main()
