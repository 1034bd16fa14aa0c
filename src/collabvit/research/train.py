"""Training ViTs (the shipped pairs, or a pair on any image folder) from scratch or from
pretrained weights, with an optional token-drop regime, optionally distilled from a teacher,
with weight averaging (EMA), in one process or several (torchrun).

AdamW, per-step cosine schedule with linear warm-up (timm's CosineLRScheduler), label
smoothing, the data set's augmentations (train_data), a validation split that never changes
with the seed (the test set is only reported, never used for choices), a JSON-lines log,
resumable at epoch boundaries and deterministic given the seed (every epoch's randomness is
derived from (seed, epoch), so a resumed run repeats an uninterrupted one). A distilled run
on Fashion-MNIST keeps its teacher's outputs per training image and augmentation
(TeacherOutputs), so the frozen teacher runs once per pair, not every epoch.

Under torchrun every process trains on its share of each global batch (the batch size is
the global one) and DistributedDataParallel averages the gradients, each process's loss
weighted by its share, so the step is the one a single process takes on the whole batch;
augmentations and token drop are drawn for the whole batch on every process. Only the
first process writes checkpoints, logs and the model card; a checkpoint resumes with any
number of processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from collabvit import cpu_model, versions
from collabvit.algo.metrics import accuracy
from collabvit.config.train import TrainConfig, TrainRun
from collabvit.data import VALIDATION_SPLIT
from collabvit.lite.protocol import patchify
from collabvit.models import vit, zoo
from collabvit.models.pretrained import load_initial_weights
from collabvit.research.distributed import Processes
from collabvit.research.teacher import (
    TeacherOutputs,
    check_teacher_fits,
    distillation_loss,
    load_teacher,
)
from collabvit.research.train_data import (
    DEFAULT_AUTO_AUGMENT,
    ClutteredTraining,
    ImageFolderTraining,
    ShiftedFashionMNIST,
    fingerprint,
)

# validation images per forward
VALIDATION_BATCH = 250


def training_record(config: TrainConfig) -> dict:
    """The config a run records in its model card and weights: its fields, plus Fashion-MNIST's
    validation split where it trained on Fashion-MNIST."""
    if config.data_set == "imagenet":
        return asdict(config)
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


def drop_tokens(
    images: torch.Tensor, patch_size: tuple[int, int], drop: float, generator: torch.Generator,
    rows: slice = slice(None), batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random subset of each image's patches, the same number for the whole batch.

    The kept count is uniform in [ceil(N (1 - drop)), N], so the model sees both
    complete and heavily reduced images, as the server does in service. The draws are made
    for a global batch of `batch` images (default: these) of which `images` are the `rows`,
    so that every process of a run draws the same and keeps its own rows' share.

    Args:
        images: normalised [b, C, H, W], rows `rows` of the global batch.

    Returns:
        patches [b, k, C, P, P], positions [b, k] int64.
    """
    patches = patchify(images, patch_size)
    count = patches.shape[1]
    low = max(1, math.ceil(count * (1 - drop)))
    keep = int(torch.randint(low, count + 1, (1,), generator=generator))
    drawn = torch.rand(batch or len(images), count, generator=generator)[rows]
    positions = drawn.argsort(dim=1)[:, :keep].to(images.device)
    return patches[torch.arange(len(images), device=images.device)[:, None], positions], positions


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
    with torch.inference_mode():  # a model being trained would keep every batch's graph
        logits = torch.cat([model(normalization(images[start : start + batch_size])).float()
                            for start in range(0, len(labels), batch_size)])  # fmt: skip
    return accuracy(logits, labels)


def training_data(config: TrainConfig, model: torch.nn.Module, workers: int = 0):
    """The training set a config names, for `model` (an image folder reads at its size)."""
    if config.data_set == "fmnist-cluttered":
        return ClutteredTraining(config.data_path, config.augment, config.train_limit,
                                 config.clutter)  # fmt: skip
    if config.data_set == "imagenet":
        auto_augment = {None: DEFAULT_AUTO_AUGMENT, "none": None}.get(config.auto_augment,
                                                                      config.auto_augment)
        return ImageFolderTraining(config.data_path, model, config.augment, config.seed,
                                   config.train_limit, auto_augment, workers,
                                   config.crop_scale)  # fmt: skip
    return ShiftedFashionMNIST(config.data_path, config.augment, config.train_limit)


def with_data_classes(config: TrainConfig) -> TrainConfig:
    """`config` whose model has as many classes as an image folder has class folders (unless
    its model_kwargs say otherwise), so that its weights record how to build it again."""
    if config.data_set != "imagenet" or "num_classes" in config.model_kwargs:
        return config
    train = Path(config.data_path) / "train"
    classes = sorted(entry.name for entry in train.iterdir() if entry.is_dir()) \
        if train.is_dir() else []  # fmt: skip
    if not classes:
        return config  # the training set's own error says what is wrong
    return replace(config, model_kwargs={**config.model_kwargs, "num_classes": len(classes)})


class StudentForward(torch.nn.Module):
    """The student's training forward, on whole images or on token-dropped patches, as one
    module for DistributedDataParallel to wrap (it syncs the gradients of what its forward
    ran)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, patches: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if patches is None:
            return self.model(x)
        return vit.forward_selected(self.model, patches, positions)


class Trainer:
    """Owns one run: model, optimiser, data and its output folder, on this process's share
    of every batch (`processes`: one, or torchrun's)."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, progress: bool | None = None,
                 processes: Processes | None = None, workers: int = 0) -> None:  # fmt: skip
        config = with_data_classes(config)
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.processes = processes or Processes()
        self.device = torch.device(self.processes.device)
        if config.batch_size % self.processes.world_size:
            raise ValueError(f"batch size {config.batch_size} does not divide among "
                             f"{self.processes.world_size} processes: it is the global batch "
                             "size, so give a multiple of the process count")  # fmt: skip
        torch.manual_seed(config.seed)  # weight initialisation
        self.model = create_trainable(config.model, config.model_kwargs)
        self.initial_weights = (load_initial_weights(self.model, config.model,
                                                     config.init_weights)
                                if config.init_weights else None)  # fmt: skip
        self.model.to(self.device)
        self.is_vit = isinstance(self.model, VisionTransformer)
        if config.token_drop > 0 and not self.is_vit:
            raise ValueError(f"token drop needs a ViT; {config.model} is not one")
        self.normalization = vit.Normalization.of_model(self.model)
        self.geometry = vit.geometry(self.model) if self.is_vit else None
        self.teacher = load_teacher(config.teacher).to(self.device) if config.teacher else None
        self.teacher_normalization = (vit.Normalization.of_model(self.teacher)
                                      if self.teacher is not None else None)  # fmt: skip
        # warm-up: the average forgets the random initialisation within the first epochs
        self.ema = (ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True)
                    if config.ema_decay else None)  # fmt: skip
        self.data = training_data(config, self.model, workers)
        g = self.geometry
        expected = ((g.in_chans, *g.img_size) if self.is_vit
                    else tuple(self.model.pretrained_cfg["input_size"]))  # fmt: skip
        if tuple(self.data.image_shape) != expected:
            raise ValueError(f"{config.data_set} training images are "
                             f"{tuple(self.data.image_shape)}, the model takes "
                             f"{expected}")  # fmt: skip
        classes = self.model.num_classes
        if len(self.data.classes) != classes:
            raise ValueError(f"the training set has {len(self.data.classes)} classes, "
                             f"{config.model} {classes}: give --model-kwargs "
                             f"'{{\"num_classes\": {len(self.data.classes)}}}'")  # fmt: skip
        if self.teacher is not None:
            check_teacher_fits(self.teacher, self.teacher_normalization(
                self.data.probe().to(self.device)), classes, config.teacher)  # fmt: skip
        self.train_labels = self.data.labels
        self.mixup = (Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                            label_smoothing=config.label_smoothing, num_classes=classes)
                      if config.mixup or config.cutmix else None)  # fmt: skip
        self.teacher_outputs = None
        # a finite set of augmentations, unmixed: the teacher's outputs can be kept
        if self.teacher is not None and self.data.augmentations and self.mixup is None:
            key = {"teacher": fingerprint(self.teacher.state_dict()),
                   "train_data": self.data.key(),
                   "augmentations": str(self.data.augmentations)}
            self.teacher_outputs = TeacherOutputs(
                self.teacher, self.teacher_normalization, key, len(self.train_labels),
                self.data.augmentations, classes)
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
        self._forward: torch.nn.Module | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def teacher_outputs_path(self) -> Path:
        return self.out_dir / TeacherOutputs.FILE

    @property
    def forward(self) -> torch.nn.Module:
        """The student's training forward; under torchrun wrapped in DDP, made at the first
        step (after a resume has loaded the weights every process starts from)."""
        if self._forward is None:
            self._forward = StudentForward(self.model)
            if self.processes.distributed:
                ids = [self.device] if self.device.type == "cuda" else None
                self._forward = DistributedDataParallel(self._forward, device_ids=ids)
        return self._forward

    def shard(self, count: int) -> slice:
        """This process's rows of a global batch of `count` images (contiguous, as even as
        can be; a process may get none of a short last batch)."""
        world, rank = self.processes.world_size, self.processes.rank
        return slice(count * rank // world, count * (rank + 1) // world)

    def resume(self) -> bool:
        """Continue from the last checkpoint in out_dir, if any (its config must match). The
        first process reads it and hands it to the others, so they need not share the disk."""
        found = self.checkpoint_path.is_file() if self.processes.is_main else None
        state = None
        if found:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        state = self.processes.broadcast(state)
        if state is None:
            return False
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
              rows: tuple[torch.Tensor, torch.Tensor] | None = None,
              batch: slice | None = None, global_count: int | None = None):  # fmt: skip
        """Loss and logits of this process's share of a training batch: images [b, C, H, W]
        (augmented), labels [b]; rows = (training image index [b], augmentation [b]) of the
        images, which a distilled run needs to look up its teacher's outputs; `batch`, the
        share's rows in the global batch of `global_count` images (default: all of them).

        The loss is this share's mean weighted by its part of the global batch times the
        process count, so that DDP's average of the processes' gradients is the gradient of
        the global batch's mean loss."""
        cfg = self.config
        global_count = global_count or len(labels)
        images, labels = images.to(self.device), labels.to(self.device)
        if self.mixup is not None:
            images, labels = self._mixed(images, labels, generator)
        x = self.normalization(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            if cfg.token_drop > 0:
                patches, positions = drop_tokens(x, self.geometry.patch_size, cfg.token_drop,
                                                 generator, batch or slice(None), global_count)
                logits = self.forward(x, patches, positions)
            else:
                logits = self.forward(x)
        # mixed labels are already smoothed
        smoothing = 0.0 if self.mixup is not None else cfg.label_smoothing
        if self.teacher is None:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        else:
            # the teacher sees the whole (augmented) image
            if self.teacher_outputs is not None:
                teacher_logits = self.teacher_outputs(images, *rows).to(self.device)
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(self.teacher_normalization(images)).float()
            loss = distillation_loss(logits.float(), teacher_logits, labels, cfg.distill,
                                     cfg.distill_weight, cfg.distill_temperature,
                                     smoothing)  # fmt: skip
        share = len(labels) * self.processes.world_size / global_count
        return loss * share, logits

    def _mixed(self, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """timm's mixup/cutmix of the batch, its draws seeded from the step's generator (timm
        draws from numpy's global generator, put back after): images float [b, C, H, W] in
        [0, 1], labels [b] -> soft labels [b, classes]."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            floats = images.float() / 255 if images.dtype == torch.uint8 else images
            return self.mixup(floats, labels)
        finally:
            np.random.set_state(state)

    def _zero_loss(self) -> torch.Tensor:
        """A loss of 0 whose gradient reaches every parameter: the part of a process whose
        share of a short last batch is empty (DDP waits for every process's gradients)."""
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_labels), generator=generator)
        self.model.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
        started = time.time()
        quiet = None if self.progress is None else not self.progress
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=quiet or not self.processes.is_main, unit="step",
                   leave=False)  # fmt: skip
        batches = self.data.batches(order, cfg.batch_size, self.shard, generator, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        for step_in_epoch, (index, augmentations, images) in zip(bar, batches, strict=True):
            global_count = min(cfg.batch_size, len(order) - step_in_epoch * cfg.batch_size)
            labels = self.train_labels[index]
            step = epoch * self.steps_per_epoch + step_in_epoch
            self.scheduler.step_update(step)
            lr = self.optimizer.param_groups[0]["lr"]
            if len(labels):
                loss, logits = self._loss(images, labels, generator, (index, augmentations),
                                          self.shard(global_count), global_count)  # fmt: skip
            else:
                loss, logits = self._zero_loss(), torch.zeros(0, 1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=step)
            share = len(labels) * self.processes.world_size / global_count
            totals += torch.tensor([float(loss.detach()) / share * len(labels) if len(labels)
                                    else 0.0,
                                    int((logits.argmax(1).cpu() == labels).sum()),
                                    len(labels)], dtype=torch.float64)  # fmt: skip
            bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.3f}", lr=f"{lr:.2e}")
        loss_sum, correct, seen = self.processes.sum(totals).tolist()
        stepped = time.time() - started
        return {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": 100.0 * correct / seen,
            "val_acc": self.validation_accuracy(),
            "lr": lr,
            "seconds": round(time.time() - started, 1),
            "train_seconds": round(stepped, 2),  # the steps alone, without the validation
            # a resumed run may continue on another machine, or with other processes
            "hardware": self.hardware(),
            **({"teacher_outputs_known": round(self.teacher_outputs.filled, 4)}
               if self.teacher_outputs is not None else {}),
        }

    def hardware(self) -> str:
        """What trains: the CPU (or GPU) and its threads, and the processes when several."""
        if self.device.type == "cuda":
            where = torch.cuda.get_device_name(self.device)
        else:
            where = f"{cpu_model()}, {torch.get_num_threads()} threads"
        world = self.processes.world_size
        return where if world == 1 else f"{where}, {world} processes"

    def validation_accuracy(self) -> float:
        """Top-1 accuracy in % of the final model on the validation images, each process
        scoring its contiguous share, the counts summed."""
        model = self.final_model
        model.eval()
        count = self.data.val_count
        world, rank = self.processes.world_size, self.processes.rank
        rows = range(count * rank // world, count * (rank + 1) // world)
        correct = 0
        with torch.inference_mode():
            for images, labels in self.data.validation(rows, VALIDATION_BATCH):
                logits = model(self.normalization(images.to(self.device)))
                correct += int((logits.argmax(1).cpu() == labels).sum())
        total_correct, total = self.processes.sum(
            torch.tensor([correct, len(rows)], dtype=torch.float64)).tolist()
        return 100.0 * total_correct / total

    @property
    def final_model(self) -> torch.nn.Module:
        """What is validated and exported: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def save_checkpoint(self, epoch: int) -> None:
        """Write last.pt (the first process only; the others hold the same weights)."""
        if not self.processes.is_main:
            return
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
        main = self.processes.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config = json.dumps(training_record(self.config), indent=2)
            (self.out_dir / "config.json").write_text(config + "\n")
        for epoch in range(self.start_epoch, stop_after or self.config.epochs):
            record = self.train_epoch(epoch)
            self.log.append(record)
            if main:
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
        state = {k: (v.half() if half and v.is_floating_point() else v).cpu().contiguous()
                 for k, v in self.final_model.state_dict().items()}  # fmt: skip
        weights = self.out_dir / "model.safetensors"
        metadata = {"model": self.config.model, "config": json.dumps(training_record(self.config)),
                    "classes": json.dumps(self.data.classes)}  # fmt: skip
        save_file(state, str(weights), metadata=metadata)
        card = {
            "model": self.config.model,
            "architecture": (dict(vit.geometry(self.model).__dict__) if self.is_vit
                             else {"input_size": list(self.model.pretrained_cfg["input_size"])}),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "storage": "float16" if half else "float32",
            "training": training_record(self.config),
            "data": {"data_set": self.config.data_set, **self.data.card()},
            "classes": self.data.classes,
            **({"initial_weights": self.initial_weights} if self.initial_weights else {}),
            "validation_acc": self.log[-1]["val_acc"] if self.log else None,
            # fewer than the schedule's epochs when the run was stopped early (--stop-after)
            "epochs_trained": len(self.log),
            **training_time(self.log),
            "log": self.log,
            **versions(),
        }
        if test_images is not None:
            card["test_acc"] = model_accuracy(self.final_model.cpu(), test_images, test_labels)
            self.final_model.to(self.device)
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
    """A whole `collabvit train` run, yielding the lines it reports (on the first process;
    under torchrun the others train and yield nothing).

    `run` names out_dir, resume, stop_after, quiet, device and workers (config.TrainRun).
    Raises ValueError (before training) when out_dir holds a checkpoint and resume is not
    asked for, when stop_after lies beyond the schedule or before the checkpoint, or when
    the batch size does not divide among the processes. Ends by exporting the weights and
    model card, with the test accuracy where the data set has a test split.
    """
    if run.stop_after is not None and run.stop_after > config.epochs:
        raise ValueError(f"--stop-after {run.stop_after} lies beyond the schedule's "
                         f"{config.epochs} epochs")  # fmt: skip
    with Processes(run.device) as processes:
        main = processes.is_main
        trainer = Trainer(config, run.out_dir, progress=False if run.quiet else None,
                          processes=processes, workers=run.workers)  # fmt: skip
        if run.resume:
            if trainer.resume() and main:
                yield (f"resuming after epoch {trainer.start_epoch}"
                       + (f" on {processes.world_size} processes"
                          if processes.distributed else ""))  # fmt: skip
        elif processes.broadcast(trainer.checkpoint_path.is_file() if main else None):
            raise ValueError(f"{trainer.checkpoint_path} exists: pass --resume or another "
                             "--out-dir")  # fmt: skip
        if run.stop_after is not None and run.stop_after < trainer.start_epoch:
            raise ValueError(f"{trainer.checkpoint_path} is after epoch {trainer.start_epoch}, "
                             f"past --stop-after {run.stop_after}")  # fmt: skip
        test = trainer.data.test()  # a missing file fails early
        for r in trainer.epochs(run.stop_after):
            if main:
                yield (f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc "
                       f"{r['train_acc']:.2f} % | val acc {r['val_acc']:.2f} % | "
                       f"{r['seconds']} s")  # fmt: skip
        if not main:
            return
        weights = trainer.export(*(test or (None, None)))
        card = json.loads((trainer.out_dir / "model_card.json").read_text())
        tested = f", test {card['test_acc']:.2f} %" if "test_acc" in card else ""
        yield f"wrote {weights}: validation {card['validation_acc']:.2f} %{tested}"
