"""Figures: the accuracy/communication-cost trade-off, attention views, histograms.

Every figure is a matplotlib `Figure` drawn off-screen (no pyplot state) and
saved as PNG and SVG next to each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from collabvit.sweep import SERIES_FIELDS, pareto_optimal, series_label

FORMATS = ("png", "svg")


def save(figure: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `figure` as stem.png and stem.svg; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def plot_frontier(
    points: Sequence[dict],
    edge_acc: float,
    server_acc: float | None,
    stem: str | Path,
    title: str = "",
) -> list[Path]:
    """Collaborative accuracy against communication cost, as the paper plots it.

    One colour per series (attention mode, policy, uncertainty measure, and
    temperature where they vary): every point faintly, the series' own
    frontier as a line. The points' `pareto` flags (sweep.mark_pareto over all
    of them) are drawn in black, so figure and CSV agree; the edge-alone and
    server-alone accuracies are horizontal reference lines.
    """
    varying = [f for f in SERIES_FIELDS if len({p.get(f) for p in points}) > 1]
    series: dict[str, list[dict]] = {}
    for point in points:
        series.setdefault(series_label(point, varying), []).append(point)

    figure = Figure(figsize=(7.5, 5))
    axes = figure.add_subplot()
    for label, members in series.items():
        costs = [p["comm_cost"] for p in members]
        accuracies = [p["collab_acc"] for p in members]
        dots = axes.scatter(costs, accuracies, s=9, alpha=0.3)
        front = sorted(
            (c, a)
            for c, a, ok in zip(costs, accuracies, pareto_optimal(costs, accuracies), strict=True)
            if ok
        )
        axes.plot(
            *zip(*front, strict=True), "-", color=dots.get_facecolor()[0][:3], lw=1.4, label=label
        )
    overall = sorted((p for p in points if p["pareto"]), key=lambda p: p["comm_cost"])
    axes.plot([p["comm_cost"] for p in overall], [p["collab_acc"] for p in overall], "o-",
              color="black", ms=3.5, lw=1.2, label="Pareto frontier (all)", zorder=5)  # fmt: skip
    axes.axhline(edge_acc, color="tab:gray", ls="--", lw=1, label=f"edge alone {edge_acc:.2f} %")
    if server_acc is not None:
        axes.axhline(server_acc, color="tab:red", ls=":", lw=1.2,
                     label=f"server alone {server_acc:.2f} %")  # fmt: skip
    # Zoom on the frontier and the reference lines; far-dominated points fall below.
    high = max(max(p["collab_acc"] for p in points), server_acc or -math.inf)
    low = min(min(p["collab_acc"] for p in overall), edge_acc)
    span = max(high - low, 1.0)
    bottom = low - 0.5 * span
    axes.set_ylim(bottom, high + 0.15 * span)
    hidden = sum(p["collab_acc"] < bottom for p in points)
    if hidden:
        axes.text(0.01, 0.01, f"{hidden} points below the axis", transform=axes.transAxes,
                  fontsize=7, color="tab:gray")  # fmt: skip
    axes.set_xlabel("communication cost (sent patches / all patches)")
    axes.set_ylabel("collaborative top-1 accuracy (%)")
    axes.set_title(title or "Accuracy against communication cost")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    return save(figure, stem)


def display_image(image: torch.Tensor) -> torch.Tensor:
    """An image [C, H, W] (uint8, or float of any range) as floats in [0, 1], [H, W, C]."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().permute(1, 2, 0).float() / 255.0
    image = image.detach().cpu().float()
    if image.min() < 0 or image.max() > 1:  # normalised inputs: stretch for display only
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.permute(1, 2, 0)


def patch_map(values: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Per-patch values [N] (row-major) as a grid [gh, gw]."""
    return values.detach().cpu().float().reshape(grid_size)


def patch_mask(keep: torch.Tensor, image_size: tuple[int, int], patch_size) -> torch.Tensor:
    """Pixels of the kept patches: keep [N] bool (row-major over the grid) -> [H, W] bool."""
    height, width = image_size
    ph, pw = patch_size
    grid = keep.cpu().reshape(height // ph, width // pw)
    return grid.repeat_interleave(ph, 0).repeat_interleave(pw, 1)


def masked_image(
    image: torch.Tensor, keep: torch.Tensor, patch_size: tuple[int, int]
) -> torch.Tensor:
    """What the server receives: the kept patches of image [C, H, W], the rest zero.

    keep [N] bool (row-major over the patch grid) -> [C, H, W], image's dtype.
    """
    mask = patch_mask(keep, image.shape[1:], patch_size).to(image.device)
    return image * mask[None].to(image.dtype)


def draw_image(axes, pixels: torch.Tensor) -> None:
    """Show display pixels [H, W, C] in [0, 1] on `axes`, without ticks."""
    pixels = pixels.numpy()  # matplotlib wants arrays, not tensors
    gray = pixels.shape[-1] == 1
    axes.imshow(pixels.squeeze(-1) if gray else pixels, cmap="gray" if gray else None,
                vmin=0, vmax=1, interpolation="nearest")  # fmt: skip
    axes.set_axis_off()


def draw_heatmap(axes, image: torch.Tensor, scores: torch.Tensor, patch_size) -> None:
    """Image [C, H, W] with its patch scores [N] (row-major) overlaid as a heatmap."""
    height, width = image.shape[1:]
    grid = (height // patch_size[0], width // patch_size[1])
    draw_image(axes, display_image(image))
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # pixel edges, as the image is drawn
    axes.imshow(patch_map(scores, grid).numpy(), cmap="jet", alpha=0.5, extent=extent,
                interpolation="nearest")  # fmt: skip


def draw_sent(axes, image: torch.Tensor, keep: torch.Tensor, patch_size) -> None:
    """What the server receives from image [C, H, W]: the kept patches (keep [N] bool).

    Dropped patches are mid-grey: black would vanish into Fashion-MNIST's background.
    """
    pixels = display_image(image)
    pixels[~patch_mask(keep, image.shape[1:], patch_size)] = 0.5
    draw_image(axes, pixels)


def save_patch_views(
    image: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    patch_size: tuple[int, int],
    out_dir: str | Path,
    name: str,
) -> list[Path]:
    """The reference's three views of one image, as PNGs in out_dir.

    name_original.png, name_heatmap.png (patch scores over the image) and
    name_masked.png (only the selected patches).

    Args:
        image: unnormalised [C, H, W].
        scores: normalised patch scores [N].
        keep: selection [N] bool.
    """
    views = {
        "original": lambda axes: draw_image(axes, display_image(image)),
        "heatmap": lambda axes: draw_heatmap(axes, image, scores, patch_size),
        "masked": lambda axes: draw_sent(axes, image, keep, patch_size),
    }
    paths = []
    for view, draw in views.items():
        figure = Figure(figsize=(3, 3))
        draw(figure.add_axes((0, 0, 1, 1)))
        paths += save(figure, Path(out_dir) / f"{name}_{view}", ("png",))
    return paths


def plot_histogram(
    counts: Sequence[int], edges: Sequence[float], stem: str | Path, title: str = ""
) -> list[Path]:
    """A histogram from its bin counts [bins] and edges [bins + 1]."""
    figure = Figure(figsize=(6.5, 4))
    axes = figure.add_subplot()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    axes.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", alpha=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("normalised patch attention score")
    axes.set_ylabel("patches")
    axes.set_title(title or "Attention over patches")
    axes.grid(alpha=0.3)
    return save(figure, stem)
