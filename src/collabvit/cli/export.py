"""`collabvit export`: the edge's whole decision as one ONNX graph (and its int8 twin) with the
card a device needs, for `collabvit edge --onnx` without torch."""

from __future__ import annotations

import argparse
from dataclasses import replace

from collabvit.cli.common import UsageError, check_output_dir, edge_choices, fail, model_specs
from collabvit.cli.flags import EDGE_FLAGS, SERVER_FLAGS, add_config_arguments, given_values
from collabvit.config import DataSpec, ExportConfig, ModelSpec
from collabvit.lite.specs import EdgeConfig

SUMMARY = "write the edge (and its operating point) as one ONNX file for devices without torch"
DESCRIPTION = (
    "Export the edge's whole decision as one ONNX graph: uint8 images in; logits, patch "
    "scores, uncertainty, the gate and the kept patches out, with the thresholds as graph "
    "inputs. Beside it edge.json holds the geometry, normalisation, class names, policy "
    "and operating point. `collabvit edge --onnx DIR` runs it with ONNX Runtime "
    "alone.")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser.add_argument_group("edge model"), ModelSpec, EDGE_FLAGS)
    add_config_arguments(parser.add_argument_group("served model"), ModelSpec, SERVER_FLAGS,
                         exclude=("weights", "kwargs", "use_ema"))  # fmt: skip
    add_config_arguments(parser.add_argument_group("data (class names, int8 calibration)"),
                         DataSpec, exclude=("limit", "batch_size", "num_workers",
                                            "skip_unreadable"), split="val")  # fmt: skip
    add_config_arguments(parser.add_argument_group("policy and default operating point"),
                         EdgeConfig)  # fmt: skip
    add_config_arguments(parser.add_argument_group("output"), ExportConfig)


def run(args: argparse.Namespace) -> int:
    try:
        # the int8 calibration reads held-out images: the validation split unless told
        data = DataSpec(**{"split": "val", **given_values(DataSpec, args)})
        edge_spec, server_spec = model_specs(args, data)
        chosen = edge_choices(args)
        export = ExportConfig(**given_values(ExportConfig, args))
        if data.inputs_normalized:
            raise UsageError("the exported edge takes uint8 images and normalises them itself: "
                             "--inputs-normalized does not apply")  # fmt: skip
        from collabvit.lite.onnx_edge import CARD_FILE, GRAPH_FILE, INT8_FILE

        out_dir = check_output_dir(export.out_dir, (GRAPH_FILE, CARD_FILE, INT8_FILE))
        from collabvit.lite.summary import provenance
        from collabvit.models.export import export_edge, quantize_edge, uint8_images
        from collabvit.models.pair import load_pair
        from collabvit.models.zoo import shipped_frontier

        pair = load_pair(edge_spec, server_spec, data, with_server=False)
        config = replace(pair.default_config(), **chosen)
        made = provenance("export", edge_model=edge_spec, server_model=server_spec, data=data,
                          edge=config, export=export)  # fmt: skip
        exported = export_edge(pair.edge_model, config, out_dir,
                               class_names=pair.class_names(), name=edge_spec.name,
                               server_model=server_spec.name, provenance=made,
                               frontier=shipped_frontier(edge_spec.name, edge_spec.weights))
        if export.int8:
            images = uint8_images(pair.dataset, export.calibration_images)
            exported = quantize_edge(exported, images, f"{data.data_set} --split {data.split}, "
                                     f"the first {len(images)} images")  # fmt: skip
    except (UsageError, ValueError, OSError) as error:
        return fail("export", error)
    for graph in [exported.graph] + ([out_dir / INT8_FILE] if export.int8 else []):
        print(f"wrote {graph} ({graph.stat().st_size / 1e6:.1f} MB, opset "
              f"{exported.contents['opset']})")  # fmt: skip
    print(f"wrote {exported.card}: policy {config.masking_mode} ({config.attention_mode} "
          f"attention), gate {config.uncer_mode}; default point masking_th {config.masking_th}, "
          f"uncer_th {config.uncer_th} (graph inputs: change them at run time)")
    return 0
