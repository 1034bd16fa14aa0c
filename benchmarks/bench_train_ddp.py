"""Training past one process: 2 processes x 1 thread (torchrun, gloo) against 1 process x 2
threads on this machine's 2 cores, and, on paper, the scaling to N GPUs.

1. **Measured**: `collabvit train` on the shipped pair's architectures (the edge from scratch,
   the server with token drop 0.5), on the first `--images` Fashion-MNIST training images,
   one epoch at a global batch of 128, run as one process with 2 threads and under
   `torchrun --nproc-per-node 2` with 1 thread each, interleaved `--repeats` times. Images/s
   of the training steps alone (the log's `train_seconds`: no start-up, no validation).
2. **On paper**: what data-parallel training on N GPUs gains for DeiT-Tiny and DeiT-Base: a
   step's gradient all-reduce moves 2 (N - 1) / N x the gradient bytes through each GPU's
   link (ring all-reduce); with the all-reduce not overlapped with the backward pass (the
   worst case; DDP overlaps it in buckets), the efficiency is t / (t + all-reduce time),
   where t is one GPU's step time. The step time per image is measured by
   `benchmarks/bench_gpu.py` where a GPU ran (its figures file), else the assumption stated.

Usage:
    python -m benchmarks.bench_train_ddp [--images 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm

from benchmarks.harness import (
    REPO,
    add_suite_arguments,
    apply_quick,
    load_average,
    publish,
    section,
)

MODELS = (("collabvit_fmnist_edge", []), ("collabvit_fmnist_server", ["--token-drop", "0.5"]))
BATCH = 128
GPU_FIGURES = Path(__file__).resolve().parent / "figures" / "bench_gpu.json"
# the links a data-parallel run's gradients cross, GB/s of all-reduce bandwidth per GPU
# (assumptions, of the order their makers publish)
LINKS = {"NVLink (H100, 8 GPUs in one node)": 300.0, "PCIe 4.0 x16": 20.0,
         "25 Gb/s Ethernet between nodes": 2.5}  # fmt: skip
# images/s one GPU trains at when no bench_gpu run measured it (an assumption: about what an
# A100 reaches in bfloat16 at batch 128 on 224 x 224 images)
ASSUMED_GPU_IMAGES_PER_SECOND = {"deit_tiny_patch16_224": 3000.0, "deit_base_patch16_224": 800.0}


def train_once(model: str, extra: list[str], processes: int, images: int, out: Path) -> float:
    """Images/s of one epoch of training steps (the log's train_seconds)."""
    threads = 2 // processes
    args = ["train", "--model", model, *extra, "--train-limit", str(images), "--epochs", "1",
            "--batch-size", str(BATCH), "--quiet", "--out-dir", str(out)]  # fmt: skip
    if processes == 1:
        command = [sys.executable, "-m", "collabvit", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(processes), "-m", "collabvit", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"bench_train_ddp: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return images / record["train_seconds"]


def measured(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for model, extra in MODELS:
            rates: dict[int, list[float]] = {1: [], 2: []}
            for repeat in range(args.repeats):
                for processes in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                    out = Path(folder) / f"{model}-{processes}-{repeat}"
                    rates[processes].append(train_once(model, extra, processes, args.images,
                                                       out))  # fmt: skip
                    print(f"{model}, {processes} processes: {rates[processes][-1]:.0f} images/s",
                          file=sys.stderr, flush=True)  # fmt: skip
            one, two = statistics.median(rates[1]), statistics.median(rates[2])
            results[model] = {"one_process": one, "two_processes": two, "ratio": two / one,
                              "runs": {str(k): v for k, v in rates.items()}}  # fmt: skip
    return results


def on_paper(gpus: tuple[int, ...]) -> dict:
    """Data-parallel efficiency on N GPUs for DeiT-Tiny and DeiT-Base, per link."""
    measured_rates = {}
    if GPU_FIGURES.exists():
        figures = json.loads(GPU_FIGURES.read_text())
        measured_rates = figures.get("train_images_per_second", {}) if figures.get("ran") else {}
    rows = {}
    for name in ASSUMED_GPU_IMAGES_PER_SECOND:
        parameters = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        rate = measured_rates.get(name, ASSUMED_GPU_IMAGES_PER_SECOND[name])
        step = BATCH / rate  # seconds per step of BATCH images on one GPU
        gradient_gb = parameters * 4 / 1e9  # float32 gradients, as DDP reduces them
        rows[name] = {"parameters": parameters, "gradient_gb": gradient_gb,
                      "images_per_second": rate, "rate_measured": name in measured_rates,
                      "efficiency": {link: {n: step / (step + 2 * (n - 1) / n * gradient_gb / bw)
                                            for n in gpus}
                                     for link, bw in LINKS.items()}}  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), images=256, repeats=1)
    began, load_at_start = time.perf_counter(), load_average()
    results = measured(args)
    gpus = (2, 8, 64)
    paper = on_paper(gpus)
    rows = [f"| {model} | {r['one_process']:.0f} | {r['two_processes']:.0f} | "
            f"**{r['ratio']:.2f}x** |" for model, r in results.items()]
    paper_rows = []
    for name, r in paper.items():
        source = "measured by bench_gpu" if r["rate_measured"] else "assumed"
        for link, by_gpus in r["efficiency"].items():
            paper_rows.append(f"| {name} ({r['parameters'] / 1e6:.1f} M, "
                              f"{r['gradient_gb'] * 1000:.0f} MB of gradients; "
                              f"{r['images_per_second']:,.0f} images/s per GPU, "
                              f"{source}) | {link} | "
                              + " | ".join(f"{100 * by_gpus[n]:.0f} %" for n in gpus) + " |")
    body = [
        f"`collabvit train` for one epoch on the first {args.images} Fashion-MNIST training "
        f"images, global batch {BATCH}: one process with 2 threads against `torchrun "
        "--nproc-per-node 2` with 1 thread each (gloo), on this machine's 2 cores; images/s of "
        f"the training steps (the log's `train_seconds`), median of {args.repeats}, the two "
        "interleaved.", "",
        "| model | 1 process x 2 threads (images/s) | 2 processes x 1 thread (images/s) | "
        "2 x 1 / 1 x 2 |", "|---|---:|---:|---:|", *rows, "",
        "On paper, data-parallel training on N GPUs: each step all-reduces the float32 "
        "gradients (2 (N - 1) / N of their bytes through each GPU's link, ring all-reduce), "
        "counted as not overlapped with the backward pass (DDP overlaps it in buckets, so "
        "this is the worst case); efficiency = step time / (step time + all-reduce time), at "
        f"a batch of {BATCH} per GPU. Link bandwidths are assumptions of the order their "
        "makers publish; the per-GPU training rate is bench_gpu's where it ran, else the "
        "assumption shown.", "",
        "| model | link | " + " | ".join(f"{n} GPUs" for n in gpus) + " |",
        "|---|---|" + "---:|" * len(gpus), *paper_rows]
    text = section("bench_train_ddp", "Training on several processes", body, load_at_start,
                   time.perf_counter() - began)
    publish(args, "bench_train_ddp", text, {"measured": results, "on_paper": paper})


if __name__ == "__main__":
    main()
