"""Datasets yielding unnormalised images: (uint8 [C, H, W], label), and the input contract.

Each model normalises with its own mean/std (see vit.Normalization).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import pil_loader

from collabvit.lite import fashion
from collabvit.lite.cluttered import ClutterSpec, compose, item_boxes
from collabvit.lite.fashion import (  # noqa: F401 - DataError, read_idx, the split's constants: API
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_HINT,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_TRAIN_SIZE,
    FASHION_MNIST_VAL_SEED,
    FASHION_MNIST_VAL_SIZE,
    VALIDATION_SPLIT,
    DataError,
    clutter_spec,
    read_fashion_mnist,
    read_idx,
)
from collabvit.lite.specs import DATA_SETS, FASHION_MNIST_SPLITS


class InputError(DataError):
    """Images or labels outside the input contract (a user-facing, one-line reason)."""


INPUT_HINT = "pass uint8 for 0..255 pixels, or --inputs-normalized for normalised inputs"


def check_images(images: torch.Tensor, normalized: bool = False) -> None:
    """Raise InputError unless `images` [B, C, H, W] are pixels the models can take.

    uint8 means 0..255 and floats (any float dtype) mean 0..1; with `normalized`
    floats are taken as already normalised and need only be finite. Other dtypes
    are refused because their scale is ambiguous (int 255 would be read as 255.0).
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise InputError(
            f"images are {images.dtype} but must be uint8 or floating point; {INPUT_HINT}"
        )
    if images.numel() == 0:
        return
    finite = torch.isfinite(images)
    if not finite.all():
        count = int((~finite).sum())
        raise InputError(f"images hold {count} NaN or infinite values; pass finite pixels")
    if not normalized:
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 1:
            raise InputError(
                f"image values span [{low:g}, {high:g}] but floats must lie in [0, 1]; {INPUT_HINT}"
            )


def check_labels(targets: torch.Tensor, num_classes: int) -> None:
    """Raise InputError unless `targets` [B] are integer class indices in [0, num_classes)."""
    if not isinstance(targets, torch.Tensor):
        raise InputError(f"labels must be a torch tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise InputError(
            f"labels are {targets.dtype} but must be integer class indices 0..{num_classes - 1}"
        )
    if targets.dim() != 1:
        raise InputError(f"labels must be one per image [B], got shape {tuple(targets.shape)}")
    outside = (targets < 0) | (targets >= num_classes)
    if outside.any():
        position = int(outside.nonzero()[0, 0])
        raise InputError(
            f"label {int(targets[position])} (batch position {position}) is outside "
            f"0..{num_classes - 1}: the model has {num_classes} classes"
        )


def split_indices(count: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fashion.split_indices as tensors: sorted int64 (train [count - v], val [v])."""
    train, val = fashion.split_indices(count, val_size, seed)
    return torch.from_numpy(train), torch.from_numpy(val)


def validation_split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """collabvit's train/validation cut (fashion.VALIDATION_SPLIT) as tensors: sorted int64
    train [count - 5000], val [5000]."""
    return split_indices(count, FASHION_MNIST_VAL_SIZE, FASHION_MNIST_VAL_SEED)


def val_overlap(training_config: dict) -> int:
    """How many images of Fashion-MNIST `--split val` a run with this recorded config trained on.

    Runs record `validation_split` ({"size", "seed"}); older records have none
    because their split was drawn with `val_size` and the training `seed`.
    With `train_limit` a run trained on the first N of its sorted training indices.
    """
    split = training_config.get("validation_split") or {
        "size": training_config.get("val_size", FASHION_MNIST_VAL_SIZE),
        "seed": training_config.get("seed", 0),
    }
    trained, _ = split_indices(FASHION_MNIST_TRAIN_SIZE, int(split["size"]), int(split["seed"]))
    limit = training_config.get("train_limit")
    if limit is not None:
        trained = trained[: int(limit)]
    _, val = validation_split(FASHION_MNIST_TRAIN_SIZE)
    return int(torch.isin(trained, val).sum())


class _LabelledImages(Dataset):
    """`images` [n, C, H, W] uint8 and `labels` [n]: dataset[i] is (image, label), through
    the optional torchvision-style `transform` and `target_transform` (collabvit's own
    loops read `images` and `labels` directly)."""

    transform: Callable | None = None
    target_transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        image, label = self.images[index], int(self.labels[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


class FashionMNIST(_LabelledImages):
    """Fashion-MNIST from its IDX files: uint8 [1, 28, 28] images, labels 0..9.

    Splits: ``test`` (10,000), ``train-all`` (60,000), and the training set cut
    as collabvit's training does (validation_split): ``val`` (5,000 held out,
    seed 0) and ``train`` (the other 55,000).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "test",
                 transform: Callable | None = None,
                 target_transform: Callable | None = None) -> None:  # fmt: skip
        self.split, self.transform, self.target_transform = split, transform, target_transform
        if split not in FASHION_MNIST_SPLITS:
            choices = ", ".join(FASHION_MNIST_SPLITS)
            raise DataError(f"Fashion-MNIST split must be one of {choices}, got {split!r}")
        images, labels = fashion.split_of(
            *read_fashion_mnist(root, "test" if split == "test" else "train"), split, root)
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # torch wants it writable
        self.labels = torch.from_numpy(labels)

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, {len(self)} images)"


class ClutteredFashionMNIST(_LabelledImages):
    """Cluttered Fashion-MNIST: uint8 [1, 56, 56] canvases, each one Fashion-MNIST item at a
    random position among fragments of other items of its split (collabvit.lite.cluttered).

    Canvas i of a split shows item i of the same Fashion-MNIST split (test, val, train,
    train-all) and has its label; its clutter comes from that split's items only. `masks`
    [n, G * G] bool marks the patches (row-major, spec.patch pixels) holding the item's
    pixels, `boxes` [n, 4] its bounding box in pixels. `draw` 0 is the published data set;
    other draws are other canvases of the same items (training's augmentation, via
    `canvases`).
    """

    classes = FASHION_MNIST_CLASSES
    CHUNK = 4096  # canvases composed at a time: bounds the index arrays' memory

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "test",
                 spec: ClutterSpec | None = None, draw: int = 0,
                 transform: Callable | None = None,
                 target_transform: Callable | None = None) -> None:  # fmt: skip
        spec = spec or ClutterSpec()  # the published benchmark's parameters
        self.transform, self.target_transform = transform, target_transform
        source = FashionMNIST(root, split)
        try:
            spec.check(source.images.shape[-1])
        except ValueError as error:
            raise DataError(f"cluttered canvases: {error}") from error
        self.spec, self.split, self.draw = spec, split, draw
        self.items = source.images[:, 0].numpy()
        self.labels = source.labels

    @functools.cached_property
    def _composed(self) -> tuple[torch.Tensor, torch.Tensor]:
        # made on first use: training only ever asks for other draws of a few canvases
        return self.canvases(np.arange(len(self.labels)), self.draw, with_masks=True)

    @property
    def images(self) -> torch.Tensor:
        """All canvases of the split (this draw): uint8 [n, 1, S, S]."""
        return self._composed[0]

    @property
    def masks(self) -> torch.Tensor:
        """The item masks of all canvases: bool [n, G * G], patches row-major."""
        return self._composed[1]

    @functools.cached_property
    def boxes(self) -> torch.Tensor:
        """The item's bounding box on every canvas (this draw): int64 [n, 4] (x0, y0, x1, y1)
        in canvas pixels, torchvision's XYXY order with exclusive ends (x1 - x0 is the
        width), around the item's non-zero pixels."""
        return self.item_boxes(np.arange(len(self.labels)), self.draw)

    def item_boxes(self, index, draw=0) -> torch.Tensor:
        """The item's boxes on canvases `index` [B] under `draw`: int64 [B, 4], as `boxes`."""
        return torch.from_numpy(item_boxes(self.items, index, self.spec, self.split, draw))

    def canvases(self, index, draw=0, with_masks: bool = False):
        """Canvases `index` [B] under `draw` (one int, or one per canvas [B]): uint8
        [B, 1, S, S], and with `with_masks` their item masks [B, G * G] bool too."""
        index = np.asarray(index, dtype=np.int64)
        draw = np.broadcast_to(np.asarray(draw, dtype=np.int64), index.shape)
        parts = [compose(self.items, index[start : start + self.CHUNK], self.spec, self.split,
                         draw[start : start + self.CHUNK])
                 for start in range(0, len(index), self.CHUNK)]  # fmt: skip
        side, grid = self.spec.canvas, self.spec.canvas // self.spec.patch
        images = torch.from_numpy(np.concatenate([part[0] for part in parts]) if parts
                                  else np.zeros((0, side, side), np.uint8)).unsqueeze(1)
        if not with_masks:
            return images
        masks = (np.concatenate([part[1] for part in parts]) if parts
                 else np.zeros((0, grid, grid), bool))  # fmt: skip
        return images, torch.from_numpy(masks.reshape(len(index), grid * grid))

    def __repr__(self) -> str:
        spec = self.spec
        return (f"ClutteredFashionMNIST(split={self.split!r}, {len(self)} canvases of "
                f"{spec.canvas}x{spec.canvas}, {spec.fragments} fragments of "
                f"{spec.fragment}x{spec.fragment}, masks on {spec.patch}x{spec.patch} patches, "
                f"seed {spec.seed}, draw {self.draw})")  # fmt: skip


def item_masks(dataset: Dataset) -> torch.Tensor | None:
    """The item masks [n, N] bool of a cluttered data set (under any --limit Subset), in
    the dataset's order; None for data sets without them."""
    positions = None
    while isinstance(dataset, Subset):
        inner = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        positions = inner if positions is None else inner[positions]
        dataset = dataset.dataset
    masks = getattr(dataset, "masks", None)
    if masks is None:
        return None
    return masks if positions is None else masks[positions]


class TensorFile(Dataset):
    """A safetensors file with ``images`` [n, C, H, W] and ``targets`` [n] (no transform)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            raise DataError(
                f"{path} is a folder, not a file: --data-set tensors reads one .safetensors "
                "file holding 'images' and 'targets'"
            )
        if not path.is_file():
            raise DataError(f"tensor file {path} does not exist")
        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise DataError(f"cannot read {path} as safetensors: {error}") from error
        if "images" not in tensors or "targets" not in tensors:
            raise DataError(f"{path} must hold 'images' and 'targets', found {sorted(tensors)}")
        self.images, self.targets = tensors["images"], tensors["targets"].long()
        if self.images.dim() != 4 or len(self.images) != len(self.targets):
            raise DataError(f"{path}: images must be [n, C, H, W] with one target each")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


# The paper evaluates DeiT as DeiT's own code does at 224: resize to 256, then
# centre crop 224; timm's configs say 0.9. DeiT's 384 fine-tunes (crop 1.0) and
# DeiT III (a different recipe) keep timm's values.
DEIT_CROP_PCT = 224 / 256


def eval_crop_pct(model: nn.Module) -> float:
    """The centre-crop fraction the reference uses for this model.

    0.875 for timm's ``deit_*`` architectures (distilled too) at 224 input; timm's
    own crop_pct for everything else, ``deit3_*`` and ``*_384`` included.
    """
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture") or ""
    # the model's own input size: an img_size override is not in its pretrained config
    if architecture.startswith("deit_") and tuple(model.patch_embed.img_size) == (224, 224):
        return DEIT_CROP_PCT
    return timm.data.resolve_data_config(model=model)["crop_pct"]


IMAGE_FOLDER_LAYOUT = "--data-set imagenet reads ROOT/val/<class>/<image> or ROOT/<class>/<image>"


def read_image(path: str) -> Image.Image:
    """An image file as RGB; DataError naming the file when it cannot be decoded."""
    try:
        return pil_loader(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports broken files as OSError (UnidentifiedImageError, truncation),
        # some decoders as SyntaxError or ValueError
        reason = (
            "not an image format PIL knows" if isinstance(error, UnidentifiedImageError) else error
        )
        raise DataError(f"cannot read image {path}: {reason}") from error


def read_greyscale(path: str) -> Image.Image:
    """An image file in greyscale (mode L), for a model that takes one channel."""
    return read_image(path).convert("L")


@functools.cache
def _imagenet_info(subset: str) -> timm.data.ImageNetInfo:
    return timm.data.ImageNetInfo(subset)


@functools.cache
def _synset_index(subset: str) -> dict[str, int]:
    """Synset (e.g. "n01440764") -> class index in the ImageNet `subset`."""
    return {name: index for index, name in enumerate(_imagenet_info(subset).label_names())}


class ImageNetFolder(ImageFolder):
    """ImageFolder whose ImageNet synset folders (n01440764, ...) keep their class indices.

    When every folder is a synset of the model's ImageNet subset (timm's
    infer_imagenet_subset, e.g. "imagenet-1k"), targets are the model's class
    indices, so any subset of ImageNet scores correctly. Otherwise folders are
    numbered 0..k-1 in sorted order, as torchvision does. Unreadable images
    raise DataError naming the file.
    """

    def __init__(self, root: str | Path, transform, imagenet_subset: str | None,
                 channels: int = 3) -> None:  # fmt: skip
        self.imagenet_subset = imagenet_subset
        self.synset_labelled = False  # set by find_classes, which ImageFolder calls
        # a model of one channel reads every image in greyscale
        loader = read_image if channels == 3 else read_greyscale
        super().__init__(str(root), transform=transform, loader=loader)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx = super().find_classes(directory)
        if self.imagenet_subset is not None:
            index = _synset_index(self.imagenet_subset)
            if all(name in index for name in classes):
                self.synset_labelled = True
                class_to_idx = {name: index[name] for name in classes}
        return classes, class_to_idx


def image_folder(
    root: str | Path, model: nn.Module, crop_pct: float | None = None
) -> ImageNetFolder:
    """ImageNet-style folder with the model's timm eval transform, unnormalised uint8.

    Uses ROOT/val/<class>/<image> when ROOT/val exists (the reference's layout),
    else ROOT/<class>/<image>. `crop_pct` defaults to eval_crop_pct(model).
    Items are (uint8 [3, H, W], label); synset folders get ImageNet labels.
    """
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root} is a file, not a folder: {IMAGE_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    folder = root / "val" if (root / "val").is_dir() else root
    config = timm.data.resolve_data_config(model=model)
    # The model's own input size: architecture overrides (img_size=...) are not in its
    # pretrained config, and a transform to another size would only fail later.
    embed = model.patch_embed
    config["input_size"] = (embed.proj.in_channels, *embed.img_size)
    config["crop_pct"] = crop_pct if crop_pct is not None else eval_crop_pct(model)
    transform = timm.data.create_transform(**config, is_training=False, normalize=False)
    try:
        return ImageNetFolder(folder, transform, timm.data.infer_imagenet_subset(model),
                              embed.proj.in_channels)  # fmt: skip
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(
            f"{folder} is not an ImageNet-style folder (<class>/<image>): {error}"
        ) from error


def _unwrap(dataset: Dataset) -> Dataset:
    """The dataset under any torch Subset (e.g. --limit's)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def class_names(dataset: Dataset, num_classes: int) -> list[str]:
    """A readable name for each of the model's `num_classes` class indices.

    ImageNet synset folders: the ImageNet descriptions of all classes; other
    folders: their names at their labels; Fashion-MNIST: its class names;
    str(index) wherever nothing is known, so any predicted index has a name.
    """
    dataset = _unwrap(dataset)
    if isinstance(dataset, ImageNetFolder) and dataset.synset_labelled:
        descriptions = _imagenet_info(dataset.imagenet_subset).label_descriptions()
        known = dict(enumerate(descriptions))
    elif isinstance(dataset, ImageFolder):
        known = {index: name for name, index in dataset.class_to_idx.items()}
    else:
        known = dict(enumerate(getattr(dataset, "classes", ())))
    return [known.get(index, str(index)) for index in range(num_classes)]


def label_fit_problem(dataset: Dataset, num_classes: int) -> str | None:
    """A one-line reason why the dataset's labels may not mean the model's classes, or None."""
    dataset = _unwrap(dataset)
    if isinstance(dataset, ImageNetFolder) and dataset.synset_labelled:
        return None
    if isinstance(dataset, ImageFolder):
        count = len(dataset.classes)
        if count > num_classes:
            return (
                f"{dataset.root} has {count} class folders but the model has {num_classes} "
                f"classes: labels {num_classes}..{count - 1} can never be predicted"
            )
        if count < num_classes:
            hint = (
                "; name the folders by ImageNet synset (n01440764, ...) to use ImageNet labels"
                if getattr(dataset, "imagenet_subset", None)
                else ""
            )
            return (
                f"{dataset.root}: labels 0..{count - 1} are assigned by folder order and may "
                f"not match the model's {num_classes} classes{hint}"
            )
        return None
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != num_classes:
        return f"the data has {len(classes)} classes but the model has {num_classes}"
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, torch.Tensor) and targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            return f"labels span {low}..{high} but the model's classes are 0..{num_classes - 1}"
    return None


@dataclass(frozen=True)
class _Unreadable:
    """Stands in for an item whose image could not be read (picklable, for worker processes)."""

    reason: str


class _Indexed(Dataset):
    """(image, target, index) items of `dataset`; an unreadable one becomes _Unreadable.

    Returning rather than raising lets the reason reach the main process as one
    line (a worker's exception would arrive wrapped in its traceback).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, target = self.dataset[index]
        except DataError as error:
            return _Unreadable(str(error))
        return image, target, index


def _collate(items: list, skip_unreadable: bool):
    """The readable items collated; the first _Unreadable unless skipping; None if none remain."""
    readable = [item for item in items if not isinstance(item, _Unreadable)]
    if len(readable) < len(items) and not skip_unreadable:
        return next(item for item in items if isinstance(item, _Unreadable))
    return default_collate(readable) if readable else None


class _IndexedLoader(DataLoader):
    """Raises an unreadable item's DataError here, in the main process; drops empty batches."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _Unreadable):
                raise DataError(batch.reason)
            if batch is not None:
                yield batch


def indexed_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, skip_unreadable: bool = False,
    positions: Sequence[int] | None = None,
) -> DataLoader:
    """The evaluation's batches, in order: (images [B, C, H, W], targets [B], indices [B]).

    indices are int64 positions in `dataset` (per-image seeds downstream); with
    `positions` only those images are read, in that order (one process's shard).
    An unreadable image raises DataError naming the file; with `skip_unreadable`
    it is left out instead, so skipped = len(dataset) - images seen (a batch may
    be short, and a batch of only unreadable images is not yielded).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise DataError(f"number of workers must be >= 0, got {num_workers}")
    return _IndexedLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        num_workers=num_workers,
        sampler=positions,
        collate_fn=functools.partial(_collate, skip_unreadable=skip_unreadable),
    )


def _square_patch(model: nn.Module | None) -> int | None:
    """The side of a ViT's square patches; None for other models."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    sides = (patch, patch) if isinstance(patch, int) else tuple(patch or ())
    return sides[0] if len(sides) == 2 and sides[0] == sides[1] else None


def build_dataset(
    name: str,
    path: str | Path | None,
    model: nn.Module,
    split: str = "test",
    crop_pct: float | None = None,
    clutter: Mapping[str, int] | None = None,
) -> Dataset:
    """The evaluation dataset named on the command line.

    Args:
        name: one of DATA_SETS.
        path: its location (Fashion-MNIST defaults to the Debian package's folder).
        model: the edge model (its eval transform for ImageNet-style data; its patch grid
            for the item masks of cluttered canvases).
        split: Fashion-MNIST split (of the cluttered canvases too).
        crop_pct: centre-crop fraction for ImageNet-style data (default: the reference's).
        clutter: changes to the published cluttered canvases (cluttered.CHANGEABLE).
    """
    if name == "fmnist":
        return FashionMNIST(path or FASHION_MNIST_ROOT, split)
    if name == "fmnist-cluttered":
        spec = clutter_spec(clutter, _square_patch(model))
        return ClutteredFashionMNIST(path or FASHION_MNIST_ROOT, split, spec)
    if name == "imagenet":
        if path is None:
            raise DataError("--data-set imagenet needs --data-path ROOT (ROOT/val/<class>/<image>)")
        return image_folder(path, model, crop_pct)
    if name == "tensors":
        if path is None:
            raise DataError("--data-set tensors needs --data-path FILE.safetensors")
        return TensorFile(path)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATA_SETS)}")
