"""Whole collaborative evaluation: `collabvit eval`'s loop against the paper's loop structure.

Two workloads, each on identical data, weights and operating point for both loops:

- ``deit``: ``deit_tiny_patch16_224`` edge and ``deit_base_patch16_224`` server, randomly
  initialised (seeded), on seeded random uint8 images; attention_sum_threshold, every
  image sent (random weights leave every image uncertain);
- ``fmnist``: the shipped Fashion-MNIST pair on the test split at its default point.

Per workload:

1. **Throughput**: ``collabvit.research.evaluate.evaluate`` (what ``collabvit eval`` runs) and
   ``benchmarks.reference_loop.reference_evaluate`` interleaved repetition by repetition in
   this process; their summary figures are asserted equal first.
2. **Peak memory**: each loop alone in a fresh process per batch size (a process's peak
   resident memory only grows): peak RSS of the whole process, and the peak above the RSS
   once models and data are loaded (the working memory of the loop itself).
3. **Time in model forwards**: the share of ``evaluate``'s wall time spent inside the edge
   forward (``vit.forward_with_scores``) and the server forward (``vit.forward_selected``);
   the rest is data, gate, selection, payloads and bookkeeping.

Usage:
    python -m benchmarks.bench_eval [--workloads deit fmnist] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import timm
import torch

from benchmarks.harness import (
    Timings,
    add_suite_arguments,
    apply_quick,
    current_rss_mb,
    interleaved,
    load_average,
    peak_rss_mb,
    publish,
    reset_peak_rss,
    section,
)
from benchmarks.reference_loop import reference_evaluate
from collabvit.algo.metrics import Summary, format_summary
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.specs import SHIPPED_PAIRS, EdgeConfig
from collabvit.models import vit
from collabvit.models.edge import EdgeDevice
from collabvit.models.pair import load_pair
from collabvit.models.server import Server
from collabvit.research.evaluate import evaluate

DEIT_EDGE, DEIT_SERVER = "deit_tiny_patch16_224", "deit_base_patch16_224"
DEIT_CONFIG = EdgeConfig(attention_mode="mean", masking_mode="attention_sum_threshold",
                         masking_th=0.9, uncer_mode="min_entropy", uncer_th=0.5)  # fmt: skip
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# the batch limit of the Server that `evaluate` is given here (its default)
SERVER_MAX_BATCH = inspect.signature(Server).parameters["max_batch"].default


@dataclass
class Workload:
    """Both models, the operating point and the images (as batches of a chosen size)."""

    name: str
    description: str
    edge_model: torch.nn.Module
    server_model: torch.nn.Module
    config: EdgeConfig
    normalization: vit.Normalization | None
    batches: Callable[[int], list[Batch]]  # batch size -> (images, targets, indices) batches
    images: int

    def ours(self, batches: list[Batch]) -> Summary:
        edge = EdgeDevice(self.edge_model, self.config, normalization=self.normalization)
        server = Server(self.server_model, normalization=self.normalization)
        return evaluate(edge, server, batches, progress=False).summary

    def reference(self, batches: list[Batch]) -> Summary:
        return reference_evaluate(self.edge_model, self.server_model, batches, self.config,
                                  normalization=self.normalization)  # fmt: skip

    def plain(self, batches: list[Batch]) -> None:
        """The forwards no loop at this batch size avoids: plain `model(x)` of the edge on
        each batch and of the server on up to its batch limit of the batch's whole images."""
        normalize = self.normalization or vit.Normalization.of_model(self.edge_model)
        with torch.inference_mode():
            for images, _, _ in batches:
                x = normalize(images)
                self.edge_model(x)
                self.server_model(x[:SERVER_MAX_BATCH])

    def loop(self, variant: str) -> Callable[[list[Batch]], Summary | None]:
        return {"collabvit": self.ours, "reference": self.reference, "plain": self.plain}[variant]

    def figures(self, summary: Summary | None) -> str | None:
        if summary is None:
            return None
        c = self.config
        return format_summary(summary, c.masking_mode, c.masking_th, c.uncer_mode, c.uncer_th)


def split(images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> list[Batch]:
    """images [M, C, H, W], targets [M] -> batches with dataset indices."""
    indices = torch.arange(len(images))
    return [(images[s : s + batch_size], targets[s : s + batch_size],
             indices[s : s + batch_size]) for s in range(0, len(images), batch_size)]  # fmt: skip


def deit_workload(images: int, seed: int) -> Workload:
    torch.manual_seed(seed)
    edge = timm.create_model(DEIT_EDGE, pretrained=False).eval()
    server = timm.create_model(DEIT_SERVER, pretrained=False).eval()
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (images, 3, 224, 224), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 1000, (images,), generator=gen)
    return Workload(
        "deit", f"{DEIT_EDGE} edge, {DEIT_SERVER} server (random weights, seed {seed}); "
        f"{images} random uint8 images; attention_sum_threshold 0.9, min_entropy 0.5 (every "
        "image sent)", edge, server, DEIT_CONFIG, None,
        lambda batch_size: split(pixels, targets, batch_size), images)  # fmt: skip


IMAGES_OF = {"fmnist": "Fashion-MNIST", "fmnist-cluttered": "cluttered Fashion-MNIST"}


def fmnist_workload(images: int, seed: int, data_set: str = "fmnist") -> Workload:
    """The shipped pair of `data_set` (fmnist or fmnist-cluttered) on its first test images,
    decoded once, at its default point."""
    edge_name, server_name = SHIPPED_PAIRS[data_set]
    pair = load_pair(ModelSpec(edge_name), ModelSpec(server_name),
                     DataSpec(data_set=data_set, limit=images))  # fmt: skip
    config = pair.default_config()
    loaded = [pair.dataset[i] for i in range(len(pair.dataset))]
    pixels = torch.stack([image for image, _ in loaded])
    targets = torch.tensor([label for _, label in loaded])
    return Workload(
        "fmnist" if data_set == "fmnist" else "cluttered", f"the shipped pair ({edge_name}, "
        f"{server_name}), the first {len(loaded)} {IMAGES_OF[data_set]} test images (decoded "
        f"once, in memory); default point {config.masking_mode} {config.masking_th:g}, "
        f"{config.uncer_mode} {config.uncer_th:g}", pair.edge_model, pair.server_model, config,
        pair.normalization, lambda batch_size: split(pixels, targets, batch_size),
        len(loaded))  # fmt: skip


WORKLOADS = {"deit": deit_workload, "fmnist": fmnist_workload}


@contextmanager
def time_inside(functions: list[str]) -> Iterator[list[float]]:
    """Accumulate the wall time spent inside the named functions of collabvit.models.vit.

    The library calls them through the module (``vit.forward_with_scores``), so wrapping the
    module attribute for the duration sees every call; the originals are put back after.
    """
    spent = [0.0]
    originals = {name: getattr(vit, name) for name in functions}

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for name, function in originals.items():
        setattr(vit, name, timed(function))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(vit, name, function)


def forward_fraction(workload: Workload, batches: list[Batch]) -> float:
    with time_inside(["forward_with_scores", "forward_selected"]) as spent:
        start = time.perf_counter()
        workload.ours(batches)
        wall = time.perf_counter() - start
    return spent[0] / wall


def memory_worker(args: argparse.Namespace) -> None:
    """One loop alone over one workload at one batch size; prints its figures as JSON."""
    workload = WORKLOADS[args.workloads[0]](args.images, args.seed)
    batches = workload.batches(args.batch_sizes[0])
    loaded = current_rss_mb()
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    summary = workload.loop(args.worker)(batches)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "images": workload.images, "loaded_mb": loaded,
                      "peak_mb": peak_rss_mb(), "peak_reset": peak_reset,
                      "figures": workload.figures(summary)}))  # fmt: skip


def measure_memory(name: str, variant: str, batch_size: int, images: int, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_eval", "--worker", variant,
               "--workloads", name, "--batch-sizes", str(batch_size), "--images", str(images),
               "--seed", str(args.seed), "--threads", str(torch.get_num_threads())]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name} {variant} batch {batch_size}: {result['images'] / result['seconds']:.2f} "
          f"img/s, peak {result['peak_mb']:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    return result


def bench_workload(name: str, args: argparse.Namespace) -> dict:
    images = args.images or (QUICK_IMAGES if args.quick else FULL_IMAGES)[name]
    print(f"{name}: loading {images} images", file=sys.stderr, flush=True)
    workload = WORKLOADS[name](images, args.seed)
    batches = workload.batches(args.batch_sizes[0])
    ours, theirs = workload.figures(workload.ours(batches)), workload.figures(
        workload.reference(batches))
    if ours != theirs:
        raise AssertionError(f"the two loops disagree:\n{ours}\n---\n{theirs}")
    timings = interleaved({"collabvit": lambda: workload.ours(batches),
                           "reference": lambda: workload.reference(batches)},
                          args.repeats, warmup=0)  # fmt: skip
    fraction = forward_fraction(workload, batches)
    memory_images = args.memory_images or max(args.batch_sizes)  # one batch at the largest
    memory = {str(b): {variant: measure_memory(name, variant, b, memory_images, args)
                       for variant in MEMORY_VARIANTS}
              for b in args.batch_sizes}  # fmt: skip
    for runs in memory.values():
        if runs["collabvit"]["figures"] != runs["reference"]["figures"]:
            raise AssertionError("the two loops disagree in the memory runs")
    return {"description": workload.description, "images": workload.images,
            "figures": ours, "timings": timings.seconds,
            "speedup": 1 / timings.ratio("collabvit", "reference"),
            "forward_fraction": fraction, "memory_images": memory_images,
            "memory": memory}  # fmt: skip


MEMORY_VARIANTS = ("collabvit", "reference", "plain")
FULL_IMAGES = {"deit": 64, "fmnist": 10_000}
QUICK_IMAGES = {"deit": 4, "fmnist": 256}
TARGETS = {"deit": (1.2, 0.90), "fmnist": (2.5, 0.75)}  # (speed-up, share in forwards)


def render(results: dict, args: argparse.Namespace, elapsed: float, load_at_start: str) -> str:
    rows = ["| workload | images | batch | collabvit (img/s) | reference (img/s) | speed-up "
            "| target | time in model forwards | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    memory_rows = ["| workload | batch | collabvit peak RSS (MB) | reference peak RSS (MB) "
                   "| ratio | collabvit above loaded (MB) | reference above loaded (MB) | ratio "
                   "| plain forwards above loaded (MB) | collabvit (img/s) | reference (img/s) |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    notes = []
    for name, r in results.items():
        timings = Timings(r["timings"])
        speed_target, share_target = TARGETS[name]
        ours_rate = r["images"] / (timings.median_ms("collabvit") / 1000)
        ref_rate = r["images"] / (timings.median_ms("reference") / 1000)
        rows.append(f"| {name} | {r['images']} | {args.batch_sizes[0]} | {ours_rate:.2f} | "
                    f"{ref_rate:.2f} | **{r['speedup']:.2f}x** | >= {speed_target}x "
                    f"{'met' if r['speedup'] >= speed_target else 'NOT met'} | "
                    f"**{100 * r['forward_fraction']:.1f} %** | >= {100 * share_target:.0f} % "
                    f"{'met' if r['forward_fraction'] >= share_target else 'NOT met'} |")
        for batch, runs in r["memory"].items():
            ours, ref, plain = runs["collabvit"], runs["reference"], runs["plain"]
            above = [max(run["peak_mb"] - run["loaded_mb"], 0.0) for run in (ours, ref, plain)]
            memory_rows.append(
                f"| {name} | {batch} | {ours['peak_mb']:.0f} | {ref['peak_mb']:.0f} | "
                f"**{ours['peak_mb'] / ref['peak_mb']:.2f}** | {above[0]:.0f} | {above[1]:.0f} | "
                f"**{above[0] / max(above[1], 1e-9):.2f}** | {above[2]:.0f} | "
                f"{ours['images'] / ours['seconds']:.2f} | {ref['images'] / ref['seconds']:.2f} |")
        if not all(run["peak_reset"] for runs in r["memory"].values() for run in runs.values()):
            notes.append("- This kernel did not let the peak-memory record be reset: the peaks "
                         "above include loading the models.")
        notes.append(f"- `{name}`: {r['description']}. Memory runs: the first "
                     f"{r['memory_images']} images. Both loops give these figures: "
                     + "; ".join(r["figures"].splitlines()[:3]) + ".")  # fmt: skip
    return section("bench_eval", "Whole evaluation against the reference loop", [
        "`collabvit eval`'s loop (`collabvit.research.evaluate.evaluate`: fused attention with "
        "only the last block's class-token row, embedding only the kept patches, every sent "
        "image of a batch in size-planned ragged forwards) against a re-creation of the paper's "
        "loop structure (`benchmarks/reference_loop.py`: every block's full attention map kept, "
        "the server embedding whole images and gathering the kept tokens, one server call per "
        "image under the threshold policies). Same models, images and operating point; the summary "
        "figures of the two are asserted equal before timing. Speed-up = reference median time "
        f"/ collabvit median time, the two interleaved ({args.repeats} repetitions each, after "
        "the check run). Time in model forwards: the share of `evaluate`'s wall time inside "
        "`vit.forward_with_scores` (edge) and `vit.forward_selected` (server).",
        "",
        *notes,
        "",
        *rows,
        "",
        "Peak memory, each loop alone in a fresh process per batch size: the peak resident "
        "memory of the whole process (Python, torch, both models and the images included), "
        "and the peak above the resident memory once those are loaded (what the loop itself "
        "needs). Plain forwards: the edge's `model(x)` on each batch and the server's on "
        f"{SERVER_MAX_BATCH} of its whole images (the server's batch limit in `evaluate`), "
        "nothing else: the working memory no loop at that batch size can go below.",
        "",
        *memory_rows,
    ], load_at_start, elapsed)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS),
                        default=["deit", "fmnist"])  # fmt: skip
    parser.add_argument("--images", type=int, default=None,
                        help="images per workload (default: deit 64, fmnist 10000)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256],
                        help="the first for throughput, all for peak memory")
    parser.add_argument("--memory-images", type=int, default=None,
                        help="images of each memory run (default: the largest batch size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    parser.add_argument("--worker", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.batch_sizes == [64, 256]:
        args.batch_sizes = [2, 4]
    return apply_quick(args, repeats=1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        memory_worker(args)
        return
    began, load_at_start = time.perf_counter(), load_average()
    results = {name: bench_workload(name, args) for name in args.workloads}
    text = render(results, args, time.perf_counter() - began, load_at_start)
    publish(args, "bench_eval", text,
            {name: {k: r[k] for k in ("speedup", "forward_fraction", "memory")}
             for name, r in results.items()})  # fmt: skip


if __name__ == "__main__":
    main()
