"""plots.py: figures are written, non-empty, and show what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb, to_rgba
from PIL import Image

from collabvit.algo import metrics
from collabvit.lite import frontier
from collabvit.research.plots import (
    DROPPED_COLOUR,
    OBJECT_COLOUR,
    VIEWS,
    PatchView,
    canvas_examples_figure,
    display_image,
    frontier_figure,
    learning_curves_figure,
    masked_image,
    patch_view_figures,
    patch_view_sheet,
    plot_frontier,
    plot_histogram,
    plot_learning_curves,
    save_patch_views,
    sent_pixels,
)


def _point(cost, acc, policy="attention_sum_threshold", measure="min_entropy", temperature=1.0):
    figures = metrics.Summary(
        images=100, num_patches=49, confident_images=50, sent_images=50,
        sent_tokens=98 * cost, avg_min_attention=0.01, avg_sum_attention=0.5, comm_cost=cost,
        client_acc=79.0, client_acc5=95.0, collab_acc=acc, collab_acc5=98.0,
    )  # fmt: skip
    return frontier.SweepPoint("mean", temperature, policy, 0.5, measure, 0.3, figures)


def _points(policies=("attention_sum_threshold", "random")):
    points = [
        _point(0.05 * i, 80.0 + i - index, policy)
        for index, policy in enumerate(policies)
        for i in range(6)
    ]
    return frontier.mark_pareto(points)


def _check_image_files(paths, suffixes):
    assert [p.suffix for p in paths] == suffixes
    for path in paths:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.width > 100 and image.height > 100
        else:
            assert path.read_text().lstrip().startswith("<?xml")


def _legend_texts(figure):
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_frontier_plot_is_written_as_png_and_svg_with_its_series(tmp_path):
    paths = plot_frontier(_points(), edge_acc=79.0, server_acc=86.0, stem=tmp_path / "f")
    _check_image_files(paths, [".png", ".svg"])
    svg = paths[1].read_text()
    for label in ("attention_sum_threshold", "random", "Pareto frontier", "edge alone 79.00",
                  "server alone 86.00"):  # fmt: skip
        assert label in svg
    assert "pick" not in svg


def test_frontier_gives_twelve_series_twelve_distinct_colours():
    policies = [f"policy_{i}" for i in range(12)]
    figure = frontier_figure(_points(policies), edge_acc=79.0, server_acc=None)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    colours = {to_rgba(lines[policy].get_color()) for policy in policies}
    assert len(colours) == 12
    assert to_rgba("black") not in colours  # black is the overall frontier's


def test_frontier_marks_the_pick_in_legend_and_svg(tmp_path):
    points = _points()
    pick = frontier.pick_point(points, budget=0.12)
    assert (pick.comm_cost, pick.collab_acc) == (0.1, 82.0)
    figure = frontier_figure(points, 79.0, 86.0, pick=pick, pick_label="budget pick")
    assert "budget pick: 82.00 % at cost 0.100" in _legend_texts(figure)
    star = [line for line in figure.axes[0].get_lines() if line.get_marker() == "*"]
    assert [tuple(line.get_xydata()[0]) for line in star] == [(0.1, 82.0)]
    paths = plot_frontier(points, 79.0, 86.0, tmp_path / "f", pick=pick, pick_label="budget pick")
    assert "budget pick: 82.00 % at cost 0.100" in paths[1].read_text()


def test_frontier_counts_the_points_below_the_axis():
    points = frontier.mark_pareto(_points() + [_point(0.9, 10.0)])
    texts = [text.get_text() for text in frontier_figure(points, 79.0, 86.0).axes[0].texts]
    assert "1 point below the axis" in texts


def test_patch_views_write_three_titled_pngs(tmp_path):
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    keep = torch.zeros(49, dtype=torch.bool)
    keep[:10] = True
    view = PatchView(image, torch.rand(49), keep, (4, 4), label="Coat", edge_answer="Shirt",
                     server_answer="Coat")
    paths = save_patch_views(view, tmp_path, "00003")
    assert [p.name for p in paths] == ["00003_original.png", "00003_heatmap.png",
                                       "00003_masked.png"]  # fmt: skip
    _check_image_files(paths, [".png"] * 3)


def test_patch_view_titles_name_the_label_and_both_answers():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    keep = torch.arange(49) < 41
    figures = patch_view_figures(PatchView(image, torch.rand(49), keep, (4, 4), label="Coat",
                                           edge_answer="Shirt", server_answer="Coat"))
    assert list(figures) == ["original", "heatmap", "masked"]
    for figure in figures.values():
        title = " ".join(figure.axes[0].get_title().split())
        assert "label Coat · edge: Shirt ✗" in title
        assert "server (41/49 patches): Coat ✓" in title


def test_patch_view_titles_without_answers_name_only_the_view():
    figures = patch_view_figures(PatchView(torch.zeros(1, 28, 28), torch.rand(49),
                                           torch.arange(49) < 3, (4, 4)))
    assert figures["original"].axes[0].get_title() == "original"


def test_heatmap_has_a_colour_bar():
    figures = patch_view_figures(PatchView(torch.zeros(1, 28, 28), torch.rand(49),
                                           torch.arange(49) < 3, (4, 4)))
    bars = [axes for axes in figures["heatmap"].axes if "attention" in axes.get_ylabel()]
    assert len(bars) == 1


def _rendered(figure):
    """The figure's pixels [H, W, 3] uint8, top row first, and its canvas."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3], canvas


def test_masked_view_colours_dropped_patches_and_keeps_the_grey_of_the_rest():
    # Each 4x4 patch of a 28x28 image a grey level of its own, every other patch kept.
    levels = 40 + 4 * torch.arange(49, dtype=torch.uint8)
    grid = levels.reshape(7, 7).repeat_interleave(4, 0).repeat_interleave(4, 1)
    keep = torch.arange(49) % 2 == 0
    figure = patch_view_figures(PatchView(grid[None], torch.rand(49), keep, (4, 4)))["masked"]
    pixels, _ = _rendered(figure)
    box = figure.axes[0].get_window_extent()  # display coordinates, origin bottom left
    dropped = np.round(np.array(to_rgb(DROPPED_COLOUR)) * 255)
    for index in range(49):
        row, column = divmod(index, 7)
        x = int(box.x0 + (column + 0.5) / 7 * box.width)
        y = int(pixels.shape[0] - (box.y1 - (row + 0.5) / 7 * box.height))
        expected = np.full(3, int(levels[index])) if keep[index] else dropped
        np.testing.assert_allclose(pixels[y, x], expected, atol=2, err_msg=f"patch {index}")
    assert not np.allclose(dropped, dropped.mean())  # not a grey a garment could have
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["not sent to the server"]


def test_sent_pixels_colour_an_rgb_image_without_touching_it():
    image = torch.full((3, 8, 8), 0.25)
    pixels = sent_pixels(image, torch.tensor([True, False, False, True]), (4, 4))
    assert pixels.shape == (8, 8, 3)
    torch.testing.assert_close(pixels[:4, :4], torch.full((4, 4, 3), 0.25))
    torch.testing.assert_close(pixels[:4, 4:], torch.tensor(to_rgb(DROPPED_COLOUR)).expand(4, 4, 3))
    assert image.eq(0.25).all()


def test_masked_image_keeps_exactly_the_selected_patches():
    image = torch.arange(1, 3 * 8 * 12 + 1, dtype=torch.float32).reshape(3, 8, 12)
    keep = torch.tensor([True, False, False, False, False, True])  # grid 2 x 3 of 4x4 patches
    out = masked_image(image, keep, (4, 4))
    torch.testing.assert_close(out[:, :4, :4], image[:, :4, :4])
    torch.testing.assert_close(out[:, 4:, 8:], image[:, 4:, 8:])
    assert out[:, :4, 4:].eq(0).all() and out[:, 4:, :8].eq(0).all()


@pytest.mark.parametrize(
    "image, expected",
    [
        (torch.full((1, 2, 2), 255, dtype=torch.uint8), 1.0),
        (torch.full((3, 2, 2), 0.5), 0.5),
    ],
)
def test_display_image_maps_to_unit_range_channels_last(image, expected):
    shown = display_image(image)
    assert shown.shape == (2, 2, image.shape[0])
    assert torch.allclose(shown, torch.full_like(shown, expected))


def test_display_image_stretches_normalised_inputs():
    shown = display_image(torch.tensor([[[-2.0, 0.0], [1.0, 2.0]]]))
    assert shown.min() == 0.0 and shown.max() == 1.0


def test_histogram_plot(tmp_path):
    paths = plot_histogram([5, 0, 12], [0.0, 0.1, 0.2, 0.3], tmp_path / "h")
    _check_image_files(paths, [".png", ".svg"])


def _log(val_accs):
    return [{"epoch": e + 1, "val_acc": v, "train_acc": v - 3} for e, v in enumerate(val_accs)]


def test_learning_curves_draw_each_run_its_validation_training_and_test():
    logs = {"server": _log([60.0, 80.0, 90.0]), "edge": _log([55.0, 75.0])}
    figure = learning_curves_figure(logs, {"server": 91.5})
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines["server: validation"].get_ydata()) == [60.0, 80.0, 90.0]
    assert list(lines["server: training"].get_xdata()) == [1, 2, 3]
    assert list(lines["edge: training"].get_ydata()) == [52.0, 72.0]
    assert list(lines["server: test 91.50 %"].get_xydata()[0]) == [3, 91.5]
    assert "edge: test" not in " ".join(lines)  # no test accuracy given for it
    assert to_rgb(lines["server: validation"].get_color()) != to_rgb(
        lines["edge: validation"].get_color()
    )


def test_learning_curves_plot(tmp_path):
    paths = plot_learning_curves({"edge": _log([55.0, 75.0])}, tmp_path / "curves")
    _check_image_files(paths, [".png", ".svg"])


def _has_colour(figure, colour: str) -> bool:
    """Whether any pixel of the rendered figure is (nearly) `colour`."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    target = (np.array(to_rgb(colour)) * 255).astype(int)
    return bool((np.abs(pixels - target).max(axis=-1) <= 8).any())


def test_object_patches_are_outlined_and_counted_in_every_view():
    image = torch.zeros(1, 56, 56, dtype=torch.uint8)
    keep, item = torch.arange(49) < 20, torch.zeros(49, dtype=torch.bool)
    item[[15, 16, 22, 23, 30]] = True  # 2 of the 5 among the first 20
    figures = patch_view_figures(PatchView(image, torch.rand(49), keep, (8, 8), label="Coat",
                                           object_patches=item))
    for figure in figures.values():  # no server answer: the gate kept it, nothing was sent
        assert "item (outlined): 2 of its 5 patches selected" in figure.axes[0].get_title()
        assert _has_colour(figure, OBJECT_COLOUR)
    sent = patch_view_figures(PatchView(image, torch.rand(49), keep, (8, 8), label="Coat",
                                        server_answer="Coat", object_patches=item))
    assert "item (outlined): 2 of its 5 patches sent" in sent["masked"].axes[0].get_title()
    plain = patch_view_figures(PatchView(image, torch.rand(49), keep, (8, 8), label="Coat"))
    assert not _has_colour(plain["original"], OBJECT_COLOUR)


def test_the_sheet_draws_every_image_in_a_row_of_three_views():
    image = torch.zeros(1, 56, 56, dtype=torch.uint8)
    item = torch.zeros(49, dtype=torch.bool)
    item[[15, 16]] = True
    views = [PatchView(image, torch.rand(49), torch.arange(49) < sent, (8, 8), label="Coat",
                       edge_answer="Shirt", server_answer="Coat", object_patches=item)
             for sent in (3, 20)]  # fmt: skip
    figure = patch_view_sheet(views)
    assert len(figure.axes) == 6  # no colour bars: the rows share one scale of colours
    assert [axes.get_title() for axes in figure.axes[:3]] == list(VIEWS.values())
    captions = [text.get_text() for axes in figure.axes for text in axes.texts]
    assert len(captions) == 2
    assert "server (3/49 patches)" in captions[0] and "0 of its 2 patches sent" in captions[0]
    assert "item (outlined): 2 of its 2 patches sent" in captions[1]
    assert _has_colour(figure, OBJECT_COLOUR) and _has_colour(figure, DROPPED_COLOUR)


def test_canvas_examples_are_titled_and_outlined():
    images = torch.randint(0, 256, (5, 1, 56, 56), dtype=torch.uint8)
    masks = torch.zeros(5, 49, dtype=torch.bool)
    masks[:, :6] = True
    figure = canvas_examples_figure(images, masks, [f"canvas {i}" for i in range(5)], (8, 8),
                                    columns=3)  # fmt: skip
    titled = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert titled == [f"canvas {i}" for i in range(5)] and len(figure.axes) == 6
    assert _has_colour(figure, OBJECT_COLOUR)


def test_the_scenario_figure_draws_each_kind_of_client_over_the_phases(tmp_path):
    from collabvit.research.plots import plot_scenario

    rows = [{"second": t, "accuracy": 92.0 - (t >= 3), "on_time_accuracy": 91.0,
             "bytes_per_client": 3000.0 / (1 + 9 * (3 <= t < 5)), "p99_ms": 100.0 + t,
             "fallbacks": t % 2, "withheld": 1} for t in range(8)]  # fmt: skip
    phases = [("steady", 0, 3, 4000.0), ("link at a tenth", 3, 5, 400.0),
              ("back", 5, 8, 4000.0)]  # fmt: skip
    paths = plot_scenario({"adaptive": rows, "fixed": rows}, phases, 3200.0,
                          tmp_path / "scenario")  # fmt: skip
    assert sorted(p.name for p in paths) == ["scenario.png", "scenario.svg"]
    svg = (tmp_path / "scenario.svg").read_text()
    assert "link at a tenth" in svg and "adaptive, on time" in svg
