"""What `collabvit train` trains on: Fashion-MNIST (shifted and flipped), its cluttered
canvases, or any ImageNet-style image folder (timm's training transforms).

Each training set hands out the batches of an epoch for the rows this process trains on
(`batches`), its validation images (`validation`), its test images where it has some, and
what the model card says of it (`card`). Every random choice of an augmentation depends
on the run's seed, the epoch and the image alone, never on how the batch is split among
processes, so one process and several see the same augmented images.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from collabvit.data import (
    FASHION_MNIST_CLASSES,
    VALIDATION_SPLIT,
    ClutteredFashionMNIST,
    DataError,
    FashionMNIST,
    ImageNetFolder,
    eval_crop_pct,
    read_image,
    split_indices,
    validation_split,
)
from collabvit.lite.cluttered import spec_with
from collabvit.lite.fashion import FASHION_MNIST_VAL_SEED

# which rows of a global batch of n images this process trains on
Shard = Callable[[int], slice]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # index [b], augmentation [b], images
# DeiT's RandAugment (magnitude 9, noise 0.5, increasing), the magnitude capped at 9: at 10
# timm's increasing posterize keeps 0 bits, which Pillow refuses since version 10
DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
# an image folder without val/ holds out this share of train/ (at least one image), by
# FASHION_MNIST_VAL_SEED: the validation images do not change with the run's seed
HELD_OUT_SHARE = 0.1
FOLDER_LAYOUT = ("--data-set imagenet trains on DIR/train/<class>/<image> and validates on "
                 "DIR/val/<class>/<image> (or on a tenth of train/, held out)")  # fmt: skip


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


class InMemoryTraining:
    """A training set held in memory whose augmentations are a finite set of indices, drawn
    from the training step's generator (so that a resumed run repeats an uninterrupted one,
    and a teacher's outputs can be kept per image and augmentation)."""

    labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    augmentations: int
    classes: list[str]

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Each training image's augmentation index: [batch] int64."""
        raise NotImplementedError

    def batch(self, index: torch.Tensor, augmentations: torch.Tensor) -> torch.Tensor:
        """Training images `index` [B] under `augmentations` [B]: uint8 [B, C, H, W]."""
        raise NotImplementedError

    def batches(self, order: torch.Tensor, batch_size: int, shard: Shard,
                generator: torch.Generator, epoch: int) -> Iterator[Batch]:  # fmt: skip
        """The epoch's batches of `order` [N], this process's rows of each. The whole global
        batch's augmentations are drawn (lazily, step by step, from `generator`, which the
        step's token drop draws from next), so every process's generator stays in step."""
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            augmentations = self.draw(len(index), generator)
            rows = shard(len(index))
            mine = index[rows]
            # a process may have no share of a short last batch
            images = self.batch(mine, augmentations[rows]) if len(mine) else self.val_images[:0]
            yield mine, augmentations[rows], images

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.val_images.shape[1:])

    @property
    def val_count(self) -> int:
        return len(self.val_labels)

    def probe(self) -> torch.Tensor:
        """One validation image, [1, C, H, W] unnormalised."""
        return self.val_images[:1]

    def validation(self, rows: range, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """The validation images and labels at `rows`, in batches."""
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            yield self.val_images[start:stop], self.val_labels[start:stop]


class ShiftedFashionMNIST(InMemoryTraining):
    """Fashion-MNIST training images (the training split of validation_split, optionally the
    first `limit`), augmented by random shift and flip (augmentation_count() of them)."""

    dataset = "Fashion-MNIST (Debian dataset-fashion-mnist)"
    description = "Fashion-MNIST --split val"
    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, root: str | Path, augmented: bool, limit: int | None = None) -> None:
        self.root = root
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
        if self.augmentations == 1:
            return torch.zeros(batch, dtype=torch.long)
        return draw_augmentations(batch, generator)

    def batch(self, index: torch.Tensor, augmentations: torch.Tensor) -> torch.Tensor:
        images = self.images[index]
        return images if self.augmentations == 1 else apply_augmentations(images, augmentations)

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        test = FashionMNIST(self.root, "test")
        return test.images, test.labels

    def card(self) -> dict:
        return {"dataset": self.dataset, **_split_card(self)}


# Training sees this many canvases of each item (then each may be flipped); the teacher's
# output table holds 2 x this many columns.
CLUTTERED_DRAWS = 32


class ClutteredTraining(InMemoryTraining):
    """Cluttered canvases of the Fashion-MNIST training split: augmentation a shows draw
    a // 2 of the item's canvas (a new position and new clutter; draw 0 is the published
    canvas), flipped horizontally when a is odd. Validation: the val split's draw 0. Every
    split is made with the published parameters changed by `clutter` (cluttered.spec_with)."""

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, root: str | Path, augmented: bool, limit: int | None = None,
                 clutter: dict | None = None) -> None:  # fmt: skip
        self.root = root
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

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        test = ClutteredFashionMNIST(self.root, "test", self.train.spec)
        return test.images, test.labels

    def card(self) -> dict:
        return {"dataset": self.dataset, "clutter": asdict(self.train.spec),
                "draws_per_item": self.augmentations // 2, **_split_card(self)}


def _split_card(data: InMemoryTraining) -> dict:
    """The model card's account of a Fashion-MNIST run's images and validation split."""
    return {"train_images": len(data.labels), "validation_images": data.val_count,
            "validation_split": dict(VALIDATION_SPLIT),
            "validation": f"{VALIDATION_SPLIT['size']} images of the training set, split with "
                          f"seed {VALIDATION_SPLIT['seed']} ({data.description})"}  # fmt: skip


def sample_seeds(index: torch.Tensor, seed: int, epoch: int, count: int) -> torch.Tensor:
    """Each training image's augmentation seed in an epoch: a function of the run's seed,
    the epoch and the image alone. index [B] -> [B] int64."""
    return (seed * 1_000_003 + epoch) * count + index


class _StepImages(Dataset):
    """The images of each planned training step, so that a DataLoader's workers decode and
    augment whole steps ahead of the training loop."""

    def __init__(self, folder: ImageFolderTraining, plan: list[tuple[torch.Tensor, ...]]):
        self.folder, self.plan = folder, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> torch.Tensor:
        index, seeds = self.plan[step]
        if not len(index):  # no share of a short last batch
            return torch.zeros(0, *self.folder.image_shape, dtype=torch.uint8)
        return torch.stack([self.folder.augmented_image(int(i), int(s))
                            for i, s in zip(index, seeds, strict=True)])


class ImageFolderTraining:
    """An ImageNet-style folder: DIR/train/<class>/<image>, validated on DIR/val/<class>/
    <image> or, without val/, on a tenth of train/ held out by a fixed seed. Training images
    go through timm's training transform at the model's input size (random resized crop,
    flip, colour jitter, `auto_augment`), validation images through its evaluation crop;
    both hand out unnormalised uint8, as every collabvit data set does.

    An augmentation is a seed (sample_seeds), so there is no finite set of them: a teacher
    runs on every batch rather than from a table (augmentations = 0).
    """

    augmentations = 0

    def __init__(self, root: str | Path, model: torch.nn.Module, augmented: bool, seed: int,
                 limit: int | None = None, auto_augment: str | None = DEFAULT_AUTO_AUGMENT,
                 workers: int = 0, crop_scale: float = 0.08) -> None:  # fmt: skip
        root = Path(root)
        if not (root / "train").is_dir():
            raise DataError(f"{root} has no train/ folder: {FOLDER_LAYOUT}")
        config = timm.data.resolve_data_config(model=model)
        embed = model.patch_embed
        size = (embed.proj.in_channels, *embed.img_size)
        self.image_shape = size
        eval_transform = timm.data.create_transform(
            size, interpolation=config["interpolation"], crop_pct=eval_crop_pct(model),
            normalize=False)  # fmt: skip
        # the model's mean is the colour RandAugment fills with (one value per channel)
        self.train_transform = timm.data.create_transform(
            size, is_training=True, auto_augment=auto_augment, mean=config["mean"],
            scale=(crop_scale, 1.0),
            interpolation=config["interpolation"], normalize=False,
        ) if augmented else eval_transform  # fmt: skip
        self.channels = size[0]
        train = _folder(root / "train", None, self.channels)
        self.classes = list(train.classes)
        self.samples = [path for path, _ in train.samples]
        labels = torch.tensor(train.targets, dtype=torch.long)
        if (root / "val").is_dir():
            self.val = _folder(root / "val", eval_transform, self.channels)
            if self.val.classes != self.classes:
                raise DataError(f"{root / 'val'} has other class folders than {root / 'train'}: "
                                f"{_difference(self.val.classes, self.classes)}")  # fmt: skip
            self.val_rows = list(range(len(self.val)))
            train_rows = torch.arange(len(labels))
            self.description = f"{root / 'val'}"
        else:
            held_out = max(1, round(HELD_OUT_SHARE * len(labels)))
            if held_out >= len(labels):
                raise DataError(f"{root / 'train'} has too few images to hold out a validation "
                                "split: add a val/ folder")  # fmt: skip
            train_rows, val_rows = split_indices(len(labels), held_out, FASHION_MNIST_VAL_SEED)
            self.val = _folder(root / "train", eval_transform, self.channels)
            self.val_rows = val_rows.tolist()
            self.description = (f"{held_out} images of {root / 'train'} held out with seed "
                                f"{FASHION_MNIST_VAL_SEED}")  # fmt: skip
        if limit is not None:
            train_rows = train_rows[:limit]
        self.samples = [self.samples[i] for i in train_rows.tolist()]
        self.labels = labels[train_rows]
        self.root, self.workers, self.augmented = root, workers, augmented
        self.crop_scale = crop_scale
        self.auto_augment = auto_augment if augmented else None
        self.dataset = f"image folder {root}"
        self.seed = seed

    def key(self) -> str:
        digest = hashlib.sha256("\n".join(self.samples).encode())
        return digest.hexdigest()

    def augmented_image(self, index: int, seed: int) -> torch.Tensor:
        """Training image `index` under the augmentation `seed` draws: uint8 [C, H, W].
        torchvision's and timm's transforms draw from the global random generators of torch,
        Python and NumPy (RandAugment's choice of operations), so they are seeded here for
        this one image and put back after."""
        image = read_image(self.samples[index])
        image = image if self.channels == 3 else image.convert("L")
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.train_transform(image)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def batches(self, order: torch.Tensor, batch_size: int, shard: Shard,
                generator: torch.Generator, epoch: int) -> Iterator[Batch]:  # fmt: skip
        plan = []
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            rows = shard(len(index))
            seeds = sample_seeds(index[rows], self.seed, epoch, len(self.labels))
            plan.append((index[rows], seeds))
        loader = DataLoader(_StepImages(self, plan), batch_size=None, num_workers=self.workers,
                            persistent_workers=False)  # fmt: skip
        for (index, seeds), images in zip(plan, loader, strict=True):
            yield index, seeds, images

    @property
    def val_count(self) -> int:
        return len(self.val_rows)

    def probe(self) -> torch.Tensor:
        return self.val[self.val_rows[0]][0][None]

    def validation(self, rows: range, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        subset = torch.utils.data.Subset(self.val, [self.val_rows[i] for i in rows])
        yield from DataLoader(subset, batch_size=batch_size, num_workers=self.workers)

    def test(self) -> None:
        return None

    def card(self) -> dict:
        return {"dataset": self.dataset, "train_images": len(self.labels),
                "validation_images": self.val_count, "validation": self.description,
                "classes": self.classes,
                "transform": {"auto_augment": self.auto_augment, "augmented": self.augmented,
                              "crop_scale": self.crop_scale if self.augmented else None,
                              "input_size": list(self.image_shape)}}  # fmt: skip


def _folder(path: Path, transform, channels: int) -> ImageNetFolder:
    """A class-per-folder image set, numbered 0..k-1 in sorted order; DataError naming the
    folder when it holds no class folders or no images."""
    try:
        return ImageNetFolder(path, transform, imagenet_subset=None, channels=channels)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"{path} is not a folder of class folders: {error}") from error


def _difference(these: list[str], those: list[str]) -> str:
    extra, missing = sorted(set(these) - set(those)), sorted(set(those) - set(these))
    parts = ([f"{len(extra)} extra ({', '.join(extra[:3])})"] if extra else []) + \
        ([f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else [])  # fmt: skip
    return "; ".join(parts)
