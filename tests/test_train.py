"""train.py: schedule, split, augmentation, token drop, a short run, resume, export."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from collabvit import cpu_model
from collabvit.cli import main
from collabvit.config.train import TrainConfig
from collabvit.data import FashionMNIST, split_indices, val_overlap
from collabvit.lite.protocol import patchify
from collabvit.models import vit
from collabvit.models.zoo import recorded_training_config
from collabvit.research.teacher import TeacherOutputs, distillation_loss, load_teacher
from collabvit.research.train import Trainer, drop_tokens, lr_scheduler, training_time
from collabvit.research.train_data import (
    apply_augmentations,
    augment,
    augmentation_count,
    draw_augmentations,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
# a one-block ViT at a quarter of the shipped edge's width: every epoch validates on 5,000
# images, and the width decides what that costs
TINY = {"depth": 1, "embed_dim": 24}
TINY_FLAG = json.dumps(TINY)


def _rates(total_steps: int, warmup_steps: int, steps) -> list[float]:
    """The learning rate optimiser step s trains at, for each s in steps (lr 1e-3, min 1e-5)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = lr_scheduler(optimizer, total_steps, warmup_steps, min_lr=1e-5)
    rates = []
    for step in steps:
        scheduler.step_update(step)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_learning_rate_warms_up_linearly_then_decays_to_the_minimum():
    # 100 steps, 10 of warm-up: step s < 10 trains at 1e-3 (s + 1) / 10, step 9 is the peak,
    # then a cosine over the remaining 91 steps reaches 1e-5 at step 100. (The former
    # hand-written schedule held the peak for steps 9 and 10 and ran its cosine over 90
    # steps from step 10: identical warm-up, e.g. 0.000505 instead of 0.000496 at step 55.)
    steps = [0, 4, 8, 9, 10, 55, 99, 100]
    expected = [1e-4, 5e-4, 9e-4, 1e-3, 0.00099970504957278, 0.0004964559827518327,
                1.029495042722015e-05, 1e-5]  # fmt: skip
    assert _rates(100, 10, steps) == pytest.approx(expected, rel=1e-12)
    rates = _rates(100, 10, range(101))
    assert all(a > b for a, b in zip(rates[9:], rates[10:], strict=False))  # decays after the peak


def test_learning_rate_without_warm_up_is_a_plain_cosine():
    assert _rates(100, 0, [0, 50, 99]) == pytest.approx(
        [1e-3, 0.000505, 1.0244252618962858e-05], rel=1e-12
    )


def test_split_is_disjoint_complete_and_seeded():
    train, val = split_indices(100, 20, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(split_indices(100, 20, seed=3)[1], val)
    assert not torch.equal(split_indices(100, 20, seed=4)[1], val)
    with pytest.raises(ValueError):
        split_indices(10, 10, seed=0)


def test_augment_shifts_and_flips_without_changing_pixels():
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[0, 0, 3, 2] = 200
    out = augment(image.repeat(64, 1, 1, 1), torch.Generator().manual_seed(0), shift=2)
    assert out.dtype == torch.uint8 and out.shape == (64, 1, 8, 8)
    assert (out.flatten(1).amax(1) == 200).all() and ((out > 0).flatten(1).sum(1) == 1).all()
    positions = {tuple(torch.nonzero(o[0])[0].tolist()) for o in out}
    assert len(positions) > 5  # really random
    assert all(abs(r - 3) <= 2 and (abs(c - 2) <= 2 or abs(c - 5) <= 2) for r, c in positions)


def test_each_augmentation_index_is_one_shift_and_flip():
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[0, 0, 3, 1] = 200
    count = augmentation_count(shift=2)
    assert count == 50
    out = apply_augmentations(image.repeat(count, 1, 1, 1), torch.arange(count), shift=2)
    places = [tuple(torch.nonzero(o[0])[0].tolist()) if o.any() else None for o in out]
    for index, place in enumerate(places):
        flip, dy, dx = index // 25, index // 5 % 5, index % 5
        column = 1 + (2 - dx)  # the image moves right by shift - dx pixels (zero fill)
        expected = (3 + (2 - dy), 7 - column if flip else column)
        assert place == (expected if 0 <= column < 8 else None), index
    # the 10 shifts by 2 to the left push the pixel out; the other 40 places are distinct
    assert places.count(None) == 10 and len(set(places) - {None}) == 40
    # augment is one draw of indices, then applying them
    images = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8)
    drawn = draw_augmentations(16, torch.Generator().manual_seed(4))
    assert drawn.min() >= 0 and drawn.max() < count and len(set(drawn.tolist())) > 5
    assert torch.equal(augment(images, torch.Generator().manual_seed(4)),
                       apply_augmentations(images, drawn))


def test_drop_tokens_keeps_a_random_subset_within_bounds():
    images = torch.randn(4, 1, 28, 28)
    sizes = set()
    for seed in range(20):
        patches, positions = drop_tokens(images, (4, 4), 0.8, torch.Generator().manual_seed(seed))
        keep = positions.shape[1]
        sizes.add(keep)
        assert math.ceil(49 * 0.2) <= keep <= 49
        assert all(len(set(row.tolist())) == keep for row in positions)
        full = patchify(images, (4, 4))
        assert torch.equal(patches[2], full[2, positions[2]])
    assert len(sizes) > 3


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="token drop"):
        TrainConfig(token_drop=1.0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_config_has_no_validation_size_to_disagree_with_the_split():
    assert "val_size" not in asdict(TrainConfig())


@needs_fmnist
def test_training_holds_out_the_val_split_whatever_the_seed(tmp_path):
    """Seed 1 trains on images of `--split train` and validates on exactly `--split val`."""
    config = TrainConfig(model_kwargs=TINY, train_limit=300, seed=1)
    trainer = Trainer(config, tmp_path, progress=False)
    val, train = FashionMNIST(FMNIST, "val"), FashionMNIST(FMNIST, "train")
    assert torch.equal(trainer.data.val_images, val.images)
    assert torch.equal(trainer.data.val_labels, val.labels)
    assert torch.equal(trainer.data.images, train.images[:300])
    assert torch.equal(trainer.train_labels, train.labels[:300])


@needs_fmnist
def test_short_run_resume_and_export_loadable(tmp_path):
    """A few hundred images, one epoch; resuming for a second epoch equals training two at once."""
    kwargs = dict(model="collabvit_fmnist_edge", model_kwargs=TINY, train_limit=256,
                  batch_size=64, seed=5)  # fmt: skip
    straight = Trainer(TrainConfig(epochs=2, **kwargs), tmp_path / "straight", progress=False)
    straight.fit()
    first = Trainer(TrainConfig(epochs=2, **kwargs), tmp_path / "resumed", progress=False)
    first.train_epoch(0)  # one epoch, then "crash" after checkpointing
    first.log.append({"epoch": 1})
    first.save_checkpoint(1)
    second = Trainer(TrainConfig(epochs=2, **kwargs), tmp_path / "resumed", progress=False)
    assert second.resume() and second.start_epoch == 1
    second.fit()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, atol=0, rtol=0)
    # 4 steps an epoch, 8 in all, 4 of warm-up: the peak at step 3, then the cosine (see above)
    assert [r["lr"] for r in straight.log] == pytest.approx([1e-3, 0.00010453658778440107])

    weights = straight.export()
    card = json.loads((tmp_path / "straight" / "model_card.json").read_text())
    assert card["training"]["seed"] == 5 and card["collabvit"] and card["parameters"] > 0
    assert card["training_seconds"] == round(sum(record["seconds"] for record in straight.log))
    assert card["hardware"] == [f"{cpu_model()}, {torch.get_num_threads()} threads: 2 epochs"]
    split = {"size": 5000, "seed": 0}
    assert card["training"]["validation_split"] == split
    assert card["data"]["validation_split"] == split and card["data"]["validation_images"] == 5000
    with safe_open(str(weights), framework="pt") as handle:
        assert json.loads(handle.metadata()["config"]) == card["training"]
    assert recorded_training_config("collabvit_fmnist_edge", weights) == card["training"]
    assert val_overlap(card["training"]) == 0
    loaded = vit.create_vit("collabvit_fmnist_edge", weights, TINY)
    x = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), straight.model.eval()(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(TrainConfig(epochs=3, **kwargs), tmp_path / "straight", progress=False).resume()
    # a checkpoint written before a config field existed was made with its default
    state = torch.load(second.checkpoint_path, weights_only=True)
    del state["config"]["clutter"]
    torch.save(state, second.checkpoint_path)
    assert second.resume() and second.start_epoch == 2


@needs_fmnist
def test_train_command_stops_resumes_and_writes_weights_the_eval_loader_accepts(tmp_path,
                                                                              capsys):  # fmt: skip
    """`collabvit train --stop-after 1` of a 2-epoch schedule, refused again without --resume,
    resumed to the schedule's end; eval loads the weights."""
    out = tmp_path / "run"
    args = ["train", "--model", "collabvit_fmnist_edge", "--model-kwargs", TINY_FLAG,
            "--out-dir", str(out), "--epochs", "2", "--train-limit", "300",
            "--token-drop", "0.5", "--quiet"]  # fmt: skip
    assert main([*args, "--stop-after", "1"]) == 0
    assert "validation" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1
    card = json.loads((out / "model_card.json").read_text())
    assert card["epochs_trained"] == 1 and card["training"]["epochs"] == 2
    assert main(args) == 2  # refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--stop-after", "3"]) == 2
    assert "beyond the schedule's 2 epochs" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # on to the end of the schedule
    card = json.loads((out / "model_card.json").read_text())
    assert card["epochs_trained"] == 2 and [r["epoch"] for r in card["log"]] == [1, 2]
    assert main([*args, "--resume", "--stop-after", "1"]) == 2
    assert "past --stop-after 1" in capsys.readouterr().err
    # eval of the written weights on the validation split measures the accuracy the run logged
    status = main(["eval", "--data-set", "fmnist", "--split", "val", "--quiet",
                   "--model", "collabvit_fmnist_edge", "--model-kwargs", TINY_FLAG,
                   "--model-weights", str(out / "model.safetensors"),
                   "--server-model", "collabvit_fmnist_edge", "--server-kwargs", TINY_FLAG,
                   "--server-weights", str(out / "model.safetensors"),
                   "--results-file", str(tmp_path / "eval.json")])  # fmt: skip
    assert status == 0
    assert "Collaborative accuracy" in capsys.readouterr().out
    measured = json.loads((tmp_path / "eval.json").read_text())["summary"]["client_acc"]
    assert measured == pytest.approx(card["log"][-1]["val_acc"], abs=1e-9)


@needs_fmnist
@pytest.mark.slow  # four runs; the command's stop, refusals and resume run by default above
def test_stop_after_ends_a_schedule_early_and_resume_finishes_it(tmp_path, capsys):
    """--stop-after N trains the first N epochs of the whole schedule (not an N-epoch one):
    stopped and resumed, it ends with the weights of a run that was never stopped."""
    base = ["train", "--model", "collabvit_fmnist_edge", "--model-kwargs", TINY_FLAG,
            "--epochs", "2", "--warmup-epochs", "0", "--train-limit", "256", "--batch-size",
            "64", "--seed", "5", "--quiet"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main([*base, "--out-dir", str(straight)]) == 0
    assert main([*base, "--out-dir", str(stopped), "--stop-after", "1"]) == 0
    full = json.loads((straight / "model_card.json").read_text())
    early = json.loads((stopped / "model_card.json").read_text())
    assert (full["epochs_trained"], early["epochs_trained"]) == (2, 1)
    assert early["training"]["epochs"] == 2
    same = ("lr", "train_loss", "val_acc")
    assert {k: early["log"][0][k] for k in same} == {k: full["log"][0][k] for k in same}
    assert early["log"][0]["lr"] > 2 * full["log"][1]["lr"]  # the cosine is halfway, not done
    assert early["validation_acc"] == early["log"][0]["val_acc"]

    capsys.readouterr()
    assert main([*base, "--out-dir", str(stopped), "--resume", "--stop-after", "3"]) == 2
    assert "beyond the schedule's 2 epochs" in capsys.readouterr().err
    assert main([*base, "--out-dir", str(stopped), "--resume"]) == 0  # on to the end
    assert json.loads((stopped / "model_card.json").read_text())["epochs_trained"] == 2
    with safe_open(str(straight / "model.safetensors"), framework="pt") as a, \
            safe_open(str(stopped / "model.safetensors"), framework="pt") as b:  # fmt: skip
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    assert main([*base, "--out-dir", str(stopped), "--resume", "--stop-after", "1"]) == 2
    assert "past --stop-after 1" in capsys.readouterr().err


# ------------------------------------------------------------------ teacher and distillation


@needs_fmnist
def test_cnn_teacher_with_weight_averaging_trains_exports_and_loads(tmp_path):
    config = TrainConfig(model="collabvit_fmnist_cnn", model_kwargs={"width": 4}, epochs=1,
                         train_limit=256, batch_size=64, ema_decay=0.9)  # fmt: skip
    trainer = Trainer(config, tmp_path / "teacher", progress=False)
    trainer.fit()
    weights = trainer.export()
    averaged, trained = trainer.ema.module.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)  # EMA is its own
    teacher = load_teacher(tmp_path / "teacher")
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(teacher(x), trainer.ema.module.eval()(x), atol=1e-6, rtol=0)
    assert load_teacher(weights).state_dict().keys() == trained.keys()
    card = json.loads((tmp_path / "teacher" / "model_card.json").read_text())
    assert card["architecture"] == {"input_size": [1, 28, 28]}
    assert card["training"]["ema_decay"] == 0.9
    # the run's checkpoint gives the average to --use-ema, the trained weights otherwise
    checkpoint = tmp_path / "teacher" / "last.pt"
    for use_ema, expected in ((True, averaged), (False, trained)):
        read = vit.read_state_dict(checkpoint, use_ema=use_ema)
        assert all(torch.equal(read[name], value) for name, value in expected.items())
    # a resumed run restores the average too
    resumed = Trainer(config, tmp_path / "teacher", progress=False)
    assert resumed.resume()
    for name, value in averaged.items():
        assert torch.equal(resumed.ema.module.state_dict()[name], value)


@needs_fmnist
def test_distilled_student_records_its_teacher(tmp_path):
    teacher_config = TrainConfig(model="collabvit_fmnist_cnn", model_kwargs={"width": 4},
                                 epochs=1, train_limit=128, batch_size=64)  # fmt: skip
    teacher = Trainer(teacher_config, tmp_path / "teacher", progress=False)
    teacher.fit()
    teacher.export(*_test_set(200))
    student = Trainer(TrainConfig(model_kwargs=TINY, epochs=1, train_limit=128,
                                  batch_size=64, token_drop=0.5, teacher=str(tmp_path / "teacher"),
                                  distill="soft"), tmp_path / "student", progress=False)
    assert student.teacher is not None and not student.teacher.training
    student.fit()
    student.export()
    card = json.loads((tmp_path / "student" / "model_card.json").read_text())
    assert card["teacher"]["model"] == "collabvit_fmnist_cnn"
    assert card["teacher"]["test_acc"] == json.loads(
        (tmp_path / "teacher" / "model_card.json").read_text())["test_acc"]
    assert card["training"]["distill"] == "soft"
    assert card["teacher"]["hardware"] == [f"{cpu_model()}, {torch.get_num_threads()} threads: "
                                           "1 epoch"]  # fmt: skip


def test_training_time_counts_the_epochs_of_each_machine_and_the_unrecorded_ones():
    log = [{"seconds": 10.4, "hardware": "A"}, {"seconds": 20.0}, {"seconds": 5.0, "hardware": "A"},
           {"seconds": 1.0, "hardware": "B"}]  # fmt: skip
    assert training_time(log) == {"training_seconds": 36, "hardware": [
        "A: 2 epochs", "not recorded: 1 epoch", "B: 1 epoch"]}  # fmt: skip


def _test_set(count: int):
    test = FashionMNIST(FMNIST, "test")
    return test.images[:count], test.labels[:count]


class _CountingTeacher(torch.nn.Module):
    """A fixed random linear teacher that counts the images it has classified."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.linear = torch.nn.Linear(16, 3)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.linear(x.flatten(1))


def test_the_teacher_table_returns_the_teachers_logits_and_runs_it_once_per_pair(tmp_path):
    teacher = _CountingTeacher()
    images = torch.rand(6, 1, 4, 4)
    table = TeacherOutputs(teacher, lambda x: x - 0.5, {"teacher": "a"}, 6,
                           augmentation_count(shift=1), 3)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    pairs, lookups = set(), 0
    for _ in range(12):
        index = torch.randperm(6, generator=generator)[:4]
        drawn = draw_augmentations(4, generator, shift=1)
        augmented = apply_augmentations(images[index], drawn, shift=1)
        logits = table(augmented, index, drawn)
        with torch.no_grad():
            torch.testing.assert_close(logits, teacher.linear((augmented - 0.5).flatten(1)))
        pairs |= set(zip(index.tolist(), drawn.tolist(), strict=True))
        lookups += 4
        assert teacher.seen == len(pairs)
    assert len(pairs) < lookups  # some pairs came back and were looked up, not recomputed
    assert table.filled == pytest.approx(len(pairs) / (6 * 18))
    # saved and reloaded under the same key only
    table.save(tmp_path / "table.safetensors")
    again = TeacherOutputs(teacher, lambda x: x, {"teacher": "a"}, 6, 18, 3)
    assert again.load(tmp_path / "table.safetensors")
    assert torch.equal(again.logits, table.logits) and torch.equal(again.known, table.known)
    for key, shape in (({"teacher": "b"}, (6, 18, 3)), ({"teacher": "a"}, (7, 18, 3))):
        other = TeacherOutputs(teacher, lambda x: x, key, *shape)
        assert not other.load(tmp_path / "table.safetensors") and other.filled == 0
    assert not again.load(tmp_path / "missing.safetensors")


@needs_fmnist
@pytest.mark.slow  # three runs; the table's saving and keying are checked by default above
def test_a_distilled_run_keeps_its_teacher_table_across_a_resume(tmp_path):
    teacher = Trainer(TrainConfig(model="collabvit_fmnist_cnn", model_kwargs={"width": 4},
                                  epochs=1, train_limit=64, batch_size=64), tmp_path / "teacher",
                      progress=False)  # fmt: skip
    teacher.fit()
    teacher.export()
    config = TrainConfig(model_kwargs=TINY, epochs=2, train_limit=64, batch_size=32,
                         teacher=str(tmp_path / "teacher"))  # fmt: skip
    first = Trainer(config, tmp_path / "student", progress=False)
    record = next(first.epochs())
    # 64 images, one augmentation each so far
    assert record["teacher_outputs_known"] == round(64 / (64 * augmentation_count()), 4)
    resumed = Trainer(config, tmp_path / "student", progress=False)
    assert resumed.resume() and torch.equal(resumed.teacher_outputs.known,
                                            first.teacher_outputs.known)  # fmt: skip
    # another teacher's table is not taken
    retrained = Trainer(TrainConfig(model="collabvit_fmnist_cnn", model_kwargs={"width": 4},
                                    epochs=1, train_limit=64, batch_size=64, seed=1),
                        tmp_path / "teacher", progress=False)  # fmt: skip
    retrained.fit()
    retrained.export()
    assert Trainer(config, tmp_path / "student", progress=False).teacher_outputs.filled == 0


def test_distillation_loss_blends_the_label_and_the_teacher():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=generator)
    teacher = torch.randn(8, 10, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    plain = torch.nn.functional.cross_entropy(student, labels, label_smoothing=0.1)
    hard_only = torch.nn.functional.cross_entropy(student, teacher.argmax(1))
    assert distillation_loss(student, teacher, labels, "hard", 0.0, 3.0, 0.1) == \
        pytest.approx(float(plain))  # fmt: skip
    assert distillation_loss(student, teacher, labels, "hard", 1.0, 3.0, 0.1) == \
        pytest.approx(float(hard_only))  # fmt: skip
    blended = distillation_loss(student, teacher, labels, "hard", 0.25, 3.0, 0.1)
    assert float(blended) == pytest.approx(0.75 * float(plain) + 0.25 * float(hard_only))
    # soft: a student that already matches the teacher pays only the label term
    assert distillation_loss(teacher, teacher, labels, "soft", 0.5, 3.0, 0.0) == pytest.approx(
        0.5 * float(torch.nn.functional.cross_entropy(teacher, labels)), abs=1e-6)
    assert float(distillation_loss(student, teacher, labels, "soft", 1.0, 3.0, 0.0)) > 0


def test_teacher_and_token_drop_mistakes_are_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match="token drop needs a ViT"):
        Trainer(TrainConfig(model="collabvit_fmnist_cnn", token_drop=0.5, train_limit=64),
                tmp_path, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="neither a timm model name nor a folder"):
        load_teacher(tmp_path / "missing")
    status = main(["train", "--out-dir", str(tmp_path / "x"), "--teacher",
                   str(tmp_path / "missing"), "--train-limit", "64", "--quiet"])  # fmt: skip
    assert status == 2 and "neither a timm model name" in capsys.readouterr().err


def test_a_teacher_by_name_is_the_shipped_model(monkeypatch):
    monkeypatch.setattr(vit, "_hub_reachable", lambda: False)  # shipped: no hub needed
    teacher = load_teacher("collabvit_fmnist_edge")
    x = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(teacher(x), vit.create_vit("collabvit_fmnist_edge")(x),
                                   atol=0, rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="hub is unreachable"):
        load_teacher("resnet18")  # a timm name without local weights, offline


@needs_fmnist
def test_a_teacher_that_does_not_fit_the_student_is_a_clear_error(tmp_path, capsys):
    from collabvit.research.train import create_trainable

    kwargs = {"width": 4, "num_classes": 5}
    state = create_trainable("collabvit_fmnist_cnn", kwargs).state_dict()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={
        "model": "collabvit_fmnist_cnn", "config": json.dumps({"model_kwargs": kwargs})})
    status = main(["train", "--out-dir", str(tmp_path / "x"), "--teacher", str(tmp_path),
                   "--train-limit", "64", "--quiet"])  # fmt: skip
    assert status == 2 and "answers with 5 classes, the student with 10" in (
        capsys.readouterr().err)


def test_a_vit_starts_from_the_weights_its_seed_gave_before_cnns_were_trainable():
    from collabvit.research.train import create_trainable

    torch.manual_seed(7)
    trained_here = create_trainable("collabvit_fmnist_edge", {"depth": 1})
    torch.manual_seed(7)
    direct = vit.create_vit("collabvit_fmnist_edge", model_kwargs={"depth": 1}, pretrained=False)
    for name, value in direct.state_dict().items():
        assert torch.equal(trained_here.state_dict()[name], value), name


def test_a_teacher_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_teacher(bad)


@needs_fmnist
def test_cluttered_training_draws_canvases_of_its_items_with_the_clutter_asked(tmp_path, capsys):
    """Augmentation a of a training canvas is draw a // 2 of its item's canvas, flipped when a
    is odd (draw 0: the published canvas); --clutter changes every draw; a model of another
    image size is a one-line error."""
    from collabvit.data import ClutteredFashionMNIST
    from collabvit.lite.cluttered import spec_with
    from collabvit.research.train_data import CLUTTERED_DRAWS, ClutteredTraining

    data = ClutteredTraining(FMNIST, augmented=True, limit=32)
    assert data.augmentations == 2 * CLUTTERED_DRAWS and len(data.labels) == 32
    published = ClutteredFashionMNIST(FMNIST, "train")
    images = data.batch(torch.tensor([0, 5, 5, 31]), torch.tensor([0, 0, 1, 6]))
    assert images.shape == (4, 1, 56, 56) and images.dtype == torch.uint8
    first, last = published.canvases([0, 31])  # the published canvases: draw 0
    assert torch.equal(images[0], first)  # draw 0 is the published canvas
    assert torch.equal(images[2], images[1].flip(-1))  # odd: the same draw, flipped
    assert not torch.equal(images[3], last)  # draw 3: another canvas
    assert torch.equal(images[3], published.canvases([31], 3)[0])

    busy = {"fragments": 12, "seed": 3}
    changed = ClutteredTraining(FMNIST, augmented=True, limit=32, clutter=busy)
    expected = ClutteredFashionMNIST(FMNIST, "train", spec_with(busy))
    assert torch.equal(changed.batch(torch.tensor([0, 7]), torch.tensor([0, 4])),
                       torch.stack([expected.canvases([0])[0], expected.canvases([7], 2)[0]]))
    assert changed.key() != data.key()  # a teacher table of other canvases is not taken

    # a Fashion-MNIST model cannot train on canvases
    status = main(["train", "--model", "collabvit_fmnist_edge", "--data-set",
                   "fmnist-cluttered", "--train-limit", "32", "--quiet", "--out-dir",
                   str(tmp_path)])  # fmt: skip
    assert status == 2
    assert "fmnist-cluttered training images are (1, 56, 56)" in capsys.readouterr().err


@needs_fmnist
@pytest.mark.slow  # two runs on canvases; the canvases' draws are checked by default above
def test_cluttered_training_distils_from_a_canvas_teacher(tmp_path, capsys):
    """A tiny run on fmnist-cluttered: the teacher and a distilled student train, export and
    record the data set; validation is on the val split's published canvases."""
    from collabvit.data import ClutteredFashionMNIST
    from collabvit.research.train_data import CLUTTERED_DRAWS, ClutteredTraining

    data = ClutteredTraining(FMNIST, augmented=True, limit=64)
    assert torch.equal(data.val_images, ClutteredFashionMNIST(FMNIST, "val").images)

    teacher = ["--model", "collabvit_cluttered_cnn", "--model-kwargs", '{"width": 4}']
    common = ["--data-set", "fmnist-cluttered", "--epochs", "1", "--train-limit", "64",
              "--batch-size", "32", "--quiet"]  # fmt: skip
    assert main(["train", *teacher, *common, "--out-dir", str(tmp_path / "teacher")]) == 0
    student = ["--model", "collabvit_cluttered_edge", "--model-kwargs", TINY_FLAG,
               "--teacher", str(tmp_path / "teacher"), "--token-drop", "0.5"]  # fmt: skip
    assert main(["train", *student, *common, "--out-dir", str(tmp_path / "student")]) == 0
    assert "test" in capsys.readouterr().out
    card = json.loads((tmp_path / "student" / "model_card.json").read_text())
    assert card["data"]["data_set"] == "fmnist-cluttered"
    assert card["data"]["clutter"] == {"canvas": 56, "fragments": 6, "fragment": 10, "patch": 8,
                                       "seed": 0}  # fmt: skip
    assert card["architecture"]["img_size"] == [56, 56] and card["teacher"]["test_acc"] >= 0
    table = TeacherOutputs.FILE
    with safe_open(str(tmp_path / "student" / table), framework="pt") as handle:
        assert handle.get_tensor("logits").shape == (64, 2 * CLUTTERED_DRAWS, 10)


@needs_fmnist
@pytest.mark.slow  # three runs' set-ups on canvases; --clutter's training draws run by default
def test_cluttered_training_on_changed_canvases_records_them_and_resumes_old_checkpoints(
    tmp_path, capsys
):
    """--clutter: training, validation and test canvases all take the changes, the card and
    config record them, and a checkpoint made before the field existed still resumes."""
    from collabvit.data import ClutteredFashionMNIST
    from collabvit.lite.cluttered import spec_with
    from collabvit.research.train_data import ClutteredTraining

    busy = {"fragments": 12, "seed": 3}
    data = ClutteredTraining(FMNIST, augmented=True, limit=32, clutter=busy)
    busy_val = ClutteredFashionMNIST(FMNIST, "val", spec_with(busy)).images
    assert torch.equal(data.val_images, busy_val)
    assert not torch.equal(busy_val, ClutteredFashionMNIST(FMNIST, "val").images)

    out = tmp_path / "run"
    common = ["train", "--data-set", "fmnist-cluttered", "--model", "collabvit_cluttered_edge",
              "--model-kwargs", TINY_FLAG, "--epochs", "1", "--train-limit", "32",
              "--batch-size", "32", "--quiet", "--out-dir", str(out)]  # fmt: skip
    assert main([*common, "--clutter", json.dumps(busy)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["clutter"] == busy
    assert card["data"]["clutter"] == {"canvas": 56, "fragments": 12, "fragment": 10, "patch": 8,
                                       "seed": 3}  # fmt: skip
    assert "fragments" in card["data"]["dataset"] and "--clutter" in card["data"]["validation"]
    assert json.loads((out / "config.json").read_text())["clutter"] == busy
    # other canvases than the checkpoint's: refused, not silently mixed
    assert main([*common, "--resume", "--epochs", "2"]) == 2
    assert "another configuration" in capsys.readouterr().err

    # a checkpoint written before --clutter existed has no such key: it meant the default
    published = TrainConfig(model="collabvit_cluttered_edge", model_kwargs=TINY,
                            data_set="fmnist-cluttered", epochs=2, train_limit=32,
                            batch_size=32)  # fmt: skip
    old = Trainer(published, tmp_path / "old", progress=False)
    old.log.append({"epoch": 1})
    old.save_checkpoint(1)
    state = torch.load(old.checkpoint_path, weights_only=True)
    del state["config"]["clutter"]
    torch.save(state, old.checkpoint_path)
    assert Trainer(published, tmp_path / "old", progress=False).resume()
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(replace(published, clutter=busy), tmp_path / "old", progress=False).resume()

    # a canvas the model cannot take: the image-size error, one line
    assert main([*common[:-1], str(tmp_path / "wide"), "--clutter", '{"canvas": 64}']) == 2
    assert "training images are (1, 64, 64), the model takes (1, 56, 56)" in capsys.readouterr().err


def test_accuracy_keeps_no_graph_of_a_model_being_trained(monkeypatch):
    """A trained (not averaged) model's parameters require gradients: scoring 10,000 test
    images with them must not keep every batch's graph (tens of GB for the server)."""
    from collabvit.research import train as training

    model = vit.create_vit("collabvit_fmnist_edge", pretrained=False, model_kwargs=TINY).train()
    assert all(p.requires_grad for p in model.parameters())
    seen = []
    monkeypatch.setattr(training, "accuracy", lambda logits, labels: seen.append(logits) or 0.0)
    training.model_accuracy(model, torch.zeros(6, 1, 28, 28, dtype=torch.uint8),
                            torch.zeros(6, dtype=torch.long), batch_size=4)  # fmt: skip
    assert len(seen) == 1 and not seen[0].requires_grad and seen[0].shape == (6, 10)
