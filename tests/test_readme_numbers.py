"""The README's figures are the regenerated ones: tables and the demo lines come from the JSON
that `make results` and `make findings` write (benchmarks/, docs/findings/)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from readme_block import markers

from collabvit.algo.metrics import Summary, format_summary

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RESULTS = json.loads((REPO / "benchmarks" / "fmnist_results.json").read_text())
CLUTTERED = json.loads((REPO / "benchmarks" / "cluttered_results.json").read_text())


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def between(text: str, start: str, end: str) -> str:
    assert start in text and end in text, f"README lacks the {start!r} markers"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_results_table_is_the_regenerated_one(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text(README)
    script("fmnist_results").write_table(copy, RESULTS)
    assert copy.read_text() == README, "README's results table differs from fmnist_results.json"
    assert "| token drop | attention_sum_threshold |" in README


@pytest.mark.parametrize("name", ["findings-table", "cluttered-findings-table"])
def test_findings_tables_are_the_regenerated_ones(name):
    findings = script("findings_table")
    table = between(README, *markers(name)).strip()
    assert table == findings.render(REPO / "docs" / "findings", name)
    assert table.count("\n") >= 10


def demo_blocks() -> dict[str, str]:
    """README's `make demo` output: {its heading line: the eight lines below it}."""
    block = re.search(r"`make demo` runs.*?```\n(.*?)```", README, re.S)
    assert block, "README has no demo output block"
    parts = [part.strip().splitlines() for part in block.group(1).strip().split("\n\n")]
    return {lines[0]: "\n".join(lines[1:]) for lines in parts}


def demo_lines(row: dict) -> str:
    """`collabvit eval`'s eight lines for a results row."""
    fields = {name: row[name] for name in Summary.__dataclass_fields__ if name in row}
    return format_summary(Summary(**fields), row["policy"], row["threshold"], row["measure"],
                          row["eta"])  # fmt: skip


def test_demo_lines_are_the_default_points_on_test():
    """`make demo` prints each pair's default operating point's test figures, as the results
    have them: Fashion-MNIST first, then the cluttered canvases, each under its heading."""
    default = RESULTS["default"]
    row = next(r for r in RESULTS["rows"] if r["server"] == "token drop"
               and r["policy"] == "attention_sum_threshold" and r["measure"] == "min_entropy")
    assert (row["threshold"], row["eta"]) == (default["delta"], default["eta"])
    cluttered = CLUTTERED["default_test"]
    assert (cluttered["threshold"], cluttered["eta"]) == (CLUTTERED["default"]["delta"],
                                                          CLUTTERED["default"]["eta"])
    blocks = demo_blocks()
    recipe = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    headings = [line.split('"')[1] for line in recipe.splitlines() if '@echo "' in line]
    assert list(blocks) == headings
    assert list(blocks.values()) == [demo_lines(row), demo_lines(cluttered)]


def test_shipped_operating_point_is_the_validation_pick():
    card = json.loads((REPO / "src/collabvit/weights/collabvit_fmnist_edge.json").read_text())
    point = card["operating_point"]
    default = RESULTS["default"]
    assert (point["masking_th"], point["uncer_th"]) == (default["delta"], default["eta"])


def test_deploy_table_is_the_regenerated_one():
    """README's bytes-per-codec table is what scripts/deploy_table.py renders from its JSON."""
    deploy = script("deploy_table")
    results = json.loads((REPO / "benchmarks" / "deploy_results.json").read_text())
    assert between(README, *markers("deploy-table")).strip() == deploy.render(results)
    assert {row["codec"] for row in results["rows"]} == set(deploy.CODECS)
    assert results["images"] == 10_000


def test_deploy_demo_prints_the_demo_lines_then_bytes_and_latency():
    """`make demo-deploy` (raw codec) gives `make demo`'s lines exactly, then the network's."""
    demo = next(iter(demo_blocks().values()))
    block = between(README, "<!-- deploy-demo:start -->", "<!-- deploy-demo:end -->")
    lines = block.strip().strip("`").strip().splitlines()
    assert "\n".join(lines[:8]) == demo
    assert lines[8].startswith("Bytes per image (HTTP request incl. headers, codec raw)")
    assert any(line.startswith("Latency (ms)") for line in lines)
    raw = next(row for row in json.loads((REPO / "benchmarks" / "deploy_results.json")
                                         .read_text())["rows"] if row["codec"] == "raw")
    assert f"{raw['bytes_all']:.1f} over all images" in lines[8]


def test_onnx_edge_table_is_the_regenerated_one():
    """README's exported-edge table is what scripts/onnx_edge_report.py renders from its JSON,
    measured on every test image, with no decision differing away from a threshold."""
    report = script("onnx_edge_report")
    results = json.loads((REPO / "benchmarks" / "onnx_edge_results.json").read_text())
    assert between(README, *markers("onnx-edge")).strip() == report.render(results)
    assert results["limit"] is None and "fmnist" in results["pairs"]
    for pair in results["pairs"].values():
        assert pair["fp32"]["images"] == 10_000 and pair["fp32"]["differs_clear"] == 0
        assert pair["fp32"]["max_logit_difference"] < 1e-4
        assert pair["int8"]["kept"] == (pair["int8"]["collab_acc_loss"] <= 0.3)
        # the slice that tests/test_shipped_slices.py measures again ran the same int8 graph
        assert pair["slice"]["graph_sha256"]["int8"] == pair["int8_card"]["graph_sha256"]
    fmnist = results["pairs"]["fmnist"]["summaries"]["fp32"]
    assert f"{fmnist['collab_acc']:.2f} %" in README.split("## Deploy on a device")[1]


def test_cluttered_results_are_the_regenerated_ones():
    """README's cluttered block is what scripts/cluttered_results.py renders from its JSON,
    measured at the shipped operating point on every test canvas, bytes target included."""
    results_script = script("cluttered_results")
    block = between(README, *markers("cluttered-results")).strip()
    assert block == results_script.render(CLUTTERED)
    assert CLUTTERED["bytes"] is not None and len(CLUTTERED["targets"]) == 5
    card = json.loads((REPO / "src/collabvit/weights/collabvit_cluttered_edge.json").read_text())
    point = card["operating_point"]
    assert (point["masking_th"], point["uncer_th"]) == (CLUTTERED["default"]["delta"],
                                                        CLUTTERED["default"]["eta"])
    deploy = script("deploy_table")
    bytes_results = json.loads((REPO / "benchmarks" / "deploy_results_cluttered.json").read_text())
    assert between(README, *markers("deploy-table-cluttered")).strip() == deploy.render(
        bytes_results)
    assert bytes_results["images"] == 10_000
    assert bytes_results["operating_point"]["masking_th"] == point["masking_th"]


@pytest.mark.parametrize("results", [RESULTS, CLUTTERED], ids=["fmnist", "fmnist-cluttered"])
def test_the_re_measured_slice_ran_with_the_headline_figures(results):
    """The test slice (measured again by tests/test_shipped_slices.py) was taken at the default
    point of README's figures, by the same software as they were."""
    run = results["slice"]["runs"]["default point"]["results"]["config"]
    assert (run["edge"]["masking_th"], run["edge"]["uncer_th"]) == (results["default"]["delta"],
                                                                    results["default"]["eta"])
    assert run["edge_model"]["name"] == results["provenance"]["edge"]
    assert {name: run[name] for name in ("collabvit", "torch", "timm")} == \
        {name: results["provenance"][name] for name in ("collabvit", "torch", "timm")}  # fmt: skip


def test_opening_table_is_both_demos():
    """README's opening puts both pairs' default points side by side, from their results."""
    results_script = script("cluttered_results")
    table = between(README, *markers("opening")).strip()
    assert table == results_script.render_opening(RESULTS, CLUTTERED)


def test_model_tables_are_the_cards():
    """Every shipped model's README row gives its card's validation and test accuracy."""
    from collabvit.models import zoo

    for name in zoo.ARCHITECTURES:
        card = zoo.model_card(name)
        rows = [line for line in README.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, name
        cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
        assert cells[-2:] == [f"{card['validation_acc']:.2f} %", f"{card['test_acc']:.2f} %"]
        assert cells[3].startswith(card["storage"])


def test_opening_prose_is_the_regenerated_one():
    """The sentences beside the opening table and below the demo lines are rendered from the
    same results, so a changed figure changes them; the random patches they compare with are
    the cluttered results' own row at the default point's sent canvases and patch count."""
    rows = script("cluttered_results").default_row(RESULTS["rows"])
    blocks = script("readme_block").opening_blocks(rows, RESULTS, CLUTTERED)
    for name, text in blocks.items():
        assert between(README, *markers(name)).strip() == text, f"README's {name} drifted"
    random = next(r for r in CLUTTERED["rows"] if r["policy"] == "random"
                  and r["measure"] == "min_entropy")  # fmt: skip
    assert f"with {random['threshold']} random patches would give " \
           f"{random['collab_acc']:.2f} %" in blocks["opening-prose"]  # fmt: skip
    drifted = {**CLUTTERED, "edge_alone": CLUTTERED["edge_alone"] + 1}
    assert script("readme_block").opening_blocks(rows, RESULTS, drifted) != blocks


def test_the_precision_table_is_the_regenerated_one_and_the_cards_hold_its_figures():
    """README's precision table is what scripts/precision_report.py renders from its JSON,
    measured on every test image of both pairs; each shipped server's card records the
    server-alone change that `collabvit serve --precision auto` reads."""
    from collabvit.models import zoo
    from collabvit.research.precision import precision_table

    results = json.loads((REPO / "benchmarks" / "precision_results.json").read_text())
    assert between(README, *markers("precision")).strip() == precision_table(results)
    assert results["provenance"]["limit"] is None
    for pair in results["pairs"].values():
        assert pair["images"] == 10_000
        for precision, alone in pair["server_alone"].items():
            assert zoo.precision_change(pair["server_model"], precision) == round(
                alone["largest_change_pt"], 4)
