"""The edge as one ONNX graph, for devices without torch (`collabvit export`).

The graph takes uint8 images and computes the whole edge decision: normalisation, the
edge ViT's logits, its patch scores, the uncertainty, the gate and the kept-patch mask.
The thresholds δ (or k) and η are graph inputs, so an operating point changes at run time
without exporting again. The graph is traced from the very functions `EdgeDevice` runs
(vit.forward_with_scores, uncertainty, selection), so there is no second implementation
of the gate or of the selection rules to keep equal. `random` stays torch-only: it is a
baseline, not a deployment policy.

Beside the graph, `edge.json` says what a device needs: geometry, normalisation, class
names, the policy, the operating point and how the file was made (onnx_edge.OnnxEdge runs it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from collabvit.algo.selection import (
    select_attention_sum_threshold,
    select_attention_threshold,
    select_topk,
    selection_statistics,
)
from collabvit.algo.uncertainty import confident_by, uncertainty
from collabvit.lite.arrays import as_array
from collabvit.lite.modes import canonical_uncertainty_mode, validate_masking
from collabvit.lite.onnx_edge import (
    CARD_FILE,
    EXPORT_FORMAT,
    GRAPH_FILE,
    GRAPH_INPUTS,
    GRAPH_OUTPUTS,
    GRAPH_POLICIES,
    INT8_FILE,
)
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit

# Pinned: an export reads the same on every onnxruntime that implements this opset.
OPSET = 18
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
# Significant bits kept of each calibrated activation bound, rounded outward. Float32
# kernels of different CPUs move a min-max bound in its last bits and the int8 scales and
# zero points follow the bounds exactly, so unrounded ranges make the int8 graph depend on
# the machine that calibrates it. 4 bits widen a range by less than 1/8.
RANGE_BITS = 4


class EdgeDecision(torch.nn.Module):
    """The edge's whole decision for a batch, as one module with tensor thresholds.

    forward(images uint8 [B, C, H, W], masking_th float32 [], uncer_th float32 []) ->
    logits [B, classes] float32, scores [B, N] float32, uncertainty [B] float32 (0 for
    'none'), confident [B] bool, keep [B, N] bool, and the selection's size [B] int64,
    smallest score [B] (+inf when empty) and score sum [B]. For `topk`, k = floor(masking_th).
    """

    def __init__(self, model: torch.nn.Module, normalization: vit.Normalization,
                 config: EdgeConfig) -> None:  # fmt: skip
        super().__init__()
        if config.masking_mode not in GRAPH_POLICIES:
            raise ValueError(f"the {config.masking_mode} policy stays in torch (a baseline); "
                             f"export one of {', '.join(GRAPH_POLICIES)}")  # fmt: skip
        vit.check_supported(model)
        self.model = model.eval()
        self.normalization = normalization
        self.attention_mode = config.attention_mode
        self.uncer_mode = canonical_uncertainty_mode(config.uncer_mode)
        self.masking_mode = config.masking_mode

    def forward(self, images: torch.Tensor, masking_th: torch.Tensor,
                uncer_th: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        logits, scores = vit.forward_with_scores(self.model, self.normalization(images),
                                                 self.attention_mode)  # fmt: skip
        if self.uncer_mode == "none":
            measure = torch.zeros_like(logits[:, 0])
            confident = measure != measure  # all False, shaped by the batch
        else:
            measure = uncertainty(logits, self.uncer_mode)
            confident = confident_by(measure, self.uncer_mode, uncer_th)
        if self.masking_mode == "topk":
            keep = select_topk(scores, masking_th.floor())
        elif self.masking_mode == "attention_threshold":
            keep = select_attention_threshold(scores, masking_th)
        else:
            keep = select_attention_sum_threshold(scores, masking_th)
        return (logits, scores, measure, confident, keep, *selection_statistics(scores, keep))


@dataclass(frozen=True)
class ExportedEdge:
    """Where an export went: the graph, its card, and the card's contents."""

    graph: Path
    card: Path
    contents: dict


def export_edge(model: torch.nn.Module, config: EdgeConfig, out_dir: str | Path, *,
                normalization: vit.Normalization | None = None,
                class_names: list[str] | None = None, name: str = "", server_model: str = "",
                provenance: dict | None = None,
                frontier: dict | None = None) -> ExportedEdge:  # fmt: skip
    """Write `model`'s edge decision as out_dir/edge.onnx and its card out_dir/edge.json.

    Args:
        model: a supported timm ViT (float32 after export; half models are cast).
        config: policy, attention mode, measure and the operating point stored as default.
        normalization: the edge's own (default: the model's timm data config).
        class_names: one name per class (default: the class indices).
        name: the model's name, for the card.
        server_model: the name of the server model it sends to (the edge's default).
        provenance: how the model and the export were made (configs, versions).
        frontier: the pair's frontier file (controller.frontier_document), carried in the
            card so that `collabvit edge --onnx DIR --budget-*` finds it.

    Raises ValueError for a policy that cannot go into the graph.
    """
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vit.compute_dtype(model) != torch.float32:  # a copy: the caller's model stays as it is
        model = copy.deepcopy(model).float()
    normalization = normalization or vit.Normalization.of_model(model)
    decision = EdgeDecision(model, normalization, config).eval()
    geometry = vit.geometry(model)
    validate_masking(config.masking_mode, config.masking_th, geometry.num_patches)
    example = (torch.zeros(2, geometry.in_chans, *geometry.img_size, dtype=torch.uint8),
               torch.tensor(float(config.masking_th)), torch.tensor(float(config.uncer_th)))
    batch = torch.export.Dim("batch")
    graph = out / GRAPH_FILE
    torch.onnx.export(decision, example, str(graph), dynamo=True, opset_version=OPSET,
                      input_names=list(GRAPH_INPUTS), output_names=list(GRAPH_OUTPUTS),
                      dynamic_shapes=({0: batch}, {}, {}), external_data=False,
                      verbose=False)  # fmt: skip
    # The exporter annotates every node with the trace's debugging records, Python stack
    # traces included (this install's paths, the tracer's counters): without them an
    # export's bytes depend on the model and the versions alone.
    proto = onnx.load(str(graph))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(graph))
    onnx.checker.check_model(str(graph), full_check=True)
    names = class_names or [str(i) for i in range(geometry.num_classes)]
    contents = {
        "format": EXPORT_FORMAT,
        "graph": GRAPH_FILE,
        "graph_sha256": hashlib.sha256(graph.read_bytes()).hexdigest(),
        "opset": OPSET,
        "model": name,
        "server_model": server_model,
        "inputs": list(GRAPH_INPUTS),
        "outputs": list(GRAPH_OUTPUTS),
        "geometry": {
            "in_chans": geometry.in_chans,
            "img_size": list(geometry.img_size),
            "patch_size": list(geometry.patch_size),
            "grid": list(geometry.grid_size),
            "num_prefix_tokens": geometry.num_prefix_tokens,
            "num_classes": geometry.num_classes,
        },
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "class_names": names,
        "policy": {"masking_mode": config.masking_mode, "attention_mode": config.attention_mode,
                   "uncer_mode": decision.uncer_mode},
        "operating_point": {"masking_th": float(config.masking_th),
                            "uncer_th": float(config.uncer_th)},
        "provenance": provenance or {},
        "frontier": frontier,
    }  # fmt: skip
    card = out / CARD_FILE
    card.write_text(json.dumps(contents, indent=2) + "\n")
    return ExportedEdge(graph, card, contents)


def round_outward(values: np.ndarray, upward: bool, bits: int = RANGE_BITS) -> np.ndarray:
    """Each value rounded to `bits` significant bits, toward +inf (upward) or -inf.

    values float [...] -> float32 [...]: for 2^(e-1) <= |value| < 2^e, the nearest multiple of
    2^(e - bits) on that side (0 stays 0). Such numbers are exact in float32.
    """
    exact = np.asarray(values, dtype=np.float64)
    _, exponent = np.frexp(exact)  # |value| = m · 2^exponent with 0.5 <= m < 1
    step = np.ldexp(1.0, exponent - bits)
    return ((np.ceil if upward else np.floor)(exact / step) * step).astype(np.float32)


def coarse_ranges(ranges: dict[str, tuple[np.ndarray, np.ndarray]]
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Calibrated ranges {tensor: (lowest [k], highest [k])}, each widened to the grid of
    round_outward: the lowest bound rounded down, the highest up."""
    return {name: (round_outward(low, False), round_outward(high, True))
            for name, (low, high) in ranges.items()}  # fmt: skip


def calibration_ranges(prepared: Path, calibration: np.ndarray, thresholds: dict[str, np.ndarray],
                       work: Path, batch_size: int = 100) -> dict[str, tuple[np.ndarray, ...]]:
    """ONNX Runtime's min-max ranges {tensor: (lowest [1], highest [1]) float32} of every
    tensor that quantising `prepared`'s QUANTIZED_OPS needs, over `calibration` uint8
    [n, C, H, W] fed in batches with `thresholds` (the graph's other inputs); `work` holds
    ONNX Runtime's augmented copy of the graph."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            if start is None:
                return None
            return {"images": calibration[start : start + batch_size], **thresholds}

    calibrator = create_calibrator(prepared, list(QUANTIZED_OPS),
                                   augmented_model_path=str(work / "edge.augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    calibrator.collect_data(Batches())
    return {name: data.range_value for name, data in calibrator.compute_data().data.items()}


def quantize_with_ranges(prepared: Path, target: Path,
                         ranges: dict[str, tuple[np.ndarray, np.ndarray]], work: Path) -> None:
    """Write `prepared`'s int8 graph to `target`: ONNX Runtime's static quantisation (QDQ,
    int8 weights and activations, per tensor, of QUANTIZED_OPS) with these activation ranges,
    handed to it as its calibration cache (in `work`) instead of calibrating again."""
    import inspect

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        TensorsData,
        quantize_static,
        save_tensors_data,
    )

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ValueError("an int8 export needs onnxruntime >= 1.32 (to hand its rounded "
                         "ranges to the quantiser): pip install -U onnxruntime")  # fmt: skip
    cache = work / "edge.ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
    quantize_static(str(prepared), str(target), None, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=False, op_types_to_quantize=list(QUANTIZED_OPS),
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=cache)  # fmt: skip


def prepare_for_quantization(graph: Path, prepared: Path) -> Path:
    """ONNX Runtime's pre-processing of an exported graph before it is calibrated and
    quantised (shape inference, graph optimisation); returns `prepared`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
    return prepared


def quantize_edge(exported: ExportedEdge, calibration: np.ndarray, source: str,
                  batch_size: int = 100) -> ExportedEdge:  # fmt: skip
    """Add an int8 graph of an export: ONNX Runtime's static quantisation in QDQ format
    (int8 weights and activations, per tensor, of MatMul, Gemm and Conv; everything
    else, the scores, the gate and the selection included, stays float32), calibrated
    with min-max ranges on `calibration` uint8 [n, C, H, W] at the card's operating point,
    each range widened to RANGE_BITS significant bits (coarse_ranges) so that the graph is the
    same whichever CPU calibrates it.

    The card gains an `int8` entry (file, SHA-256, calibration); OnnxEdge(int8=True) runs it.
    """
    point = exported.contents["operating_point"]
    thresholds = {"masking_th": np.array(point["masking_th"], dtype=np.float32),
                  "uncer_th": np.array(point["uncer_th"], dtype=np.float32)}  # fmt: skip
    target = exported.graph.parent / INT8_FILE
    with tempfile.TemporaryDirectory(prefix="collabvit-int8-") as folder:
        work = Path(folder)
        prepared = prepare_for_quantization(exported.graph, work / "edge.prepared.onnx")
        ranges = calibration_ranges(prepared, calibration, thresholds, work, batch_size)
        quantize_with_ranges(prepared, target, coarse_ranges(ranges), work)
    contents = {**exported.contents, "int8": {
        "graph": INT8_FILE,
        "graph_sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "quantization": {"format": "QDQ", "weights": "int8 per tensor",
                         "activations": "int8", "ops": list(QUANTIZED_OPS),
                         "calibration": "min-max",
                         "ranges": f"each bound rounded outward to {RANGE_BITS} significant bits"},
        "calibration": {"images": int(len(calibration)), "source": source},
    }}  # fmt: skip
    exported.card.write_text(json.dumps(contents, indent=2) + "\n")
    return ExportedEdge(exported.graph, exported.card, contents)


def uint8_images(dataset, count: int) -> np.ndarray:
    """The first `count` images of a dataset as a device holds them, for the int8 calibration:
    uint8 [n, C, H, W] (float images in [0, 1] rounded to 0..255)."""
    stacked = np.stack([as_array(dataset[i][0]) for i in range(min(count, len(dataset)))])
    if stacked.dtype != np.uint8:
        stacked = np.clip(np.rint(stacked * 255.0), 0, 255).astype(np.uint8)
    return stacked
