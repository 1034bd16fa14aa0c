"""`collabvit sweep`: operating points of the pair over a data set, the frontier, and a point
picked for a budget or a target; under torchrun each process takes its shard."""

from __future__ import annotations

import argparse
from dataclasses import replace

from collabvit.cli.common import (
    UsageError,
    add_pair_arguments,
    check_output_dir,
    fail,
    load_pair,
    pair_specs,
    progress,
)
from collabvit.cli.flags import add_config_arguments, given_values
from collabvit.config import RunConfig, SweepConfig

SUMMARY = ("operating points: accuracy against communication cost, the frontier, picking a "
           "point for a budget")  # fmt: skip
DESCRIPTION = (
    "Sweep selection thresholds and gate thresholds over a dataset with one edge pass and "
    "one server pass per selection setting; write every point (JSON Lines and CSV) with "
    "the Pareto-optimal ones marked, plot the frontier, and optionally pick a point for a "
    "budget on a calibration part and check it on the held-out part.")  # fmt: skip

# how the figure's title names the built-in data sets
DATA_SET_TITLES = {"fmnist": "Fashion-MNIST", "fmnist-cluttered": "cluttered Fashion-MNIST"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_arguments(parser)
    add_config_arguments(parser.add_argument_group("grid, report and budget"), SweepConfig)
    add_config_arguments(parser.add_argument_group("run"), RunConfig)


def run(args: argparse.Namespace) -> int:
    try:
        edge_spec, server_spec, data, run_config = pair_specs(args)
        config = SweepConfig(**given_values(SweepConfig, args))
        from collabvit.lite.summary import provenance
        from collabvit.research import sweep
        from collabvit.research.distributed import Processes

        out_dir = check_output_dir(config.out_dir, sweep.OUTPUT_FILES)
        with Processes(run_config.device) as processes:
            run_config = replace(run_config, device=processes.device)
            main = processes.is_main
            pair = load_pair("sweep", edge_spec, server_spec, data, run_config, warn_user=main)
            report = sweep.run(pair, config, seed=run_config.seed,
                               progress=progress(run_config) if main else False,
                               processes=processes)  # fmt: skip
        if not main:  # rank 0 prints and writes for all
            return 0
        print(sweep.findings_text(report, config, out_dir))
        title = f"{report.images} images" + (
            f" of {DATA_SET_TITLES[data.data_set]} {data.split}"
            if data.data_set in DATA_SET_TITLES else ""
        ) + "".join(f", {name} {value}" for name, value in data.clutter.items())  # fmt: skip
        made = provenance("sweep", edge_model=edge_spec, server_model=server_spec, data=data,
                          sweep=config, run=run_config)  # fmt: skip
        made["processes"] = processes.world_size
        pick_label = "budget pick" if config.budget is not None else "target pick"
        written = sweep.write_report(report, out_dir, made,
                                     None if config.no_plots else title, pick_label)  # fmt: skip
        if not config.no_plots:
            print(f"frontier: {written[3]}")
    except (UsageError, ValueError, OSError) as error:
        return fail("sweep", error)
    return 0
