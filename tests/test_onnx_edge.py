"""The exported edge: `collabvit export`, OnnxEdge against EdgeDevice, the torch-free
`collabvit edge --onnx` against a live server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHIPPED_IMAGES, cli_in_process, tiny_vit

from collabvit.algo.uncertainty import uncertainty
from collabvit.data import ClutteredFashionMNIST, FashionMNIST
from collabvit.lite.onnx_edge import ExportError, OnnxEdge
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeDevice
from collabvit.models.export import (
    RANGE_BITS,
    EdgeDecision,
    calibration_ranges,
    coarse_ranges,
    export_edge,
    prepare_for_quantization,
    quantize_with_ranges,
    round_outward,
)

EDGE, SERVER = "collabvit_fmnist_edge", "collabvit_fmnist_server"
IMAGES = 300


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory):
    """The shipped Fashion-MNIST edge exported at its shipped operating point."""
    out = tmp_path_factory.mktemp("export")
    model = vit.create_model(EDGE)
    config = zoo.default_operating_point(EDGE, SERVER)
    export_edge(model, config, out, name=EDGE, server_model=SERVER,
                class_names=list(FashionMNIST.classes))  # fmt: skip
    return out, model, config


@pytest.fixture(scope="module")
def test_images():
    data = FashionMNIST(split="test")
    return data.images[:IMAGES], data.labels[:IMAGES]


def near_threshold(values: np.ndarray, threshold: float, margin: float = 1e-5) -> np.ndarray:
    return np.abs(values - threshold) <= margin


def assert_same_decision(onnx: OnnxEdge, device: EdgeDevice, images: torch.Tensor) -> int:
    """The ONNX edge decides as the torch edge on every image whose deciding quantities lie
    more than 1e-5 from their thresholds; returns on how many images the decisions differ
    (all of them that close: float32 sums in another order)."""
    ours, theirs = onnx.process(images.numpy()), device.process(images)
    assert np.abs(ours.logits - theirs.logits.numpy()).max() < 1e-4
    assert np.abs(ours.scores - theirs.scores.numpy()).max() < 1e-5
    config = device.config
    close = np.zeros(len(images), dtype=bool)
    if config.uncer_mode != "none":
        measure = uncertainty(theirs.logits, config.uncer_mode).numpy()
        close |= near_threshold(measure, config.uncer_th)
        assert np.abs(ours.uncertainty - measure).max() < 1e-4
    scores = theirs.scores.numpy()
    if config.masking_mode == "attention_threshold":
        close |= near_threshold(scores, config.masking_th).any(axis=1)
    elif config.masking_mode == "attention_sum_threshold":
        running = np.cumsum(-np.sort(-scores, axis=1), axis=1)
        close |= near_threshold(running, config.masking_th).any(axis=1)
    clear = ~close
    differ = (ours.confident != theirs.confident.numpy()) | \
        (ours.keep != theirs.keep.numpy()).any(axis=1)  # fmt: skip
    assert not (differ & clear).any()
    sizes, minima, sums = (s.numpy() for s in theirs.selection_statistics())
    assert np.array_equal(ours.kept[clear], sizes[clear])
    assert np.allclose(ours.kept_sum[clear], sums[clear], atol=1e-5)
    assert np.allclose(ours.kept_min[clear], minima[clear], atol=1e-6)
    if not differ.any():
        assert len(ours.payloads) == len(theirs.payloads)
        for mine, reference in zip(ours.payloads, theirs.payloads, strict=True):
            assert np.array_equal(mine.positions, reference.positions)
            assert np.array_equal(mine.patches, reference.patches)
    return int(differ.sum())


def test_the_exported_shipped_edge_decides_as_the_torch_edge(shipped_export, test_images):
    folder, model, config = shipped_export
    onnx = OnnxEdge(folder, threads=1)
    assert onnx.config == config
    assert assert_same_decision(onnx, EdgeDevice(model, config), test_images[0]) == 0


def test_the_exported_cluttered_edge_decides_as_the_torch_edge(cluttered_export):
    model = vit.create_model(zoo.CLUTTERED_EDGE)
    config = zoo.default_operating_point(zoo.CLUTTERED_EDGE, zoo.CLUTTERED_SERVER)
    assert config != EdgeConfig()  # the pair's own point, not the reference's defaults
    canvases = ClutteredFashionMNIST(split="test").images[:IMAGES]
    onnx = OnnxEdge(cluttered_export[0], threads=1)
    assert onnx.config == config
    assert assert_same_decision(onnx, EdgeDevice(model, config), canvases) == 0


@pytest.mark.parametrize("delta, eta", [(0.9, 0.6), (0.5, 1.5), (1.0, 0.05)])
def test_thresholds_are_graph_inputs(shipped_export, test_images, delta, eta):
    """Another operating point runs on the same file, as the torch edge at that point."""
    folder, model, config = shipped_export
    onnx = OnnxEdge(folder, masking_th=delta, uncer_th=eta)
    moved = EdgeConfig(**{**config.__dict__, "masking_th": delta, "uncer_th": eta})
    assert assert_same_decision(onnx, EdgeDevice(model, moved), test_images[0]) <= 1
    onnx.set_operating_point(uncer_th=0.0)  # min entropy is never below 0: every image is sent
    assert not onnx.process(test_images[0][:20].numpy()).confident.any()


@pytest.mark.parametrize("config", [
    EdgeConfig(attention_mode="mean", masking_mode="attention_threshold", masking_th=0.02,
               uncer_mode="shannon_entropy", uncer_th=0.9),
    EdgeConfig(masking_mode="attention_sum_threshold", masking_th=0.8, uncer_mode="none"),
], ids=["mean-threshold-shannon", "sum-none"])  # fmt: skip
def test_every_exported_policy_and_measure_matches_torch(tmp_path, config):
    """On another geometry (3 channels, 16 patches); rollout, top-k and the margin are
    test_a_non_default_export_runs_as_exported's."""
    torch.manual_seed(0)
    model = tiny_vit(img_size=32, patch_size=8, num_classes=10)  # random weights, 16 patches
    export_edge(model, config, tmp_path)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    onnx = OnnxEdge(tmp_path)
    assert assert_same_decision(onnx, EdgeDevice(model, config), images) <= 1


def test_dynamic_batch_and_an_empty_batch(shipped_export, test_images):
    onnx = OnnxEdge(shipped_export[0])
    for batch in (1, 5, 0):
        result = onnx.process(test_images[0][:batch].numpy())
        assert result.logits.shape == (batch, 10) and result.keep.shape == (batch, 49)


def test_the_graph_is_the_traced_decision(shipped_export, test_images):
    """EdgeDecision, the module exported, answers as the graph (float32 thresholds)."""
    folder, model, config = shipped_export
    decision = EdgeDecision(model, vit.Normalization.of_model(model), config).eval()
    with torch.inference_mode():
        reference = decision(test_images[0][:64], torch.tensor(config.masking_th),
                             torch.tensor(config.uncer_th))  # fmt: skip
    ours = OnnxEdge(folder).decide(test_images[0][:64].numpy())
    assert np.array_equal(ours["keep"], reference[4].numpy())
    assert np.array_equal(ours["confident"], reference[3].numpy())


def test_the_card_says_what_a_device_needs(shipped_export):
    card = json.loads((shipped_export[0] / "edge.json").read_text())
    assert card["geometry"] == {"in_chans": 1, "img_size": [28, 28], "patch_size": [4, 4],
                                "grid": [7, 7], "num_prefix_tokens": 1, "num_classes": 10}
    assert card["class_names"][9] == "Ankle boot" and card["server_model"] == SERVER
    assert card["opset"] == 18 and card["policy"]["masking_mode"] == "attention_sum_threshold"
    assert card["operating_point"]["masking_th"] == shipped_export[2].masking_th


def test_random_stays_in_torch(tmp_path):
    with pytest.raises(ValueError, match="random policy stays in torch"):
        export_edge(tiny_vit(), EdgeConfig(masking_mode="random", masking_th=3), tmp_path)


def test_a_broken_export_is_a_clear_error(shipped_export, tmp_path):
    folder = shipped_export[0]
    with pytest.raises(ExportError, match="not a folder written by"):
        OnnxEdge(tmp_path / "missing")
    (tmp_path / "edge.json").write_text((folder / "edge.json").read_text())
    with pytest.raises(ExportError, match="has no edge.onnx"):
        OnnxEdge(tmp_path)
    (tmp_path / "edge.onnx").write_bytes((folder / "edge.onnx").read_bytes()[:-1] + b"x")
    with pytest.raises(ExportError, match="SHA-256"):
        OnnxEdge(tmp_path)
    card = json.loads((folder / "edge.json").read_text())
    del card["geometry"]
    (tmp_path / "edge.onnx").write_bytes((folder / "edge.onnx").read_bytes())
    (tmp_path / "edge.json").write_text(json.dumps(card))
    with pytest.raises(ExportError, match="lacks geometry"):
        OnnxEdge(tmp_path)
    onnx = OnnxEdge(folder)
    with pytest.raises(ValueError, match="uint8"):
        onnx.process(np.zeros((2, 1, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="do not fit the edge"):
        onnx.process(np.zeros((2, 1, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="cumulative attention share"):
        onnx.set_operating_point(masking_th=1.5)


# ------------------------------------------------------------------ the command line


def test_export_command_writes_the_graphs_and_their_card(cluttered_export):
    folder, lines = cluttered_export
    written = [line.split()[1].rstrip(":") for line in lines[:3]]
    assert written == [str(folder / name) for name in ("edge.onnx", "edge.int8.onnx", "edge.json")]
    card = json.loads((folder / "edge.json").read_text())
    assert card["model"] == zoo.CLUTTERED_EDGE and card["server_model"] == zoo.CLUTTERED_SERVER
    assert card["geometry"]["img_size"] == [56, 56]
    for entry in (card, card["int8"]):
        assert hashlib.sha256((folder / entry["graph"]).read_bytes()).hexdigest() == \
            entry["graph_sha256"]  # fmt: skip
    assert card["int8"]["calibration"] == {
        "images": 1000, "source": "fmnist-cluttered --split val, the first 1000 images"}
    assert f"rounded outward to {RANGE_BITS} significant bits" in \
        card["int8"]["quantization"]["ranges"]  # fmt: skip


def test_int8_ranges_round_outward_to_a_grid_that_last_bits_do_not_move():
    rng = np.random.default_rng(0)
    highs = rng.uniform(1e-3, 50, 500).astype(np.float32)
    for values, upward in ((highs, True), (-highs, False)):
        rounded = round_outward(values, upward)
        assert rounded.dtype == np.float32
        assert ((rounded >= values) if upward else (rounded <= values)).all()  # outward
        assert (np.abs(rounded - values) < np.abs(values) / 8).all()  # less than 1/8 wider
        mantissa, _ = np.frexp(rounded)
        assert np.array_equal(mantissa * 2**RANGE_BITS, np.round(mantissa * 2**RANGE_BITS))
        for direction in (np.inf, -np.inf):  # a few ulps, as another CPU's kernels may give
            nudged = values
            for _ in range(3):
                nudged = np.nextafter(nudged, np.float32(direction))
            assert np.array_equal(round_outward(nudged, upward), rounded)
    grid = np.float32([0.0, 0.75, -3.5, 4.0, 2.0**-20])
    assert np.array_equal(round_outward(grid, True), grid)
    assert np.array_equal(round_outward(grid, False), grid)


def test_the_int8_graph_does_not_follow_the_last_bits_of_its_ranges(cluttered_export,
                                                                    tmp_path):  # fmt: skip
    """Ranges a few ulps off, as another CPU's float32 kernels may calibrate them, give the
    same int8 graph once rounded; unrounded, the quantiser follows them."""
    prepared = prepare_for_quantization(cluttered_export[0] / "edge.onnx", tmp_path / "p.onnx")
    canvases = ClutteredFashionMNIST(split="val").images[:20].numpy()
    point = zoo.default_operating_point(zoo.CLUTTERED_EDGE, zoo.CLUTTERED_SERVER)
    thresholds = {"masking_th": np.array(point.masking_th, dtype=np.float32),
                  "uncer_th": np.array(point.uncer_th, dtype=np.float32)}  # fmt: skip
    ranges = calibration_ranges(prepared, canvases, thresholds, tmp_path)
    nudged = {name: (np.nextafter(low, np.float32(0)), np.nextafter(high, np.float32(0)))
              for name, (low, high) in ranges.items()}  # fmt: skip
    graphs = {}
    for name, chosen in {"rounded": coarse_ranges(ranges), "nudged, rounded":
                         coarse_ranges(nudged), "unrounded": ranges, "nudged": nudged}.items():
        quantize_with_ranges(prepared, tmp_path / "int8.onnx", chosen, tmp_path)
        graphs[name] = (tmp_path / "int8.onnx").read_bytes()
    assert graphs["rounded"] == graphs["nudged, rounded"]
    assert graphs["unrounded"] != graphs["nudged"]


@pytest.mark.parametrize("flags, message", [
    ((), "--out-dir"),
    (("--out-dir", "X", "--masking-mode", "random", "--masking-th", "3"), "stays in torch"),
    (("--out-dir", "X", "--inputs-normalized"), "uint8"),
])  # fmt: skip
def test_export_usage_errors_are_one_line(run_cli, tmp_path, flags, message):
    result = run_cli("export", *[str(tmp_path / f) if f == "X" else f for f in flags])
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (("--model", EDGE), "--model do not apply"),
    (("--attention-mode", "rollout"), "fixes attention_mode = mean"),
])  # fmt: skip
def test_edge_onnx_usage_errors(run_cli, shipped_export, tmp_path, flags, message):
    result = run_cli("edge", "--onnx", str(shipped_export[0]), "--server", "http://127.0.0.1:9",
                     "--records", str(tmp_path / "r.jsonl"), "--quiet", *flags)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("flag", [("--threads", "1"), ("--int8",)])
def test_runtime_flags_go_with_onnx(run_cli, tmp_path, flag):
    result = run_cli("edge", *flag, "--records", str(tmp_path / "r.jsonl"))
    assert result.returncode == 2 and "go with --onnx" in result.stderr


def test_edge_onnx_int8_needs_an_int8_graph(run_cli, shipped_export, tmp_path):
    result = run_cli("edge", "--onnx", str(shipped_export[0]), "--int8", "--quiet",
                     "--records", str(tmp_path / "r.jsonl"))  # fmt: skip
    assert result.returncode == 2 and "has no edge.int8.onnx" in result.stderr


def test_a_non_default_export_runs_as_exported(run_cli, shipped_live, test_images, tmp_path):
    """The policy, attention and measure of the export apply, as the torch edge's (rollout,
    top-k with k = floor(20.5), margin); flags not typed do not count as asking for other
    ones."""
    export = run_cli("export", "--out-dir", str(tmp_path / "x"), "--attention-mode",
                     "rollout", "--masking-mode", "topk", "--masking-th", "20.5",
                     "--uncer-mode", "margin", "--uncer-th", "0.5")  # fmt: skip
    assert export.returncode == 0, export.stderr
    config = EdgeConfig(attention_mode="rollout", masking_mode="topk", masking_th=20.5,
                        uncer_mode="margin", uncer_th=0.5)  # fmt: skip
    exported = OnnxEdge(tmp_path / "x")
    assert exported.config == config
    device = EdgeDevice(vit.create_model(EDGE), config)
    assert assert_same_decision(exported, device, test_images[0][:100]) <= 1
    assert (exported.process(test_images[0][:20].numpy()).kept == 20).all()
    flags = ("--server", shipped_live.url, "--limit", "40", "--quiet")
    onnx = run_cli("edge", "--onnx", str(tmp_path / "x"), *flags, "--records",
                   str(tmp_path / "onnx.jsonl"))  # fmt: skip
    assert onnx.returncode == 0, onnx.stderr
    torch_edge = run_cli("edge", *flags, "--attention-mode", "rollout", "--masking-mode",
                         "topk", "--masking-th", "20.5", "--uncer-mode", "margin", "--uncer-th",
                         "0.5", "--records", str(tmp_path / "torch.jsonl"))  # fmt: skip
    assert onnx.stdout.splitlines()[:8] == torch_edge.stdout.splitlines()[:8]
    assert "topk, 20.5" in onnx.stdout


def test_an_export_that_could_not_run_is_refused(run_cli, tmp_path):
    result = run_cli("export", "--out-dir", str(tmp_path / "x"), "--masking-mode", "topk",
                     "--masking-th", "1000")  # fmt: skip
    assert result.returncode == 2 and "only 49" in result.stderr
    assert not (tmp_path / "x" / "edge.onnx").exists()


# Imports of these names fail in the subprocess below, as on a device without torch.
BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"torch", "torchvision", "timm", "safetensors", "matplotlib", "fastapi",
               "uvicorn", "onnx", "onnxscript"}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocker())
""")


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_light_edge_imports_no_torch_and_answers_as_eval(shipped_export, shipped_live,
                                                             shipped_eval, tmp_path):  # fmt: skip
    folder = shipped_export[0]
    records, results = tmp_path / "onnx.jsonl", tmp_path / "onnx.json"
    light = run_without_torch(f"""
        import sys
        from collabvit.cli import main
        status = main(["edge", "--onnx", {str(folder)!r}, "--server", {shipped_live.url!r},
                       "--limit", "{SHIPPED_IMAGES}", "--quiet", "--records", {str(records)!r},
                       "--results-file", {str(results)!r}])
        assert not {{"torch", "timm", "torchvision"}} & set(sys.modules), "torch was imported"
        sys.exit(status)
    """)
    assert light.returncode == 0, light.stderr
    assert light.stdout.splitlines()[:8] == shipped_eval[0]
    written = json.loads(results.read_text())
    assert "torch" not in written["config"] and "onnxruntime" in written["config"]
    assert written["config"]["edge_model"]["model"] == EDGE


@pytest.mark.parametrize("data_set", ["fmnist", "fmnist-cluttered"])
def test_without_torch_the_validation_split_is_the_one_torch_reads(data_set, tmp_path):
    """The light edge cuts --split val itself: the same images, in the same order, as the
    torch side's data sets (cluttered canvases drawn from the same items)."""
    from collabvit.data import ClutteredFashionMNIST, FashionMNIST

    saved = tmp_path / "val.npz"
    light = run_without_torch(f"""
        import numpy as np
        from collabvit.lite.fashion import read_split_images
        images, labels = read_split_images({data_set!r}, None, "val", limit=64)
        np.savez({str(saved)!r}, images=images, labels=labels)
    """)
    assert light.returncode == 0, light.stderr
    torch_side = (FashionMNIST if data_set == "fmnist" else ClutteredFashionMNIST)(split="val")
    with np.load(saved) as read:
        np.testing.assert_array_equal(read["images"], torch_side.images[:64].numpy())
        np.testing.assert_array_equal(read["labels"], torch_side.labels[:64].numpy())


def test_the_light_edge_runs_the_validation_split_as_eval(shipped_export, shipped_live,
                                                           tmp_path):  # fmt: skip
    split = ("--split", "val", "--limit", "48", "--quiet")
    light = run_without_torch(f"""
        import sys
        from collabvit.cli import main
        sys.exit(main(["edge", "--onnx", {str(shipped_export[0])!r}, "--server",
                       {shipped_live.url!r}, "--records", {str(tmp_path / "r.jsonl")!r},
                       *{split!r}]))
    """)
    assert light.returncode == 0, light.stderr
    status, lines = cli_in_process("eval", *split)
    assert status == 0 and light.stdout.splitlines()[:8] == lines


def test_without_torch_a_full_command_says_what_to_install():
    result = run_without_torch("""
        import sys
        from collabvit.cli import main
        sys.exit(main(["eval", "--limit", "5"]))
    """)
    assert result.returncode == 2, result.stderr
    assert "pip install 'collabvit[full]'" in result.stderr and "Traceback" not in result.stderr


def test_every_module_of_the_torch_free_package_imports_without_torch():
    """Walks collabvit.lite and the command line (whose torch-side imports sit inside the
    commands), so a module added there is checked without being named here."""
    result = run_without_torch("""
        import importlib, pkgutil
        import collabvit, collabvit.cli, collabvit.config, collabvit.lite
        names = [m.name for package in (collabvit.lite, collabvit.cli)
                 for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        print(len(names), "ok")
    """)
    assert result.returncode == 0, result.stderr
    count, status = result.stdout.split()
    assert status == "ok" and int(count) >= 30  # every module of both packages, none missed


@pytest.mark.slow
def test_a_fresh_light_install_has_no_torch_and_answers_as_eval(shipped_export, shipped_live,
                                                                run_cli, tmp_path):  # fmt: skip
    """`pip install 'collabvit[edge]'` into a new venv: no torch in it, and its
    `collabvit edge --onnx` gives eval's eight lines."""
    repo = Path(__file__).resolve().parents[1]
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(tmp_path / "light")], check=True)
    python = tmp_path / "light" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"{repo}[edge]"], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode
    light = subprocess.run([str(tmp_path / "light" / "bin" / "collabvit"), "edge", "--onnx",
                            str(shipped_export[0]), "--server", shipped_live.url, "--limit",
                            "100", "--quiet", "--records", str(tmp_path / "r.jsonl")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert light.returncode == 0, light.stderr
    evaluated = run_cli("eval", "--limit", "100", "--quiet")
    assert light.stdout.splitlines()[:8] == evaluated.stdout.splitlines()
