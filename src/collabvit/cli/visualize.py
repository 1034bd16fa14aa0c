"""`collabvit visualize`: what the edge sends, drawn: chosen images with their attention and
kept patches, and the histogram of patch attention over the data set."""

from __future__ import annotations

import argparse
from dataclasses import replace

from collabvit.cli.common import (
    UsageError,
    add_pair_arguments,
    check_output_dir,
    edge_choices,
    fail,
    load_pair,
    pair_specs,
    progress,
)
from collabvit.cli.flags import add_config_arguments, given_values
from collabvit.config import RunConfig, VisualizeConfig
from collabvit.lite.specs import EdgeConfig

SUMMARY = "attention heatmaps, masked images, the attention histogram"
DESCRIPTION = (
    "Draw what the edge sends: for chosen images the original, the attention heatmap and "
    "the masked image (PNG); and the histogram of patch attention over the dataset (PNG, "
    "SVG, CSV).")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_arguments(parser)
    add_config_arguments(parser.add_argument_group("selection and gate"), EdgeConfig)
    add_config_arguments(parser.add_argument_group("what to draw"), VisualizeConfig)
    add_config_arguments(parser.add_argument_group("run"), RunConfig)


def run(args: argparse.Namespace) -> int:
    try:
        edge_spec, server_spec, data, run_config = pair_specs(args)
        chosen = edge_choices(args)
        views = VisualizeConfig(**given_values(VisualizeConfig, args))
        out_dir = check_output_dir(views.output_dir)
        pair = load_pair("visualize", edge_spec, server_spec, data, run_config)
        for index in views.indices:
            if not 0 <= index < len(pair.dataset):
                last = len(pair.dataset) - 1
                raise UsageError(f"index {index} is outside the dataset (0..{last})")
        config = replace(pair.default_config(), **chosen)
        from collabvit.research.visualize import draw_attention_histogram, draw_images

        for line in draw_images(pair, config, views, out_dir, run_config.seed):
            print(line)
        if views.attention_histogram:
            print(draw_attention_histogram(pair, config, views, out_dir, progress(run_config)))
    except (UsageError, ValueError, OSError) as error:
        return fail("visualize", error)
    return 0
