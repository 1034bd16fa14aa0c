"""The `collabvit` command: flags, one-line errors, outputs, DeiT end to end.

Most tests call `main([...])` in-process; a few run the real entry point
(`python -m collabvit`) to check what a shell sees.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from collabvit.cli import build_parser


def run_process(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real entry point, as a shell runs it."""
    return subprocess.run([sys.executable, "-m", "collabvit", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


EVAL_FLAGS = [
    "--model", "--model-weights", "--model-kwargs", "--server-model", "--server-weights",
    "--server-kwargs", "--data-set", "--data-path", "--split", "--crop-pct", "--clutter", "--limit",
    "--inputs-normalized", "--use-ema", "--server-use-ema", "--skip-unreadable",
    "--batch-size", "--num-workers", "--attention-mode", "--masking-mode", "--masking-th",
    "--uncer-mode", "--uncer-th", "--device", "--seed", "--results-file", "--per-image", "--quiet",
    "--budget-bps", "--budget-cost", "--frontier", "--images-per-second", "--codec",
    "--precision",
]  # fmt: skip
REFERENCE_SPELLINGS = [
    "--masking_mode", "--masking_th", "--attention_mode", "--uncer_mode", "--uncer_th",
    "--batch_size", "--data_path", "--server_model", "--data_set",
]  # fmt: skip


def test_help_lists_every_flag():
    result = run_process("eval", "--help")
    assert result.returncode == 0
    for flag in EVAL_FLAGS:
        assert re.search(rf"{flag}\b", result.stdout), flag
    parser_actions = build_parser()._subparsers._group_actions[0].choices["eval"]._actions
    declared = {s for a in parser_actions for s in a.option_strings if s.startswith("--")}
    assert set(EVAL_FLAGS) | set(REFERENCE_SPELLINGS) <= declared
    assert declared - {"--help"} <= set(EVAL_FLAGS) | {
        f.replace("-", "_").replace("__", "--", 1) for f in EVAL_FLAGS
    }


@pytest.mark.parametrize("command", ["eval", "reproduce", "sweep", "visualize", "serve", "edge",
                                     "export", "train"])  # fmt: skip
def test_every_command_answers_help(run_cli, command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: collabvit {command}")
    assert result.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--masking-mode", "topk", "--masking-th", "-3"], "k must be >= 0"),
        (["--masking-mode", "attention_sum_threshold", "--masking-th", "1.2"], r"\[0, 1\]"),
        (["--masking-mode", "median"], "invalid choice"),
        (["--attention-mode", "max"], "invalid choice"),
        (["--uncer-mode", "variance"], "unknown uncertainty mode"),
        (["--uncer-th", "high"], "expected a finite number"),
        (["--uncer-th", "nan"], "expected a finite number"),
        (["--num-workers", "-1"], "expected a whole number >= 0"),
        (["--batch-size", "0"], "expected a whole number >= 1, got 0"),
        (["--data-set", "fmnist", "--data-path", "/nonexistent/fmnist",
          "--model-weights", "/nonexistent/edge.safetensors"], "not found"),
        (["--model", "resnet_pi"], "unknown timm model"),
        (["--model-kwargs", "{img_size: 3"], "not valid JSON"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(run_cli, args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert result.stdout == ""


def test_missing_data_path_with_golden_models(run_cli, golden):
    args = golden.cli_model_args()
    args[args.index("--data-path") + 1] = "/nonexistent/inputs.safetensors"
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "collabvit eval: error: tensor file /nonexistent/inputs.safetensors does not exist"
    )


def test_offline_without_weights_explains_how_to_pass_a_file(run_cli, monkeypatch):
    # Whatever the network: the hub looks unreachable, so no test ever calls it.
    monkeypatch.setattr("collabvit.models.vit._hub_reachable", lambda: False)
    deit = ["--model", "deit_tiny_patch16_224", "--server-model", "deit_base_patch16_224"]
    result = run_cli("eval", *deit, "--data-set", "imagenet", "--data-path", "/tmp")
    assert result.returncode == 2
    assert "--model-weights" in result.stderr and "Traceback" not in result.stderr


def test_reference_spellings_give_the_same_run(run_cli, golden, tmp_path):
    kebab = run_cli("eval", *golden.cli_model_args(), "--masking-mode", "topk", "--masking-th", "5",
                    "--uncer-mode", "shannon_entropy", "--uncer-th", "3.0")  # fmt: skip
    snake = run_cli("eval", *golden.cli_model_args(), "--masking_mode", "topk", "--masking_th", "5",
                    "--uncer_mode", "shannon_entropy", "--uncer_th", "3.0")  # fmt: skip
    assert kebab.returncode == snake.returncode == 0, kebab.stderr + snake.stderr
    assert kebab.stdout == snake.stdout
    expected = golden.expected["summaries"]["mean/topk@5/shannon_entropy@3.0"]
    assert f"Collaborative accuracy: {round(expected['collab_acc'], 4)} %" in kebab.stdout


def write_image_folder(root, classes=("cat", "dog"), per_class=2, size=(260, 300)):
    generator = torch.Generator().manual_seed(0)
    for label in classes:
        folder = root / "val" / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


@pytest.mark.slow
def test_deit_pair_end_to_end_through_the_cli(tmp_path):
    """deit_tiny edge + deit_base server (random weights saved to files), ImageNet-style folder."""
    torch.manual_seed(0)
    save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(),
              str(tmp_path / "tiny.safetensors"))  # fmt: skip
    torch.save({"model": timm.create_model("deit_base_patch16_224", pretrained=False).state_dict()},
               tmp_path / "base.pth")  # fmt: skip
    write_image_folder(tmp_path / "imagenet")
    result = run_process(
        "eval", "--model", "deit_tiny_patch16_224",
        "--model-weights", str(tmp_path / "tiny.safetensors"),
        "--server-model", "deit_base_patch16_224", "--server-weights", str(tmp_path / "base.pth"),
        "--data-set", "imagenet", "--data-path", str(tmp_path / "imagenet"), "--batch-size", "3",
        "--masking-mode", "attention_sum_threshold", "--masking-th", "0.5", "--uncer-mode", "none",
        "--results-file", str(tmp_path / "out" / "results.json"),
        "--per-image", str(tmp_path / "rows.csv"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    gate = "Confidence criterion:: none, 1.0"  # not a shipped pair: the paper's eta
    assert lines[0] == f"* Masking mode:: attention_sum_threshold, 0.5 / {gate}"
    assert lines[2] == "* Total confident image:: 0"
    assert lines[4].startswith("Client only accuracy: ") and lines[5].startswith(
        "Collaborative accuracy: "
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = results["summary"]
    assert summary["images"] == 4 and summary["num_patches"] == 196 and summary["sent_images"] == 4
    assert 0 < summary["sent_tokens"] < 196
    assert summary["comm_cost"] == pytest.approx(summary["sent_tokens"] / 196)
    assert results["config"]["server_model"]["name"] == "deit_base_patch16_224"
    assert results["config"]["edge"]["masking_th"] == 0.5
    assert results["config"]["data"]["crop_pct"] is None  # resolved by the model: DeiT's 0.875
    rows = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert [int(r["label"]) for r in rows] == [0, 0, 1, 1]
    assert all(r["sent"] == "1" for r in rows)
    assert sum(int(r["patches_sent"]) for r in rows) / 4 == pytest.approx(summary["sent_tokens"])


def test_fmnist_images_do_not_fit_an_imagenet_model(run_cli, tmp_path, golden):
    args = golden.cli_model_args()
    args[args.index("--data-set") + 1] = "fmnist"
    args[args.index("--data-path") + 1] = "/usr/share/datasets/fashion-mnist"
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert "images are 1x28x28 but the edge model takes 3x32x32" in result.stderr


def test_sweep_writes_points_frontier_and_a_calibrated_pick(run_cli, golden, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep", *golden.cli_model_args(), "--out-dir", str(out),
        "--policy", "attention_sum_threshold=0.9,0.97", "--policy", "topk=4",
        "--uncer-modes", "min_entropy", "margin", "--num-etas", "4",
        "--budget", "0.6", "--temperature-scaling",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert len(rows) == len(points)
    # 3 selections x (at most 4 etas x 2 measures) x 2 temperatures
    assert 3 * 2 * 2 <= len(points) <= 3 * 8 * 2
    assert {p["temperature"] == 1.0 for p in points} == {True, False}
    # Pareto over the whole file: marked points are unbeaten, every other point is beaten.
    for p in points:
        beaten = any(
            q["comm_cost"] <= p["comm_cost"] and q["collab_acc"] >= p["collab_acc"]
            and (q["comm_cost"], q["collab_acc"]) != (p["comm_cost"], p["collab_acc"])
            for q in points
        )  # fmt: skip
        duplicate_first = next(q for q in points if (q["comm_cost"], q["collab_acc"])
                               == (p["comm_cost"], p["collab_acc"]))  # fmt: skip
        assert p["pareto"] == (not beaten and duplicate_first is p)
    assert any(p["comm_cost"] == 0.0 and p["sent_images"] == 0 for p in points)  # edge alone
    assert all(p["calibration"]["images"] == 8 and p["held_out"]["images"] == 8 for p in points)
    report = json.loads((out / "sweep.json").read_text())
    pick = report["pick"]["uncalibrated"]
    fitting = [p for p in points if p["temperature"] == 1.0 and
               p["calibration"]["comm_cost"] <= 0.6]  # fmt: skip
    assert pick["calibration"]["collab_acc"] == max(p["calibration"]["collab_acc"] for p in fitting)
    assert pick["calibration"]["comm_cost"] <= 0.6
    assert report["temperature"]["mean"]["temperature"] > 0
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "frontier.svg").is_file()
    assert "budget 0.6 (uncalibrated):" in result.stdout
    assert "best collaborative accuracy (%) at communication cost <=" in result.stdout

    # The picked point is exactly what `collabvit eval` reports for those settings.
    again = run_cli(
        "eval", *golden.cli_model_args(), "--masking-mode", pick["policy"],
        "--masking-th", str(pick["threshold"]), "--uncer-mode", pick["measure"],
        "--uncer-th", repr(pick["eta"]), "--results-file", str(tmp_path / "eval.json"),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert summary["collab_acc"] == pytest.approx(pick["collab_acc"], abs=1e-9)
    assert summary["comm_cost"] == pytest.approx(pick["comm_cost"], abs=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "median=3"], "expected MODE=TH"),
        (["--policy", "topk=a,b"], "expected numbers separated by commas"),
        (["--policy", "topk=99"], "only 16"),
        (["--policy", "attention_sum_threshold=1.5"], r"\[0, 1\]"),
        (["--num-etas", "3", "--etas", "0.1"], "not allowed with argument"),
        (["--budget", "0.2", "--calibration-fraction", "1.5"], r"expected a number in \(0, 1\)"),
        (["--budget", "0.2", "--target-acc", "90"], "not allowed with argument"),
        (["--compare-at", "-0.1"], "costs must be >= 0"),
        (["--etas", "nan"], "expected finite numbers"),
        (["--num-etas", "100000000000"], r"expected a whole number in 1\.\.1000"),
        (["--budget", "-1"], "expected a cost >= 0"),
        (["--target-acc", "150"], r"expected an accuracy in \[0, 100\]"),
    ],
)  # fmt: skip
def test_sweep_bad_input_is_one_line_and_status_2(run_cli, golden, tmp_path, args, message):
    result = run_cli("sweep", *golden.cli_model_args(), "--out-dir", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_visualize_draws_views_and_the_attention_histogram(run_cli, golden, tmp_path):
    result = run_cli(
        "visualize", *golden.cli_model_args(), "--output-dir", str(tmp_path),
        "--output_list", "0", "3", "--masking-mode", "topk", "--masking-th", "5",
        "--attention-histogram", "--bins", "10",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for index in ("00000", "00003"):
        for view in ("original", "heatmap", "masked"):
            assert (tmp_path / f"{index}_{view}.png").stat().st_size > 500
    assert "server on 5/16 patches" in result.stdout
    assert f"all 2 on one sheet: {tmp_path / 'views.png'}" in result.stdout
    with Image.open(tmp_path / "views.png") as sheet:  # two rows of three views
        assert sheet.height > sheet.width / 2
    rows = list(csv.DictReader((tmp_path / "attention_histogram.csv").open()))
    assert len(rows) == 10
    assert sum(int(r["patches"]) for r in rows) == 16 * 16  # 16 images x 16 patches
    assert (tmp_path / "attention_histogram.png").is_file()
    assert (tmp_path / "attention_histogram.svg").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--indices", "16"], r"outside the dataset \(0..15\)"),
        (["--indices", "-1"], r"outside the dataset"),
        (["--attention-histogram", "--bins", "10000000000"], r"1\.\.10000"),
        ([], "nothing to draw"),
    ],
)
def test_visualize_bad_input(run_cli, golden, tmp_path, args, message):
    result = run_cli("visualize", *golden.cli_model_args(), "--output-dir", str(tmp_path), *args)
    assert result.returncode == 2
    assert re.search(message, result.stderr) and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------- failures after set-up


def tiny_folder_pair(tmp_path, classes=("n01440764", "n01443537"), corrupt=False):
    """A tiny random ViT pair saved to files and an ImageNet-style folder of 32x32 PNGs."""
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3,
              "num_classes": 1000}  # fmt: skip
    torch.manual_seed(0)
    for role in ("edge", "server"):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
        save_file(model.state_dict(), str(tmp_path / f"{role}.safetensors"))
    write_image_folder(tmp_path / "images", classes=classes, per_class=2, size=(32, 32))
    if corrupt:
        (tmp_path / "images" / "val" / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n")
    return [
        "--model", "vit_tiny_patch16_224", "--model-weights", str(tmp_path / "edge.safetensors"),
        "--model-kwargs", json.dumps(kwargs), "--server-model", "vit_tiny_patch16_224",
        "--server-weights", str(tmp_path / "server.safetensors"),
        "--server-kwargs", json.dumps(kwargs), "--data-set", "imagenet",
        "--data-path", str(tmp_path / "images"), "--crop-pct", "1.0", "--quiet",
    ]  # fmt: skip


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_a_corrupt_image_is_named_or_skipped_and_counted(run_cli, tmp_path):
    args = tiny_folder_pair(tmp_path, corrupt=True)
    assert_one_line_error(run_cli("eval", *args), r"cannot read image .*broken\.png")
    result = run_cli("eval", *args, "--skip-unreadable", "--results-file",
                     str(tmp_path / "r.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable images" in result.stderr
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"]["images"] == 4 and saved["skipped_images"] == 1


def test_synset_folders_score_with_their_imagenet_indices(run_cli, tmp_path):
    args = tiny_folder_pair(tmp_path)
    result = run_cli("eval", *args, "--per-image", str(tmp_path / "rows.csv"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert [int(r["label"]) for r in rows] == [0, 0, 1, 1]  # tench, goldfish: ImageNet 0 and 1
    assert result.stderr == ""  # synsets fit a 1000-class head: nothing to warn about


def test_folders_that_do_not_fit_the_head_warn_and_visualize_names_every_class(run_cli,
                                                                               tmp_path):
    args = tiny_folder_pair(tmp_path, classes=("cat", "dog"))
    result = run_cli("eval", *args)
    assert result.returncode == 0
    assert "warning: " in result.stderr and "folder order" in result.stderr
    # The models answer with any of 1000 classes; the folder has names for two.
    result = run_cli("visualize", *args, "--indices", "0", "--output-dir", str(tmp_path / "v"))
    assert result.returncode == 0, result.stderr
    assert "image 0: label cat;" in result.stdout


@pytest.mark.parametrize(
    "flag, make_path, message",
    [
        ("--results-file", lambda d: d, "is a folder"),
        ("--per-image", lambda d: d / "a-file" / "rows.csv", "cannot create the folder"),
    ],
)
def test_output_paths_are_checked_before_any_work(run_cli, golden, tmp_path, flag, make_path,
                                                  message):
    (tmp_path / "a-file").write_text("")
    result = run_cli("eval", *golden.cli_model_args(), flag, str(make_path(tmp_path)))
    assert_one_line_error(result, message)
    assert result.stdout == ""  # nothing ran


@pytest.mark.parametrize(
    "device, message",
    [("cuda", "CUDA is not available"), ("tpu9", "unknown device"), ("cuda:x", "unknown device")],
)
def test_an_unusable_device_is_one_line(run_cli, golden, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    assert_one_line_error(run_cli("eval", *golden.cli_model_args(), "--device", device), message)


def test_help_and_usage_errors_do_not_load_torch():
    code = ("import sys; from collabvit.cli import main\n"
            "try:\n    main(['eval', '--masking-th', 'x'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    assert "expected a finite number" in result.stderr


def test_the_real_entry_point_runs_an_evaluation(golden, tmp_path):
    result = run_process("eval", *golden.cli_model_args(), "--masking-mode", "topk",
                         "--masking-th", "5", "--uncer-mode", "shannon_entropy", "--uncer-th",
                         "3.0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = golden.expected["summaries"]["mean/topk@5/shannon_entropy@3.0"]
    assert f"Collaborative accuracy: {round(expected['collab_acc'], 4)} %" in result.stdout
    assert len(result.stdout.splitlines()) == 8


def test_val_split_warns_when_a_model_trained_on_it(run_cli, tmp_path):
    """Weights from an older run that held out another validation split (its own seed)."""
    from collabvit.models import vit

    state = vit.create_vit("collabvit_fmnist_edge").state_dict()
    config = {"model": "collabvit_fmnist_edge", "val_size": 5000, "seed": 1, "train_limit": None}
    weights = tmp_path / "edge.safetensors"
    save_file(state, str(weights), metadata={"config": json.dumps(config)})
    args = ["--model-weights", str(weights), "--limit", "20", "--quiet"]
    result = run_cli("eval", *args, "--split", "val")
    assert result.returncode == 0, result.stderr
    assert "warning: the edge model collabvit_fmnist_edge was trained on 4588" in result.stderr
    assert "warning" not in run_cli("eval", *args, "--split", "test").stderr
