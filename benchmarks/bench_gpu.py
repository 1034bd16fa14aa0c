"""On a GPU: `collabvit eval`'s loop against the reference loop at deit shapes, fp32 and bf16.

The ``deit`` workload of bench_eval (deit_tiny edge, deit_base server, random weights,
random images, attention_sum_threshold 0.9, every image sent) at batch 256, the models in
float32 and in bfloat16. The reference structure calls the server once per image under the
threshold policies; that is where batching ragged selections matters most on a GPU.
Reported: images/s of each loop (interleaved, synchronised), the speed-up, peak GPU memory
(``torch.cuda.max_memory_allocated``) and whether the two loops' figures agree (in bfloat16
fused and unfused attention round differently, so a selection may differ).

Usage (one command runs it all on a machine with a GPU):
    python -m benchmarks.bench_gpu [--images 2048] [--batch-size 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.bench_eval import DEIT_CONFIG, deit_workload
from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    interleaved,
    load_average,
    publish,
    section,
)
from benchmarks.reference_loop import reference_evaluate
from collabvit.algo.metrics import format_summary
from collabvit.models.edge import EdgeDevice
from collabvit.models.pair import resolve_device
from collabvit.models.server import Server
from collabvit.research.evaluate import evaluate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def synchronised(device: torch.device, run):
    def timed():
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return timed


def peak_memory_mb(device: torch.device, run) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_dtype(dtype: str, args: argparse.Namespace, device: torch.device) -> dict:
    workload = deit_workload(args.images, args.seed)
    edge_model = workload.edge_model.to(device, DTYPES[dtype])
    server_model = workload.server_model.to(device, DTYPES[dtype])
    batches = workload.batches(args.batch_size)
    edge, server = EdgeDevice(edge_model, DEIT_CONFIG, device), Server(server_model, device)
    server.max_batch = args.batch_size

    def ours():
        return evaluate(edge, server, batches, progress=False).summary

    def reference():
        return reference_evaluate(edge_model, server_model, batches, DEIT_CONFIG)

    c = DEIT_CONFIG
    figures = [format_summary(run(), c.masking_mode, c.masking_th, c.uncer_mode, c.uncer_th)
               for run in (ours, reference)]  # fmt: skip
    timings = interleaved({"collabvit": synchronised(device, ours),
                           "reference": synchronised(device, reference)},
                          args.repeats, warmup=0)  # fmt: skip
    return {
        "collabvit": args.images / (timings.median_ms("collabvit") / 1000),
        "reference": args.images / (timings.median_ms("reference") / 1000),
        "speedup": 1 / timings.ratio("collabvit", "reference"),
        "collabvit_mb": peak_memory_mb(device, ours),
        "reference_mb": peak_memory_mb(device, reference),
        "figures_agree": figures[0] == figures[1],
    }


def render(results: dict, args, device: torch.device, elapsed: float, load_at_start: str):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU run)"

    def mb(value):
        return "" if value is None else f"{value:.0f}"

    rows = ["| dtype | collabvit (img/s) | reference (img/s) | speed-up | collabvit peak GPU MB "
            "| reference peak GPU MB | figures agree |", "|---|---:|---:|---:|---:|---:|---|"]
    for dtype, r in results.items():
        rows.append(f"| {dtype} | {r['collabvit']:.1f} | {r['reference']:.1f} | "
                    f"**{r['speedup']:.2f}x** | {mb(r['collabvit_mb'])} | "
                    f"{mb(r['reference_mb'])} | {'yes' if r['figures_agree'] else 'no'} |")
    return section("bench_gpu", "GPU: whole evaluation against the reference loop", [
        f"Device: **{name}**. deit_tiny edge, deit_base server (random weights), {args.images} "
        f"random images in batches of {args.batch_size}, attention_sum_threshold 0.9, every "
        f"image sent; interleaved, {args.repeats} repetitions, medians.",
        "",
        *rows,
    ], load_at_start, elapsed)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    return apply_quick(args, images=4, batch_size=2, repeats=1, dtypes=["float32"],
                       device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        sys.exit(f"bench_gpu: {error}")
    began, load_at_start = time.perf_counter(), load_average()
    results = {dtype: bench_dtype(dtype, args, device) for dtype in args.dtypes}
    text = render(results, args, device, time.perf_counter() - began, load_at_start)
    publish(args, "bench_gpu", text, results)


if __name__ == "__main__":
    main()
