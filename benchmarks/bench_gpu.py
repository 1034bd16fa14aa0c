"""On a GPU: the suite's eval and server figures at each precision, in a few minutes.

1. **Eval**: `evaluate` (what `collabvit eval --device cuda --precision P` runs) at each
   precision against the paper's loop in float32 on the same batches: bench_eval's ``deit``
   workload (deit_tiny edge, deit_base server, random weights, random images,
   attention_sum_threshold 0.9, every image sent) in batches of 256. Images/s (interleaved,
   synchronised), the speed-up, peak GPU memory, and whether float32's figures equal the
   reference's.
2. **Server in-process**: `Server.classify` of the deit_base server at each precision on
   ragged payloads (bench_forward's: 100..196 of 196 patches each), in batches of 256.
3. **Served**: `collabvit serve --device cuda --precision P` (the shipped Fashion-MNIST
   server) under bench_serve's load, where fastapi and uvicorn are installed.
4. **Fine-tuning steps**: images/s of `collabvit train`'s step (forward, label-smoothed loss,
   backward, AdamW) for deit_tiny and deit_base on random 224 x 224 images, batches of 128,
   bfloat16 autocast (what bench_train_ddp's scaling on paper takes as one GPU's rate).

On a machine without a GPU this keeps the figures of an earlier GPU run (its section gives
their date and device), or, where none ran, writes a section saying so and how to run it.
scripts/gpu_bench.sh runs it on a machine with a GPU and collects what it wrote.

Usage:
    python -m benchmarks.bench_gpu [--images 2048] [--batch-size 256] [--device cuda]
        [--precisions float32 bfloat16 float16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch

from benchmarks.bench_eval import DEIT_CONFIG, deit_workload
from benchmarks.bench_forward import make_payloads
from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    interleaved,
    load_average,
    markers,
    publish,
    section,
)
from benchmarks.reference_loop import reference_evaluate
from collabvit import cpu_model
from collabvit.algo.metrics import format_summary
from collabvit.models.edge import EdgeDevice
from collabvit.models.pair import resolve_device
from collabvit.models.precision import runs_natively, with_precision
from collabvit.models.server import Server
from collabvit.research.evaluate import evaluate

GPU_PRECISIONS = ("float32", "bfloat16", "float16")
COMMAND = "python -m benchmarks.bench_gpu"


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


def bench_eval(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of evaluate at each precision and of the reference loop (float32)."""
    workload = deit_workload(args.images, args.seed)
    edge_model = workload.edge_model.to(device)
    server_model = workload.server_model.to(device)
    batches = workload.batches(args.batch_size)
    runners = {}
    for precision in args.precisions:
        edge = EdgeDevice(with_precision(edge_model, precision, device), DEIT_CONFIG, device)
        server = Server(with_precision(server_model, precision, device), device,
                        max_batch=args.batch_size)  # fmt: skip
        runners[precision] = lambda edge=edge, server=server: evaluate(
            edge, server, batches, progress=False).summary

    def reference():
        return reference_evaluate(edge_model, server_model, batches, DEIT_CONFIG)

    c = DEIT_CONFIG
    figures = {name: format_summary(run(), c.masking_mode, c.masking_th, c.uncer_mode,
                                    c.uncer_th)
               for name, run in {**runners, "reference": reference}.items()}  # fmt: skip
    timings = interleaved({name: synchronised(device, run)
                           for name, run in {**runners, "reference": reference}.items()},
                          args.repeats, warmup=0)  # fmt: skip
    per_second = {name: args.images / (timings.median_ms(name) / 1000)
                  for name in [*runners, "reference"]}  # fmt: skip
    return {"images_per_second": per_second,
            "over_reference": {p: 1 / timings.ratio(p, "reference") for p in runners},
            "peak_mb": {name: peak_memory_mb(device, run)
                        for name, run in {**runners, "reference": reference}.items()},
            "float32_equals_reference": figures.get("float32") == figures["reference"]}


def bench_server(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of the deit_base server in-process at each precision (best of repeats)."""
    payloads = make_payloads(args.server_images, args.seed)
    server_model = deit_workload(1, args.seed).server_model.to(device)
    rates = {}
    for precision in args.precisions:
        server = Server(with_precision(server_model, precision, device), device,
                        max_batch=args.batch_size)  # fmt: skip

        def classify_all(server=server) -> None:
            for start in range(0, len(payloads), args.batch_size):
                server.classify(payloads[start : start + args.batch_size])

        timed = synchronised(device, classify_all)
        timed()
        best = min(_seconds(timed) for _ in range(args.repeats))
        rates[precision] = len(payloads) / best
    return rates


TRAINED = ("deit_tiny_patch16_224", "deit_base_patch16_224")


def bench_training(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of a fine-tuning step of each DeiT size (bfloat16 autocast on a GPU)."""
    from collabvit.config.train import TrainConfig
    from collabvit.research.train import StudentForward

    rates, workload = {}, deit_workload(1, args.seed)
    smoothing = TrainConfig().label_smoothing
    for name, model in zip(TRAINED, (workload.edge_model, workload.server_model), strict=True):
        model = model.to(device).train()
        forward = StudentForward(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(args.train_batch, 3, 224, 224, device=device)
        labels = torch.randint(0, model.num_classes, (args.train_batch,), device=device)
        timed = synchronised(device, lambda f=forward, o=optimizer, x=images, y=labels:
                             _train_step(f, o, x, y, smoothing))  # fmt: skip
        for _ in range(2):
            timed()
        best = min(_seconds(timed) for _ in range(args.repeats * 3))
        rates[name] = args.train_batch / best
    return rates


def _train_step(forward, optimizer, images, labels, smoothing: float) -> None:
    """One step of `collabvit train`'s: forward under bfloat16 autocast, label-smoothed loss,
    backward, AdamW."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        logits = forward(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_served(args: argparse.Namespace) -> dict | str:
    """Served images/s of the shipped Fashion-MNIST server on the GPU at each precision, or
    why it was not measured."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        return f"not measured: {' and '.join(missing)} not installed here"
    from benchmarks.bench_serve import payloads_of_test_images, served
    from collabvit.lite.protocol import encode_payload

    _, payloads, geometry, _ = payloads_of_test_images(args.requests)
    blobs = [encode_payload(p, geometry) for p in payloads]
    return {precision: served(blobs, args.concurrency, "--device", args.device, "--precision",
                              precision)[0]
            for precision in args.precisions}  # fmt: skip


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def render(results: dict, args, device: torch.device, elapsed: float, load_at_start: str):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU run)"
    e, s = results["eval"], results["server"]

    def mb(value):
        return "" if value is None else f"{value:,.0f}"

    eval_rows = [f"| {p} | {e['images_per_second'][p]:.1f} | **{e['over_reference'][p]:.2f}x** "
                 f"| {mb(e['peak_mb'][p])} |" for p in args.precisions]
    eval_rows.append(f"| reference loop (float32) | {e['images_per_second']['reference']:.1f} "
                     f"| 1.00x | {mb(e['peak_mb']['reference'])} |")
    served = results["served"]
    server_rows = [f"| {p} | {s[p]:,.0f} | {s[p] / s['float32']:.2f}x | "
                   + (f"{served[p]:,.0f} | {served[p] / served['float32']:.2f}x |"
                      if isinstance(served, dict) else "| |")
                   for p in args.precisions]  # fmt: skip
    agree = "equal" if e["float32_equals_reference"] else "**differ from**"
    body = [
        f"Device: **{name}** (torch {torch.__version__}).", "",
        f"`evaluate` at each precision against the paper's loop in float32: deit_tiny edge, "
        f"deit_base server (random weights), {args.images} random images in batches of "
        f"{args.batch_size}, attention_sum_threshold 0.9, every image sent; interleaved, "
        f"{args.repeats} repetitions, medians. float32's figures {agree} the reference's.", "",
        "| precision | images/s | / reference loop (float32) | peak GPU MB |",
        "|---|---:|---:|---:|", *eval_rows, "",
        f"The deit_base server in-process (`Server.classify`, {args.server_images} payloads of "
        f"100..196 patches, batches of {args.batch_size}, best of {args.repeats}), and "
        f"`collabvit serve --device {args.device} --precision P` (the shipped Fashion-MNIST "
        f"server, {args.requests} requests, {args.concurrency} in flight)"
        + ("" if isinstance(served, dict) else f": served {served}") + ".", "",
        "| precision | in-process images/s | / float32 | served images/s | / float32 |",
        "|---|---:|---:|---:|---:|", *server_rows, "",
        f"Fine-tuning steps (`collabvit train`'s: forward, loss, backward, AdamW), random "
        f"224 x 224 images in batches of {args.train_batch}, bfloat16 autocast, best of "
        f"{args.repeats * 3}:", "",
        "| model | images/s |", "|---|---:|",
        *[f"| {name} | {rate:,.0f} |" for name, rate in results["train_images_per_second"].items()]]
    return section("bench_gpu", "GPU: eval and server at each precision", body,
                   load_at_start, elapsed)


def render_not_run(load_at_start: str) -> str:
    """The section of a machine without a GPU: nothing measured, and how to measure it."""
    return section("bench_gpu", "GPU: eval and server at each precision", [
        f"**Not measured: no GPU was at hand** where this suite last ran ({cpu_model()}). On a "
        f"machine with a CUDA GPU, `{COMMAND}` measures `collabvit eval`'s loop against the "
        "paper's and the server in-process and served, in float32, bfloat16 and float16, in a "
        "few minutes; `scripts/gpu_bench.sh` runs it and keeps its section and figures."],
        load_at_start)  # fmt: skip


def measured_earlier(args: argparse.Namespace) -> bool:
    """The results file already holds a GPU run's section (and the figures file, where one is
    kept, its figures): a run without a GPU keeps them rather than write "not measured"."""
    text = args.output.read_text() if args.output is not None and args.output.exists() else ""
    start, end = markers("bench_gpu")
    ours = text[text.find(start):text.find(end)] if start in text else ""
    figures = json.loads(args.json.read_text()) if args.json and args.json.exists() else None
    on_gpu = "Device: **" in ours and "(CPU run)" not in ours
    return on_gpu and (args.json is None or str((figures or {}).get("device")).startswith("cuda"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--server-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", nargs="+", choices=GPU_PRECISIONS, default=None,
                        help="default: those the device runs natively")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    return apply_quick(args, images=4, server_images=4, batch_size=2, requests=8,
                       train_batch=2, concurrency=2, repeats=1, precisions=["float32", "bfloat16"],
                       device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began, load_at_start = time.perf_counter(), load_average()
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.quick:
        if measured_earlier(args):
            print(f"bench_gpu: no GPU here; {args.output} keeps the earlier GPU run's figures",
                  file=sys.stderr)  # fmt: skip
        else:
            publish(args, "bench_gpu", render_not_run(load_at_start), {"ran": False})
        return
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        sys.exit(f"bench_gpu: {error}")
    if args.precisions is None:
        args.precisions = [p for p in GPU_PRECISIONS if runs_natively(p, device)]
    if "float32" not in args.precisions:
        args.precisions.insert(0, "float32")  # the baseline every ratio is taken against
    results = {"ran": True, "device": str(device), "precisions": args.precisions,
               "eval": bench_eval(args, device)}  # fmt: skip
    print(f"eval: {results['eval']['over_reference']}", file=sys.stderr, flush=True)
    results["server"] = bench_server(args, device)
    print(f"server in-process: {results['server']}", file=sys.stderr, flush=True)
    results["served"] = bench_served(args)
    print(f"served: {results['served']}", file=sys.stderr, flush=True)
    results["train_images_per_second"] = bench_training(args, device)
    print(f"training: {results['train_images_per_second']}", file=sys.stderr, flush=True)
    text = render(results, args, device, time.perf_counter() - began, load_at_start)
    publish(args, "bench_gpu", text, results)


if __name__ == "__main__":
    main()
