"""The teacher a student is distilled from: loading it (a `collabvit train` folder or a timm
name), checking it fits the student's images and classes, the distillation loss, and the table
of its outputs that lets the frozen teacher run once per (training image, augmentation).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from collabvit.models import vit


class TeacherOutputs:
    """The frozen teacher's logits for each (training image, augmentation) pair, computed
    the first time training meets the pair and looked up after that.

    There are only augmentation_count() augmentations, so over a long schedule most of
    the teacher's forwards would repeat; the table makes distillation cost about one
    teacher forward per pair instead of one per image and epoch. A looked-up row is what
    the teacher returned for that very augmented image, so training is unchanged.
    The table is saved beside the checkpoint and reloaded only for the same teacher
    weights, training images and augmentations (its key).
    """

    FILE = "teacher_outputs.safetensors"

    def __init__(self, teacher: torch.nn.Module, normalization, key: dict[str, str],
                 images: int, augmentations: int, classes: int) -> None:  # fmt: skip
        self.teacher, self.normalization, self.key = teacher, normalization, key
        self.logits = torch.zeros(images, augmentations, classes)
        self.known = torch.zeros(images, augmentations, dtype=torch.bool)

    def __call__(self, images: torch.Tensor, index: torch.Tensor,
                 augmentations: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Logits [B, classes] for augmented images [B, C, H, W], which are training
        images `index` [B] under `augmentations` [B]; only unseen pairs run the teacher."""
        missing = ~self.known[index, augmentations]
        if missing.any():
            rows = missing.nonzero().squeeze(1)  # the table lives on the CPU, images anywhere
            with torch.no_grad():
                unseen = images[rows.to(images.device)]
                computed = self.teacher(self.normalization(unseen)).float().cpu()
            self.logits[index[rows], augmentations[rows]] = computed
            self.known[index[rows], augmentations[rows]] = True
        return self.logits[index, augmentations]

    @property
    def filled(self) -> float:
        """Share of the pairs whose logits are known."""
        return float(self.known.float().mean())

    def save(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        save_file({"logits": self.logits, "known": self.known}, str(temporary),
                  metadata=self.key)  # fmt: skip
        temporary.replace(path)

    def load(self, path: Path) -> bool:
        """Take the table in `path` if it has this table's key and shape; True if taken."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}) != self.key:
                    return False
                logits, known = handle.get_tensor("logits"), handle.get_tensor("known")
        except (SafetensorError, OSError, KeyError):
            return False
        if logits.shape != self.logits.shape or known.shape != self.known.shape:
            return False
        self.logits, self.known = logits, known
        return True



def load_teacher(source: str | Path) -> torch.nn.Module:
    """The teacher, in eval mode: a model written by `collabvit train` (its folder or
    model.safetensors, whose metadata names the model and its architecture overrides), or
    a timm model name with weights (shipped with collabvit, or from timm's hub)."""
    path = Path(source)
    if not path.exists() and timm.is_model(str(source)):
        return vit.create_model(str(source))
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"teacher {source}: neither a timm model name nor a folder or file "
                         "with model.safetensors (train one first)")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"teacher {path} is not a safetensors file: {error}") from error
    if "model" not in metadata:
        raise ValueError(f"teacher {path} was not written by collabvit train (no model name "
                         "in its metadata)")  # fmt: skip
    recorded = json.loads(metadata.get("config", "{}"))
    return vit.create_model(metadata["model"], path, recorded.get("model_kwargs"))


def check_teacher_fits(teacher: torch.nn.Module, probe: torch.Tensor, classes: int,
                       source: str) -> None:  # fmt: skip
    """ValueError unless the teacher takes the training images (probe [1, C, H, W],
    normalised for it) and answers with the student's `classes` logits."""
    try:
        with torch.inference_mode():
            logits = teacher(probe)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"teacher {source} cannot take the training images "
                         f"{tuple(probe.shape[1:])}: {first}") from error  # fmt: skip
    if tuple(logits.shape) != (1, classes):
        raise ValueError(f"teacher {source} answers with {logits.shape[-1]} classes, the "
                         f"student with {classes}")  # fmt: skip


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      mode: str, weight: float, temperature: float,
                      label_smoothing: float) -> torch.Tensor:  # fmt: skip
    """(1 - weight) * CE(student, labels) + weight * the teacher's term.

    hard: CE(student, the teacher's top class) (DeiT's hard distillation); soft:
    KL(softmax(teacher / T) || softmax(student / T)) * T^2. Logits [B, classes], labels [B].
    """
    base = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if mode == "hard":
        guide = F.cross_entropy(student, teacher.argmax(dim=1))
    else:
        guide = F.kl_div(F.log_softmax(student / temperature, dim=1),
                         F.log_softmax(teacher / temperature, dim=1), reduction="batchmean",
                         log_target=True) * temperature**2  # fmt: skip
    return (1 - weight) * base + weight * guide
