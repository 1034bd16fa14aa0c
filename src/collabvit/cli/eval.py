"""`collabvit eval`: the pair over a data set, the reference's summary lines, optionally held at
a budget offline; under torchrun each process takes its shard and rank 0 prints for all."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from collabvit.cli.common import (
    UsageError,
    add_pair_arguments,
    check_input_file,
    check_output_file,
    edge_choices,
    fail,
    load_pair,
    pair_specs,
    progress,
    warn,
)
from collabvit.cli.flags import add_config_arguments, given_values
from collabvit.config import EvalOutputs, RunConfig
from collabvit.lite.config import BudgetConfig, ClientConfig
from collabvit.lite.specs import EdgeConfig

SUMMARY = "collaborative evaluation: prints the reference's summary lines"
DESCRIPTION = ("Run edge + server collaborative inference over a dataset and print the "
               "reference's six summary lines, then top-5.")  # fmt: skip

# what an offline bytes budget needs of the edge's stream: the images' pace and the codec
STREAM_FIELDS = ("images_per_second", "codec")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_arguments(parser)
    add_config_arguments(parser.add_argument_group("collaborative inference"), EdgeConfig)
    budget = parser.add_argument_group("budget (an operating point held along the frontier, "
                                       "offline)")  # fmt: skip
    add_config_arguments(budget, BudgetConfig, exclude=("latency_target",))
    add_config_arguments(budget, ClientConfig, exclude=tuple(
        f.name for f in fields(ClientConfig) if f.name not in STREAM_FIELDS))  # fmt: skip
    add_config_arguments(parser.add_argument_group("run"), RunConfig)
    add_config_arguments(parser.add_argument_group("outputs"), EvalOutputs)


def run(args: argparse.Namespace) -> int:
    try:
        edge_spec, server_spec, data, run_config = pair_specs(args)
        chosen = edge_choices(args)
        outputs = EvalOutputs(**given_values(EvalOutputs, args))
        check_output_file(outputs.results_file)
        check_output_file(outputs.per_image)
        budget_flags = given_values(BudgetConfig, args)
        budget = BudgetConfig(**budget_flags)
        stream = ClientConfig(**{k: v for k, v in given_values(ClientConfig, args).items()
                                 if k in STREAM_FIELDS})  # fmt: skip
        if not budget.held and (budget_flags or stream != ClientConfig()):
            raise UsageError("--frontier, --images-per-second and --codec go with "
                             "--budget-bps or --budget-cost")  # fmt: skip
        if budget.budget_bps is not None and stream.images_per_second is None:
            raise UsageError("--budget-bps offline needs the images' pace: "
                             "--images-per-second N")  # fmt: skip
        check_input_file(budget.frontier, "frontier")
        from collabvit.research.distributed import Processes

        with Processes(run_config.device) as processes:
            if budget.held and processes.distributed:
                raise UsageError("a budget follows the images in order: run it in one "
                                 "process, not under torchrun")  # fmt: skip
            run_config = replace(run_config, device=processes.device)
            return _evaluate(edge_spec, server_spec, data, run_config, chosen, outputs,
                             processes, budget, stream)  # fmt: skip
    except (UsageError, ValueError, OSError) as error:  # ModelError, DataError: ValueErrors
        return fail("eval", error)


def _evaluate(edge_spec, server_spec, data, run_config, chosen, outputs, processes, budget,
              stream) -> int:  # fmt: skip
    """`collabvit eval` in this process: its shard under torchrun, else every image."""
    from collabvit.algo.metrics import format_summary
    from collabvit.lite.budget import BudgetHeld, budget_controller, last_point
    from collabvit.lite.client import offload_bytes
    from collabvit.lite.protocol import WireGeometry
    from collabvit.lite.summary import provenance
    from collabvit.models.zoo import shipped_frontier
    from collabvit.research.distributed import shard_block
    from collabvit.research.evaluate import evaluate, merge_results, write_per_image, write_results

    main = processes.is_main
    pair = load_pair("eval", edge_spec, server_spec, data, run_config, warn_user=main)
    config = replace(pair.default_config(), **chosen)
    edge, server = pair.edge(config), pair.server()
    span = processes.span(len(pair.dataset), shard_block(data.batch_size))
    loader = pair.loader(span)
    controller, send_bytes = None, None
    if budget.held:
        controller = budget_controller(budget, config, server_spec.name,
                                       shipped_frontier(edge_spec.name, edge_spec.weights))
        send_bytes = offload_bytes(stream, server_spec.name, WireGeometry.of(edge.geometry),
                                   edge.geometry.num_classes)  # fmt: skip
    result = evaluate(
        edge, server, loader, seed=run_config.seed,
        progress=progress(run_config) if main else False,
        keep_records=outputs.per_image is not None, total=len(loader),
        expected_images=len(span), controller=controller,
        images_per_second=stream.images_per_second, send_bytes=send_bytes,
    )  # fmt: skip
    if processes.distributed:
        result = merge_results(processes.gather(result))
    if not main:  # rank 0 prints and writes for all
        return 0
    shown = config if controller is None else last_point(config, controller)
    print(format_summary(result.summary, shown.masking_mode, shown.masking_th,
                         shown.uncer_mode, shown.uncer_th))  # fmt: skip
    held = None
    if controller is not None:
        rate = result.wire_bytes / result.seconds if result.seconds else 0.0
        held = BudgetHeld.of(budget, controller, result.summary.comm_cost,
                             result.summary.images, result.withheld, rate, result.seconds)
        print(held.text())
    if result.skipped:
        warn("eval", f"skipped {result.skipped} unreadable images")
    if outputs.results_file:
        made = provenance("eval", edge_model=edge_spec, server_model=server_spec, data=data,
                          edge=config, run=run_config, budget=budget, stream=stream)
        made["processes"] = processes.world_size
        extra = {} if held is None else {"budget": held.as_dict()}
        write_results(outputs.results_file, result.summary, made,
                      skipped_images=result.skipped, **extra)  # fmt: skip
    if outputs.per_image:
        write_per_image(outputs.per_image, result.records)
    return 0
