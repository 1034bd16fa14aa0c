"""The edge on a device: install size, cold start and speed of torch against ONNX Runtime.

    python -m benchmarks.bench_onnx_edge [--repeats 7] [--images 200] [--no-install]

Exports the shipped Fashion-MNIST edge (fp32, and int8 calibrated as `collabvit export
--int8` does), then measures:
- install size: `du` of a fresh venv with `pip install '.[edge]'` (the light edge: no
  torch) against one with a CPU-only torch (torch==2.13.0, the CPU build on this machine's
  disk; torchvision and timm not even counted);
- cold start: a new Python process from start to its first answer on one image, for the
  light edge (in the light venv) and the torch edge (median of --repeats);
- batch-1 latency on 1 thread (one image at a time, as a camera sends them) and throughput
  at batch 64 on 2 threads, for torch fp32, ONNX Runtime fp32 and ONNX Runtime int8, all
  interleaved (the whole decision: scores, gate, selection and payloads).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    interleaved,
    load_average,
    publish,
    section,
)
from collabvit.data import FashionMNIST
from collabvit.lite.onnx_edge import OnnxEdge
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeDevice
from collabvit.models.export import export_edge, quantize_edge

REPO = Path(__file__).resolve().parents[1]
EDGE, SERVER = "collabvit_fmnist_edge", "collabvit_fmnist_server"
CPU_TORCH = "torch==2.13.0"  # the CPU build this workplace keeps on disk

LIGHT_FIRST_ANSWER = """
import sys, numpy as np
from collabvit.lite.onnx_edge import OnnxEdge
OnnxEdge(sys.argv[1], threads=1).process(np.zeros((1, 1, 28, 28), np.uint8))
"""
TORCH_FIRST_ANSWER = f"""
import torch
torch.set_num_threads(1)
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeDevice
model = vit.create_model("{EDGE}")
EdgeDevice(model, zoo.default_operating_point("{EDGE}", "{SERVER}")).process(
    torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
"""


def venv_mb(folder: Path) -> float:
    """`du -sm` of a folder."""
    return float(subprocess.run(["du", "-sm", str(folder)], capture_output=True, text=True,
                                check=True).stdout.split()[0])  # fmt: skip


def largest_packages(venv: Path, count: int = 5) -> dict[str, float]:
    """The `count` largest folders of a venv's site-packages, in MB (`du -sm`)."""
    packages = next(venv.glob("lib/python*/site-packages"))
    sizes = {folder.name: venv_mb(folder) for folder in packages.iterdir() if folder.is_dir()}
    return dict(sorted(sizes.items(), key=lambda item: -item[1])[:count])


def build_venv(folder: Path, *requirements: str) -> Path:
    """A fresh venv at `folder` with `requirements` installed; its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return python


def cold_start_seconds(python: Path, code: str, argument: str, repeats: int) -> float:
    """Median wall time of a new process running `code` to its first answer."""
    times = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([str(python), "-c", code, argument], check=True, env=env,
                       cwd=tempfile.gettempdir())  # fmt: skip
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=200, help="images timed one at a time")
    parser.add_argument("--batches", type=int, default=8, help="batches of 64 timed")
    parser.add_argument("--no-install", action="store_true",
                        help="skip building the two venvs (sizes and the light cold start)")
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), repeats=1, images=5, batches=1,
                       no_install=True)  # fmt: skip
    began, load_at_start = time.perf_counter(), load_average()
    work = Path(tempfile.mkdtemp(prefix="bench_onnx_edge-"))
    try:
        model = vit.create_model(EDGE)
        config = zoo.default_operating_point(EDGE, SERVER)
        exported = export_edge(model, config, work / "export", name=EDGE, server_model=SERVER)
        quantize_edge(exported, FashionMNIST(split="val").images[:1000].numpy(), "val, 1000")
        images = FashionMNIST(split="test").images[: max(args.images, 64)]
        pixels = images.numpy()
        device = EdgeDevice(model, config)
        runtimes = {(name, threads): OnnxEdge(work / "export", threads=threads, int8=int8)
                    for name, int8 in (("onnx fp32", False), ("onnx int8", True))
                    for threads in (1, 2)}  # fmt: skip

        def one_at_a_time(name: str):
            def run() -> None:
                if name == "torch fp32":
                    torch.set_num_threads(1)
                    for i in range(args.images):
                        device.process(images[i : i + 1])
                else:
                    edge = runtimes[(name, 1)]
                    for i in range(args.images):
                        edge.process(pixels[i : i + 1])
            return run

        def batches_of_64(name: str):
            def run() -> None:
                if name == "torch fp32":
                    torch.set_num_threads(2)
                    for _ in range(args.batches):
                        device.process(images[:64])
                else:
                    edge = runtimes[(name, 2)]
                    for _ in range(args.batches):
                        edge.process(pixels[:64])
            return run

        names = ("torch fp32", "onnx fp32", "onnx int8")
        latency = interleaved({n: one_at_a_time(n) for n in names}, args.repeats, 1)
        throughput = interleaved({n: batches_of_64(n) for n in names}, args.repeats, 1)
        latency_ms = {n: latency.median_ms(n) / args.images for n in names}
        images_per_s = {n: 64 * args.batches / (throughput.median_ms(n) / 1000) for n in names}

        sizes, cold, parts = {}, {}, {}
        torch_python = Path(sys.executable)
        cold["torch edge"] = cold_start_seconds(torch_python, TORCH_FIRST_ANSWER, "",
                                                args.repeats)  # fmt: skip
        if not args.no_install:
            light = build_venv(work / "light", f"{REPO}[edge]")
            sizes["light edge (collabvit[edge])"] = venv_mb(work / "light")
            parts = largest_packages(work / "light")
            check = subprocess.run([str(light), "-c", "import torch"], capture_output=True)
            if check.returncode == 0:
                raise SystemExit("the light venv has torch: collabvit[edge] pulled it in")
            build_venv(work / "cpu-torch", CPU_TORCH, "numpy")
            sizes[f"CPU-only torch alone ({CPU_TORCH}, numpy)"] = venv_mb(work / "cpu-torch")
            cold["light edge"] = cold_start_seconds(light, LIGHT_FIRST_ANSWER,
                                                    str(work / "export"), args.repeats)
        else:
            cold["light edge (this venv)"] = cold_start_seconds(
                torch_python, LIGHT_FIRST_ANSWER, str(work / "export"), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    torch_ms = latency_ms["torch fp32"]
    rows = [f"| {n} | {latency_ms[n]:.3f} | {latency_ms[n] / torch_ms:.2f} | "
            f"{images_per_s[n]:,.0f} | {images_per_s[n] / images_per_s['torch fp32']:.2f} |"
            for n in names]  # fmt: skip
    size_rows = [f"| {name} | {mb:.0f} MB |" for name, mb in sizes.items()]
    if parts:
        size_rows.insert(1, "| of which (largest folders) " + ", ".join(
            f"{name} {mb:.0f}" for name, mb in parts.items()) + " | |")
    cold_rows = [f"| {name} | {seconds:.2f} s |" for name, seconds in cold.items()]
    body = f"""The shipped Fashion-MNIST edge deciding (scores, gate, selection, payloads) with
torch and with ONNX Runtime. Batch 1: {args.images} test images one at a time on 1 thread;
batch 64: {args.batches} batches on 2 threads; medians of {args.repeats} interleaved
repetitions after warm-up.

| edge | batch-1 ms per image, 1 thread | / torch | images/s at batch 64, 2 threads | / torch |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

| environment (fresh venv, `du -sm`) | size |
|---|---:|
{chr(10).join(size_rows) or "| (not built: --no-install) | |"}

| process start to its first answer (median of {args.repeats}) | time |
|---|---:|
{chr(10).join(cold_rows)}"""
    text = section("bench_onnx_edge", "The edge on a device: torch against ONNX Runtime",
                   body.splitlines(), load_at_start, time.perf_counter() - began)
    publish(args, "bench_onnx_edge", text, {
        "latency_ms": latency_ms, "images_per_s": images_per_s, "sizes_mb": sizes,
        "cold_start_s": cold, "light_packages_mb": parts,
    })


if __name__ == "__main__":
    main()
