"""`collabvit reproduce`: the paper's ImageNet run at its setting, each figure beside the
published one; resumable, optionally with the sweep's frontier and the paper's point."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

from collabvit.cli.common import (
    UsageError,
    check_input_file,
    check_output_dir,
    check_output_file,
    fail,
    load_pair,
    progress,
    warn,
)
from collabvit.cli.flags import EDGE_FLAGS, SERVER_FLAGS, add_config_arguments, given_values
from collabvit.config import DataSpec, EvalOutputs, ModelSpec, ReproduceConfig, RunConfig

SUMMARY = ("the paper's ImageNet run (DeiT-Tiny edge, DeiT-Base server), compared with its "
           "published figures")  # fmt: skip
DESCRIPTION = (
    "Run `collabvit eval` at the paper's setting (deit_tiny_patch16_224 edge, "
    "deit_base_patch16_224 server, ImageNet val with DeiT's crop, attention_sum_threshold "
    "0.97, min_entropy 1.0, mean attention), print its eight lines and each figure beside "
    "the published one. The run saves its progress after every chunk of images; --resume "
    "continues an interrupted one. --sweep DIR also draws the accuracy/cost frontier with "
    "the paper's point.")  # fmt: skip

# ReproduceConfig's fields but --data-path: what the run saves and draws
RUN_FIELDS = tuple(f.name for f in fields(ReproduceConfig) if f.name != "data_path")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The paper's models, data set, crop and operating point are fixed: only the weights
    files, the images' folder, how to run and what to write can be given."""
    weights = parser.add_argument_group("the paper's weights (default: timm's hub)")
    only_weights = tuple(f.name for f in fields(ModelSpec) if f.name != "weights")
    add_config_arguments(weights, ModelSpec, EDGE_FLAGS, exclude=only_weights)
    add_config_arguments(weights, ModelSpec, SERVER_FLAGS, exclude=only_weights)
    images = parser.add_argument_group("ImageNet val")
    add_config_arguments(images, ReproduceConfig, exclude=RUN_FIELDS)
    add_config_arguments(images, DataSpec, exclude=("data_set", "data_path", "split", "crop_pct",
                                                    "clutter", "inputs_normalized"))  # fmt: skip
    add_config_arguments(parser.add_argument_group("run"), RunConfig)
    outputs = parser.add_argument_group("outputs and saved progress")
    add_config_arguments(outputs, EvalOutputs, exclude=("per_image",))
    add_config_arguments(outputs, ReproduceConfig, exclude=("data_path",))


def run(args: argparse.Namespace) -> int:
    from collabvit.research import reproduce

    settings = None
    try:
        settings = ReproduceConfig(**given_values(ReproduceConfig, args))
        outputs = EvalOutputs(**given_values(EvalOutputs, args))
        run_config = RunConfig(**given_values(RunConfig, args))
        reading = {k: v for k, v in given_values(DataSpec, args).items() if k != "data_path"}
        data = reproduce.paper_data(settings.data_path, **reading)
        edge_spec, server_spec = reproduce.PAPER.model_specs(
            given_values(ModelSpec, args, EDGE_FLAGS).get("weights"),
            given_values(ModelSpec, args, SERVER_FLAGS).get("weights"))  # fmt: skip
        config = reproduce.PAPER.edge_config()
        check_output_file(outputs.results_file)
        check_output_file(settings.state_file)
        if settings.sweep:
            from collabvit.research.sweep import OUTPUT_FILES

            check_output_dir(settings.sweep, (*OUTPUT_FILES, "frontier.png", "frontier.svg"))
        left = None if settings.resume else reproduce.unfinished(settings.state_file)
        if left:
            raise UsageError(f"{settings.state_file} holds an unfinished run ({left[0]:,} of "
                             f"{left[1]:,} images): pass --resume to continue it, or another "
                             "--state-file")  # fmt: skip
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("reproduce runs in one process, not under torchrun")
        for spec in (edge_spec, server_spec):
            check_input_file(spec.weights, "weights file")
        problem = reproduce.missing_weights(edge_spec, server_spec)
        if problem:
            raise UsageError(problem)
        identity = reproduce.run_identity(edge_spec, server_spec, data, config, run_config.seed,
                                          run_config.precision)  # fmt: skip
        if settings.resume:  # a state from other settings is refused before any model loads
            reproduce.load_state(settings.state_file, identity)
        pair = load_pair("reproduce", edge_spec, server_spec, data, run_config)
        result = reproduce.run(pair, config, settings.state_file, identity, settings.resume,
                               settings.chunk_images, run_config.seed,
                               progress(run_config))  # fmt: skip
        _report(result, config, settings, outputs, pair, identity,
                dict(edge_model=edge_spec, server_model=server_spec, data=data, edge=config,
                     run=run_config, reproduce=settings))  # fmt: skip
    except KeyboardInterrupt:
        left = reproduce.unfinished(settings.state_file) if settings else None
        where = (f" after {left[0]:,} of {left[1]:,} images; --resume continues from "
                 f"{settings.state_file}" if left else "")  # fmt: skip
        print(f"collabvit reproduce: interrupted{where}", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as error:  # ModelError, DataError, StateError
        return fail("reproduce", error)
    return 0


def _report(result, config, settings: ReproduceConfig, outputs: EvalOutputs, pair, identity,
            configs: dict) -> None:  # fmt: skip
    """Print the run's lines and the comparison; draw the sweep; write the results file."""
    from collabvit.algo.metrics import format_summary
    from collabvit.lite.summary import provenance, write_results
    from collabvit.research import reproduce, sweep

    summary = result.summary
    print(format_summary(summary, config.masking_mode, config.masking_th, config.uncer_mode,
                         config.uncer_th))  # fmt: skip
    rows = reproduce.compare(summary)
    print(reproduce.format_comparison(rows, summary.images))
    if result.skipped:
        warn("reproduce", f"skipped {result.skipped} unreadable images")
    made = provenance("reproduce", **configs)
    made["weights_sha256"] = {role: identity[f"{role}_model"]["sha256"]
                              for role in ("edge", "server")}  # fmt: skip
    extra = {"skipped_images": result.skipped, "published": asdict(reproduce.PAPER),
             "comparison": [row.as_dict() for row in rows]}  # fmt: skip
    if settings.sweep:
        report, sweep_config, figures = reproduce.sweep_frontier(
            pair, settings.sweep, made, configs["run"].seed, progress(configs["run"]))
        print(sweep.findings_text(report, sweep_config, Path(settings.sweep)))
        print(f"frontier with the paper's point: {figures[0]}")
        extra["sweep"] = {"out_dir": settings.sweep, "figures": [str(p) for p in figures],
                          "published_point": asdict(reproduce.reference_point())}
    if outputs.results_file:
        write_results(outputs.results_file, summary, made, **extra)
