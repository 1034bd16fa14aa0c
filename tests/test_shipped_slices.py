"""The shipped pairs measured again: `collabvit eval` on the first test images of each pair,
and a fresh int8 export of the cluttered edge, give exactly the figures that the results
scripts stored beside their 10,000-image ones (README's numbers come from the same runs)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_edge_report
from conftest import SERVER_ALONE, SHIPPED_IMAGES

from collabvit.config import DataSpec, ModelSpec
from collabvit.data import ClutteredFashionMNIST
from collabvit.lite.specs import SHIPPED_PAIRS
from collabvit.models import zoo
from collabvit.models.pair import load_model
from collabvit.models.server import Server

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = {"fmnist": "fmnist_results.json", "fmnist-cluttered": "cluttered_results.json"}


def stored_slice(data_set: str) -> dict:
    return json.loads((BENCHMARKS / RESULTS[data_set]).read_text())["slice"]


def test_eval_on_each_pairs_test_slice_gives_the_stored_figures(shipped_slices):
    """Every figure of the eval summary (accuracies, top-5, cost, sent tokens, confident
    images, attention averages) of each pair at its shipped point and of its server alone,
    run as stored: the same images, flags and batch size (float sums follow the batching)."""
    flags = {"default point": [], "server alone": list(SERVER_ALONE)}
    for data_set, fresh in shipped_slices.items():
        stored = stored_slice(data_set)
        assert stored["images"] == SHIPPED_IMAGES
        for name, summary in fresh.items():
            run = stored["runs"][name]
            data = run["results"]["config"]["data"]
            assert (run["flags"], data["data_set"], data["split"], data["limit"],
                    data["batch_size"]) == (flags[name], data_set, "test", SHIPPED_IMAGES,
                                            DataSpec().batch_size)  # fmt: skip
            assert summary == run["results"]["summary"], f"{data_set}, {name} (--slice-only)"
        point = stored["runs"]["default point"]["results"]["config"]["edge"]
        assert point == zoo.default_operating_point(*SHIPPED_PAIRS[data_set]).__dict__


def test_a_fresh_int8_export_of_the_cluttered_edge_gives_the_stored_slice_figures(
        cluttered_export):  # fmt: skip
    """The export's graphs are byte for byte the ones the stored int8 figures were measured
    with, and its int8 edge with the shipped server answers the first test canvases as then."""
    folder, _ = cluttered_export
    stored = json.loads((BENCHMARKS / "onnx_edge_results.json").read_text())
    stored = stored["pairs"]["fmnist-cluttered"]["slice"]
    card = json.loads((folder / "edge.json").read_text())
    graphs = {"fp32": card["graph_sha256"], "int8": card["int8"]["graph_sha256"]}
    assert graphs == stored["graph_sha256"], "not the measured export: make onnx-report"
    server = Server(load_model(ModelSpec(name=zoo.CLUTTERED_SERVER), server=True))
    fresh = onnx_edge_report.int8_slice(folder, ClutteredFashionMNIST(split="test"), server,
                                        stored["images"])  # fmt: skip
    assert fresh == stored
