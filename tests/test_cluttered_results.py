"""scripts/cluttered_results.py on a few hundred canvases with small random models: every
figure is computed, consistent with its definition, rendered and drawn."""

from __future__ import annotations

import json

import pytest
import torch
from readme_block import markers
from test_readme_numbers import REPO, script
from torch.utils.data import Subset

from collabvit.data import FASHION_MNIST_ROOT, ClutteredFashionMNIST
from collabvit.models import vit

pytestmark = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="Fashion-MNIST missing")


class Canvases(Subset):
    """The first n canvases of a split, with their masks (as the script reads them)."""

    def __init__(self, split: str, count: int) -> None:
        whole = ClutteredFashionMNIST(split=split)
        super().__init__(whole, range(count))
        self.masks = whole.masks[:count]


def _model(name: str, server: bool = False):
    torch.manual_seed(1 + server)
    return vit.create_vit(name, model_kwargs={"depth": 1, "embed_dim": 24, "num_heads": 2},
                          pretrained=False, server=server)  # fmt: skip


def test_results_pipeline_on_a_few_hundred_canvases(tmp_path, monkeypatch):
    results_script = script("cluttered_results")
    # a coarser selection curve: the pipeline, not the curve's resolution, is under test
    monkeypatch.setattr(results_script, "CURVE_DELTAS", (0.5, 0.9, 0.99))
    monkeypatch.setattr(results_script, "CURVE_COUNTS", (8, 16, 49))
    edge = _model("collabvit_cluttered_edge")
    server = _model("collabvit_cluttered_server", server=True)
    val, test = Canvases("val", 100), Canvases("test", 160)
    results = results_script.measure(edge, server, val, test, budget=1.0)
    results["bytes"] = {"share": 0.5}
    results["targets"] = results_script.targets(results)

    assert results["item_patches"] == pytest.approx(float(test.masks.sum(1).float().mean()))
    # k random patches recall k / 49 of the item on average; k = 49 recalls all of it
    random = results["recall"]["random"]
    assert len(random) == 49 and random[-1] == 1.0 and results["recall"]["mean"][-1] == 1.0
    assert random[15] == pytest.approx(16 / 49, abs=0.06)
    for curve in results["recall"].values():  # more patches, more recall
        assert all(a <= b + 1e-9 for a, b in zip(curve, curve[1:], strict=False))
    every = [r for r in results["selection_curve"]
             if r["series"] == "random" and r["setting"] == 49]  # fmt: skip
    assert every[0]["server_acc"] == pytest.approx(results["server_alone"])
    for name, shares in results["composition"].items():
        assert shares["object"] + shares["clutter"] + shares["blank"] == pytest.approx(1.0), name
    default = results["default_test"]
    assert default["comm_cost"] <= 1.0 and {r["policy"] for r in results["rows"]} == {
        "attention_sum_threshold", "topk", "attention_threshold", "random"}
    assert [row["holds"] for row in results["targets"]][-1] is False  # 50 % of the bytes

    block = results_script.render(results)
    assert f"**{results['server_alone']:.2f} %**" in block
    assert block.count("\n| ") >= 20
    readme = tmp_path / "README.md"
    start, end = markers("cluttered-results")
    readme.write_text(f"before\n{start}old\n{end}\nafter\n")
    results_script.write_block(readme, "cluttered-results", block)
    assert readme.read_text() == f"before\n{start}{block}\n{end}\nafter\n"
    fmnist = json.loads((REPO / "benchmarks" / "fmnist_results.json").read_text())
    opening = results_script.render_opening(fmnist, results).splitlines()
    assert len(opening) == 8 and opening[0].endswith("| Fashion-MNIST | cluttered Fashion-MNIST |")
    assert opening[3].endswith(f"| {results['server_alone']:.2f} % |")
    assert opening[4].endswith(f"| **{default['collab_acc']:.2f} %** |")
    assert f"| {fmnist['edge_alone']:.2f} % |" in opening[2]
    for figure in (results_script.selection_figure(results), results_script.recall_figure(results)):
        assert len(figure.axes[0].lines) >= 4
