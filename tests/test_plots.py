"""plots.py: figures are written, non-empty, and show what they claim."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from collabvit.plots import (
    display_image,
    masked_image,
    plot_frontier,
    plot_histogram,
    save_patch_views,
)
from collabvit.sweep import mark_pareto


def _points():
    points = []
    for policy in ("attention_sum_threshold", "random"):
        for i in range(6):
            points.append({"attention_mode": "mean", "policy": policy, "measure": "min_entropy",
                           "temperature": 1.0, "comm_cost": 0.05 * i,
                           "collab_acc": 80.0 + i - (policy == "random")})  # fmt: skip
    return mark_pareto(points)


def _check_image_files(paths, suffixes):
    assert [p.suffix for p in paths] == suffixes
    for path in paths:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.width > 100 and image.height > 100
        else:
            assert path.read_text().lstrip().startswith("<?xml")


def test_frontier_plot_is_written_as_png_and_svg_with_its_series(tmp_path):
    paths = plot_frontier(_points(), edge_acc=79.0, server_acc=86.0, stem=tmp_path / "f")
    _check_image_files(paths, [".png", ".svg"])
    svg = paths[1].read_text()
    for label in ("attention_sum_threshold", "random", "Pareto frontier", "edge alone 79.00",
                  "server alone 86.00"):  # fmt: skip
        assert label in svg


def test_patch_views_write_three_pngs(tmp_path):
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    keep = torch.zeros(49, dtype=torch.bool)
    keep[:10] = True
    paths = save_patch_views(image, torch.rand(49), keep, (4, 4), tmp_path, "00003")
    assert [p.name for p in paths] == ["00003_original.png", "00003_heatmap.png",
                                       "00003_masked.png"]  # fmt: skip
    _check_image_files(paths, [".png"] * 3)


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
