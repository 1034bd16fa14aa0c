"""How close the forwards come to the machine's limit, how server time falls with the tokens
kept, and what one image costs end to end.

1. **Matmul limit**: GFLOP/s of a large float32 matrix product (``torch.mm``, n x n).
2. **Achieved GFLOP/s** of the edge forward (``vit.forward_with_scores``, ``mean``) and the
   server forward (``Server.classify`` with every patch kept) on whole-image batches, and of
   the plain ``model(x)`` forwards beside them; FLOPs are counted from the shapes
   (``vit_flops``: linear layers, the two attention products, patch embedding and head).
3. **Server time against kept tokens**: ``Server.classify`` per image at k = N/4, N/2, 3N/4
   and N kept patches (random positions), one image per call and in batches; the bound is
   1.1 x (k + prefix) / (N + prefix) x the time at k = N.
4. **Batch-1 latency**: one image through ``EdgeDevice.process`` (every patch selected and
   sent) and ``Server.classify``, against the two plain forwards ``edge(x)`` and
   ``server(x)``, interleaved.

On deit_tiny / deit_base shapes at 224 (random weights) and on the shipped Fashion-MNIST pair.

Usage:
    python -m benchmarks.bench_compute [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    batched_calls,
    interleaved,
    load_average,
    publish,
    section,
)
from collabvit.config import ModelSpec
from collabvit.lite.protocol import PatchPayload, patchify
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit
from collabvit.models.edge import EdgeDevice
from collabvit.models.pair import load_model
from collabvit.models.server import Server

KEPT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MIN_SECONDS = 0.3  # per timed repetition: many calls of a forward of a few ms


def vit_flops(model: VisionTransformer, tokens: int) -> float:
    """Floating-point operations (2 per multiply-add) of one image's forward through `model`
    with `tokens` tokens (prefix tokens included): patch embedding of the patches, every
    block's linear layers and its two attention products (q k^T and attention x v), and
    the head. Normalisation, activations and softmax are left out (a few per cent)."""
    width = model.embed_dim
    patches = tokens - model.num_prefix_tokens
    in_chans = model.patch_embed.proj.in_channels
    patch_h, patch_w = model.patch_embed.patch_size
    flops = 2 * patches * in_chans * patch_h * patch_w * width
    for block in model.blocks:
        hidden = block.mlp.fc1.out_features
        flops += 2 * tokens * width * (3 * width + width)  # qkv and output projection
        flops += 2 * 2 * tokens * tokens * width  # q k^T and attention x v, all heads
        flops += 2 * 2 * tokens * width * hidden  # the two MLP layers
    return float(flops + 2 * width * model.num_classes)


def matmul_gflops(size: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of torch.mm on two size x size matrices of `dtype` (CPU)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


@dataclass
class Models:
    name: str
    edge: VisionTransformer
    server: VisionTransformer

    @property
    def geometry(self) -> vit.Geometry:
        return vit.geometry(self.server)


def deit_models(seed: int) -> Models:
    torch.manual_seed(seed)
    return Models("deit (tiny edge, base server, 224)",
                  timm.create_model("deit_tiny_patch16_224", pretrained=False).eval(),
                  timm.create_model("deit_base_patch16_224", pretrained=False).eval())  # fmt: skip


def fmnist_models(seed: int) -> Models:
    return Models("Fashion-MNIST pair", load_model(ModelSpec("collabvit_fmnist_edge")),
                  load_model(ModelSpec("collabvit_fmnist_server"), server=True))  # fmt: skip


def random_images(models: Models, count: int, seed: int) -> torch.Tensor:
    g = models.geometry
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, g.in_chans, *g.img_size), dtype=torch.uint8,
                         generator=gen)  # fmt: skip


def payloads_with(models: Models, images: torch.Tensor, kept: int, seed: int) -> list:
    """One payload per image, `kept` patches at random distinct positions."""
    gen = torch.Generator().manual_seed(seed)
    patches = patchify(images, models.geometry.patch_size)  # [B, N, C, P, P]
    payloads = []
    for row in range(len(images)):
        positions = torch.randperm(patches.shape[1], generator=gen)[:kept]
        payloads.append(PatchPayload(positions=positions.numpy(),
                                     patches=patches[row, positions].cpu().numpy()))
    return payloads


def median_seconds(run, repeats: int) -> float:
    """Median seconds of one call of `run` (batched into repetitions of >= MIN_SECONDS)."""
    runs, calls = batched_calls({"run": run}, MIN_SECONDS)
    return statistics.median(interleaved(runs, repeats, warmup=0).seconds["run"]) / calls


def bench_rates(models: Models, batch: int, repeats: int, seed: int) -> dict:
    """GFLOP/s of the edge and server forwards on whole images, with plain model(x)."""
    images = random_images(models, batch, seed)
    norm = vit.Normalization.of_model(models.edge)
    x = norm(images)
    edge = EdgeDevice(models.edge, EdgeConfig())
    server = Server(models.server, max_batch=batch)
    everything = payloads_with(models, images, models.geometry.num_patches, seed)
    tokens = models.geometry.num_patches + models.server.num_prefix_tokens
    edge_flops = batch * vit_flops(models.edge, tokens)
    server_flops = batch * vit_flops(models.server, tokens)

    def plain(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    variants = {
        "edge forward_with_scores": (lambda: edge.scores(images), edge_flops),
        "edge model(x)": (plain(models.edge), edge_flops),
        "server classify (all patches)": (lambda: server.classify(everything), server_flops),
        "server model(x)": (plain(models.server), server_flops),
    }
    runs, calls = batched_calls({name: run for name, (run, _) in variants.items()}, MIN_SECONDS)
    timings = interleaved(runs, repeats, warmup=0)
    seconds = {name: statistics.median(timings.seconds[name]) / calls for name in variants}
    return {name: {"seconds": seconds[name], "gflop_per_image": flops / batch / 1e9,
                   "gflops": flops / seconds[name] / 1e9}
            for name, (_, flops) in variants.items()}  # fmt: skip


def bench_kept(models: Models, batch: int, singles: int, repeats: int, seed: int) -> list:
    """Server seconds per image at each kept fraction, batched and one image per call."""
    images = random_images(models, batch, seed)
    server = Server(models.server, max_batch=batch)
    n, prefix = models.geometry.num_patches, models.server.num_prefix_tokens
    rows = []
    for fraction in KEPT_FRACTIONS:
        kept = round(fraction * n)
        payloads = payloads_with(models, images, kept, seed)
        batched = median_seconds(lambda p=payloads: server.classify(p), repeats) / batch

        def one_by_one(p=payloads[:singles]):
            for payload in p:
                server.classify([payload])

        single = median_seconds(one_by_one, repeats) / singles
        rows.append({"kept": kept, "bound_fraction": (kept + prefix) / (n + prefix),
                     "batched": batched, "single": single})  # fmt: skip
        print(f"  k={kept}: batched {1000 * batched:.2f} ms/img, single {1000 * single:.2f} ms",
              file=sys.stderr, flush=True)  # fmt: skip
    whole = rows[-1]
    for row in rows:
        for mode in ("batched", "single"):
            row[f"{mode}_ratio"] = row[mode] / whole[mode]
            row[f"{mode}_met"] = row[f"{mode}_ratio"] <= 1.1 * row["bound_fraction"]
    return rows


def bench_latency(models: Models, repeats: int, seed: int) -> dict:
    """One image: EdgeDevice.process + Server.classify against edge(x) + server(x)."""
    image = random_images(models, 1, seed)
    n = models.geometry.num_patches
    send_all = EdgeConfig(masking_mode="topk", masking_th=n, uncer_mode="none")
    edge = EdgeDevice(models.edge, send_all)
    server = Server(models.server)
    x = vit.Normalization.of_model(models.edge)(image)

    def collaborative():
        server.classify(edge.process(image).payloads)

    def plain():
        with torch.inference_mode():
            models.edge(x)
            models.server(x)

    runs, calls = batched_calls({"collabvit": collaborative, "plain": plain}, MIN_SECONDS)
    timings = interleaved(runs, repeats, warmup=0)
    return {"collabvit_ms": timings.median_ms("collabvit") / calls, "calls": calls,
            "plain_ms": timings.median_ms("plain") / calls,
            "ratio": timings.ratio("collabvit", "plain")}  # fmt: skip


def render(results: dict, args, elapsed: float, load_at_start: str) -> str:
    limit = results["matmul_gflops"]
    rate_rows = ["| models | forward | GFLOP/image | images/s | GFLOP/s | of matmul |",
                 "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    kept_rows = ["| models | kept k of N | bound (k+p)/(N+p) x 1.1 | batched ms/image | ratio "
                 "| met | one per call ms/image | ratio | met |",
                 "|---|---:|---:|---:|---:|---|---:|---:|---|"]  # fmt: skip
    latency_rows = ["| models | edge + server (ms) | plain edge(x) + server(x) (ms) | ratio "
                    "| target |", "|---|---:|---:|---:|---|"]  # fmt: skip
    for name, r in results["models"].items():
        for forward, rate in r["rates"].items():
            share = 100 * rate["gflops"] / limit
            rate_rows.append(f"| {name} | {forward} | {rate['gflop_per_image']:.3f} | "
                             f"{args.batch / rate['seconds']:.1f} | "
                             f"{rate['gflops']:.1f} | **{share:.0f} %** |")  # fmt: skip
        n = r["num_patches"]
        for row in r["kept"]:
            kept_rows.append(
                f"| {name} | {row['kept']} of {n} | {1.1 * row['bound_fraction']:.3f} | "
                f"{1000 * row['batched']:.2f} | **{row['batched_ratio']:.3f}** | "
                f"{'met' if row['batched_met'] else 'NOT met'} | {1000 * row['single']:.2f} | "
                f"**{row['single_ratio']:.3f}** | {'met' if row['single_met'] else 'NOT met'} |")
        lat = r["latency"]
        latency_rows.append(f"| {name} | {lat['collabvit_ms']:.2f} | {lat['plain_ms']:.2f} | "
                            f"**{lat['ratio']:.3f}** | <= 1.1 "
                            f"{'met' if lat['ratio'] <= 1.1 else 'NOT met'} |")  # fmt: skip
    return section("bench_compute", "Compute: the machine's limit, server time against kept "
                   "tokens, batch-1 latency", [
        f"Large-matmul limit: `torch.mm` of two {args.matmul_size} x {args.matmul_size} float32 "
        f"matrices, **{limit:.1f} GFLOP/s** (median of {args.repeats + 2}).",
        "",
        f"Achieved GFLOP/s on batches of {args.batch} whole random images, the four forwards "
        f"interleaved ({args.repeats} repetitions, medians). FLOPs from the shapes: linear "
        "layers, both attention products, patch embedding and head (2 per multiply-add).",
        "",
        *rate_rows,
        "",
        f"Server seconds per image at k kept patches (random positions): batches of "
        f"{args.batch} in one `Server.classify`, and {args.singles} images one per call; ratio = "
        "time at k / time at k = N. Target: ratio <= 1.1 x (k + prefix) / (N + prefix).",
        "",
        *kept_rows,
        "",
        "Batch-1 latency of one image: `EdgeDevice.process` (every patch selected, the image "
        "sent) then `Server.classify` of its payload, against the plain forwards `edge(x)` + "
        f"`server(x)` on the whole image; interleaved, {args.latency_repeats} repetitions "
        f"(each of >= {MIN_SECONDS} s, many calls), medians.",
        "",
        *latency_rows,
    ], load_at_start, elapsed)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per batched forward")
    parser.add_argument("--singles", type=int, default=8, help="images sent one per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=3072)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    return apply_quick(args, batch=2, singles=1, repeats=1, latency_repeats=2, matmul_size=512)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began, load_at_start = time.perf_counter(), load_average()
    results: dict = {"matmul_gflops": matmul_gflops(args.matmul_size, args.repeats + 2),
                     "models": {}}  # fmt: skip
    print(f"matmul: {results['matmul_gflops']:.1f} GFLOP/s", file=sys.stderr, flush=True)
    for build in (deit_models, fmnist_models):
        models = build(args.seed)
        print(models.name, file=sys.stderr, flush=True)
        results["models"][models.name] = {
            "num_patches": models.geometry.num_patches,
            "rates": bench_rates(models, args.batch, args.repeats, args.seed),
            "kept": bench_kept(models, args.batch, args.singles, args.repeats, args.seed),
            "latency": bench_latency(models, args.latency_repeats, args.seed),
        }
    text = render(results, args, time.perf_counter() - began, load_at_start)
    publish(args, "bench_compute", text, results)


if __name__ == "__main__":
    main()
