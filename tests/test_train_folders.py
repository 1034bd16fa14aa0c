"""`collabvit train` on an image folder: fine-tuning from a weights file, token drop,
distillation, resume, and the same step on one process or several."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collabvit.cli import main
from collabvit.config.train import TrainConfig
from collabvit.data import FashionMNIST
from collabvit.models import vit
from collabvit.research.train import Trainer
from collabvit.research.train_data import ImageFolderTraining

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["bag", "sneaker", "trouser"]  # Fashion-MNIST labels 8, 7, 1
LABELS = {"bag": 8, "sneaker": 7, "trouser": 1}
# a tiny RGB ViT at 32 x 32 (4 x 4 patches of 8): a few milliseconds a step
ARCHITECTURE = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
MODEL = "vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, per_class: dict[str, int], offset: int = 0) -> None:
    """Fashion-MNIST training images of CLASSES as PNG files in class folders."""
    data = FashionMNIST(FMNIST, "train-all")
    for split, count in per_class.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rows = np.flatnonzero(data.labels.numpy() == LABELS[name])[offset : offset + count]
            for row in rows:
                Image.fromarray(data.images[row, 0].numpy()).save(folder / f"{row}.png")
        offset += count


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, {"train": 16, "val": 4})
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A randomly initialised 10-class ViT saved as a weights file to fine-tune from."""
    torch.manual_seed(1)
    model = vit.create_vit(MODEL, model_kwargs={**ARCHITECTURE, "num_classes": 10},
                           pretrained=False)  # fmt: skip
    path = tmp_path_factory.mktemp("weights") / "pretrained.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def train_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-set", "imagenet", "--data-path", str(folder), "--model", MODEL,
            "--model-kwargs", json.dumps(ARCHITECTURE), "--epochs", "1", "--batch-size", "12",
            "--warmup-epochs", "0", "--quiet", "--out-dir", str(out), *extra]  # fmt: skip


def test_fine_tuning_on_an_image_folder_starts_from_the_weights_with_a_new_head(
        image_folder, pretrained, tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    # a learning rate too small to move anything: what is exported is what was loaded
    status = main(train_args(image_folder, out, "--init-weights", str(pretrained), "--lr",
                             "1e-12", "--min-lr", "0", "--weight-decay", "0"))  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "wrote" in printed.out and "validation" in printed.out and ", test " not in printed.out
    card = json.loads((out / "model_card.json").read_text())
    assert card["classes"] == CLASSES and card["data"]["validation_images"] == 12
    assert card["data"]["train_images"] == 48
    assert card["training"]["model_kwargs"]["num_classes"] == 3  # from the class folders
    assert card["initial_weights"]["new_head"] == ["head.bias", "head.weight"]
    assert len(card["initial_weights"]["sha256"]) == 64
    trained, start = load_file(str(out / "model.safetensors")), load_file(str(pretrained))
    assert trained["head.weight"].shape == (3, 48)
    for name in ("blocks.1.mlp.fc2.weight", "pos_embed", "patch_embed.proj.weight"):
        torch.testing.assert_close(trained[name], start[name], atol=1e-6, rtol=0)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["classes"]) == CLASSES
    # the exported model evaluates, serves and trains further (as a teacher), naming its
    # classes, with no --model-kwargs: its weights record the architecture
    from collabvit.config import DataSpec, ModelSpec
    from collabvit.models.pair import load_pair
    from collabvit.research.teacher import load_teacher
    from collabvit.serve.model import load_served_model

    assert load_teacher(out).num_classes == 3
    spec = ModelSpec(MODEL, weights=str(out / "model.safetensors"))
    pair = load_pair(spec, spec, DataSpec(data_set="imagenet", data_path=str(image_folder)))
    assert pair.class_names() == CLASSES and len(pair.dataset) == 12
    load, _ = load_served_model(spec, "cpu", None, "float32", 8)
    assert load().class_names == CLASSES
    status = main(["eval", "--data-set", "imagenet", "--data-path", str(image_folder),
                   "--model", MODEL, "--model-weights", spec.weights, "--server-model", MODEL,
                   "--server-weights", spec.weights, "--quiet"])  # fmt: skip
    assert status == 0 and "Collaborative accuracy" in capsys.readouterr().out


def test_a_pretrained_grid_of_another_size_is_resampled(image_folder, tmp_path):
    """Weights made for 64 x 64 images (8 x 8 patches) start a 32 x 32 model: the position
    embeddings are resampled to its 4 x 4 grid, as timm does for pretrained weights."""
    torch.manual_seed(2)
    larger = vit.create_vit(MODEL, model_kwargs={**ARCHITECTURE, "img_size": 64},
                            pretrained=False)  # fmt: skip
    path = tmp_path / "larger.safetensors"
    save_file(larger.state_dict(), str(path))
    trainer = Trainer(TrainConfig(data_set="imagenet", data_path=str(image_folder), model=MODEL,
                                  model_kwargs=ARCHITECTURE, init_weights=str(path)),
                      tmp_path / "run", progress=False)  # fmt: skip
    assert trainer.model.pos_embed.shape == (1, 17, 48)
    torch.testing.assert_close(trainer.model.blocks[0].attn.qkv.weight,
                               larger.blocks[0].attn.qkv.weight)  # fmt: skip


def test_weights_that_do_not_fit_and_an_offline_hub_are_one_line(image_folder, tmp_path,
                                                                  monkeypatch, capsys):  # fmt: skip
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(other))
    for weights, expected in ((str(other), "do not fit"), ("missing.pth", "not found"),
                              ("pretrained", "hub is unreachable")):  # fmt: skip
        monkeypatch.setattr(vit, "_hub_reachable", lambda: False)
        status = main(train_args(image_folder, tmp_path / weights.replace("/", "_"),
                                 "--init-weights", weights))  # fmt: skip
        err = capsys.readouterr().err
        assert status == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert "huggingface.co/timm/vit_tiny_patch16_224" in err  # where to get the file


def test_a_folder_that_is_not_one_is_one_line(tmp_path, capsys, image_folder):
    write_folder(tmp_path / "mixed", {"train": 2})
    (tmp_path / "mixed" / "val" / "shoe").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "val" / "shoe" / "a.png")
    cases = ((tmp_path / "empty", "has no train/ folder"),
             (tmp_path / "mixed", "other class folders"))  # fmt: skip
    (tmp_path / "empty").mkdir()
    for folder, expected in cases:
        status = main(train_args(folder, tmp_path / "out"))
        err = capsys.readouterr().err
        assert status == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    status = main(train_args(image_folder, tmp_path / "out", "--model-kwargs",
                             json.dumps({**ARCHITECTURE, "num_classes": 5})))  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "3 classes" in err and "num_classes" in err
    status = main(["train", "--data-set", "imagenet", "--out-dir", str(tmp_path / "o")])
    assert status == 2 and "needs --data-path" in capsys.readouterr().err


def test_without_val_a_tenth_of_train_is_held_out_whatever_the_seed(tmp_path):
    write_folder(tmp_path / "only-train", {"train": 20})
    model = vit.create_vit(MODEL, model_kwargs={**ARCHITECTURE, "num_classes": 3},
                           pretrained=False)  # fmt: skip
    held = [ImageFolderTraining(tmp_path / "only-train", model, True, seed) for seed in (0, 7)]
    assert held[0].val_count == 6 and len(held[0].labels) == 54
    assert held[0].val_rows == held[1].val_rows and held[0].samples == held[1].samples
    trained = set(held[0].samples)
    validated = {held[0].val.samples[row][0] for row in held[0].val_rows}
    assert not trained & validated and len(trained | validated) == 60


def test_an_augmentation_depends_on_its_seed_alone(image_folder):
    model = vit.create_vit(MODEL, model_kwargs={**ARCHITECTURE, "num_classes": 3},
                           pretrained=False)  # fmt: skip
    data = ImageFolderTraining(image_folder, model, True, seed=3)
    first = data.augmented_image(5, 1234)
    torch.manual_seed(99)  # the global generators do not matter ...
    assert torch.equal(data.augmented_image(5, 1234), first) and first.dtype == torch.uint8
    assert first.shape == (3, 32, 32)
    assert not torch.equal(data.augmented_image(5, 1235), first)  # ... the seed does
    # this process's rows of each batch, whichever rows it trains on
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(0))
    whole = list(data.batches(order, 12, lambda n: slice(0, n), torch.Generator(), epoch=2))
    halves = [list(data.batches(order, 12, lambda n, r=r: slice(n * r // 2, n * (r + 1) // 2),
                                torch.Generator(), epoch=2)) for r in (0, 1)]  # fmt: skip
    for step, (index, _, images) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), index)
        assert torch.equal(torch.cat([halves[0][step][2], halves[1][step][2]]), images)


@pytest.mark.parametrize(("data_set", "world"), [("imagenet", 2), ("fmnist", 2),
                                                ("fmnist", 4)])  # fmt: skip
def test_the_shares_of_several_processes_make_the_step_of_one(image_folder, tmp_path,
                                                               data_set, world):  # fmt: skip
    """The processes' losses, each on its share of the global batch and weighted by it,
    average (as DDP averages) to the gradient one process takes on the whole batch: with
    token drop, and on a short last batch split unevenly (with 4 processes, 2 of them get
    none of its 2 images)."""
    kwargs = dict(model=MODEL, model_kwargs={**ARCHITECTURE, "num_classes": 10}, token_drop=0.5,
                  batch_size=8, seed=4)  # fmt: skip
    if data_set == "imagenet":
        kwargs.update(data_set="imagenet", data_path=str(image_folder), model_kwargs=ARCHITECTURE)
    else:
        kwargs.update(model="collabvit_fmnist_edge", model_kwargs={"depth": 1, "embed_dim": 24},
                      train_limit=10)  # fmt: skip

    def gradients(world: int, rank: int, step: int) -> dict[str, torch.Tensor]:
        processes = types.SimpleNamespace(world_size=world, rank=rank, device="cpu",
                                          distributed=False, is_main=rank == 0)  # fmt: skip
        trainer = Trainer(TrainConfig(**kwargs), tmp_path / f"{world}-{rank}", progress=False,
                          processes=processes)  # fmt: skip
        generator = torch.Generator().manual_seed(11)
        order = torch.arange(len(trainer.train_labels))
        batches = trainer.data.batches(order, 8, trainer.shard, generator, epoch=0)
        for _ in range(step + 1):
            index, augmentations, images = next(batches)
        count = min(8, len(order) - 8 * step)
        if len(index):
            labels = trainer.train_labels[index]
            loss, _ = trainer._loss(images, labels, generator, (index, augmentations),
                                    trainer.shard(count), count)  # fmt: skip
        else:
            loss = trainer._zero_loss()
        loss.backward()
        return {n: p.grad / world for n, p in trainer.model.named_parameters()}

    steps = (0,) if data_set == "imagenet" else (0, 1)  # 10 images: a last batch of 2
    for step in steps:
        one = gradients(1, 0, step)
        shares = [gradients(world, rank, step) for rank in range(world)]
        for name, gradient in one.items():
            torch.testing.assert_close(sum(share[name] for share in shares), gradient,
                                       atol=1e-6, rtol=1e-4)  # fmt: skip


def test_a_batch_that_does_not_divide_among_the_processes_is_one_line(image_folder, tmp_path):
    processes = types.SimpleNamespace(world_size=4, rank=0, device="cpu", distributed=True,
                                      is_main=True)  # fmt: skip
    config = TrainConfig(data_set="imagenet", data_path=str(image_folder), model=MODEL,
                         model_kwargs=ARCHITECTURE, batch_size=10)  # fmt: skip
    with pytest.raises(ValueError, match="batch size 10 does not divide among 4 processes"):
        Trainer(config, tmp_path, progress=False, processes=processes)


def test_token_drop_distillation_and_resume_on_an_image_folder(image_folder, pretrained,
                                                               tmp_path, capsys):  # fmt: skip
    """The server recipe (fine-tuned with token drop, EMA), then an edge distilled from it;
    a run stopped after one epoch and resumed equals one run straight through."""
    server = tmp_path / "server"
    assert main(train_args(image_folder, server, "--init-weights", str(pretrained),
                           "--token-drop", "0.5", "--ema-decay", "0.9")) == 0  # fmt: skip
    edge_args = ["--teacher", str(server), "--distill", "soft", "--epochs", "2",
                 "--auto-augment", "none", "--mixup", "0.2"]
    assert main(train_args(image_folder, tmp_path / "straight", *edge_args)) == 0
    assert main(train_args(image_folder, tmp_path / "resumed", *edge_args, "--stop-after",
                           "1")) == 0  # fmt: skip
    assert main(train_args(image_folder, tmp_path / "resumed", *edge_args, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "resuming after epoch 1" in printed
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=0, rtol=0)
    card = json.loads((tmp_path / "resumed" / "model_card.json").read_text())
    assert card["teacher"]["source"] == str(server) and card["epochs_trained"] == 2
    assert card["data"]["transform"]["auto_augment"] is None


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(processes), "--master-port", str(29_500 + os.getpid() % 1000 + processes),
               "-m", "collabvit", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)  # fmt: skip


@pytest.mark.slow
def test_two_processes_train_the_weights_one_does_and_resume_with_any_count(
        image_folder, pretrained, tmp_path):  # fmt: skip
    args = ["--init-weights", str(pretrained), "--token-drop", "0.5", "--ema-decay", "0.9",
            "--epochs", "2", "--seed", "3"]
    one = subprocess.run([sys.executable, "-m", "collabvit",
                          *train_args(image_folder, tmp_path / "one", *args)],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(2, *train_args(image_folder, tmp_path / "two", *args))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote") == 1  # the first process alone reports and writes
    weights = [load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=2e-5, rtol=1e-4)
    cards = [json.loads((tmp_path / run / "model_card.json").read_text()) for run in ("one", "two")]
    assert [r["val_acc"] for r in cards[0]["log"]] == [r["val_acc"] for r in cards[1]["log"]]
    assert cards[1]["hardware"][0].endswith("2 processes: 2 epochs")
    # a checkpoint of one process resumes on two, and the log says so
    first = subprocess.run([sys.executable, "-m", "collabvit",
                            *train_args(image_folder, tmp_path / "mixed", *args, "--stop-after",
                                        "1")],
                           capture_output=True, text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = torchrun(2, *train_args(image_folder, tmp_path / "mixed", *args, "--resume"))
    assert resumed.returncode == 0 and "resuming after epoch 1 on 2 processes" in resumed.stdout
    mixed = load_file(str(tmp_path / "mixed" / "model.safetensors"))
    for name, value in weights[0].items():
        torch.testing.assert_close(mixed[name], value, atol=2e-5, rtol=1e-4)
    hardware = json.loads((tmp_path / "mixed" / "model_card.json").read_text())["hardware"]
    assert len(hardware) == 2 and hardware[1].endswith("2 processes: 1 epoch")
