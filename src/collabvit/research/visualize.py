"""`collabvit visualize`: what the edge sends, drawn: per-image views, attention histogram."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from collabvit import data
from collabvit.config import VisualizeConfig
from collabvit.lite.specs import EdgeConfig
from collabvit.models.pair import Pair
from collabvit.research import passes, plots


def gate_text(measure: str, value: float, eta: float, sent: bool) -> str:
    """Whether the gate sends an image, and why, e.g. 'sent (min_entropy 0.613 >= η 0.252)'
    or 'answered at the edge (margin 0.702 > η 0.49)': entropies send at or above η, the
    margin at or below it, and 'none' sends every image."""
    if measure == "none":
        return "sent (--uncer-mode none sends every image)"
    if measure == "margin":
        relation = "<=" if sent else ">"
    else:
        relation = ">=" if sent else "<"
    where = "sent" if sent else "answered at the edge"
    return f"{where} ({measure} {value:.3f} {relation} η {eta:g})"


def item_text(keep: torch.Tensor, item: torch.Tensor | None) -> str:
    """How much of a cluttered canvas's item the selection holds: keep, item [N] bool ->
    '; kept 9 of the item's 12 patches' ('' without an item mask)."""
    if item is None:
        return ""
    return f"; kept {int((keep & item).sum())} of the item's {int(item.sum())} patches"


def draw_images(
    pair: Pair, config: EdgeConfig, views: VisualizeConfig, out_dir: Path, seed: int = 0
) -> Iterator[str]:
    """Original, heatmap and masked view of each of `views.indices`, and all of them on one
    sheet (views.png); yields one line per image, then one for the sheet.

    Each image goes through the edge at `config`'s operating point: the server answers only
    the images the gate sends. The masked view shows the selection of every image, sent or
    not; the line says which it is."""
    edge, server = pair.edge(config), pair.server()
    names = pair.class_names()
    total = edge.geometry.num_patches
    objects = data.item_masks(pair.dataset)  # cluttered canvases know their item's patches
    drawn = []
    for index in views.indices:
        image, label = pair.dataset[index]
        result = edge.process(image[None], torch.tensor([index]), seed)
        sent = bool(result.sent[0])
        server_answer = int(server.classify(result.payloads).argmax(1)[0]) if sent else None
        edge_answer = int(result.logits.argmax(1)[0])
        keep = result.keep[0]
        item = objects[index] if objects is not None else None
        view = plots.PatchView(
            image, result.scores[0], keep, edge.geometry.patch_size,
            label=names[int(label)], edge_answer=names[edge_answer],
            server_answer=names[server_answer] if sent else None, object_patches=item,
        )  # fmt: skip
        plots.save_patch_views(view, out_dir, f"{index:05d}")
        drawn.append(view)
        gate = gate_text(config.uncer_mode, float(result.uncertainty[0]), config.uncer_th, sent)
        selection = f"{int(keep.sum())}/{total} patches"
        answer = (f"server on {selection} says {names[server_answer]}" if sent else
                  f"the server sees nothing; selection drawn: {selection}")
        yield (f"image {index}: label {names[int(label)]}; edge says {names[edge_answer]}; "
               f"{gate}: {answer}{item_text(keep, item)} -> "
               f"{out_dir}/{index:05d}_*.png")  # fmt: skip
    sheet = plots.save(plots.patch_view_sheet(drawn), out_dir / "views", ("png",))[0]
    yield f"all {len(drawn)} on one sheet: {sheet}"


def draw_attention_histogram(
    pair: Pair, config: EdgeConfig, views: VisualizeConfig, out_dir: Path, progress=None
) -> str:
    """Histogram of every patch score over the dataset (PNG, SVG and CSV); returns one line."""
    scores = passes.run_edge(pair.edge(config), pair.loader(), progress).scores
    counts, edges = torch.histogram(scores.flatten().float(), bins=views.bins)
    csv_path = out_dir / "attention_histogram.csv"
    csv_path.write_text(
        "bin_start,bin_end,patches\n"
        + "".join(
            f"{a:.6g},{b:.6g},{int(c)}\n"
            for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
        )
    )
    title = (f"{config.attention_mode} attention, {len(scores)} images, "
             f"{scores.shape[1]} patches each")  # fmt: skip
    figure = plots.plot_histogram(counts.tolist(), edges.tolist(),
                                  out_dir / "attention_histogram", title)  # fmt: skip
    return f"attention histogram: {figure[0]} and {csv_path}"
