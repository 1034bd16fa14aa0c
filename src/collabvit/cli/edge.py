"""`collabvit edge`: the edge half of a deployment, with the torch edge or an export run by ONNX
Runtime (no torch); confident images keep its answer, the others go to `collabvit serve`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from collabvit.cli.common import (
    UsageError,
    check_input_file,
    check_output_file,
    edge_choices,
    fail,
    load_pair,
    model_specs,
    progress,
    token,
    warn,
)
from collabvit.cli.flags import EDGE_FLAGS, SERVER_FLAGS, add_config_arguments, given_values
from collabvit.config import DataSpec, ModelSpec, RunConfig
from collabvit.lite.config import BudgetConfig, ClientConfig, EdgeRuntime, LinkConfig
from collabvit.lite.specs import EdgeConfig, shipped_pair

SUMMARY = "the edge half of a deployment: classify, offload uncertain images to a server"
DESCRIPTION = (
    "Run the edge model over a dataset; confident images keep its answer, the others send "
    "their selected patches to `collabvit serve` (retries with back-off; the edge's own "
    "answer when the server is unreachable, slow or refusing). Prints the summary lines, "
    "bytes per image and latency percentiles; per-image results go to a JSON Lines file "
    "that --resume continues.")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser.add_argument_group("edge model"), ModelSpec, EDGE_FLAGS)
    add_config_arguments(parser.add_argument_group("served model"), ModelSpec, SERVER_FLAGS,
                         exclude=("weights", "kwargs", "use_ema"))  # fmt: skip
    add_config_arguments(parser.add_argument_group("data"), DataSpec)
    add_config_arguments(parser.add_argument_group("collaborative inference"), EdgeConfig)
    add_config_arguments(parser.add_argument_group("server connection and outputs"),
                         ClientConfig)  # fmt: skip
    add_config_arguments(parser.add_argument_group("budget (operating point held online)"),
                         BudgetConfig)  # fmt: skip
    add_config_arguments(parser.add_argument_group("emulated link"), LinkConfig)
    add_config_arguments(parser.add_argument_group("edge runtime"), EdgeRuntime)
    add_config_arguments(parser.add_argument_group("run"), RunConfig)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from collabvit.lite import client as edge_client
    from collabvit.lite.budget import BudgetHeld, budget_controller, last_point
    from collabvit.lite.progress import progress_bar
    from collabvit.lite.protocol import Codec
    from collabvit.lite.summary import format_summary, provenance, write_results

    try:
        data = DataSpec(**given_values(DataSpec, args))
        run_config = RunConfig(**given_values(RunConfig, args))
        chosen = edge_choices(args)
        values = given_values(ClientConfig, args)
        client = ClientConfig(**{**values, "token": token(values.get("token"))})
        if client.token_in_clear:
            warn("edge", f"the token travels in clear text over HTTP to {client.server}: "
                 "serve HTTPS and use an https:// URL")  # fmt: skip
        link = LinkConfig(**given_values(LinkConfig, args))
        runtime = EdgeRuntime(**given_values(EdgeRuntime, args))
        budget_flags = given_values(BudgetConfig, args)
        budget = BudgetConfig(**budget_flags)
        if not budget.held and budget_flags:
            raise UsageError("--frontier and --latency-target go with --budget-bps or "
                             "--budget-cost")  # fmt: skip
        check_input_file(budget.frontier, "frontier")
        check_input_file(client.ca_file, "CA certificate")
        check_output_file(client.records)
        check_output_file(client.results_file)
        codec = Codec.parse(client.codec)
        edge_client.check_resumable(Path(client.records), client.resume)
        served: dict = {}  # the served model's metadata, read before the edge's model loads
        make_edge = _onnx_edge if runtime.onnx else _torch_edge
        edge, batches, count, names = make_edge(
            args, data, run_config, chosen, runtime,
            lambda name: served.update(edge_client.reach_server(client, name)))  # fmt: skip
        config = edge.config
        controller = budget_controller(budget, config, names["server_model"],
                                       names["frontier"]) if budget.held else None
        identity = edge_client.run_identity(
            names["edge_model"], names["server_model"], asdict(data), asdict(config),
            str(codec), run_config.seed, link.loss, asdict(budget),
            run_config.precision)  # fmt: skip
        batches = progress_bar(batches, "edge", total=len(batches), unit="batch",
                               enabled=progress(run_config))  # fmt: skip
        report = asyncio.run(edge_client.run_edge(
            edge, batches, client, link, names["server_model"], identity, seed=run_config.seed,
            count=count, metadata=served or None, controller=controller))  # fmt: skip
        shown = config if controller is None else last_point(config, controller)
        print(format_summary(report.summary, shown.masking_mode, shown.masking_th,
                             shown.uncer_mode, shown.uncer_th))  # fmt: skip
        print(edge_client.format_report(report))
        held = None if controller is None else BudgetHeld.of(
            budget, controller, report.summary.comm_cost, report.summary.images,
            report.withheld, report.wire_bytes_per_second, report.seconds)  # fmt: skip
        if held is not None:
            print(held.text())
        skipped = count - report.summary.images
        if skipped:
            warn("edge", f"{skipped} images have no answer (unreadable, skipped)")
        missed = report.summary.undelivered_images
        if missed:
            warn("edge", f"{missed} of {report.attempted.sent_images} sent images did not "
                 f"reach the server ({edge_client.fallback_text(report)}); they keep the "
                 "edge's answer")  # fmt: skip
        if client.results_file:
            made = provenance("edge", data=data, edge=config, client=client, link=link,
                              run=run_config, runtime=runtime, budget=budget)  # fmt: skip
            made.update(edge_model=names["edge_model"], server_model=names["server_model"],
                        server_precision=edge_client.served_precision(served))
            extra = report.as_dict()
            extra.pop("summary")
            if held is not None:
                extra["budget"] = held.as_dict()
            write_results(client.results_file, report.summary, made, skipped_images=skipped,
                          **extra)  # fmt: skip
        if report.none_delivered and not client.allow_edge_only:
            print("collabvit edge: error: no image reached the server; the figures above are "
                  "the edge's alone (--allow-edge-only accepts such a run)", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("collabvit edge: interrupted; --resume continues from the records file",
              file=sys.stderr)  # fmt: skip
        return 130
    except (UsageError, ValueError, OSError) as error:  # ClientError is a ValueError
        return fail("edge", error)
    return 0


def _torch_edge(args: argparse.Namespace, data: DataSpec, run_config: RunConfig, chosen: dict,
                runtime: EdgeRuntime, check_server) -> tuple:  # fmt: skip
    """The torch edge: (EdgeDevice, batches, image count, names)."""
    if runtime.threads is not None or runtime.int8:
        raise UsageError("--threads and --int8 are ONNX Runtime's: they go with --onnx")
    edge_spec, server_spec = model_specs(args, data)
    check_server(server_spec.name)  # before torch loads: a server that is not one fails fast
    from collabvit.models.zoo import shipped_frontier

    pair = load_pair("edge", edge_spec, server_spec, data, run_config, with_server=False)
    edge = pair.edge(replace(pair.default_config(), **chosen))
    names = {"edge_model": asdict(edge_spec), "server_model": server_spec.name,
             "frontier": shipped_frontier(edge_spec.name, edge_spec.weights)}  # fmt: skip
    return edge, pair.loader(), len(pair.dataset), names


def _onnx_edge(args: argparse.Namespace, data: DataSpec, run_config: RunConfig, chosen: dict,
               runtime: EdgeRuntime, check_server) -> tuple:  # fmt: skip
    """The ONNX Runtime edge (no torch): (OnnxEdge, batches, image count, names)."""
    if run_config.precision != "float32":
        raise UsageError("--precision is the torch edge's: an export runs as it was written "
                         "(float32, or its int8 graph with --int8)")  # fmt: skip
    model_flags = given_values(ModelSpec, args, EDGE_FLAGS)
    if model_flags:
        flags = ", ".join(f"--{EDGE_FLAGS.get(name, name).lstrip('-')}" for name in model_flags)
        raise UsageError(f"--onnx runs an exported edge: {flags} do not apply")
    from collabvit.lite.fashion import read_split_images
    from collabvit.lite.onnx_edge import ArrayBatches, OnnxEdge

    edge = OnnxEdge(runtime.onnx, chosen.get("masking_th"), chosen.get("uncer_th"),
                    runtime.threads, runtime.int8)  # fmt: skip
    edge.refuse_changes(chosen)
    if data.inputs_normalized:
        raise UsageError("the exported edge takes uint8 images: --inputs-normalized does not "
                         "apply")  # fmt: skip
    server = given_values(ModelSpec, args, SERVER_FLAGS).get("name") or edge.card.get(
        "server_model") or shipped_pair(data.data_set)[1]  # fmt: skip
    images, labels = read_split_images(data.data_set, data.data_path, data.split, data.limit,
                                       data.clutter)  # fmt: skip
    edge.check_shape(images, data.data_set)
    check_server(server)
    names = {"edge_model": edge.identity(), "server_model": server,
             "frontier": edge.card.get("frontier")}  # fmt: skip
    return edge, ArrayBatches(images, labels, data.batch_size), len(labels), names
