"""Forward-speed ratios of collabvit's edge and server paths, measured in one run.

Two comparisons, each as a ratio of median wall-clock times measured in the
same process, with the compared variants interleaved repetition by
repetition (these machines are noisy; absolute times are only context):

1. Edge: ``collabvit.models.vit.forward_with_scores(model, x, "mean")`` over plain
   ``model(x)`` for a randomly initialised ``deit_tiny_patch16_224`` at a batch
   of random 3x224x224 inputs, under ``torch.inference_mode()``. ``rollout``
   over plain is reported too (informational).
2. Server: ``Server.classify(payloads)`` on all payloads at once (one ragged,
   padded and masked batch) over a loop of single-payload ``classify([p])``
   calls, for a randomly initialised ``deit_base_patch16_224``. Each payload
   holds k uint8 patches at k distinct random positions of the 14x14 grid,
   k uniform in 100..196 (seeded). Before timing, the two are checked to give
   the same logits (atol 1e-4). Informational: the same payloads through a
   ``Server`` with a smaller ``max_batch`` (``--bucket-batch``, default 8),
   i.e. sorted size buckets with less padding, over the loop.

Besides the ratio of medians, the table gives the per-repetition (paired)
ratios and the ratio of the fastest repetitions (robust to bursts of load
from other processes, not to one unusually fast repetition).

The script prints a markdown table and writes it, with the machine it ran on,
into its own section of ``benchmarks/RESULTS.md`` (other sections of that file
are kept).

Usage:
    python -m benchmarks.bench_forward [--repeats 7] [--server-repeats 5]
        [--batch-size 32] [--threads N] [--bucket-batch 8] [--warmup 1] [--seed 0]
        [--output benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import timm
import torch

from benchmarks.harness import (
    Timings,
    add_suite_arguments,
    apply_quick,
    fmt_ratio,
    interleaved,
    load_average,
    publish,
    section,
)
from collabvit.lite.protocol import PatchPayload, patchify
from collabvit.models.server import Server, plan_batches
from collabvit.models.vit import forward_with_scores

EDGE_MODEL = "deit_tiny_patch16_224"
SERVER_MODEL = "deit_base_patch16_224"
MIN_PATCHES, MAX_PATCHES = 100, 196  # selection sizes, both inclusive
ATOL = 1e-4



def bench_edge(batch_size: int, repeats: int, warmup: int, seed: int) -> tuple[Timings, Timings]:
    """Edge forward with scores versus plain model(x): (mean vs plain, rollout vs plain).

    Each mode is interleaved with plain in its own pair: with all three in one
    rotation, the forward right after ``rollout`` (which allocates every block's
    T x T maps) was measurably perturbed, biasing mean/plain.
    """
    torch.manual_seed(seed)
    model = timm.create_model(EDGE_MODEL, pretrained=False).eval()
    x = torch.randn(batch_size, 3, 224, 224)

    def plain() -> object:
        with torch.inference_mode():
            return model(x)

    def edge(mode: str) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return forward_with_scores(model, x, mode)

        return run

    print(f"edge: {EDGE_MODEL}, batch {batch_size}", file=sys.stderr, flush=True)
    mean = interleaved({"plain": plain, "mean": edge("mean")}, repeats, warmup)
    rollout = interleaved({"plain": plain, "rollout": edge("rollout")}, repeats, warmup)
    return mean, rollout


def make_payloads(batch_size: int, seed: int) -> list[PatchPayload]:
    """Random uint8 images cut into 16x16 patches; each keeps k random distinct patches."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, generator=gen)
    patches = patchify(images, (16, 16))  # [B, 196, 3, 16, 16]
    num_patches = patches.shape[1]
    payloads = []
    for row in range(batch_size):
        k = int(torch.randint(MIN_PATCHES, MAX_PATCHES + 1, (1,), generator=gen))
        positions = torch.randperm(num_patches, generator=gen)[:k]
        payloads.append(PatchPayload(positions=positions.numpy(),
                                     patches=patches[row, positions].numpy()))
    return payloads


def token_slots(sizes: list[int], max_batch: int) -> int:
    """Token slots the server runs: its own batch plan, each forward padded to its longest."""
    groups = plan_batches(sizes, max_batch, prefix_tokens=1)  # deit: class token only
    return sum(len(group) * (max(sizes[i] for i in group) + 1) for group in groups)


def bench_server(
    batch_size: int, repeats: int, warmup: int, seed: int, bucket: int
) -> tuple[Timings, list[PatchPayload], float]:
    """Ragged batch classify versus a loop of single-payload classify calls.

    With `bucket` > 0 a third, informational variant runs the same payloads
    through a server with ``max_batch=bucket`` (sorted size buckets, less padding).
    """
    torch.manual_seed(seed)
    model = timm.create_model(SERVER_MODEL, pretrained=False).eval()
    server = Server(model, "cpu", max_batch=batch_size)
    payloads = make_payloads(batch_size, seed)

    def ragged() -> torch.Tensor:
        return server.classify(payloads)

    def loop() -> torch.Tensor:
        return torch.cat([server.classify([p]) for p in payloads])

    variants = {"ragged": ragged, "loop": loop}
    print(f"server: {SERVER_MODEL}, batch {batch_size}; checking logits", file=sys.stderr)
    single = loop()  # the check runs every variant once: it is one warm-up of each
    outputs = {"ragged": ragged()}
    if bucket > 0:
        bucketed_server = Server(model, "cpu", max_batch=bucket)
        variants["bucketed"] = lambda: bucketed_server.classify(payloads)
        outputs["bucketed"] = variants["bucketed"]()
    max_diff = 0.0
    for name, logits in outputs.items():
        diff = float((logits - single).abs().max())
        if not torch.allclose(logits, single, rtol=0.0, atol=ATOL):
            raise AssertionError(
                f"{name} and single-image server logits differ by up to {diff:.3g} (atol {ATOL})"
            )
        max_diff = max(max_diff, diff)
    return interleaved(variants, repeats, max(warmup - 1, 0)), payloads, max_diff


def render(
    args: argparse.Namespace,
    edge: tuple[Timings, Timings],
    server: Timings,
    payloads: list[PatchPayload],
    max_diff: float,
    elapsed: float,
    load_at_start: str,
) -> str:
    edge_mean, edge_rollout = edge
    sizes = [p.size for p in payloads]
    real_tokens = sum(s + 1 for s in sizes)  # + class token
    padded_tokens = token_slots(sizes, args.batch_size)
    header = (
        "| comparison | variant median (ms) | baseline median (ms) | ratio of medians "
        "| per-repetition ratio: median [min, max] | ratio of minimums |"
    )
    rows = [
        header,
        "|---|---:|---:|---:|---:|---:|",
        f"| edge `mean` / plain `model(x)` ({EDGE_MODEL}, batch {args.batch_size}) | "
        + " | ".join(fmt_ratio(edge_mean, "mean", "plain"))
        + " |",
        "| edge `rollout` / plain `model(x)` (informational) | "
        + " | ".join(fmt_ratio(edge_rollout, "rollout", "plain"))
        + " |",
        f"| server ragged `classify(all)` / loop of `classify([p])` ({SERVER_MODEL}, "
        f"batch {args.batch_size}) | " + " | ".join(fmt_ratio(server, "ragged", "loop")) + " |",
    ]
    comparisons = [
        (edge_mean, "mean", "plain"),
        (edge_rollout, "rollout", "plain"),
        (server, "ragged", "loop"),
    ]
    bucket_note = ""
    if "bucketed" in server.seconds:
        rows.append(
            f"| server bucketed `classify(all)` with `max_batch={args.bucket_batch}` / loop "
            "(informational) | " + " | ".join(fmt_ratio(server, "bucketed", "loop")) + " |"
        )
        comparisons.append((server, "bucketed", "loop"))
        slots = token_slots(sizes, args.bucket_batch)
        bucket_note = (
            f" The informational bucketed variant (a `Server` with `max_batch={args.bucket_batch}`"
            f", so sorted chunks of {args.bucket_batch}) runs {slots} token slots "
            f"({slots / real_tokens:.2f}x)."
        )
    noisy = [
        f"{name}/{baseline}"
        for timings, name, baseline in comparisons
        if max(timings.paired_ratios(name, baseline))
        > 1.25 * min(timings.paired_ratios(name, baseline))
    ]
    noise_note = (
        f"**Noisy run:** the per-repetition ratios of {', '.join(noisy)} spread by more than "
        "25 % (max/min), a sign of contention from other processes; prefer a rerun on an "
        "idle machine, or compare with the ratio of minimums (contention only adds time)."
        if noisy
        else "Per-repetition ratios stayed within 25 % (max/min) of each other."
    )
    return section("bench_forward", "Forward speed: edge scores and ragged server batches", [
        "Ratios of median wall-clock times measured in one process run, the compared "
        "variants interleaved repetition by repetition (order rotating) after warm-up; "
        "a ratio below 1 means the variant is faster than its baseline. The ratio of "
        "minimums (fastest repetition of each) resists bursts of load from other processes "
        "but not a single unusually fast repetition; where it disagrees with the ratio of "
        "medians, the run was noisy. Models are "
        "randomly initialised (`pretrained=False`), inputs random; CPU, float32.",
        "",
        f"- Edge: `collabvit.models.vit.forward_with_scores(model, x, mode)` versus `model(x)`, "
        f"{EDGE_MODEL}, x = randn({args.batch_size}, 3, 224, 224), under `torch.inference_mode()`; "
        "each mode is interleaved with plain in its own pair (plain is timed twice); "
        f"timed repetitions: {args.repeats} per pair, warm-up runs: {args.warmup}.",
        f"- Server: `collabvit.models.server.Server(model, 'cpu', max_batch={args.batch_size})` on "
        f"{args.batch_size} `PatchPayload`s of uint8 patches, sizes uniform in "
        f"{MIN_PATCHES}..{MAX_PATCHES} of 196 at random distinct positions (seed {args.seed}); "
        f"ragged = `server.classify(payloads)`, loop = `[server.classify([p]) for p in "
        f"payloads]`; timed repetitions: {args.server_repeats}, warm-up runs: {args.warmup}. "
        f"Sizes: min {min(sizes)}, median {statistics.median(sizes):g}, max {max(sizes)}; "
        f"the ragged batch runs {padded_tokens} token slots for {real_tokens} real tokens "
        f"({padded_tokens / real_tokens:.2f}x).{bucket_note} Logits of every server variant "
        f"agree with the loop: max |diff| = {max_diff:.2g} (atol {ATOL:g}).",
        "",
        *rows,
        "",
        noise_note,
        "",
        "Other processes (e.g. test runs) may share the machine during a run; interleaving "
        "exposes the compared variants to the same conditions, so ratios hold up better "
        "than absolute times, but contention is not neutral: the loop of many small "
        "single-image forwards suffers more from oversubscribed cores than one large forward.",
    ], load_at_start, elapsed)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions, edge part")
    parser.add_argument(
        "--server-repeats",
        type=int,
        default=5,
        help="timed repetitions, server part (each is several seconds on CPU)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every variant")
    parser.add_argument(
        "--bucket-batch",
        type=int,
        default=8,
        help="max_batch of the informational bucketed server variant (0: skip it)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.server_repeats < 1 or args.batch_size < 1:
        parser.error("repeats and batch size must be >= 1")
    if args.warmup < 0 or args.bucket_batch < 0:
        parser.error("warm-up and bucket batch must be >= 0")
    return apply_quick(args, repeats=1, server_repeats=1, batch_size=2, bucket_batch=0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    load_at_start = load_average()
    edge = bench_edge(args.batch_size, args.repeats, args.warmup, args.seed)
    server, payloads, max_diff = bench_server(
        args.batch_size, args.server_repeats, args.warmup, args.seed, args.bucket_batch
    )
    elapsed = time.perf_counter() - began
    text = render(args, edge, server, payloads, max_diff, elapsed, load_at_start)
    publish(args, "bench_forward", text, {
        "edge_mean_over_plain": edge[0].ratio("mean", "plain"),
        "server_ragged_over_loop": server.ratio("ragged", "loop"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
