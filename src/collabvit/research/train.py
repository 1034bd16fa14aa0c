"""Training small ViTs (the shipped Fashion-MNIST pair) with an optional token-drop regime,
optionally distilled from a CNN teacher (trained here too), with weight averaging (EMA).

AdamW, per-step cosine schedule with linear warm-up (timm's CosineLRScheduler),
label smoothing, random translation + horizontal flip, collabvit's one
validation split of the training set (data.validation_split, the images of
``--split val``; the test set is only reported, never used for choices), a JSON-lines log,
resumable at epoch boundaries and deterministic given the seed (every epoch's
randomness is derived from (seed, epoch), so a resumed run repeats an
uninterrupted one). A distilled run keeps its teacher's outputs per training image and
augmentation (TeacherOutputs), so the frozen teacher runs once per pair, not every epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm import tqdm

from collabvit import cpu_model, versions
from collabvit.algo.metrics import accuracy
from collabvit.config import TrainConfig, TrainRun
from collabvit.data import (
    VALIDATION_SPLIT,
    ClutteredFashionMNIST,
    FashionMNIST,
    validation_split,
)
from collabvit.lite.cluttered import spec_with
from collabvit.lite.protocol import patchify
from collabvit.models import vit, zoo
from collabvit.research.teacher import (
    TeacherOutputs,
    check_teacher_fits,
    distillation_loss,
    load_teacher,
)


def training_record(config: TrainConfig) -> dict:
    """The config a run records in its model card and weights: its fields plus the split."""
    return {**asdict(config), "validation_split": dict(VALIDATION_SPLIT)}


def lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> CosineLRScheduler:
    """Linear warm-up to the optimiser's lr, then cosine decay to `min_lr` at `total_steps`.

    Call ``step_update(s)`` before optimiser step s (0-based). With W warm-up
    steps, step s < W trains at lr (s + 1) / W, so step W - 1 is the peak;
    then the cosine runs from the peak to `min_lr`, reached at s = total_steps.
    """
    warmup_steps = min(warmup_steps, total_steps)
    # timm's warm-up climbs from warmup_lr_init to lr over warmup_t steps; starting
    # at lr / W and peaking one step early makes the first step train at lr / W, not 0
    warmup_t = max(warmup_steps - 1, 0)
    lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup_t,
        lr_min=min_lr,
        warmup_t=warmup_t,
        warmup_lr_init=lr / max(warmup_steps, 1),
        warmup_prefix=True,
        t_in_epochs=False,
    )


def augmentation_count(shift: int = 2) -> int:
    """How many distinct augmentations `augment` can apply: flip or not, times each shift."""
    return 2 * (2 * shift + 1) ** 2


def draw_augmentations(batch: int, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Each image's random augmentation, as an index in [0, augmentation_count(shift)):
    (flip * side + dy) * side + dx with side = 2 shift + 1. Returns [batch] int64."""
    side = 2 * shift + 1
    dy = torch.randint(0, side, (batch,), generator=generator)
    dx = torch.randint(0, side, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return (flip.long() * side + dy) * side + dx


def apply_augmentations(images: torch.Tensor, augmentations: torch.Tensor,
                        shift: int = 2) -> torch.Tensor:  # fmt: skip
    """Translate each image by its (dy - shift, dx - shift) pixels (zero fill), then flip
    it horizontally where its flip bit is set (draw_augmentations' indices).

    images [B, C, H, W], augmentations [B] -> [B, C, H, W], same dtype.
    """
    batch, _, height, width = images.shape
    side = 2 * shift + 1
    dx, dy, flip = augmentations % side, augmentations // side % side, augmentations >= side**2
    padded = F.pad(images, (shift, shift, shift, shift))
    rows = (dy[:, None] + torch.arange(height)[None])[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(width)[None])[:, None, None, :]  # [B, 1, 1, W]
    batch_index = torch.arange(batch)[:, None, None, None]
    channel_index = torch.arange(images.shape[1])[None, :, None, None]
    shifted = padded[batch_index, channel_index, rows, cols]
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to `shift` pixels (zero fill) and horizontal flip.

    images [B, C, H, W] -> same shape and dtype.
    """
    return apply_augmentations(images, draw_augmentations(len(images), generator, shift), shift)


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of named tensors (weights, data)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().reshape(-1)  # 0-d (BatchNorm's counter) too
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ShiftedFashionMNIST:
    """Fashion-MNIST training images (the training split of validation_split, optionally the
    first `limit`), augmented by random shift and flip (augmentation_count() of them)."""

    dataset = "Fashion-MNIST (Debian dataset-fashion-mnist)"
    description = "Fashion-MNIST --split val"

    def __init__(self, root: str | Path, augmented: bool, limit: int | None = None) -> None:
        data = FashionMNIST(root, "train-all")
        train_index, val_index = validation_split(len(data.labels))
        if limit is not None:
            train_index = train_index[:limit]
        self.images, self.labels = data.images[train_index], data.labels[train_index]
        self.val_images, self.val_labels = data.images[val_index], data.labels[val_index]
        self.augmentations = augmentation_count() if augmented else 1

    def key(self) -> str:
        """A fingerprint of the training images (what a teacher-output table is valid for)."""
        return fingerprint({"images": self.images, "labels": self.labels})

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Each training image's augmentation index: [batch] int64."""
        if self.augmentations == 1:
            return torch.zeros(batch, dtype=torch.long)
        return draw_augmentations(batch, generator)

    def batch(self, index: torch.Tensor, augmentations: torch.Tensor) -> torch.Tensor:
        """Training images `index` [B] under `augmentations` [B]: uint8 [B, C, H, W]."""
        images = self.images[index]
        return images if self.augmentations == 1 else apply_augmentations(images, augmentations)

    def test(self, root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        test = FashionMNIST(root, "test")
        return test.images, test.labels


# Training sees this many canvases of each item (then each may be flipped); the teacher's
# output table holds 2 x this many columns.
CLUTTERED_DRAWS = 32


class ClutteredTraining:
    """Cluttered canvases of the Fashion-MNIST training split: augmentation a shows draw
    a // 2 of the item's canvas (a new position and new clutter; draw 0 is the published
    canvas), flipped horizontally when a is odd. Validation: the val split's draw 0. Every
    split is made with the published parameters changed by `clutter` (cluttered.spec_with)."""

    def __init__(self, root: str | Path, augmented: bool, limit: int | None = None,
                 clutter: dict | None = None) -> None:  # fmt: skip
        spec = spec_with(clutter)
        self.train = ClutteredFashionMNIST(root, "train", spec)
        # with a limit, the first canvases; their clutter still comes from the whole split
        self.labels = self.train.labels[:limit]
        val = ClutteredFashionMNIST(root, "val", spec)
        changes = f" --clutter '{json.dumps(clutter)}'" if clutter else ""
        spec_text = f"ClutterSpec with {clutter}" if clutter else "default ClutterSpec"
        self.dataset = f"cluttered Fashion-MNIST (collabvit.lite.cluttered, {spec_text})"
        self.description = f"fmnist-cluttered{changes} --split val"
        self.val_images, self.val_labels = val.images, val.labels
        self.augmentations = 2 * CLUTTERED_DRAWS if augmented else 1

    def key(self) -> str:
        return fingerprint({"items": torch.from_numpy(self.train.items), "labels": self.labels,
                            "spec": torch.tensor(list(asdict(self.train.spec).values()))})

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.augmentations, (batch,), generator=generator)

    def batch(self, index: torch.Tensor, augmentations: torch.Tensor) -> torch.Tensor:
        images = self.train.canvases(index.numpy(), (augmentations // 2).numpy())
        flip = (augmentations % 2 == 1)[:, None, None, None]
        return torch.where(flip, images.flip(-1), images)

    def test(self, root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        test = ClutteredFashionMNIST(root, "test", self.train.spec)
        return test.images, test.labels


def training_data(config: TrainConfig):
    """The training set a config names (ShiftedFashionMNIST or ClutteredTraining)."""
    if config.data_set == "fmnist-cluttered":
        return ClutteredTraining(config.data_path, config.augment, config.train_limit,
                                 config.clutter)  # fmt: skip
    return ShiftedFashionMNIST(config.data_path, config.augment, config.train_limit)


def drop_tokens(
    images: torch.Tensor, patch_size: tuple[int, int], drop: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random subset of each image's patches, the same number for the whole batch.

    The kept count is uniform in [ceil(N (1 - drop)), N], so the model sees both
    complete and heavily reduced images, as the server does in service.

    Args:
        images: normalised [B, C, H, W].

    Returns:
        patches [B, k, C, P, P], positions [B, k] int64.
    """
    patches = patchify(images, patch_size)
    batch, count = patches.shape[:2]
    low = max(1, math.ceil(count * (1 - drop)))
    keep = int(torch.randint(low, count + 1, (1,), generator=generator))
    positions = torch.rand(batch, count, generator=generator).argsort(dim=1)[:, :keep]
    return patches[torch.arange(batch)[:, None], positions], positions


def create_trainable(name: str, model_kwargs: dict | None = None) -> torch.nn.Module:
    """A randomly initialised model to train: a supported timm ViT (checked as collabvit
    checks them), or any other timm model (the CNN teacher)."""
    model = vit.build_model(name, model_kwargs)
    if isinstance(model, VisionTransformer):
        vit.check_supported(model)
    return model.eval()


def model_accuracy(
    model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy in % of `model` on unnormalised images [n, C, H, W], labels [n]."""
    normalization = vit.Normalization.of_model(model)
    model.eval()
    logits = torch.cat([model(normalization(images[start : start + batch_size])).float()
                        for start in range(0, len(labels), batch_size)])  # fmt: skip
    return accuracy(logits, labels)


class Trainer:
    """Owns one run: model, optimiser, data and its output folder."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, progress: bool | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        torch.manual_seed(config.seed)  # weight initialisation
        self.model = create_trainable(config.model, config.model_kwargs)
        self.is_vit = isinstance(self.model, VisionTransformer)
        if config.token_drop > 0 and not self.is_vit:
            raise ValueError(f"token drop needs a ViT; {config.model} is not one")
        self.normalization = vit.Normalization.of_model(self.model)
        self.geometry = vit.geometry(self.model) if self.is_vit else None
        self.teacher = load_teacher(config.teacher) if config.teacher else None
        self.teacher_normalization = (vit.Normalization.of_model(self.teacher)
                                      if self.teacher is not None else None)  # fmt: skip
        # warm-up: the average forgets the random initialisation within the first epochs
        self.ema = (ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True)
                    if config.ema_decay else None)  # fmt: skip
        self.data = training_data(config)
        g = self.geometry
        expected = ((g.in_chans, *g.img_size) if self.is_vit
                    else tuple(self.model.pretrained_cfg["input_size"]))  # fmt: skip
        if tuple(self.data.val_images.shape[1:]) != expected:
            raise ValueError(f"{config.data_set} training images are "
                             f"{tuple(self.data.val_images.shape[1:])}, the model takes "
                             f"{expected}")  # fmt: skip
        if self.teacher is not None:
            check_teacher_fits(self.teacher, self.teacher_normalization(self.data.val_images[:1]),
                               self.model.num_classes, config.teacher)  # fmt: skip
        self.train_labels = self.data.labels
        self.val_images, self.val_labels = self.data.val_images, self.data.val_labels
        self.teacher_outputs = None
        if self.teacher is not None:
            key = {"teacher": fingerprint(self.teacher.state_dict()),
                   "train_data": self.data.key(),
                   "augmentations": str(self.data.augmentations)}
            self.teacher_outputs = TeacherOutputs(
                self.teacher, self.teacher_normalization, key, len(self.train_labels),
                self.data.augmentations, self.model.num_classes)
            self.teacher_outputs.load(self.teacher_outputs_path)
        skip_decay = self.model.no_weight_decay() if self.is_vit else ()
        groups = param_groups_weight_decay(self.model, config.weight_decay, skip_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.steps_per_epoch = math.ceil(len(self.train_labels) / config.batch_size)
        self.scheduler = lr_scheduler(
            self.optimizer,
            config.epochs * self.steps_per_epoch,
            round(config.warmup_epochs * self.steps_per_epoch),
            config.min_lr,
        )
        self.log: list[dict] = []
        self.start_epoch = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def teacher_outputs_path(self) -> Path:
        return self.out_dir / TeacherOutputs.FILE

    def resume(self) -> bool:
        """Continue from the last checkpoint in out_dir, if any (its config must match)."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        # a checkpoint older than a config field was made with that field's default
        saved = {**asdict(TrainConfig()), **state["config"]}
        if saved != asdict(self.config):
            raise ValueError(f"{self.checkpoint_path} was made with another configuration; "
                             "use a new --out-dir or the same flags")  # fmt: skip
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state[vit.TRAIN_EMA_KEY])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"]
        self.log = json.loads(state["log"])
        return True

    def _loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
              rows: tuple[torch.Tensor, torch.Tensor] | None = None):  # fmt: skip
        """Loss and logits of a training batch: images [B, C, H, W] (augmented), labels [B];
        rows = (training image index [B], augmentation [B]) of the images, which a
        distilled run needs to look up its teacher's outputs."""
        x = self.normalization(images)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            if self.config.token_drop > 0:
                patches, positions = drop_tokens(
                    x, self.geometry.patch_size, self.config.token_drop, generator
                )
                logits = vit.forward_selected(self.model, patches, positions)
            else:
                logits = self.model(x)
        cfg = self.config
        if self.teacher is None:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            return loss, logits
        # the teacher sees the whole (augmented) image
        teacher_logits = self.teacher_outputs(images, *rows)
        loss = distillation_loss(logits.float(), teacher_logits, labels, cfg.distill,
                                 cfg.distill_weight, cfg.distill_temperature,
                                 cfg.label_smoothing)  # fmt: skip
        return loss, logits

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_labels), generator=generator)
        self.model.train()
        loss_sum, correct, seen, started = 0.0, 0, 0, time.time()
        quiet = None if self.progress is None else not self.progress
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=quiet, unit="step", leave=False)  # fmt: skip
        for step_in_epoch in bar:
            index = order[step_in_epoch * cfg.batch_size : (step_in_epoch + 1) * cfg.batch_size]
            augmentations = self.data.draw(len(index), generator)
            images, labels = self.data.batch(index, augmentations), self.train_labels[index]
            step = epoch * self.steps_per_epoch + step_in_epoch
            self.scheduler.step_update(step)
            lr = self.optimizer.param_groups[0]["lr"]
            loss, logits = self._loss(images, labels, generator, (index, augmentations))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=step)
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.2e}")
        return {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": 100.0 * correct / seen,
            "val_acc": model_accuracy(self.final_model, self.val_images, self.val_labels),
            "lr": lr,
            "seconds": round(time.time() - started, 1),
            # a resumed run may continue on another machine
            "hardware": f"{cpu_model()}, {torch.get_num_threads()} threads",
            **({"teacher_outputs_known": round(self.teacher_outputs.filled, 4)}
               if self.teacher_outputs is not None else {}),
        }

    @property
    def final_model(self) -> torch.nn.Module:
        """What is validated and exported: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def save_checkpoint(self, epoch: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **({vit.TRAIN_EMA_KEY: self.ema.module.state_dict()} if self.ema is not None else {}),
            "epoch": epoch,
            "log": json.dumps(self.log),
        }
        if self.teacher_outputs is not None:
            self.teacher_outputs.save(self.teacher_outputs_path)
        temporary = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, temporary)
        temporary.replace(self.checkpoint_path)  # never leave a half-written checkpoint

    def epochs(self, stop_after: int | None = None) -> Iterator[dict]:
        """Train the remaining epochs (up to epoch `stop_after` of the schedule, if given),
        yielding each one's log record after checkpointing it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = json.dumps(training_record(self.config), indent=2)
        (self.out_dir / "config.json").write_text(config + "\n")
        for epoch in range(self.start_epoch, stop_after or self.config.epochs):
            record = self.train_epoch(epoch)
            self.log.append(record)
            with (self.out_dir / "log.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.save_checkpoint(epoch + 1)
            yield record

    def fit(self, on_epoch=None) -> list[dict]:
        """Train the remaining epochs; checkpoint and log after each."""
        for record in self.epochs():
            if on_epoch is not None:
                on_epoch(record)
        return self.log

    def export(self, test_images=None, test_labels=None, half: bool = False) -> Path:
        """Write model.safetensors (a timm state dict) and model_card.json into out_dir."""
        state = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
                 for k, v in self.final_model.state_dict().items()}  # fmt: skip
        weights = self.out_dir / "model.safetensors"
        metadata = {"model": self.config.model, "config": json.dumps(training_record(self.config))}
        save_file(state, str(weights), metadata=metadata)
        card = {
            "model": self.config.model,
            "architecture": (dict(vit.geometry(self.model).__dict__) if self.is_vit
                             else {"input_size": list(self.model.pretrained_cfg["input_size"])}),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "storage": "float16" if half else "float32",
            "training": training_record(self.config),
            "data": {
                "dataset": self.data.dataset,
                "data_set": self.config.data_set,
                **({"clutter": asdict(self.data.train.spec),
                    "draws_per_item": self.data.augmentations // 2}
                   if isinstance(self.data, ClutteredTraining) else {}),
                "train_images": len(self.train_labels),
                "validation_images": len(self.val_labels),
                "validation_split": dict(VALIDATION_SPLIT),
                "validation": f"{VALIDATION_SPLIT['size']} images of the training set, split with "
                f"seed {VALIDATION_SPLIT['seed']} ({self.data.description})",
            },
            "validation_acc": self.log[-1]["val_acc"] if self.log else None,
            # fewer than the schedule's epochs when the run was stopped early (--stop-after)
            "epochs_trained": len(self.log),
            **training_time(self.log),
            "log": self.log,
            **versions(),
        }
        if test_images is not None:
            card["test_acc"] = model_accuracy(self.final_model, test_images, test_labels)
        if self.teacher is not None:
            card["teacher"] = teacher_card(self.config.teacher)
        (self.out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        return weights


def training_time(log: list[dict]) -> dict:
    """Seconds spent training (epochs summed, validation included) and the machines that
    ran the epochs, from a run's log; epochs logged before machines were recorded count as
    "not recorded"."""
    epochs_on: dict[str, int] = {}
    for record in log:
        machine = record.get("hardware", "not recorded")
        epochs_on[machine] = epochs_on.get(machine, 0) + 1
    return {"training_seconds": round(sum(record["seconds"] for record in log)),
            "hardware": [f"{machine}: {count} epoch{'s' * (count != 1)}"
                         for machine, count in epochs_on.items()]}


def teacher_card(source: str | Path) -> dict:
    """What a student's card says of its teacher: its recipe and accuracies, from the
    teacher's own model card beside its weights."""
    folder = Path(source)
    folder = folder if folder.is_dir() else folder.parent
    card = zoo.read_card(folder / "model_card.json")
    return {"source": str(source), **{key: card.get(key) for key in
            ("model", "parameters", "training", "validation_acc", "test_acc")},
            **training_time(card.get("log", []))}  # fmt: skip


def train(config: TrainConfig, run: TrainRun) -> Iterator[str]:
    """A whole `collabvit train` run, yielding the lines it reports.

    `run` names out_dir, resume, stop_after and quiet (config.TrainRun). Raises
    ValueError (before training) when out_dir holds a checkpoint and resume is not
    asked for, or when stop_after lies beyond the schedule or before the checkpoint.
    Ends by exporting the weights and model card, with the test accuracy.
    """
    if run.stop_after is not None and run.stop_after > config.epochs:
        raise ValueError(f"--stop-after {run.stop_after} lies beyond the schedule's "
                         f"{config.epochs} epochs")  # fmt: skip
    trainer = Trainer(config, run.out_dir, progress=False if run.quiet else None)
    if run.resume:
        if trainer.resume():
            yield f"resuming after epoch {trainer.start_epoch}"
    elif trainer.checkpoint_path.is_file():
        raise ValueError(f"{trainer.checkpoint_path} exists: pass --resume or another --out-dir")
    if run.stop_after is not None and run.stop_after < trainer.start_epoch:
        raise ValueError(f"{trainer.checkpoint_path} is after epoch {trainer.start_epoch}, "
                         f"past --stop-after {run.stop_after}")  # fmt: skip
    test_images, test_labels = trainer.data.test(config.data_path)  # a missing file fails early
    for r in trainer.epochs(run.stop_after):
        yield (
            f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f} % | "
            f"val acc {r['val_acc']:.2f} % | {r['seconds']} s"
        )
    weights = trainer.export(test_images, test_labels)
    card = json.loads((trainer.out_dir / "model_card.json").read_text())
    validation, test_acc = card["validation_acc"], card["test_acc"]
    yield f"wrote {weights}: validation {validation:.2f} %, test {test_acc:.2f} %"
