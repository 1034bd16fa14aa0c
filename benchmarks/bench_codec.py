"""Wire codecs: encode and decode speed of one image's payload (``collabvit.lite.protocol``).

Payloads hold half of an image's patches (the best-scoring half by the pixels' own
variance, so the kept patches carry content as the edge's selections do). Images:
Fashion-MNIST test images at their own geometry (1 x 28 x 28, patches 4 x 4) and, for the
224 geometry (3 x 224 x 224, patches 16 x 16), the same images resized to 224 with three
equal channels (natural-looking content; random noise would be an unfair case for png and
jpeg). Speed is in MB of uncompressed kept pixels per second; the wire size is the whole
encoded payload (header and indices included).

Usage:
    python -m benchmarks.bench_codec [--images 200] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    add_suite_arguments,
    apply_quick,
    load_average,
    publish,
    section,
)
from collabvit.data import FashionMNIST
from collabvit.lite.protocol import (
    Codec,
    PatchPayload,
    WireGeometry,
    decode_payload,
    encode_payload,
    patchify,
)

CODECS = ("raw", "png", "jpeg:75", "jpeg:95")


def half_of_the_patches(images: torch.Tensor, patch: int) -> list[PatchPayload]:
    """images uint8 [B, C, H, W] -> payloads of each image's higher-variance half of patches."""
    patches = patchify(images, (patch, patch))  # [B, N, C, P, P]
    spread = patches.float().flatten(2).var(dim=2)  # [B, N]
    kept = spread.topk(patches.shape[1] // 2, dim=1).indices.sort(dim=1).values
    return [PatchPayload(positions=kept[row].numpy(), patches=patches[row, kept[row]].numpy())
            for row in range(len(images))]  # fmt: skip


def geometries(count: int) -> dict[str, tuple[WireGeometry, list[PatchPayload]]]:
    fmnist = FashionMNIST(split="test").images[:count]  # [B, 1, 28, 28] uint8
    large = F.interpolate(fmnist.float(), size=(224, 224), mode="bilinear", align_corners=False)
    large = large.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return {
        "1 x 28 x 28, patches 4 x 4": (WireGeometry(1, (4, 4), (7, 7)),
                                       half_of_the_patches(fmnist, 4)),
        "3 x 224 x 224, patches 16 x 16": (WireGeometry(3, (16, 16), (14, 14)),
                                           half_of_the_patches(large, 16)),
    }  # fmt: skip


def seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(geometry: WireGeometry, payloads: list[PatchPayload], codec: Codec, repeats: int):
    blobs = [encode_payload(p, geometry, codec) for p in payloads]  # warm-up and the sizes
    for blob, payload in zip(blobs, payloads, strict=True):  # decoded back to the same patches
        decoded = decode_payload(blob, geometry)
        assert decoded.positions.dtype == np.int64
        assert np.array_equal(decoded.positions, payload.positions)
        assert decoded.patches.dtype == np.uint8
        assert decoded.patches.shape == payload.patches.shape
        if codec.name != "jpeg":
            assert np.array_equal(decoded.patches, payload.patches)
    pixels = sum(p.patches.size for p in payloads) / 1e6  # MB of uint8 pixels
    encode = seconds(lambda: [encode_payload(p, geometry, codec) for p in payloads], repeats)
    decode = seconds(lambda: [decode_payload(b, geometry) for b in blobs], repeats)
    return {"encode_mb_s": pixels / encode, "decode_mb_s": pixels / decode,
            "encode_us": 1e6 * encode / len(payloads), "decode_us": 1e6 * decode / len(payloads),
            "bytes": statistics.mean(len(b) for b in blobs),
            "pixel_bytes": 1e6 * pixels / len(payloads)}  # fmt: skip


def render(results: dict, args, elapsed: float, load_at_start: str) -> str:
    rows = ["| image, patches | codec | wire bytes / image (kept pixels) | encode MB/s "
            "| decode MB/s | encode µs / image | decode µs / image |",
            "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, codecs in results.items():
        for codec, r in codecs.items():
            rows.append(f"| {name} | {codec} | {r['bytes']:.0f} ({r['pixel_bytes']:.0f}) | "
                        f"**{r['encode_mb_s']:.1f}** | **{r['decode_mb_s']:.1f}** | "
                        f"{r['encode_us']:.0f} | {r['decode_us']:.0f} |")  # fmt: skip
    return section("bench_codec", "Wire codecs: encode and decode speed", [
        f"{args.images} payloads per geometry, each half of an image's patches (the "
        "higher-variance half); MB/s of uncompressed kept pixels, medians of "
        f"{args.repeats} passes over all payloads, one thread of Python each (`encode_payload`, "
        "`decode_payload`; png via Pillow, jpeg via Pillow's libjpeg). 224 images: Fashion-MNIST "
        "test images resized, three equal channels. Every payload is decoded back to its "
        "positions (and, lossless codecs, its pixels) before timing.",
        "",
        *rows,
    ], load_at_start, elapsed)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    return apply_quick(args, images=4, repeats=1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began, load_at_start = time.perf_counter(), load_average()
    results = {name: {codec: bench(geometry, payloads, Codec.parse(codec), args.repeats)
                      for codec in CODECS}
               for name, (geometry, payloads) in geometries(args.images).items()}  # fmt: skip
    text = render(results, args, time.perf_counter() - began, load_at_start)
    publish(args, "bench_codec", text, results)


if __name__ == "__main__":
    main()
