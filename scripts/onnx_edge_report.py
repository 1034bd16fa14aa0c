"""The exported edge against the torch edge on every test image of each shipped pair.

    python scripts/onnx_edge_report.py [--limit N] [--out benchmarks/onnx_edge_results.json]
        [--readme README.md] [--readme-only]

For each shipped pair whose weights are in the package: exports its edge at the shipped
operating point (fp32, and int8 calibrated on the first 1,000 validation images, as
`collabvit export --int8` does), runs the torch edge and both graphs over the test set,
and counts: the largest logit difference, the images whose gate or kept patches differ,
and how many of those had a deciding quantity within 1e-5 of its threshold (float32 sums
in another order may fall either side there). For int8 it runs the shipped server on the
int8 edge's payloads: edge accuracy, gate agreement with fp32, collaborative accuracy and
communication cost against fp32's, and the same on the first SLICE test images alone
(`slice`, which tests/test_shipped_slices.py measures again with a fresh export). Writes
the figures with their provenance to the JSON and the table between the onnx-edge markers
in README.md (tests/test_readme_numbers.py checks that they agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from readme_block import write_block

from collabvit import versions
from collabvit.algo.uncertainty import uncertainty
from collabvit.config import ModelSpec
from collabvit.data import ClutteredFashionMNIST, FashionMNIST
from collabvit.lite.onnx_edge import OnnxEdge
from collabvit.lite.specs import SHIPPED_PAIRS
from collabvit.lite.summary import RunningSummary
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeDevice
from collabvit.models.export import export_edge, quantize_edge
from collabvit.models.pair import load_model
from collabvit.models.server import Server

REPO = Path(__file__).resolve().parents[1]
DATA = {"fmnist": FashionMNIST, "fmnist-cluttered": ClutteredFashionMNIST}
BATCH, MARGIN, CALIBRATION = 256, 1e-5, 1000
KEEP_IF_WITHIN = 0.3  # collaborative accuracy points int8 may lose and still be kept
SLICE = 200  # the first test images whose int8 figures the default test suite measures again


def near_threshold(scores: np.ndarray, measure: np.ndarray, config) -> np.ndarray:
    """Images [B] whose gate measure or selection running sum lies within MARGIN of η / δ."""
    close = np.abs(measure - config.uncer_th) <= MARGIN
    if config.masking_mode == "attention_sum_threshold":
        running = np.cumsum(-np.sort(-scores, axis=1), axis=1)
        close |= (np.abs(running - config.masking_th) <= MARGIN).any(axis=1)
    elif config.masking_mode == "attention_threshold":
        close |= (np.abs(scores - config.masking_th) <= MARGIN).any(axis=1)
    return close


def collaborative(edge_out, server: Server, labels: np.ndarray, running: RunningSummary) -> None:
    """Add one batch of an edge's decisions, answered by the server where sent."""
    final = edge_out.logits.copy()
    sent = np.flatnonzero(~edge_out.confident)
    if len(sent):
        final[sent] = server.classify(edge_out.payloads).float().numpy()
    size, minimum, total = edge_out.selection_statistics()
    running.update(labels, edge_out.logits, final, edge_out.confident, size, minimum, total)


def report_pair(data_set: str, limit: int | None, folder: Path) -> dict:
    edge_name, server_name = SHIPPED_PAIRS[data_set]
    model = vit.create_model(edge_name)
    config = zoo.default_operating_point(edge_name, server_name)
    test, val = DATA[data_set](split="test"), DATA[data_set](split="val")
    exported = export_edge(model, config, folder, name=edge_name, server_model=server_name,
                           class_names=list(test.classes))  # fmt: skip
    quantize_edge(exported, val.images[:CALIBRATION].numpy(),
                  f"{data_set} --split val, the first {CALIBRATION} images")  # fmt: skip
    device = EdgeDevice(model, config)
    fp32, int8 = OnnxEdge(folder), OnnxEdge(folder, int8=True)
    server = Server(load_model(ModelSpec(name=server_name), server=True))
    count = len(test.labels) if limit is None else min(limit, len(test.labels))
    counts = {"images": count, "gate_differs": 0, "keep_differs": 0, "differs_near": 0,
              "differs_clear": 0, "near_threshold": 0, "max_logit_difference": 0.0}
    int8_counts = {"gate_agrees": 0, "keep_agrees": 0, "edge_correct": 0}
    summaries = {"fp32": RunningSummary(fp32.geometry.num_patches),
                 "int8": RunningSummary(fp32.geometry.num_patches)}  # fmt: skip
    for start in range(0, count, BATCH):
        images = test.images[start : min(start + BATCH, count)]
        labels = test.labels[start : start + len(images)].numpy()
        theirs, ours, small = device.process(images), fp32.process(images.numpy()), \
            int8.process(images.numpy())  # fmt: skip
        logits = theirs.logits.numpy()
        counts["max_logit_difference"] = max(counts["max_logit_difference"],
                                             float(np.abs(ours.logits - logits).max()))
        gate = ours.confident != theirs.confident.numpy()
        keep = (ours.keep != theirs.keep.numpy()).any(axis=1)
        measure = uncertainty(theirs.logits, config.uncer_mode).numpy()
        close = near_threshold(theirs.scores.numpy(), measure, config)
        counts["gate_differs"] += int(gate.sum())
        counts["keep_differs"] += int(keep.sum())
        counts["differs_near"] += int(((gate | keep) & close).sum())
        counts["differs_clear"] += int(((gate | keep) & ~close).sum())
        counts["near_threshold"] += int(close.sum())
        int8_counts["gate_agrees"] += int((small.confident == ours.confident).sum())
        int8_counts["keep_agrees"] += int((small.keep == ours.keep).all(axis=1).sum())
        int8_counts["edge_correct"] += int((small.logits.argmax(axis=1) == labels).sum())
        collaborative(ours, server, labels, summaries["fp32"])
        collaborative(small, server, labels, summaries["int8"])
    figures = {name: running.summary().as_dict() for name, running in summaries.items()}
    loss = figures["fp32"]["collab_acc"] - figures["int8"]["collab_acc"]
    return {
        "edge": edge_name, "server": server_name, "operating_point": config.__dict__,
        "fp32": counts,
        "int8": {"edge_acc": 100.0 * int8_counts["edge_correct"] / count,
                 "gate_agreement": 100.0 * int8_counts["gate_agrees"] / count,
                 "keep_agreement": 100.0 * int8_counts["keep_agrees"] / count,
                 "collab_acc_loss": loss, "kept": loss <= KEEP_IF_WITHIN,
                 "graph_mb": (folder / "edge.int8.onnx").stat().st_size / 1e6},
        "graph_mb": (folder / "edge.onnx").stat().st_size / 1e6,
        "summaries": figures,
        "int8_card": json.loads((folder / "edge.json").read_text())["int8"],
        "slice": int8_slice(folder, test, server),
    }  # fmt: skip


def int8_slice(folder: Path, test, server: Server, images: int = SLICE) -> dict:
    """The int8 graph of the export in `folder` with `server` on the first `images` images of
    the `test` data set, in one batch on one thread: {"images", "graph_sha256" (fp32 and
    int8 graphs), "int8": the run's summary}."""
    edge = OnnxEdge(folder, threads=1, int8=True)
    card, running = edge.card, RunningSummary(edge.geometry.num_patches)
    collaborative(edge.process(test.images[:images].numpy()), server,
                  test.labels[:images].numpy(), running)  # fmt: skip
    return {"images": images, "threads": 1,
            "graph_sha256": {"fp32": card["graph_sha256"], "int8": card["int8"]["graph_sha256"]},
            "int8": running.summary().as_dict()}  # fmt: skip


def render(results: dict) -> str:
    """README's table (between the onnx-edge markers) of the figures in `results`."""
    rows = []
    for data_set, r in results["pairs"].items():
        f, q = r["fp32"], r["int8"]
        fp32, int8 = r["summaries"]["fp32"], r["summaries"]["int8"]
        rows.append(
            f"| `{data_set}` fp32 ({r['graph_mb']:.1f} MB) | {f['max_logit_difference']:.1e} | "
            f"{f['gate_differs']} / {f['keep_differs']} ({f['differs_clear']} away from a "
            f"threshold) | {fp32['client_acc']:.2f} % | {fp32['collab_acc']:.2f} % | "
            f"{fp32['comm_cost']:.3f} |")
        rows.append(
            f"| `{data_set}` int8 ({q['graph_mb']:.1f} MB) | | gate agrees with fp32 on "
            f"{q['gate_agreement']:.2f} %, kept patches on {q['keep_agreement']:.2f} % | "
            f"{q['edge_acc']:.2f} % | {int8['collab_acc']:.2f} % | {int8['comm_cost']:.3f} |")
    return ("| exported edge | largest logit difference from torch | images whose gate / kept "
            "patches differ from torch's | edge accuracy | collaborative accuracy | "
            "communication cost |\n|---|---:|---|---:|---:|---:|\n" + "\n".join(rows))


def write_readme(readme: Path, results: dict) -> None:
    """Put the table between README's onnx-edge markers (when it has them)."""
    write_block(readme, "onnx-edge", render(results), required=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "onnx_edge_results.json"))
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--readme-only", action="store_true",
                        help="only write README's table from the JSON of an earlier run")
    args = parser.parse_args(argv)
    if args.readme_only:
        write_readme(Path(args.readme), json.loads(Path(args.out).read_text()))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pairs = {}
    for data_set, (edge_name, server_name) in SHIPPED_PAIRS.items():
        if not (zoo.is_shipped(edge_name) and zoo.is_shipped(server_name)):
            print(f"{data_set}: its pair is not in the package; skipped", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as folder:
            pairs[data_set] = report_pair(data_set, args.limit, Path(folder))
        print(f"{data_set}: {json.dumps(pairs[data_set]['fp32'])}")
        print(f"{data_set} int8: {json.dumps(pairs[data_set]['int8'])}")
    results = {"pairs": pairs, "limit": args.limit, "script": "scripts/onnx_edge_report.py",
               **versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    write_readme(Path(args.readme), results)
    print(render(results))


if __name__ == "__main__":
    main()
