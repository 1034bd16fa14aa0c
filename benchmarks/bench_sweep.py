"""What a sweep costs against the forwards it cannot avoid, measured in one run.

`collabvit sweep` promises about one edge pass over the data plus one server
pass per selection setting: the gate threshold eta only decides which images
use the server's answer, so no eta needs a forward of its own. This measures
it on the shipped Fashion-MNIST pair and the 10,000 test images:

- sweep: ``run_edge`` + the eta grid + ``sweep_points`` for the default deltas
  of ``attention_sum_threshold`` x 20 etas of ``min_entropy``, i.e.
  everything ``collabvit sweep`` computes besides writing files;
- baseline: ``run_edge`` + ``server_logits`` of every image on each of those
  selections (one edge pass plus one server pass per delta), nothing else.

The two alternate repetition by repetition (bench_forward's ``interleaved``),
and the ratio of their medians goes into this script's section of
``benchmarks/RESULTS.md``.

Usage:
    python -m benchmarks.bench_sweep [--repeats 3] [--threads N] [--limit N]
        [--output benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import Subset

from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    fmt_ratio,
    interleaved,
    load_average,
    publish,
    section,
)
from collabvit.config import SWEEP_DELTAS, SWEEP_NUM_ETAS
from collabvit.data import FashionMNIST, indexed_loader
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeConfig, EdgeDevice
from collabvit.models.server import Server
from collabvit.research.passes import (
    Grid,
    gate_grid,
    run_edge,
    selections,
    server_logits,
    sweep_points,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--limit", type=int, help="only the first N test images")
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), repeats=1, limit=200)
    torch.set_num_threads(args.threads)
    load_at_start = load_average()

    data = FashionMNIST(split="test")
    if args.limit:
        data = Subset(data, range(args.limit))
    loader = indexed_loader(data, batch_size=500)
    edge = EdgeDevice(vit.create_vit(zoo.EDGE), EdgeConfig())
    server = Server(vit.create_vit(zoo.SERVER, server=True))
    policies = tuple(("attention_sum_threshold", delta) for delta in SWEEP_DELTAS)
    points: list = []

    def sweep() -> None:
        edge_pass = run_edge(edge, loader, progress=False)
        gates = gate_grid(edge_pass.logits, ["min_entropy"], SWEEP_NUM_ETAS)
        grid = Grid(policies, gates)
        points[:] = sweep_points(edge_pass, server, grid, progress=False)

    def baseline() -> None:
        edge_pass = run_edge(edge, loader, progress=False)
        for mode, threshold in policies:
            policy = EdgeConfig(masking_mode=mode, masking_th=threshold)
            server_logits(server, edge_pass.images, selections(edge_pass, policy))

    print(f"{len(data)} images, {len(policies)} selections, {args.repeats} repetitions",
          file=sys.stderr)  # fmt: skip
    timings = interleaved({"sweep": sweep, "baseline": baseline}, args.repeats, warmup=0)
    row = fmt_ratio(timings, "sweep", "baseline")
    deltas = len(policies)
    text = section("bench_sweep", f"Sweep cost: {deltas} δ x {SWEEP_NUM_ETAS} η against one "
                   f"edge pass + {deltas} server passes", [
        f"The shipped pair ({zoo.EDGE}, {zoo.SERVER}) on {len(data)} Fashion-MNIST test images. "
        f"Sweep = `run_edge` + η grid + `sweep_points` over {len(policies)} δ of "
        f"attention_sum_threshold x {SWEEP_NUM_ETAS} η of min_entropy ({len(points)} points); "
        "baseline = `run_edge` + `server_logits` of every image on each of the "
        f"{len(policies)} selections. Variants interleaved, {args.repeats} repetitions each; "
        "the sweep's target is a ratio at or below 1.3.",
        "",
        "| comparison | sweep median (ms) | baseline median (ms) | ratio of medians | "
        "per-repetition ratio: median [min, max] | ratio of minimums |",
        "|---|---:|---:|---:|---:|---:|",
        f"| sweep / (one edge pass + {deltas} server passes) | " + " | ".join(row) + " |",
    ], load_at_start)  # fmt: skip
    publish(args, "bench_sweep", text, {"sweep_over_baseline": timings.ratio("sweep", "baseline")})


if __name__ == "__main__":
    main()
