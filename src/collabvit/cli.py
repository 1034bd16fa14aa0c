"""The `collabvit` command: parse flags into the config dataclasses, call the library, print.

Flags are generated from config.py's fields (flags.py): kebab-case, plus the
reference implementation's snake_case spellings (``--masking_mode``,
``--uncer_th``, ``--data_path``). User mistakes exit with status 2 and one
line on stderr, never a traceback. torch, timm and matplotlib are imported
only when a command runs, so help and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from collabvit import __version__
from collabvit.config import (
    DataSpec,
    EvalOutputs,
    ExportConfig,
    ModelSpec,
    ReproduceConfig,
    RunConfig,
    ServeConfig,
    SweepConfig,
    VisualizeConfig,
)
from collabvit.flags import EDGE_FLAGS, SERVER_FLAGS, add_config_arguments, given_values
from collabvit.lite.config import TOKEN_ENV, BudgetConfig, ClientConfig, EdgeRuntime, LinkConfig
from collabvit.lite.specs import EdgeConfig, shipped_pair

TRAIN_FLAGS = {"augment": "--no-augment"}
# What `pip install 'collabvit[full]'` adds to the torch-free base install.
FULL_INSTALL = ("torch", "torchvision", "timm", "safetensors", "matplotlib", "fastapi", "uvicorn",
                "prometheus_client", "onnx", "onnxscript")  # fmt: skip


class UsageError(Exception):
    """A user mistake found after parsing; reported in one line with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------ flags


def _add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """Which models, which images: the flags of every command that runs the pair."""
    add_config_arguments(parser.add_argument_group("edge model"), ModelSpec, EDGE_FLAGS)
    add_config_arguments(parser.add_argument_group("server model"), ModelSpec, SERVER_FLAGS)
    add_config_arguments(parser.add_argument_group("data"), DataSpec)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pair_arguments(parser)
    add_config_arguments(parser.add_argument_group("collaborative inference"), EdgeConfig)
    budget = parser.add_argument_group("budget (an operating point held along the frontier, "
                                       "offline)")  # fmt: skip
    add_config_arguments(budget, BudgetConfig, exclude=("latency_target",))
    add_config_arguments(budget, ClientConfig, exclude=tuple(
        f.name for f in fields(ClientConfig) if f.name not in EVAL_STREAM_FIELDS))  # fmt: skip
    add_config_arguments(parser.add_argument_group("run"), RunConfig)
    add_config_arguments(parser.add_argument_group("outputs"), EvalOutputs)


# what an offline bytes budget needs of the edge's stream: the images' pace and the codec
EVAL_STREAM_FIELDS = ("images_per_second", "codec")


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pair_arguments(parser)
    add_config_arguments(parser.add_argument_group("grid, report and budget"), SweepConfig)
    add_config_arguments(parser.add_argument_group("run"), RunConfig)


def _add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pair_arguments(parser)
    add_config_arguments(parser.add_argument_group("selection and gate"), EdgeConfig)
    add_config_arguments(parser.add_argument_group("what to draw"), VisualizeConfig)
    add_config_arguments(parser.add_argument_group("run"), RunConfig)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("served model")
    add_config_arguments(model, ModelSpec, SERVER_FLAGS)
    add_config_arguments(model, ServeConfig, exclude=SERVE_FIELDS)
    add_config_arguments(parser.add_argument_group("service"), ServeConfig,
                         exclude=("data_set",))  # fmt: skip


# ServeConfig's fields but --data-set, which names the served model
SERVE_FIELDS = tuple(f.name for f in fields(ServeConfig) if f.name != "data_set")


def _add_edge_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser.add_argument_group("edge model"), ModelSpec, EDGE_FLAGS)
    add_config_arguments(parser.add_argument_group("served model"), ModelSpec, SERVER_FLAGS,
                         exclude=("weights", "kwargs", "use_ema"))  # fmt: skip
    add_config_arguments(parser.add_argument_group("data (class names, int8 calibration)"),
                         DataSpec, exclude=("limit", "batch_size", "num_workers",
                                            "skip_unreadable"), split="val")  # fmt: skip
    add_config_arguments(parser.add_argument_group("policy and default operating point"),
                         EdgeConfig)  # fmt: skip
    add_config_arguments(parser.add_argument_group("output"), ExportConfig)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from collabvit.config import TrainConfig, TrainRun

    add_config_arguments(parser.add_argument_group("recipe"), TrainConfig, TRAIN_FLAGS)
    add_config_arguments(parser.add_argument_group("run"), TrainRun)


def _add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """The paper's models, data set, crop and operating point are fixed: only the weights
    files, the images' folder, how to run and what to write can be given."""

    weights = parser.add_argument_group("the paper's weights (default: timm's hub)")
    only_weights = tuple(f.name for f in fields(ModelSpec) if f.name != "weights")
    add_config_arguments(weights, ModelSpec, EDGE_FLAGS, exclude=only_weights)
    add_config_arguments(weights, ModelSpec, SERVER_FLAGS, exclude=only_weights)
    images = parser.add_argument_group("ImageNet val")
    add_config_arguments(images, ReproduceConfig, exclude=REPRODUCE_RUN_FIELDS)
    add_config_arguments(images, DataSpec, exclude=("data_set", "data_path", "split", "crop_pct",
                                                    "clutter", "inputs_normalized"))  # fmt: skip
    add_config_arguments(parser.add_argument_group("run"), RunConfig)
    outputs = parser.add_argument_group("outputs and saved progress")
    add_config_arguments(outputs, EvalOutputs, exclude=("per_image",))
    add_config_arguments(outputs, ReproduceConfig, exclude=("data_path",))


# ReproduceConfig's fields but --data-path: what the run saves and draws
REPRODUCE_RUN_FIELDS = tuple(f.name for f in fields(ReproduceConfig) if f.name != "data_path")


# ------------------------------------------------------------------ helpers


def _fail(command: str, error: BaseException) -> int:
    print(f"collabvit {command}: error: {error}", file=sys.stderr)
    return 2


def _warn(command: str, message: str) -> None:
    print(f"collabvit {command}: warning: {message}", file=sys.stderr)


def _progress(run: RunConfig) -> bool | None:
    return False if run.quiet else None


def _check_output_file(path: str | None) -> None:
    """An output file must be writable before any work starts (its folder is created)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the folder of {path}: {error.strerror or error}") \
            from error  # fmt: skip
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target,
                                                                                   os.W_OK)):
        raise UsageError(f"{path} is not writable")


def _check_output_dir(path: str, files: Sequence[str] = ()) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the folder {path}: {error.strerror or error}") from error
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path} is not writable")
    for name in files:
        if (folder / name).exists() and not (folder / name).is_file():
            raise UsageError(f"{folder / name} exists and is not a file")
    return folder


def _model_specs(args: argparse.Namespace, data: DataSpec) -> tuple[ModelSpec, ModelSpec]:
    """The edge's and the server's specs; a model not named is the data set's shipped one."""
    edge_name, server_name = shipped_pair(data.data_set)
    edge = {"name": edge_name, **given_values(ModelSpec, args, EDGE_FLAGS)}
    server = {"name": server_name, **given_values(ModelSpec, args, SERVER_FLAGS)}
    return ModelSpec(**edge), ModelSpec(**server)


def _specs(args: argparse.Namespace) -> tuple[ModelSpec, ModelSpec, DataSpec, RunConfig]:
    data = DataSpec(**given_values(DataSpec, args))
    return (*_model_specs(args, data), data, RunConfig(**given_values(RunConfig, args)))


def _load_pair(command: str, edge: ModelSpec, server: ModelSpec, data: DataSpec, run: RunConfig,
               warn: bool = True):  # fmt: skip
    from collabvit.models.pair import load_pair

    pair = load_pair(edge, server, data, run.device)
    for note in pair.warnings if warn else ():
        _warn(command, note)
    return pair


def _provenance(command: str, **configs) -> dict:
    """How the numbers were made: every resolved config (asdict), the versions and the time."""
    from collabvit import versions

    def public(config) -> dict:  # a bearer token never goes into a file
        values = asdict(config)
        if values.get("token"):
            values["token"] = "<set>"
        return values

    return {
        "command": command,
        **{name: public(config) for name, config in configs.items()},
        **versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------ commands


def run_eval(args: argparse.Namespace) -> int:
    try:
        edge_spec, server_spec, data, run = _specs(args)
        chosen = given_values(EdgeConfig, args)
        EdgeConfig(**chosen)  # a bad value fails before any model loads
        outputs = EvalOutputs(**given_values(EvalOutputs, args))
        _check_output_file(outputs.results_file)
        _check_output_file(outputs.per_image)
        budget_flags = given_values(BudgetConfig, args)
        budget = BudgetConfig(**budget_flags)
        stream = {k: v for k, v in given_values(ClientConfig, args).items()
                  if k in EVAL_STREAM_FIELDS}  # fmt: skip
        stream = ClientConfig(**stream)
        if not budget.held and (budget_flags or stream != ClientConfig()):
            raise UsageError("--frontier, --images-per-second and --codec go with "
                             "--budget-bps or --budget-cost")  # fmt: skip
        if budget.budget_bps is not None and stream.images_per_second is None:
            raise UsageError("--budget-bps offline needs the images' pace: "
                             "--images-per-second N")  # fmt: skip
        _check_input_file(budget.frontier, "frontier")
        from collabvit.research.distributed import Processes

        with Processes(run.device) as processes:
            if budget.held and processes.distributed:
                raise UsageError("a budget follows the images in order: run it in one "
                                 "process, not under torchrun")  # fmt: skip
            run = replace(run, device=processes.device)
            return _eval(edge_spec, server_spec, data, run, chosen, outputs, processes,
                         budget, stream)  # fmt: skip
    except (UsageError, ValueError, OSError) as error:  # ModelError, DataError: ValueErrors
        return _fail("eval", error)


def _eval(edge_spec, server_spec, data, run, chosen, outputs, processes, budget,
          stream) -> int:  # fmt: skip
    """`collabvit eval` in this process: its shard under torchrun, else every image."""
    from collabvit.algo.metrics import format_summary
    from collabvit.research.distributed import shard_block
    from collabvit.research.evaluate import evaluate, merge_results, write_per_image, write_results

    main = processes.is_main
    pair = _load_pair("eval", edge_spec, server_spec, data, run, warn=main)
    config = replace(pair.default_config(), **chosen)
    edge, server = pair.edge(config), pair.server()
    span = processes.span(len(pair.dataset), shard_block(data.batch_size))
    loader = pair.loader(span)
    controller, send_bytes = None, None
    if budget.held:
        names = {"server_model": server_spec.name, "frontier": shipped_frontier(edge_spec)}
        controller = _controller(budget, config, names)
        from collabvit.lite.client import offload_bytes
        from collabvit.lite.protocol import WireGeometry

        send_bytes = offload_bytes(stream, server_spec.name, WireGeometry.of(edge.geometry),
                                   edge.geometry.num_classes)  # fmt: skip
    result = evaluate(
        edge, server, loader, seed=run.seed, progress=_progress(run) if main else False,
        keep_records=outputs.per_image is not None, total=len(loader),
        expected_images=len(span), controller=controller,
        images_per_second=stream.images_per_second, send_bytes=send_bytes,
    )  # fmt: skip
    if processes.distributed:
        result = merge_results(processes.gather(result))
    if not main:  # rank 0 prints and writes for all
        return 0
    shown = config if controller is None else _last_point(config, controller)
    print(format_summary(result.summary, shown.masking_mode, shown.masking_th,
                         shown.uncer_mode, shown.uncer_th))  # fmt: skip
    rate = result.wire_bytes / result.seconds if result.seconds else 0.0
    if controller is not None:
        print(_budget_text(budget, controller, result.summary, result.withheld, rate,
                           result.seconds))  # fmt: skip
    if result.skipped:
        _warn("eval", f"skipped {result.skipped} unreadable images")
    if outputs.results_file:
        provenance = _provenance("eval", edge_model=edge_spec, server_model=server_spec,
                                 data=data, edge=config, run=run, budget=budget,
                                 stream=stream)  # fmt: skip
        provenance["processes"] = processes.world_size
        held = {} if controller is None else {"budget": _budget_record(
            controller, result.summary, result.withheld, rate, result.seconds)}  # fmt: skip
        write_results(outputs.results_file, result.summary, provenance,
                      skipped_images=result.skipped, **held)  # fmt: skip
    if outputs.per_image:
        write_per_image(outputs.per_image, result.records)
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    from collabvit.research import reproduce

    settings = None
    try:
        settings = ReproduceConfig(**given_values(ReproduceConfig, args))
        outputs = EvalOutputs(**given_values(EvalOutputs, args))
        run = RunConfig(**given_values(RunConfig, args))
        reading = {k: v for k, v in given_values(DataSpec, args).items() if k != "data_path"}
        data = reproduce.paper_data(settings.data_path, **reading)
        edge_spec, server_spec = reproduce.PAPER.model_specs(
            given_values(ModelSpec, args, EDGE_FLAGS).get("weights"),
            given_values(ModelSpec, args, SERVER_FLAGS).get("weights"))  # fmt: skip
        config = reproduce.PAPER.edge_config()
        _check_output_file(outputs.results_file)
        _check_output_file(settings.state_file)
        if settings.sweep:
            from collabvit.research.sweep import OUTPUT_FILES

            _check_output_dir(settings.sweep, (*OUTPUT_FILES, "frontier.png", "frontier.svg"))
        left = None if settings.resume else reproduce.unfinished(settings.state_file)
        if left:
            raise UsageError(f"{settings.state_file} holds an unfinished run ({left[0]:,} of "
                             f"{left[1]:,} images): pass --resume to continue it, or another "
                             "--state-file")  # fmt: skip
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("reproduce runs in one process, not under torchrun")
        for spec in (edge_spec, server_spec):
            _check_input_file(spec.weights, "weights file")
        problem = reproduce.missing_weights(edge_spec, server_spec)
        if problem:
            raise UsageError(problem)
        identity = reproduce.run_identity(edge_spec, server_spec, data, config, run.seed)
        if settings.resume:  # a state from other settings is refused before any model loads
            reproduce.load_state(settings.state_file, identity)
        pair = _load_pair("reproduce", edge_spec, server_spec, data, run)
        result = reproduce.run(pair, config, settings.state_file, identity, settings.resume,
                               settings.chunk_images, run.seed, _progress(run))  # fmt: skip
        summary = result.summary
        from collabvit.algo.metrics import format_summary

        print(format_summary(summary, config.masking_mode, config.masking_th, config.uncer_mode,
                             config.uncer_th))  # fmt: skip
        rows = reproduce.compare(summary)
        print(reproduce.format_comparison(rows, summary.images))
        if result.skipped:
            _warn("reproduce", f"skipped {result.skipped} unreadable images")
        provenance = _provenance("reproduce", edge_model=edge_spec, server_model=server_spec,
                                 data=data, edge=config, run=run, reproduce=settings)  # fmt: skip
        provenance["weights_sha256"] = {role: identity[f"{role}_model"]["sha256"]
                                        for role in ("edge", "server")}  # fmt: skip
        extra = {"skipped_images": result.skipped, "published": asdict(reproduce.PAPER),
                 "comparison": [row.as_dict() for row in rows]}  # fmt: skip
        if settings.sweep:
            report, sweep_config, figures = reproduce.sweep_frontier(
                pair, settings.sweep, provenance, run.seed, _progress(run))  # fmt: skip
            _print_sweep(report, sweep_config, Path(settings.sweep))
            print(f"frontier with the paper's point: {figures[0]}")
            extra["sweep"] = {"out_dir": settings.sweep, "figures": [str(p) for p in figures],
                              "published_point": asdict(reproduce.reference_point())}
        if outputs.results_file:
            from collabvit.research.evaluate import write_results

            write_results(outputs.results_file, summary, provenance, **extra)
    except KeyboardInterrupt:
        left = reproduce.unfinished(settings.state_file) if settings else None
        where = (f" after {left[0]:,} of {left[1]:,} images; --resume continues from "
                 f"{settings.state_file}" if left else "")  # fmt: skip
        print(f"collabvit reproduce: interrupted{where}", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as error:  # ModelError, DataError, StateError
        return _fail("reproduce", error)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    try:
        edge_spec, server_spec, data, run = _specs(args)
        config = SweepConfig(**given_values(SweepConfig, args))
        from collabvit.research import sweep

        out_dir = _check_output_dir(config.out_dir, sweep.OUTPUT_FILES)
        from collabvit.research.distributed import Processes

        with Processes(run.device) as processes:
            run = replace(run, device=processes.device)
            main = processes.is_main
            pair = _load_pair("sweep", edge_spec, server_spec, data, run, warn=main)
            report = sweep.run(pair, config, seed=run.seed,
                               progress=_progress(run) if main else False,
                               processes=processes)  # fmt: skip
        if not main:  # rank 0 prints and writes for all
            return 0
        _print_sweep(report, config, out_dir)
        named = {"fmnist": "Fashion-MNIST", "fmnist-cluttered": "cluttered Fashion-MNIST"}
        title = f"{report.images} images" + (
            f" of {named[data.data_set]} {data.split}" if data.data_set in named else ""
        ) + "".join(f", {name} {value}" for name, value in data.clutter.items())
        provenance = _provenance("sweep", edge_model=edge_spec, server_model=server_spec,
                                 data=data, sweep=config, run=run)  # fmt: skip
        provenance["processes"] = processes.world_size
        pick_label = "budget pick" if config.budget is not None else "target pick"
        written = sweep.write_report(report, out_dir, provenance,
                                     None if config.no_plots else title, pick_label)  # fmt: skip
        if not config.no_plots:
            print(f"frontier: {written[3]}")
    except (UsageError, ValueError, OSError) as error:
        return _fail("sweep", error)
    return 0


def _print_sweep(report, config: SweepConfig, out_dir: Path) -> None:
    """The sweep's findings for people: reference accuracies, the table, picks, temperatures."""
    server = (f" | server alone (all patches): {report.server_acc:.2f} %"
              if report.server_acc is not None else "")  # fmt: skip
    print(f"edge alone: {report.edge_acc:.2f} %{server}")
    pareto = sum(p.pareto for p in report.points)
    print(f"{len(report.points)} operating points, {pareto} Pareto-optimal: "
          f"{out_dir / 'points.csv'}")  # fmt: skip
    width = max(len(name) for name in report.comparison)
    print("best collaborative accuracy (%) at communication cost <=")
    print(" " * width + "".join(f"{c:>9}" for c in config.compare_at))
    for name, row in report.comparison.items():
        cells = "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in row.values())
        print(f"{name:<{width}}{cells}")
    goal = (f"budget {config.budget}" if config.budget is not None
            else f"target {config.target_acc} %")  # fmt: skip
    for key, chosen in report.picks.items():
        if chosen is None:
            print(f"{goal} ({key}): no operating point qualifies on the calibration part")
            continue
        cal, held = chosen.subsets["calibration"], chosen.subsets["held_out"]
        print(f"{goal} ({key}): {chosen.attention_mode} {chosen.policy} {chosen.threshold}, "
              f"{chosen.measure} eta {chosen.eta:.4g} -> calibration {cal.collab_acc:.2f} % at "
              f"cost {cal.comm_cost:.3f}; held-out {held.collab_acc:.2f} % at cost "
              f"{held.comm_cost:.3f}")  # fmt: skip
    for mode, fit in report.temperatures.items():
        print(f"temperature ({mode}): T = {fit.temperature:.3f}; held-out expected calibration "
              f"error {fit.held_out_ece_before:.2f} % -> {fit.held_out_ece_after:.2f} %")


def run_visualize(args: argparse.Namespace) -> int:
    try:
        edge_spec, server_spec, data, run = _specs(args)
        chosen = given_values(EdgeConfig, args)
        EdgeConfig(**chosen)
        views = VisualizeConfig(**given_values(VisualizeConfig, args))
        out_dir = _check_output_dir(views.output_dir)
        pair = _load_pair("visualize", edge_spec, server_spec, data, run)
        for index in views.indices:
            if not 0 <= index < len(pair.dataset):
                last = len(pair.dataset) - 1
                raise UsageError(f"index {index} is outside the dataset (0..{last})")
        config = replace(pair.default_config(), **chosen)
        from collabvit.research.visualize import draw_attention_histogram, draw_images

        for line in draw_images(pair, config, views, out_dir, run.seed):
            print(line)
        if views.attention_histogram:
            print(draw_attention_histogram(pair, config, views, out_dir, _progress(run)))
    except (UsageError, ValueError, OSError) as error:
        return _fail("visualize", error)
    return 0


def _token(given: str | None) -> str | None:
    """The bearer token: the flag's, else the environment's (an empty one means none)."""
    return given if given is not None else (os.environ.get(TOKEN_ENV) or None)


def _check_input_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist")


def run_serve(args: argparse.Namespace) -> int:
    try:
        values = given_values(ServeConfig, args)
        config = ServeConfig(**{**values, "token": _token(values.get("token"))})
        given = given_values(ModelSpec, args, SERVER_FLAGS)
        spec = ModelSpec(**{**given, "name": config.served_model(given.get("name"))})
        _check_input_file(config.ssl_certfile, "certificate")
        _check_input_file(config.ssl_keyfile, "key file")
        if config.ssl_certfile:  # ssl.SSLError is an OSError: one line, before the model loads
            import ssl

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    config.ssl_certfile, config.ssl_keyfile)
            except ssl.SSLError as error:  # OpenSSL's "PEM lib" says nothing to a user
                detail = f" ({error.reason})" if error.reason and "PEM" not in error.reason \
                    else ""  # fmt: skip
                raise UsageError(f"cannot use {config.ssl_certfile} with the key "
                                 f"{config.ssl_keyfile}{detail}: give the certificate to "
                                 "--ssl-certfile and its private key to --ssl-keyfile, both "
                                 "PEM") from None  # fmt: skip
        from collabvit.models.pair import load_model, resolve_device
        from collabvit.serve.app import serve
        from collabvit.serve.settings import ServiceSettings

        _check_port_free(config.host, config.port)
        device = resolve_device(config.device)
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        model = load_model(spec, server=True)  # a user mistake stops here, before listening
        if config.bf16:
            from collabvit import cpu_model

            if device.type == "cpu" and not any(f in cpu_model() for f in ("avx512_bf16",
                                                                            "amx_bf16")):
                _warn("serve", f"--bf16 on a CPU without AVX512-BF16 or AMX ({cpu_model()}) "
                      "is emulated and slower than float32")  # fmt: skip
            model = model.to(torch.bfloat16)
    except (UsageError, ValueError, OSError) as error:
        return _fail("serve", error)
    from collabvit.models.server import Server

    def load_server() -> Server:
        return Server(model, device, max_batch=config.max_batch)

    from collabvit.lite.config import is_loopback
    from collabvit.serve.settings import default_allowed_hosts

    hosts = config.allowed_hosts or default_allowed_hosts(config.host)
    settings = ServiceSettings(
        model_name=spec.name, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
        max_request_bytes=config.max_request_bytes,
        max_request_images=config.max_request_images,
        max_queue_images=config.max_queue_images,
        max_queue_bytes=int(config.max_queue_mb * 2**20), body_timeout=config.timeout_body,
        parse_processes=config.parse_processes, max_requests_in_flight=config.limit_concurrency,
        allowed_hosts=None if "*" in hosts else hosts, token=config.token,
    )  # fmt: skip
    scheme = "https" if config.ssl_certfile else "http"
    if config.token and scheme == "http":
        _warn("serve", "the token travels in clear text over HTTP: serve HTTPS "
              "(--ssl-certfile, --ssl-keyfile) or put a TLS proxy in front")  # fmt: skip
    if not config.token and not is_loopback(config.host):
        _warn("serve", f"listening on {config.host} without a token: anyone who reaches this "
              "port can use the model (--token or $COLLABVIT_TOKEN)")  # fmt: skip
    print(f"collabvit serve: {spec.name} at {scheme}://{config.host}:{config.port}"
          f"/v2/models/{spec.name} (auth {'on' if config.token else 'off'}, max batch "
          f"{config.max_batch}, max delay {config.max_delay_ms} ms, hosts "
          f"{'any' if settings.allowed_hosts is None else ' '.join(hosts)})", file=sys.stderr,
          flush=True)  # fmt: skip
    worker = {"model": asdict(spec), "device": config.device, "threads": config.threads,
              "bf16": config.bf16}  # what each of --workers processes loads itself
    serve(settings, load_server, config.host, config.port, config.ssl_certfile,
          config.ssl_keyfile, config.access_log, max_connections=config.max_connections,
          timeout_keep_alive=config.timeout_keep_alive,
          timeout_request_head=config.timeout_request_head, workers=config.workers,
          worker=worker)  # fmt: skip
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A clear error for a port in use, before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UsageError(f"cannot listen on {host}: {error.strerror}") from error
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}") from error


def run_edge(args: argparse.Namespace) -> int:
    import asyncio

    try:
        data = DataSpec(**given_values(DataSpec, args))
        run = RunConfig(**given_values(RunConfig, args))
        chosen = given_values(EdgeConfig, args)
        EdgeConfig(**chosen)
        values = given_values(ClientConfig, args)
        client = ClientConfig(**{**values, "token": _token(values.get("token"))})
        if client.token_in_clear:
            _warn("edge", f"the token travels in clear text over HTTP to {client.server}: "
                  "serve HTTPS and use an https:// URL")  # fmt: skip
        link = LinkConfig(**given_values(LinkConfig, args))
        runtime = EdgeRuntime(**given_values(EdgeRuntime, args))
        budget_flags = given_values(BudgetConfig, args)
        budget = BudgetConfig(**budget_flags)
        if not budget.held and budget_flags:
            raise UsageError("--frontier and --latency-target go with --budget-bps or "
                             "--budget-cost")  # fmt: skip
        _check_input_file(budget.frontier, "frontier")
        from collabvit.lite.protocol import Codec

        codec = Codec.parse(client.codec)
        _check_input_file(client.ca_file, "CA certificate")
        _check_output_file(client.records)
        _check_output_file(client.results_file)
        if client.resume and not Path(client.records).is_file():
            raise UsageError(f"--resume: {client.records} does not exist yet")
        served: dict = {}  # the served model's metadata, read once

        def check_server(name: str) -> None:
            """The server, its certificate and the token, before the edge's model loads."""
            from collabvit.lite.client import check_server, tls_verification, wait_until_served

            if client.wait:  # the health checks need no token
                wait_until_served(client.server.rstrip("/"), client.wait,
                                  verify=tls_verification(client.ca_file))
            if not client.allow_edge_only:
                served.update(check_server(client, name))

        if runtime.onnx:
            edge, batches, count, names = _onnx_edge(args, data, chosen, runtime, check_server)
        else:
            if runtime.threads is not None or runtime.int8:
                raise UsageError("--threads and --int8 are ONNX Runtime's: they go with --onnx")
            edge, batches, count, names = _torch_edge(args, data, run, chosen, check_server)
        config = edge.config
        controller = _controller(budget, config, names) if budget.held else None
        from collabvit.lite import client as edge_client
        from collabvit.lite.progress import progress_bar
        from collabvit.lite.summary import format_summary, write_results

        # what decides the answers; batch size, workers and --limit do not (and no --clutter
        # is left out, so that records of the published canvases keep their identity)
        same_answers = {k: v for k, v in asdict(data).items()
                        if k not in ("batch_size", "num_workers", "limit")
                        and not (k == "clutter" and not v)}  # fmt: skip
        identity = edge_client.run_identity(edge_model=names["edge_model"], data=same_answers,
                                            server_model=names["server_model"],
                                            edge=asdict(config), codec=str(codec), seed=run.seed,
                                            loss=link.loss, budget=asdict(budget))  # fmt: skip
        batches = progress_bar(batches, "edge", total=len(batches), unit="batch",
                               enabled=_progress(run))  # fmt: skip
        report = asyncio.run(edge_client.run_edge(edge, batches, client, link,
                                                  names["server_model"], identity,
                                                  seed=run.seed, count=count,
                                                  metadata=served or None,
                                                  controller=controller))  # fmt: skip
        shown = config if controller is None else _last_point(config, controller)
        print(format_summary(report.summary, shown.masking_mode, shown.masking_th,
                             shown.uncer_mode, shown.uncer_th))  # fmt: skip
        print(edge_client.format_report(report))
        if controller is not None:
            print(_budget_text(budget, controller, report.summary, report.withheld,
                               report.wire_bytes_per_second, report.seconds))  # fmt: skip
        skipped = count - report.summary.images
        if skipped:
            _warn("edge", f"{skipped} images have no answer (unreadable, skipped)")
        missed = report.summary.undelivered_images
        if missed:
            _warn("edge", f"{missed} of {report.attempted.sent_images} sent images did not "
                  f"reach the server ({edge_client.fallback_text(report)}); they keep the "
                  "edge's answer")  # fmt: skip
        if client.results_file:
            provenance = _provenance("edge", data=data, edge=config, client=client, link=link,
                                     run=run, runtime=runtime, budget=budget)  # fmt: skip
            provenance.update(edge_model=names["edge_model"], server_model=names["server_model"])
            extra = report.as_dict()
            extra.pop("summary")
            if controller is not None:
                extra["budget"] = _budget_record(controller, report.summary, report.withheld,
                                                 report.wire_bytes_per_second, report.seconds)
            write_results(client.results_file, report.summary, provenance,
                          skipped_images=skipped, **extra)  # fmt: skip
        if report.none_delivered and not client.allow_edge_only:
            print("collabvit edge: error: no image reached the server; the figures above are "
                  "the edge's alone (--allow-edge-only accepts such a run)", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("collabvit edge: interrupted; --resume continues from the records file",
              file=sys.stderr)  # fmt: skip
        return 130
    except (UsageError, ValueError, OSError) as error:  # ClientError is a ValueError
        return _fail("edge", error)
    return 0


def _controller(budget: BudgetConfig, config: EdgeConfig, names: dict):
    """The controller holding `budget` along the frontier of the edge's series."""
    from collabvit.lite.controller import (
        Backpressure,
        BytesController,
        CostController,
        read_frontier,
    )

    mode = config.uncer_mode  # canonical already
    if mode == "none":
        raise UsageError("a budget moves the gate's eta: --uncer-mode none sends every image")
    source = budget.frontier or names.get("frontier")
    if source is None:
        raise UsageError("this edge has no shipped frontier: pass --frontier with the "
                         "frontier.json `collabvit sweep` wrote for this pair")  # fmt: skip
    points = read_frontier(source, config.masking_mode, mode, config.attention_mode,
                           server=names["server_model"])  # fmt: skip
    pressure = Backpressure(latency_target=budget.latency_target)
    if budget.budget_cost is not None:
        return CostController(points, mode, budget.budget_cost, pressure=pressure)
    return BytesController(points, mode, budget.budget_bps, pressure=pressure)


def _last_point(config: EdgeConfig, controller) -> EdgeConfig:
    """The operating point a budget held last (what the summary's first line shows)."""
    delta, eta = controller.operating_point()
    return replace(config, masking_th=delta, uncer_th=config.uncer_th if eta is None else eta)


def _budget_text(budget: BudgetConfig, controller, summary, withheld: int,
                 bytes_per_second: float, seconds: float) -> str:  # fmt: skip
    """What the budget held, for people: what was spent, how far from the budget against
    the tolerance the controller holds, what it withheld and where it ended."""
    point = controller.point
    last = f"last point: {point.masking_th:g} with a send share of {controller.share:.3f}"
    if budget.budget_bps is not None:
        held = (f"Budget {budget.budget_bps:,.0f} B/s: {bytes_per_second:,.0f} B/s on the wire "
                f"over {seconds:.1f} s")  # fmt: skip
    else:
        held = f"Budget cost {budget.budget_cost:g}: communication cost {summary.comm_cost:.4f}"
    outcome = controller.outcome(summary.comm_cost, summary.images, bytes_per_second, seconds)
    return (f"{held}, {outcome.text()}; {withheld} images the gate would send were answered "
            f"at the edge; {last}")  # fmt: skip


def _budget_record(controller, summary, withheld: int, bytes_per_second: float,
                   seconds: float) -> dict:  # fmt: skip
    """What the budget held, for the results file: _budget_text's figures."""
    outcome = controller.outcome(summary.comm_cost, summary.images, bytes_per_second, seconds)
    delta, eta = controller.operating_point()
    return {**outcome.as_dict(), "withheld": withheld,
            "last_point": {"masking_th": delta, "uncer_th": eta, "send_share": controller.share}}


def shipped_frontier(edge: ModelSpec) -> dict | None:
    """The frontier shipped in an edge model's card (None for other weights); which server
    it was swept with, read_frontier checks."""
    from collabvit.models import zoo

    return None if edge.weights is not None else \
        zoo.model_card(edge.name.split(".")[0]).get("frontier")  # fmt: skip


def _torch_edge(args: argparse.Namespace, data: DataSpec, run: RunConfig, chosen: dict,
                check_server) -> tuple:  # fmt: skip
    """The torch edge of `collabvit edge`: (EdgeDevice, batches, image count, names)."""
    edge_spec, server_spec = _model_specs(args, data)
    check_server(server_spec.name)
    from collabvit.models.pair import load_pair

    pair = load_pair(edge_spec, server_spec, data, run.device, with_server=False)
    for note in pair.warnings:
        _warn("edge", note)
    edge = pair.edge(replace(pair.default_config(), **chosen))
    names = {"edge_model": asdict(edge_spec), "server_model": server_spec.name,
             "frontier": shipped_frontier(edge_spec)}  # fmt: skip
    return edge, pair.loader(), len(pair.dataset), names


class _ArrayBatches:
    """(images, labels, indices) numpy batches of in-memory arrays, with a length."""

    def __init__(self, images, labels, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        import numpy as np

        for start in range(0, len(self.labels), self.batch_size):
            stop = min(start + self.batch_size, len(self.labels))
            yield self.images[start:stop], self.labels[start:stop], np.arange(start, stop)


def _onnx_edge(args: argparse.Namespace, data: DataSpec, chosen: dict, runtime: EdgeRuntime,
               check_server) -> tuple:  # fmt: skip
    """The ONNX Runtime edge of `collabvit edge` (no torch): (OnnxEdge, batches, count,
    names)."""
    model_flags = given_values(ModelSpec, args, EDGE_FLAGS)
    if model_flags:
        flags = ", ".join(f"--{EDGE_FLAGS.get(name, name).lstrip('-')}" for name in model_flags)
        raise UsageError(f"--onnx runs an exported edge: {flags} do not apply")
    from collabvit.lite.fashion import read_split_images
    from collabvit.lite.onnx_edge import OnnxEdge

    edge = OnnxEdge(runtime.onnx, chosen.get("masking_th"), chosen.get("uncer_th"),
                    runtime.threads, runtime.int8)  # fmt: skip
    fixed = {name: value for name, value in chosen.items()
             if name not in ("masking_th", "uncer_th") and value != getattr(edge.config, name)}
    if fixed:
        name, value = next(iter(fixed.items()))
        raise UsageError(f"the export in {runtime.onnx} fixes {name} = "
                         f"{getattr(edge.config, name)}; export again for {name} {value}")
    if data.inputs_normalized:
        raise UsageError("the exported edge takes uint8 images: --inputs-normalized does not "
                         "apply")  # fmt: skip
    server = given_values(ModelSpec, args, SERVER_FLAGS).get("name") or edge.card.get(
        "server_model") or shipped_pair(data.data_set)[1]  # fmt: skip
    images, labels = read_split_images(data.data_set, data.data_path, data.split, data.limit,
                                       data.clutter)
    if tuple(images.shape[1:]) != (edge.geometry.in_chans, *edge.geometry.img_size):
        raise UsageError(f"{data.data_set} images are {'x'.join(map(str, images.shape[1:]))} "
                         f"but the exported edge takes "
                         f"{edge.geometry.in_chans}x{edge.geometry.img_size[0]}x"
                         f"{edge.geometry.img_size[1]}")  # fmt: skip
    check_server(server)
    graph = edge.card["int8"] if runtime.int8 else edge.card
    names = {"edge_model": {"onnx": runtime.onnx, "model": edge.card.get("model"),
                            "graph": graph["graph"], "graph_sha256": graph["graph_sha256"]},
             "server_model": server, "frontier": edge.card.get("frontier")}  # fmt: skip
    return edge, _ArrayBatches(images, labels, data.batch_size), len(labels), names


def run_export(args: argparse.Namespace) -> int:
    try:
        # the int8 calibration reads held-out images: the validation split unless told
        data = DataSpec(**{"split": "val", **given_values(DataSpec, args)})
        edge_spec, server_spec = _model_specs(args, data)
        chosen = given_values(EdgeConfig, args)
        EdgeConfig(**chosen)
        export = ExportConfig(**given_values(ExportConfig, args))
        if data.inputs_normalized:
            raise UsageError("the exported edge takes uint8 images and normalises them itself: "
                             "--inputs-normalized does not apply")  # fmt: skip
        from collabvit.lite.onnx_edge import CARD_FILE, GRAPH_FILE, INT8_FILE

        out_dir = _check_output_dir(export.out_dir, (GRAPH_FILE, CARD_FILE, INT8_FILE))
        from collabvit.models.pair import load_pair

        pair = load_pair(edge_spec, server_spec, data, with_server=False)
        config = replace(pair.default_config(), **chosen)
        from collabvit.models.export import export_edge, quantize_edge

        provenance = _provenance("export", edge_model=edge_spec, server_model=server_spec,
                                 data=data, edge=config, export=export)  # fmt: skip
        exported = export_edge(pair.edge_model, config, out_dir,
                               class_names=pair.class_names(), name=edge_spec.name,
                               server_model=server_spec.name, provenance=provenance,
                               frontier=shipped_frontier(edge_spec))
        if export.int8:
            images = _uint8_images(pair.dataset, export.calibration_images)
            exported = quantize_edge(exported, images, f"{data.data_set} --split {data.split}, "
                                     f"the first {len(images)} images")  # fmt: skip
    except (UsageError, ValueError, OSError) as error:
        return _fail("export", error)
    for graph in [exported.graph] + ([out_dir / INT8_FILE] if export.int8 else []):
        print(f"wrote {graph} ({graph.stat().st_size / 1e6:.1f} MB, opset "
              f"{exported.contents['opset']})")  # fmt: skip
    print(f"wrote {exported.card}: policy {config.masking_mode} ({config.attention_mode} "
          f"attention), gate {config.uncer_mode}; default point masking_th {config.masking_th}, "
          f"uncer_th {config.uncer_th} (graph inputs: change them at run time)")
    return 0


def _uint8_images(dataset, count: int):
    """The first `count` images of a dataset as uint8 numpy [n, C, H, W] (floats in [0, 1]
    rounded to 0..255, as a device would hold them)."""
    import numpy as np

    from collabvit.lite.arrays import as_array

    images = [as_array(dataset[i][0]) for i in range(min(count, len(dataset)))]
    stacked = np.stack(images)
    if stacked.dtype != np.uint8:
        stacked = np.clip(np.rint(stacked * 255.0), 0, 255).astype(np.uint8)
    return stacked


def run_train(args: argparse.Namespace) -> int:
    from collabvit.config import TrainConfig, TrainRun

    try:
        config = TrainConfig(**given_values(TrainConfig, args, TRAIN_FLAGS))
        run = TrainRun(**given_values(TrainRun, args))
        from collabvit.research.train import train

        for line in train(config, run):
            print(line, flush=True)
    except (UsageError, ValueError, OSError) as error:
        return _fail("train", error)
    return 0


COMMANDS = {
    "eval": (
        "collaborative evaluation: prints the reference's summary lines",
        "Run edge + server collaborative inference over a dataset and print the reference's "
        "six summary lines, then top-5.",
        _add_eval_arguments, run_eval,
    ),
    "reproduce": (
        "the paper's ImageNet run (DeiT-Tiny edge, DeiT-Base server), compared with its "
        "published figures",
        "Run `collabvit eval` at the paper's setting (deit_tiny_patch16_224 edge, "
        "deit_base_patch16_224 server, ImageNet val with DeiT's crop, attention_sum_threshold "
        "0.97, min_entropy 1.0, mean attention), print its eight lines and each figure beside "
        "the published one. The run saves its progress after every chunk of images; --resume "
        "continues an interrupted one. --sweep DIR also draws the accuracy/cost frontier with "
        "the paper's point.",
        _add_reproduce_arguments, run_reproduce,
    ),
    "train": (
        "train a small ViT on Fashion-MNIST or its cluttered canvases (optionally with token "
        "drop and a teacher)",
        "Train a timm ViT (or the CNN teacher) on Fashion-MNIST or cluttered Fashion-MNIST: "
        "AdamW, cosine schedule with warm-up, label smoothing, augmentation, the fixed "
        "validation split; resumable; deterministic given --seed.",
        _add_train_arguments, run_train,
    ),
    "sweep": (
        "operating points: accuracy against communication cost, the frontier, picking a "
        "point for a budget",
        "Sweep selection thresholds and gate thresholds over a dataset with one edge pass and "
        "one server pass per selection setting; write every point (JSON Lines and CSV) with "
        "the Pareto-optimal ones marked, plot the frontier, and optionally pick a point for a "
        "budget on a calibration part and check it on the held-out part.",
        _add_sweep_arguments, run_sweep,
    ),
    "serve": (
        "serve the server model over HTTP (Open Inference Protocol v2)",
        "Serve the server model with the Open Inference Protocol v2 (REST, binary tensor "
        "extension): health, metadata, infer with dynamic batching, Prometheus /metrics; "
        "optional bearer token and HTTPS. Without arguments it serves the shipped "
        "Fashion-MNIST server on 127.0.0.1:8000; with --data-set fmnist-cluttered, the shipped "
        "cluttered one.",
        _add_serve_arguments, run_serve,
    ),
    "edge": (
        "the edge half of a deployment: classify, offload uncertain images to a server",
        "Run the edge model over a dataset; confident images keep its answer, the others send "
        "their selected patches to `collabvit serve` (retries with back-off; the edge's own "
        "answer when the server is unreachable, slow or refusing). Prints the summary lines, "
        "bytes per image and latency percentiles; per-image results go to a JSON Lines file "
        "that --resume continues.",
        _add_edge_arguments, run_edge,
    ),
    "export": (
        "write the edge (and its operating point) as one ONNX file for devices without torch",
        "Export the edge's whole decision as one ONNX graph: uint8 images in; logits, patch "
        "scores, uncertainty, the gate and the kept patches out, with the thresholds as graph "
        "inputs. Beside it edge.json holds the geometry, normalisation, class names, policy "
        "and operating point. `collabvit edge --onnx DIR` runs it with ONNX Runtime alone.",
        _add_export_arguments, run_export,
    ),
    "visualize": (
        "attention heatmaps, masked images, the attention histogram",
        "Draw what the edge sends: for chosen images the original, the attention heatmap and "
        "the masked image (PNG); and the histogram of patch attention over the dataset (PNG, "
        "SVG, CSV).",
        _add_visualize_arguments, run_visualize,
    ),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="collabvit", description=(
        "Attention-aware collaborative inference between an edge ViT and a server ViT "
        "(Im et al., IEEE IoT Journal 2024)."))  # fmt: skip
    parser.add_argument("--version", action="version", version=f"collabvit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (summary, description, add_arguments, run) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ModuleNotFoundError as error:  # a light install (no torch) running a full command
        missing = (error.name or "").split(".")[0]
        extra = {"onnxruntime": "edge"}.get(missing, "full" if missing in FULL_INSTALL else None)
        if extra is None:
            raise
        print(f"collabvit {args.command}: error: this needs {missing}, which is not installed "
              f"here: pip install 'collabvit[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())
