"""Figures: the accuracy/communication-cost trade-off, attention views, histograms,
learning curves.

Every figure is a matplotlib `Figure` drawn off-screen (no pyplot state) and
saved as PNG and SVG next to each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from collabvit.lite.frontier import SERIES_FIELDS, SweepPoint, pareto_optimal, series_label

FORMATS = ("png", "svg")

# Twelve qualitative colours, the most distinct first: tab10 without its grey (the
# edge-alone line is grey) and three more that differ from all of them.
SERIES_COLOURS = (
    "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
    "tab:pink", "tab:olive", "tab:cyan", "#000075", "#ff00ff", "#00c080",
)  # fmt: skip
# Beyond twelve series the colours come round again with another line style.
SERIES_LINESTYLES = ("-", "--", "-.", ":")

# Dropped patches in the masked view: a saturated colour, so it can never be mistaken
# for a grey (or black) pixel of the image itself.
DROPPED_COLOUR = "#3b7dd8"
# The outline of an object's patches (cluttered canvases): visible on black and on white.
OBJECT_COLOUR = "#ff9f1c"


def save(figure: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `figure` as stem.png and stem.svg; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


# --- the trade-off -----------------------------------------------------------------


def series_style(index: int) -> dict:
    """Colour and line style of the index-th series: twelve distinct colours, then repeats."""
    colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
    linestyle = SERIES_LINESTYLES[index // len(SERIES_COLOURS) % len(SERIES_LINESTYLES)]
    return {"color": colour, "linestyle": linestyle}


def group_series(points: Sequence[SweepPoint]) -> dict[str, list[SweepPoint]]:
    """The points by series, labelled only by the series fields that vary among them."""
    varying = [f for f in SERIES_FIELDS if len({getattr(p, f) for p in points}) > 1]
    series: dict[str, list[SweepPoint]] = {}
    for point in points:
        series.setdefault(series_label(point, varying), []).append(point)
    return series


def pick_legend(pick: SweepPoint, pick_label: str) -> str:
    """The legend entry of a picked point, e.g. 'budget pick: 87.50 % at cost 0.210'."""
    return f"{pick_label}: {pick.collab_acc:.2f} % at cost {pick.comm_cost:.3f}"


def _draw_series(axes, label: str, members: Sequence[SweepPoint], style: dict) -> None:
    """Every point of a series faintly, and its own frontier as a line."""
    costs = [p.comm_cost for p in members]
    accuracies = [p.collab_acc for p in members]
    axes.scatter(costs, accuracies, s=9, alpha=0.3, color=style["color"], linewidths=0)
    flags = pareto_optimal(costs, accuracies)
    front = sorted((c, a) for c, a, ok in zip(costs, accuracies, flags, strict=True) if ok)
    axes.plot(*zip(*front, strict=True), lw=1.4, label=label, **style)


@dataclass(frozen=True)
class ReferencePoint:
    """A result measured elsewhere (e.g. a paper's), marked on the frontier."""

    label: str
    comm_cost: float
    collab_acc: float


def _draw_reference_point(axes, reference: ReferencePoint) -> None:
    """A red diamond with its label beside it (the legend repeats the label)."""
    axes.plot(reference.comm_cost, reference.collab_acc, "D", ms=8, color="tab:red",
              mec="black", mew=0.8, zorder=7, label=reference.label)  # fmt: skip
    axes.annotate(reference.label, (reference.comm_cost, reference.collab_acc),
                  textcoords="offset points", xytext=(7, -11), fontsize=7,
                  color="tab:red")  # fmt: skip


def _draw_references(axes, edge_acc: float, server_acc: float | None) -> None:
    """Edge-alone and server-alone accuracies as horizontal lines in neutral tones."""
    axes.axhline(edge_acc, color="tab:gray", ls="--", lw=1, label=f"edge alone {edge_acc:.2f} %")
    if server_acc is not None:
        axes.axhline(server_acc, color="black", ls=":", lw=1.2,
                     label=f"server alone {server_acc:.2f} %")  # fmt: skip


def _zoom(axes, points, overall, edge_acc, server_acc, marked: Sequence[float]) -> None:
    """Zoom on the frontier, the reference lines and the `marked` accuracies (the pick,
    reference points); say how many points fall below."""
    high = max(max(p.collab_acc for p in points), server_acc or -math.inf, *marked)
    shown = overall or points  # without pareto flags, nothing is singled out
    low = min(min(p.collab_acc for p in shown), edge_acc, *marked)
    span = max(high - low, 1.0)
    bottom = max(low - 0.5 * span, 0.0)  # an accuracy axis has nothing below 0 % or above 100 %
    axes.set_ylim(bottom, min(high + 0.15 * span, 100.0 + 0.02 * span))
    hidden = sum(p.collab_acc < bottom for p in points)
    if hidden:
        note = f"{hidden} point{'s' if hidden > 1 else ''} below the axis"
        axes.text(0.01, 0.01, note, transform=axes.transAxes,
                  fontsize=7, color="tab:gray")  # fmt: skip


def frontier_figure(
    points: Sequence[SweepPoint],
    edge_acc: float,
    server_acc: float | None,
    title: str = "",
    pick: SweepPoint | None = None,
    pick_label: str = "pick",
    references: Sequence[ReferencePoint] = (),
) -> Figure:
    """Collaborative accuracy against communication cost, as the paper plots it.

    One colour per series (attention mode, policy, uncertainty measure, and
    temperature where they vary): every point faintly, the series' own frontier as
    a line. The points' `pareto` flags (frontier.mark_pareto over all of them) are
    drawn in black, so figure and CSV agree; the edge-alone and server-alone
    accuracies are horizontal reference lines; `pick` (a budget or target pick) is
    a star whose legend entry starts with `pick_label`; each of `references` (e.g. a
    published result) is a red diamond labelled beside it and in the legend.
    """
    figure = Figure(figsize=(7.5, 5))
    axes = figure.add_subplot()
    for index, (label, members) in enumerate(group_series(points).items()):
        _draw_series(axes, label, members, series_style(index))
    overall = sorted((p for p in points if p.pareto), key=lambda p: p.comm_cost)
    if overall:
        costs, accuracies = [p.comm_cost for p in overall], [p.collab_acc for p in overall]
        axes.plot(costs, accuracies, "o-", color="black", ms=3.5, lw=1.2,
                  label="Pareto frontier (all)", zorder=5)  # fmt: skip
    _draw_references(axes, edge_acc, server_acc)
    if pick is not None:
        axes.plot(pick.comm_cost, pick.collab_acc, "*", ms=16, color="gold", mec="black",
                  mew=0.9, zorder=6, label=pick_legend(pick, pick_label))  # fmt: skip
    for reference in references:
        _draw_reference_point(axes, reference)
    marked = [pick.collab_acc] if pick is not None else []
    _zoom(axes, points, overall, edge_acc, server_acc,
          marked + [r.collab_acc for r in references])  # fmt: skip
    axes.set_xlabel("communication cost (sent patches / all patches)")
    axes.set_ylabel("collaborative top-1 accuracy (%)")
    axes.set_title(title or "Accuracy against communication cost")
    axes.grid(alpha=0.3)
    # Beside the axes: with a dozen series a legend inside would hide the frontier.
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return figure


def plot_frontier(
    points: Sequence[SweepPoint],
    edge_acc: float,
    server_acc: float | None,
    stem: str | Path,
    title: str = "",
    pick: SweepPoint | None = None,
    pick_label: str = "pick",
    references: Sequence[ReferencePoint] = (),
) -> list[Path]:
    """`frontier_figure` saved as stem.png and stem.svg; returns the paths."""
    return save(frontier_figure(points, edge_acc, server_acc, title, pick, pick_label,
                                references), stem)  # fmt: skip


# --- one image and its patches ---------------------------------------------------------


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


def draw_heatmap(
    axes, image: torch.Tensor, scores: torch.Tensor, patch_size, colorbar: bool = True
) -> None:
    """Image [C, H, W] with its patch scores [N] (row-major) overlaid as a heatmap.

    With `colorbar`, a bar beside the image reads the colours as scores (they sum to 1).
    """
    height, width = image.shape[1:]
    grid = (height // patch_size[0], width // patch_size[1])
    draw_image(axes, display_image(image))
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # pixel edges, as the image is drawn
    overlay = axes.imshow(patch_map(scores, grid).numpy(), cmap="jet", alpha=0.5, vmin=0,
                          extent=extent, interpolation="nearest")  # fmt: skip
    if colorbar:
        # The bar shows the colours unblended: their hue, not the mix, encodes the score.
        opaque = ScalarMappable(norm=overlay.norm, cmap=overlay.cmap)
        bar = axes.figure.colorbar(opaque, ax=axes, fraction=0.046, pad=0.03)
        bar.set_label("normalised patch attention", fontsize=7)
        bar.ax.tick_params(labelsize=6)


def sent_pixels(
    image: torch.Tensor, keep: torch.Tensor, patch_size, colour=DROPPED_COLOUR
) -> torch.Tensor:
    """Display pixels [H, W, 3] of what the server receives: dropped patches in `colour`.

    Grey images become RGB so that the colour of the dropped patches can show. A copy:
    display_image may return a view of `image` itself.
    """
    pixels = display_image(image).expand(-1, -1, 3).clone()
    pixels[~patch_mask(keep, image.shape[1:], patch_size)] = torch.tensor(to_rgb(colour))
    return pixels


def draw_sent(
    axes, image: torch.Tensor, keep: torch.Tensor, patch_size, legend: bool = True
) -> None:
    """What the server receives from image [C, H, W]: the kept patches (keep [N] bool).

    Dropped patches are DROPPED_COLOUR: black or grey would vanish into Fashion-MNIST's
    background or garments. With `legend`, a key below the image says so.
    """
    draw_image(axes, sent_pixels(image, keep, patch_size))
    if legend:
        key = Patch(facecolor=DROPPED_COLOUR, edgecolor="none", label="not sent to the server")
        axes.legend(handles=[key], loc="upper center", bbox_to_anchor=(0.5, 0.0),
                    frameon=False, fontsize=7, handlelength=1.2, borderaxespad=0.3)  # fmt: skip


def draw_patch_outline(axes, keep: torch.Tensor, image_size: tuple[int, int], patch_size,
                       colour: str = OBJECT_COLOUR) -> None:  # fmt: skip
    """Outline the patches `keep` [N] bool (row-major) on an image drawn on `axes`."""
    height, width = image_size
    # a blank border closes the outline where the patches touch the image's edge
    mask = torch.nn.functional.pad(patch_mask(keep, image_size, patch_size).float(), (1, 1, 1, 1))
    if keep.any():
        limits = axes.get_xlim(), axes.get_ylim()
        axes.contour(torch.arange(-1, width + 1).numpy(), torch.arange(-1, height + 1).numpy(),
                     mask.numpy(), levels=[0.5], colors=[colour], linewidths=1.0)  # fmt: skip
        axes.set_xlim(*limits[0])
        axes.set_ylim(*limits[1])


def canvas_examples_figure(images: torch.Tensor, masks: torch.Tensor | None,
                           titles: Sequence[str], patch_size, columns: int = 8) -> Figure:
    """A grid of images [n, C, H, W], each titled, with its object's patches (masks [n, N]
    bool, row-major) outlined when given."""
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(1.45 * columns, 1.6 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for position, axes in enumerate(grid.flat):
        if position >= len(images):
            axes.set_axis_off()
            continue
        image = images[position]
        draw_image(axes, display_image(image))
        if masks is not None:
            draw_patch_outline(axes, masks[position], tuple(image.shape[1:]), patch_size)
        axes.set_title(titles[position], fontsize=7)
    return figure


def verdict(answer: str, label: str | None) -> str:
    """An answer with a tick or a cross when the label is known."""
    if label is None:
        return answer
    return f"{answer} {'✓' if answer == label else '✗'}"


def view_caption(
    label: str | None,
    edge_answer: str | None,
    server_answer: str | None,
    kept: int,
    total: int,
    width: int = 44,
) -> str:
    """What the image is and what each model said, e.g.
    'label Coat · edge: Shirt ✗ · server (41/49 patches): Coat ✓', broken into lines
    of about `width` characters between the parts; empty when nothing is given.
    """
    parts = []
    if label is not None:
        parts.append(f"label {label}")
    if edge_answer is not None:
        parts.append(f"edge: {verdict(edge_answer, label)}")
    if server_answer is not None:
        parts.append(f"server ({kept}/{total} patches): {verdict(server_answer, label)}")
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += f" · {part}"
        else:
            lines.append(part)
    return "\n".join(lines)


@dataclass(frozen=True)
class PatchView:
    """One image as the edge saw it: what `patch_view_figures` and `patch_view_sheet` draw.

    image: unnormalised [C, H, W]; scores: normalised patch scores [N]; keep: selection [N]
    bool; label, edge_answer, server_answer: class names, or None to leave them out;
    object_patches: [N] bool, the object's patches (a cluttered canvas's item), or None.
    """

    image: torch.Tensor
    scores: torch.Tensor
    keep: torch.Tensor
    patch_size: tuple[int, int]
    label: str | None = None
    edge_answer: str | None = None
    server_answer: str | None = None
    object_patches: torch.Tensor | None = None

    def caption(self, width: int = 44) -> str:
        """The label, both answers and, with an object, how many of its patches were sent
        (or only selected, for an image without a server answer: one the gate kept)."""
        keep = self.keep
        caption = view_caption(self.label, self.edge_answer, self.server_answer,
                               int(keep.sum()), keep.numel(), width)  # fmt: skip
        if self.object_patches is not None:
            kept = int((keep & self.object_patches).sum())
            verb = "sent" if self.server_answer is not None else "selected"
            caption += (f"\nitem (outlined): {kept} of its {int(self.object_patches.sum())} "
                        f"patches {verb}")  # fmt: skip
        return caption

    def draw(self, axes, view: str, colorbar: bool = True, legend: bool = True) -> None:
        """Draw one of VIEWS on `axes`, the object's patches outlined where known; the
        heatmap's colour bar and the masked view's key where asked for."""
        if view == "original":
            draw_image(axes, display_image(self.image))
        elif view == "heatmap":
            draw_heatmap(axes, self.image, self.scores, self.patch_size, colorbar)
        else:
            draw_sent(axes, self.image, self.keep, self.patch_size, legend)
        if self.object_patches is not None:
            draw_patch_outline(axes, self.object_patches, tuple(self.image.shape[1:]),
                               self.patch_size)  # fmt: skip


# The reference's three views of an image, and their headings.
VIEWS = {"original": "original", "heatmap": "patch attention",
         "masked": "what the server receives"}  # fmt: skip


def patch_view_figures(view: PatchView) -> dict[str, Figure]:
    """The reference's three views of one image, a figure each: original, heatmap, masked.

    Each is titled with what it shows, above the label and both answers where given.
    """
    caption = view.caption()
    figures = {}
    for name, heading in VIEWS.items():
        figure = Figure(figsize=(3.6 if name == "heatmap" else 3, 3))
        axes = figure.add_subplot()
        view.draw(axes, name)
        axes.set_title(f"{heading}\n{caption}" if caption else heading, fontsize=8)
        figures[name] = figure
    return figures


def patch_view_sheet(views: Sequence[PatchView]) -> Figure:
    """Several images' three views in one figure: a row per image, the caption on its left."""
    figure = Figure(figsize=(7.2, 2.3 * len(views)), layout="constrained")
    grid = figure.subplots(len(views), len(VIEWS), squeeze=False)
    for number, (row, view) in enumerate(zip(grid, views, strict=True), 1):
        for axes, name in zip(row, VIEWS, strict=True):  # the key once, under the last row
            view.draw(axes, name, colorbar=False, legend=number == len(views))
        row[0].text(-0.08, 0.5, view.caption(width=30), transform=row[0].transAxes,
                    ha="right", va="center", fontsize=7)  # fmt: skip
    for axes, heading in zip(grid[0], VIEWS.values(), strict=True):
        axes.set_title(heading, fontsize=8)
    return figure


def save_patch_views(view: PatchView, out_dir: str | Path, name: str) -> list[Path]:
    """`patch_view_figures` as name_original.png, name_heatmap.png and name_masked.png."""
    return [path for suffix, figure in patch_view_figures(view).items()
            for path in save(figure, Path(out_dir) / f"{name}_{suffix}", ("png",))]  # fmt: skip


# --- attention over many images ---------------------------------------------------------


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


# --- training -----------------------------------------------------------------------------


def learning_curves_figure(
    logs: Mapping[str, Sequence[Mapping]], test_acc: Mapping[str, float] | None = None
) -> Figure:
    """Accuracy per epoch of each named run: validation (solid) and training (dotted,
    on augmented, token-dropped batches), and the test accuracy as a dot after the last
    epoch. `logs`: name -> the epoch records of its model card ("epoch", "val_acc",
    "train_acc")."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for index, (name, log) in enumerate(logs.items()):
        style = series_style(index)
        epochs = [record["epoch"] for record in log]
        axes.plot(epochs, [record["val_acc"] for record in log], color=style["color"],
                  label=f"{name}: validation")  # fmt: skip
        axes.plot(epochs, [record["train_acc"] for record in log], color=style["color"],
                  linestyle=":", label=f"{name}: training")  # fmt: skip
        if test_acc and name in test_acc:
            axes.plot([epochs[-1]], [test_acc[name]], "o", color=style["color"],
                      label=f"{name}: test {test_acc[name]:.2f} %")  # fmt: skip
    axes.set_xlabel("epoch")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Learning curves")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return figure


def plot_learning_curves(
    logs: Mapping[str, Sequence[Mapping]], stem: str | Path,
    test_acc: Mapping[str, float] | None = None,
) -> list[Path]:  # fmt: skip
    """learning_curves_figure, saved as stem.png and stem.svg."""
    return save(learning_curves_figure(logs, test_acc), stem)


def scenario_figure(windows: Mapping[str, Sequence[Mapping[str, float]]],
                    phases: Sequence[tuple[str, float, float, float]],
                    budget: float) -> Figure:  # fmt: skip
    """Clients over a scripted link scenario, per 1 s window, one line per kind of client:
    accuracy, bytes/s per client (with the budget and the link's share), p99 latency of the
    sent images, and images answered at the edge although uncertain (fallbacks and withheld).

    windows: kind of client -> rows with second, accuracy (and optionally on_time_accuracy,
    dotted), bytes_per_client, p99_ms, fallbacks, withheld. phases: (name, start s, end s,
    the link's bytes/s per client).
    """
    figure = Figure(figsize=(9, 9))
    panels = figure.subplots(4, 1, sharex=True)
    for index, (kind, rows) in enumerate(windows.items()):
        style = {"color": SERIES_COLOURS[index], "label": kind, "linewidth": 1.4}
        seconds = [row["second"] + 0.5 for row in rows]
        panels[0].plot(seconds, [row["accuracy"] for row in rows], **style)
        if "on_time_accuracy" in rows[0]:
            panels[0].plot(seconds, [row["on_time_accuracy"] for row in rows],
                           color=style["color"], linestyle=":", linewidth=1.2,
                           label=f"{kind}, on time")  # fmt: skip
        panels[1].plot(seconds, [row["bytes_per_client"] / 1000 for row in rows], **style)
        panels[2].plot(seconds, [row["p99_ms"] for row in rows], **style)
        panels[3].plot(seconds, [row["fallbacks"] + row["withheld"] for row in rows], **style)
    panels[1].axhline(budget / 1000, color="grey", linestyle="--", linewidth=1, label="budget")
    panels[1].step([start for _, start, _, _ in phases] + [phases[-1][2]],
                   [share / 1000 for *_, share in phases] + [phases[-1][3] / 1000],
                   where="post", color="black", linewidth=1, label="link / clients")  # fmt: skip
    panels[1].set_yscale("log")
    labels = ("accuracy (%)", "kB/s per client", "p99 latency, sent (ms)",
              "uncertain, answered\nat the edge (images)")  # fmt: skip
    for axes, label in zip(panels, labels, strict=True):
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        for _, start, _, _ in phases[1:]:
            axes.axvline(start, color="grey", linewidth=0.8, alpha=0.6)
    for name, start, end, _ in phases:
        panels[0].text((start + end) / 2, 1.02, name, ha="center", va="bottom",
                       transform=panels[0].get_xaxis_transform(), fontsize=9)  # fmt: skip
    panels[0].legend(loc="lower left")
    panels[1].legend(loc="lower left", fontsize=8)
    panels[-1].set_xlabel("seconds")
    figure.tight_layout()
    return figure


def plot_scenario(windows: Mapping[str, Sequence[Mapping[str, float]]],
                  phases: Sequence[tuple[str, float, float, float]], budget: float,
                  stem: str | Path) -> list[Path]:  # fmt: skip
    """scenario_figure saved as stem.png and stem.svg."""
    return save(scenario_figure(windows, phases, budget), stem)
