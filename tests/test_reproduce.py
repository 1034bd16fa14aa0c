"""`collabvit reproduce`: the paper's run in one command, beside the published figures.

The command runs on an ImageNet-style folder of two images with DeiT weights saved to files.
Its server is deit_base_patch16_224; here the published table names deit_tiny_patch16_224
for both roles (a forward of DeiT-Base costs about 0.9 s an image on two CPU cores, and the
sweep runs fourteen server passes), except in the slow test that runs the paper's own pair.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import asdict, replace
from fractions import Fraction
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from collabvit.cli import main
from collabvit.lite.frontier import SweepPoint, mark_pareto
from collabvit.lite.summary import RunningSummary, Summary
from collabvit.research import plots, reproduce

SYNSETS = ("n01440764", "n01443537")  # ImageNet classes 0 and 1

# the runs of this module build each model once (conftest.models_built_once)
pytestmark = pytest.mark.usefixtures("models_built_once")


def write_folder(root: Path) -> Path:
    """ROOT/val/<synset>/0.png: one small random image per class (the crop resizes it)."""
    generator = torch.Generator().manual_seed(0)
    for synset in SYNSETS:
        (root / "val" / synset).mkdir(parents=True)
        pixels = torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(root / "val" / synset / "0.png")
    return root


FOCUS = (5, 6, 7, 8)  # patches the edge's class token attends to


def save_deit(name: str, path: Path, seed: int, favour: int | None = None,
              focus: tuple[int, ...] = ()) -> Path:  # fmt: skip
    """A timm DeiT's weights, random (small normal values, layer norms at one), saved as
    safetensors (or .pth); drawn here rather than by timm's initialisation, which takes
    seconds.

    favour: the head answers this class for every image.
    focus: the last block's class token attends almost only to these patches, about equally
        (a large position embedding along one direction, which its keys alone read), so the
        paper's policy sends all of them but the last (their attention sums exceed 0.97).
    """
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.ones(value.shape) if "norm" in key and key.endswith("weight")
             else torch.zeros(value.shape) if "norm" in key
             else torch.randn(value.shape, generator=generator) * 0.02
             for key, value in model.state_dict().items()}  # fmt: skip
    if favour is not None:
        state["head.bias"][favour] = 30.0
    if focus:
        width, heads = model.embed_dim, model.blocks[-1].attn.num_heads
        direction = torch.zeros(width)
        direction[:2] = torch.tensor([1.0, -1.0]) / 2**0.5
        for patch in focus:
            state["pos_embed"][0, model.num_prefix_tokens + patch] += 50.0 * direction
        qkv = f"blocks.{len(model.blocks) - 1}.attn.qkv"
        state[f"{qkv}.weight"][:width] = 0.0  # every query is its bias ...
        state[f"{qkv}.bias"][:width] = (width // heads) ** -0.5
        state[f"{qkv}.weight"][width:2 * width] = direction  # ... every key reads `direction`
        state[f"{qkv}.bias"][width:2 * width] = 0.0
    if path.suffix == ".pth":  # as the official DeiT release: nested under "model"
        torch.save({"model": state}, path)
    else:
        save_file(state, str(path))
    return path


def cli(*args: str):
    """`collabvit ARGS` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 2
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread for this module's runs: on a shared two-core machine two threads
    spin on each other and the DeiT forwards take 2 to 3 times as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    # the edge is unsure of every image (all are sent); the server answers class 0
    return {"images": write_folder(root / "imagenet"),
            "edge": save_deit("deit_tiny_patch16_224", root / "edge.safetensors", 0,
                              focus=FOCUS),
            "server": save_deit("deit_tiny_patch16_224", root / "server.safetensors", 1, 0),
            "root": root}  # fmt: skip


@contextlib.contextmanager
def tiny_server():
    """The published table with deit_tiny as the server too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reproduce, "PAPER", replace(reproduce.PAPER,
                                                  server_model="deit_tiny_patch16_224"))
        yield


def paper_args(files, *more: str) -> list[str]:
    return ["reproduce", "--data-path", str(files["images"]), "--model-weights",
            str(files["edge"]), "--server-weights", str(files["server"]), "--batch-size", "1",
            "--quiet", *more]  # fmt: skip


@pytest.fixture(scope="module")
def paper_run(files, models_built_once):
    """One uninterrupted run with --results-file and --sweep."""
    root = files["root"]
    with tiny_server():
        status, out, err = cli(*paper_args(files, "--results-file", str(root / "results.json"),
                                           "--state-file", str(root / "state.json"),
                                           "--sweep", str(root / "sweep")))  # fmt: skip
    assert status == 0, err
    return out, json.loads((root / "results.json").read_text()), root / "sweep"


@pytest.fixture(scope="module")
def eval_run(files, models_built_once):
    """`collabvit eval` with the six lines of flags that say the same (deit_tiny server)."""
    results = files["root"] / "eval.json"
    status, out, err = cli(
        "eval", "--model", "deit_tiny_patch16_224", "--model-weights", str(files["edge"]),
        "--server-model", "deit_tiny_patch16_224", "--server-weights", str(files["server"]),
        "--data-set", "imagenet", "--data-path", str(files["images"]),
        "--masking-mode", "attention_sum_threshold", "--masking-th", "0.97",
        "--uncer-mode", "min_entropy", "--uncer-th", "1.0", "--batch-size", "1", "--quiet",
        "--results-file", str(results))  # fmt: skip
    assert status == 0, err
    return out, json.loads(results.read_text())


def table_rows(out: str) -> dict[str, list[str]]:
    """The printed comparison: label -> [measured, published, difference]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Compared with the paper"))
    rows = {}
    for line in lines[start + 2:]:
        match = re.fullmatch(r"(.+?)\s+(\S+)\s+(\S+)\s+([+-]\S+)", line)
        if not match:
            break
        rows[match.group(1)] = list(match.groups()[1:])
    return rows


def test_the_run_prints_evals_lines_and_the_published_figures_beside_them(paper_run, eval_run):
    out, results, _ = paper_run
    eval_out, eval_results = eval_run
    assert out.splitlines()[:8] == eval_out.splitlines()  # the same eight lines
    assert results["summary"] == eval_results["summary"]  # every figure, exactly
    summary = results["summary"]
    assert summary["images"] == 2 and summary["sent_images"] == 2
    assert summary["sent_tokens"] == len(FOCUS) - 1  # what the edge attends to, but the last
    assert summary["client_acc"] == 0.0 and summary["collab_acc"] == 50.0  # server says 0
    rows = table_rows(out)
    assert list(rows) == ["edge-only accuracy (%)", "collaborative accuracy (%)",
                          "communication cost", "sent token number",
                          "confident images (% of images)"]  # fmt: skip
    assert rows["collaborative accuracy (%)"] == ["50.00", "80.23", "-30.23"]
    assert rows["edge-only accuracy (%)"] == ["0.00", "72.13", "-72.13"]
    cost = summary["comm_cost"]
    assert rows["communication cost"] == [f"{cost:.4f}", "0.2707", f"{cost - 0.2707:+.4f}"]
    assert rows["confident images (% of images)"] == ["0.00", "64.34", "-64.34"]
    # two images are not the paper's 50,000: said, with the size of the sampling error
    assert "this run measured 2 images, the paper all 50,000 of ImageNet-1k val" in out
    assert "over 2 images: 28.16 points" in out
    by_figure = {row["figure"]: row for row in results["comparison"]}
    assert by_figure["sent_tokens"]["difference"] == pytest.approx(
        summary["sent_tokens"] - 148.8113)  # fmt: skip
    assert results["published"]["collab_acc"] == 80.23
    config = results["config"]
    assert config["command"] == "reproduce" and "torch" in config and "timm" in config
    assert config["edge"]["masking_th"] == 0.97 and config["edge"]["uncer_mode"] == "min_entropy"
    assert config["data"]["crop_pct"] == 0.875 and config["data"]["data_set"] == "imagenet"
    assert config["weights_sha256"]["edge"] == reproduce.file_sha256(config["edge_model"]
                                                                     ["weights"])  # fmt: skip


def test_the_comparison_over_all_50000_images_counts_the_confident_ones():
    summary = Summary(images=50_000, num_patches=196, confident_images=32_000, sent_images=18_000,
                      sent_tokens=150.0, avg_min_attention=0.001, avg_sum_attention=0.97,
                      comm_cost=0.2755, client_acc=72.126, client_acc5=91.0, collab_acc=80.3,
                      collab_acc5=95.0)  # fmt: skip
    rows = reproduce.compare(summary)
    assert rows[-1].figure == "confident_images" and rows[-1].difference == -171
    text = reproduce.format_comparison(rows, summary.images)
    assert "Note" not in text
    printed = table_rows(text)
    assert printed["confident images"] == ["32000", "32171", "-171"]
    assert printed["edge-only accuracy (%)"] == ["72.13", "72.13", "+0.00"]  # never -0.00
    assert printed["collaborative accuracy (%)"] == ["80.30", "80.23", "+0.07"]


@pytest.mark.parametrize("case", ["unreachable", "offline, empty cache", "server file missing"])
def test_without_weights_offline_one_line_names_the_files(case, files, monkeypatch, tmp_path):
    args = ["reproduce", "--data-path", str(files["images"]), "--state-file",
            str(tmp_path / "state.json")]
    if case == "unreachable":
        monkeypatch.setattr("collabvit.models.vit._hub_reachable", lambda: False)
    else:  # HF_HUB_OFFLINE=1 over an empty hub cache
        import huggingface_hub

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    if case == "server file missing":
        args += ["--model-weights", str(files["edge"])]
    status, out, err = cli(*args)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    server = "--server-weights deit_base_patch16_224-b5f2ef4d.pth"
    assert server in err and "dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth" in err
    edge = "--model-weights deit_tiny_patch16_224-a1311bcf.pth"
    assert (edge in err) == (case != "server file missing")


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: --data-path"),
    (["--data-path", "x", "--chunk-images", "0"], "expected a whole number >= 1, got 0"),
    (["--data-path", "x", "--model-weights", "/nonexistent/tiny.pth"],
     "weights file /nonexistent/tiny.pth does not exist"),
    (["--data-path", "x", "--masking-th", "0.5"], "unrecognized arguments: --masking-th"),
])  # fmt: skip
def test_usage_errors_are_one_line(args, message, tmp_path):
    status, out, err = cli("reproduce", "--state-file", str(tmp_path / "state.json"), *args)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_the_release_files_named_are_timms_own():
    for name, url in ((reproduce.PAPER.edge_model, reproduce.PAPER.edge_weights_url),
                      (reproduce.PAPER.server_model, reproduce.PAPER.server_weights_url)):
        assert timm.models.get_pretrained_cfg(name).url == url


def test_an_interrupted_run_resumes_to_the_same_figures(files, paper_run, monkeypatch,
                                                        tmp_path):  # fmt: skip
    import collabvit.research.evaluate

    monkeypatch.setattr(reproduce, "PAPER", replace(reproduce.PAPER,
                                                    server_model="deit_tiny_patch16_224"))
    state, results = tmp_path / "state.json", tmp_path / "results.json"
    args = paper_args(files, "--chunk-images", "1", "--state-file", str(state),
                      "--results-file", str(results))  # fmt: skip
    evaluate, calls = collabvit.research.evaluate.evaluate, []

    def interrupted_second_chunk(*a, **k):  # Ctrl-C while the second chunk runs
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(collabvit.research.evaluate, "evaluate", interrupted_second_chunk)
    status, out, err = cli(*args)
    assert status == 130 and out == ""
    assert err.strip() == (f"collabvit reproduce: interrupted after 1 of 2 images; --resume "
                           f"continues from {state}")  # fmt: skip
    monkeypatch.setattr(collabvit.research.evaluate, "evaluate", evaluate)
    saved = json.loads(state.read_text())
    assert (saved["done"], saved["running"]["images"]) == (1, 1)

    status, _, err = cli(*args)  # a new run would throw the saved one away
    assert status == 2 and "holds an unfinished run (1 of 2 images): pass --resume" in err
    other = cli(*paper_args(files, "--chunk-images", "1", "--state-file", str(state),
                            "--resume", "--limit", "1"))  # fmt: skip
    assert other[0] == 2 and "is from a run with other data;" in other[2]
    swapped = cli("reproduce", "--data-path", str(files["images"]), "--model-weights",
                  str(files["server"]), "--server-weights", str(files["edge"]), "--state-file",
                  str(state), "--resume")  # fmt: skip
    assert swapped[0] == 2 and "other edge_model, server_model;" in swapped[2]

    status, out, err = cli(*args, "--resume")
    assert status == 0, err
    assert json.loads(results.read_text())["summary"] == paper_run[1]["summary"]
    assert out == paper_run[0][:len(out)]  # the same lines (the sweep's follow there)


def test_the_state_keeps_exact_sums_and_refuses_other_settings(tmp_path):
    running = RunningSummary(num_patches=196, images=3, confident=1, sent_patches=300,
                             nonempty_sent=2, sum_of_min_attention=Fraction(1, 3),
                             sum_of_sum_attention=Fraction(5, 7))  # fmt: skip
    path = tmp_path / "state.json"
    reproduce.save_state(path, {"seed": 0}, 10, 3, running)
    assert reproduce.load_state(path, {"seed": 0}) == (10, 3, running)
    assert reproduce.unfinished(path) == (3, 10)
    with pytest.raises(reproduce.StateError, match="other seed; use another --state-file"):
        reproduce.load_state(path, {"seed": 1})
    path.write_text("{")
    with pytest.raises(reproduce.StateError, match="not a collabvit reproduce state file"):
        reproduce.load_state(path, {"seed": 0})
    assert reproduce.chunk_size(1000, 64) == 1024 and reproduce.chunk_size(1, 3) == 3


def test_the_sweep_draws_the_frontier_with_the_published_point(paper_run):
    out, results, sweep_dir = paper_run
    label = "paper (Im et al., IEEE IoT Journal 2024): 80.23 % at cost 0.2707"
    assert results["sweep"]["published_point"] == {"label": label, "comm_cost": 0.2707,
                                                   "collab_acc": 80.23}  # fmt: skip
    assert f"frontier with the paper's point: {sweep_dir / 'frontier.png'}" in out
    assert label in (sweep_dir / "frontier.svg").read_text()
    points = [json.loads(line) for line in (sweep_dir / "points.jsonl").read_text().splitlines()]
    assert len(points) > 13 and {p["policy"] for p in points} == {"attention_sum_threshold"}
    assert {p["measure"] for p in points} == {"min_entropy"}


def test_the_frontier_marks_and_labels_a_reference_point():
    def point(cost, acc):
        figures = Summary(images=10, num_patches=196, confident_images=5, sent_images=5,
                          sent_tokens=cost * 392, avg_min_attention=0.0, avg_sum_attention=0.9,
                          comm_cost=cost, client_acc=60.0, client_acc5=80.0, collab_acc=acc,
                          collab_acc5=90.0)  # fmt: skip
        return SweepPoint("mean", 1.0, "attention_sum_threshold", 0.9, "min_entropy", 1.0,
                          figures)  # fmt: skip

    points = mark_pareto([point(0.1, 62.0), point(0.3, 66.0), point(0.6, 67.0)])
    paper = reproduce.reference_point()
    axes = plots.frontier_figure(points, 60.0, 68.0, references=[paper]).axes[0]
    diamonds = [line for line in axes.get_lines() if line.get_marker() == "D"]
    assert [tuple(line.get_xydata()[0]) for line in diamonds] == [(0.2707, 80.23)]
    assert diamonds[0].get_label() == paper.label
    assert [text.get_text() for text in axes.texts] == [paper.label]  # labelled beside it
    low, high = axes.get_ylim()
    assert low < 60.0 and high > 80.23  # zoomed to show it
    far = plots.frontier_figure([point(0.5, 0.0)], 0.0, 0.0, references=[paper]).axes[0]
    assert far.get_ylim()[0] == 0.0  # a random pair far below the paper: no negative accuracy
    assert asdict(paper) == {"label": paper.label, "comm_cost": 0.2707, "collab_acc": 80.23}


@pytest.mark.slow
def test_the_papers_own_pair_gives_evals_figures(tmp_path):
    """deit_tiny edge and deit_base server, as the command runs them."""
    images = write_folder(tmp_path / "imagenet")
    edge = save_deit("deit_tiny_patch16_224", tmp_path / "tiny.safetensors", 0, focus=FOCUS)
    base = save_deit("deit_base_patch16_224", tmp_path / "base.pth", 1, favour=1)
    status, out, err = cli("reproduce", "--data-path", str(images), "--model-weights", str(edge),
                           "--server-weights", str(base), "--quiet", "--state-file",
                           str(tmp_path / "state.json"), "--results-file",
                           str(tmp_path / "r.json"))  # fmt: skip
    assert status == 0, err
    status, eval_out, err = cli(
        "eval", "--model", "deit_tiny_patch16_224", "--model-weights", str(edge),
        "--server-model", "deit_base_patch16_224", "--server-weights", str(base),
        "--data-set", "imagenet", "--data-path", str(images), "--masking-mode",
        "attention_sum_threshold", "--masking-th", "0.97", "--uncer-mode", "min_entropy",
        "--uncer-th", "1.0", "--quiet", "--results-file", str(tmp_path / "e.json"))  # fmt: skip
    assert status == 0, err
    assert out.splitlines()[:8] == eval_out.splitlines()
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["summary"] == json.loads((tmp_path / "e.json").read_text())["summary"]
    assert results["summary"]["sent_tokens"] == len(FOCUS) - 1
    assert results["summary"]["collab_acc"] == 50.0  # the server answers class 1
    assert results["config"]["server_model"]["name"] == "deit_base_patch16_224"
    assert results["config"]["weights_sha256"]["server"] == reproduce.file_sha256(base)
