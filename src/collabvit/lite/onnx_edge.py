"""An exported edge run by ONNX Runtime: numpy in, numpy out, and no torch anywhere.

`collabvit export` writes a folder with `edge.onnx` (the whole edge decision, see
export.py) and `edge.json` (what a device needs to run it). `OnnxEdge` loads that folder
and answers like `EdgeDevice`: logits, scores, the gate, the kept patches, their
statistics and the payloads to send, so the network client (client.run_edge) runs either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collabvit.lite.protocol import PatchPayload, build_payloads
from collabvit.lite.specs import EdgeConfig, Geometry

EXPORT_FORMAT = 1
GRAPH_FILE, INT8_FILE, CARD_FILE = "edge.onnx", "edge.int8.onnx", "edge.json"
GRAPH_INPUTS = ("images", "masking_th", "uncer_th")
GRAPH_OUTPUTS = ("logits", "scores", "uncertainty", "confident", "keep", "kept", "kept_min",
                 "kept_sum")  # fmt: skip
GRAPH_POLICIES = ("topk", "attention_threshold", "attention_sum_threshold")
CARD_KEYS = ("graph_sha256", "geometry", "class_names", "policy", "operating_point")


class ExportError(ValueError):
    """An export folder that cannot be run (a one-line reason)."""


@dataclass(frozen=True)
class OnnxEdgeResult:
    """The edge's view of one batch (as EdgeResult, in numpy).

    Attributes:
        logits [B, classes] float32; scores [B, N] float32; uncertainty [B] float32 (0 when
        the gate has no measure); confident [B] bool; keep [B, N] bool; kept [B] int64,
        kept_min [B] (+inf when empty) and kept_sum [B] float32: the selection's size,
        smallest and total score; payloads: one per image that is not confident, in order.
    """

    logits: np.ndarray
    scores: np.ndarray
    uncertainty: np.ndarray
    confident: np.ndarray
    keep: np.ndarray
    kept: np.ndarray
    kept_min: np.ndarray
    kept_sum: np.ndarray
    payloads: list[PatchPayload]

    def selection_statistics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Size, minimum and sum of the selected scores per image ([B] each)."""
        return self.kept, self.kept_min, self.kept_sum


def read_card(folder: str | Path, int8: bool = False) -> dict:
    """The export card of `folder` (edge.json), checked against the graph it names (the
    int8 one with `int8`)."""
    folder = Path(folder)
    card_path, graph_path = folder / CARD_FILE, folder / (INT8_FILE if int8 else GRAPH_FILE)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder written by `collabvit export`")
    for path in (card_path, graph_path):
        if not path.is_file():
            again = " --int8" if path.name == INT8_FILE else ""
            raise ExportError(f"{folder} has no {path.name}: export the edge with "
                              f"`collabvit export --out-dir DIR{again}`")  # fmt: skip
    try:
        card = json.loads(card_path.read_text())
    except (ValueError, OSError) as error:
        raise ExportError(f"{card_path} is not readable JSON: {error}") from error
    if not isinstance(card, dict) or card.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{card_path} is not an export card of format {EXPORT_FORMAT}")
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ExportError(f"{card_path} lacks {', '.join(missing)}: export the edge again")
    entry = card.get("int8") if int8 else card
    if not isinstance(entry, dict):
        raise ExportError(f"{folder} holds no int8 graph: export with --int8")
    digest = hashlib.sha256(graph_path.read_bytes()).hexdigest()
    if digest != entry.get("graph_sha256"):
        raise ExportError(f"{graph_path} is not the graph its card describes (its SHA-256 "
                          "differs): copy both files of one export")  # fmt: skip
    return card


class OnnxEdge:
    """Owns an ONNX Runtime session of an exported edge and its operating point.

    Args:
        folder: a folder written by `collabvit export`.
        masking_th, uncer_th: the operating point (default: the card's); graph inputs, so
            any value runs without exporting again.
        threads: ONNX Runtime's intra-op threads (default: its own choice).
        int8: run the export's int8 graph (`collabvit export --int8`).
    """

    def __init__(self, folder: str | Path, masking_th: float | None = None,
                 uncer_th: float | None = None, threads: int | None = None,
                 int8: bool = False) -> None:  # fmt: skip
        import onnxruntime

        self.folder = Path(folder)
        self.source = str(folder)  # as given: a run's records name the edge by it
        self.card = read_card(self.folder, int8)
        self.int8 = int8
        g = self.card["geometry"]
        self.geometry = Geometry(
            in_chans=g["in_chans"], img_size=tuple(g["img_size"]),
            patch_size=tuple(g["patch_size"]), grid_size=tuple(g["grid"]),
            num_prefix_tokens=g["num_prefix_tokens"], num_classes=g["num_classes"],
        )  # fmt: skip
        self.class_names = list(self.card["class_names"])
        point = self.card["operating_point"]
        self.config = EdgeConfig(**self.card["policy"], masking_th=point["masking_th"],
                                 uncer_th=point["uncer_th"])  # fmt: skip
        self.set_operating_point(masking_th, uncer_th)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        graph = self.folder / (INT8_FILE if int8 else GRAPH_FILE)
        self.session = onnxruntime.InferenceSession(str(graph), options,
                                                    providers=["CPUExecutionProvider"])

    def set_operating_point(self, masking_th: float | None = None,
                            uncer_th: float | None = None) -> None:  # fmt: skip
        """Move to another (δ or k, η); None keeps the current value."""
        self.config = self.config.moved(masking_th, uncer_th, self.geometry.num_patches)

    def check_images(self, images: np.ndarray) -> None:
        """ValueError unless images are uint8 [B, C, H, W] of the edge's size."""
        g = self.geometry
        expected = (g.in_chans, *g.img_size)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError("the ONNX edge takes uint8 numpy images (0..255 pixels), got "
                             f"{getattr(images, 'dtype', type(images).__name__)}")  # fmt: skip
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)} do not fit the edge, which "
                             f"takes [B, {expected[0]}, {expected[1]}, {expected[2]}]")  # fmt: skip

    def decide(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for uint8 images [B, C, H, W], by name (GRAPH_OUTPUTS)."""
        self.check_images(images)
        feeds = {"images": np.ascontiguousarray(images),
                 "masking_th": np.array(self.config.masking_th, dtype=np.float32),
                 "uncer_th": np.array(self.config.uncer_th, dtype=np.float32)}  # fmt: skip
        return dict(zip(GRAPH_OUTPUTS, self.session.run(list(GRAPH_OUTPUTS), feeds), strict=True))

    def process(self, images: np.ndarray, image_ids: np.ndarray | None = None,
                seed: int = 0) -> OnnxEdgeResult:  # fmt: skip
        """Classify, gate and select for one batch, and build the payloads of the images to
        send. `image_ids` and `seed` are taken for EdgeDevice's signature: no exported
        policy is random."""
        out = self.decide(images)
        sent = np.flatnonzero(~out["confident"]).tolist()
        payloads = build_payloads(images, out["keep"], sent, self.geometry.patch_size)
        return OnnxEdgeResult(**out, payloads=payloads)

    def refuse_changes(self, chosen: dict) -> None:
        """ValueError (one line) when `chosen` EdgeConfig values change what the export fixes:
        everything but the two thresholds, which are graph inputs."""
        fixed = {name: value for name, value in chosen.items()
                 if name not in ("masking_th", "uncer_th") and value != getattr(self.config, name)}
        if fixed:
            name, value = next(iter(fixed.items()))
            raise ValueError(f"the export in {self.folder} fixes {name} = "
                             f"{getattr(self.config, name)}; export again for {name} {value}")

    def check_shape(self, images: np.ndarray, source: str) -> None:
        """ValueError (one line) when `source`'s images [n, C, H, W] are not of this edge's
        size (checked once for a data set, before any batch runs)."""
        g = self.geometry
        if tuple(images.shape[1:]) != (g.in_chans, *g.img_size):
            raise ValueError(f"{source} images are {'x'.join(map(str, images.shape[1:]))} but "
                             f"the exported edge takes {g.in_chans}x{g.img_size[0]}x"
                             f"{g.img_size[1]}")  # fmt: skip

    def identity(self) -> dict:
        """What the records and results name as this edge: the folder, the model it was
        exported from and the graph that runs (by name and SHA-256)."""
        graph = self.card["int8"] if self.int8 else self.card
        return {"onnx": self.source, "model": self.card.get("model"),
                "graph": graph["graph"], "graph_sha256": graph["graph_sha256"]}


class ArrayBatches:
    """(images, labels, indices) numpy batches of in-memory arrays, with a length: what the
    edge run takes where no torch DataLoader is.

    images [n, C, H, W]; labels [n]; each batch's indices [b] are the rows' positions."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            stop = min(start + self.batch_size, len(self.labels))
            yield self.images[start:stop], self.labels[start:stop], np.arange(start, stop)
