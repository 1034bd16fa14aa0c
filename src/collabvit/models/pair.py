"""An edge model, a server model and the images they run on, loaded and checked together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from collabvit import data
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeDevice
from collabvit.models.precision import check_precision, emulation_warning, with_precision
from collabvit.models.server import Server


def resolve_device(name: str) -> torch.device:
    """A torch device that can hold a tensor here, or ValueError with a one-line reason."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"device {name!r} cannot be used here: {reason}") from error
    return device


@dataclass(frozen=True)
class Pair:
    """Both models on one device and the dataset they run on.

    Attributes:
        warnings: one-line notes a user should see (e.g. a validation split that overlaps
            a model's training images, folder labels that may not match the model's classes).
    """

    edge_model: torch.nn.Module
    server_model: torch.nn.Module | None
    dataset: Dataset
    device: torch.device
    normalization: vit.Normalization | None
    edge_spec: ModelSpec
    server_spec: ModelSpec
    data_spec: DataSpec
    warnings: tuple[str, ...] = field(default=())
    precision: str = "float32"  # what both models compute in

    def edge(self, config: EdgeConfig) -> EdgeDevice:
        return EdgeDevice(self.edge_model, config, self.device, self.normalization)

    def server(self) -> Server:
        if self.server_model is None:
            raise ValueError("this pair was loaded without its server model")
        return Server(self.server_model, self.device, self.normalization)

    def loader(self, positions: Sequence[int] | None = None) -> DataLoader:
        """Batches (images, targets, dataset indices) of the pair's dataset, or of only the
        images at `positions` (one process's shard)."""
        spec = self.data_spec
        return data.indexed_loader(self.dataset, spec.batch_size, spec.num_workers,
                                   skip_unreadable=spec.skip_unreadable,
                                   positions=positions)  # fmt: skip

    def class_names(self) -> list[str]:
        """A readable name for each of the models' classes: those the edge's weights record
        (a `collabvit train` run), else the dataset's."""
        count = vit.geometry(self.edge_model).num_classes
        recorded = zoo.recorded_classes(self.edge_spec.weights)
        if recorded is not None and len(recorded) == count:
            return recorded
        return data.class_names(self.dataset, count)

    def default_config(self) -> EdgeConfig:
        """The operating point shipped with this pair of models, else the paper's."""
        return zoo.default_operating_point(self.edge_spec.name, self.server_spec.name)


def load_model(spec: ModelSpec, server: bool = False) -> torch.nn.Module:
    """A supported timm ViT in eval mode, from the spec (ModelError with a one-line reason).

    Weights written by `collabvit train` for this model record its architecture overrides
    (a fine-tuned head's class count, say); they are used when the spec gives none."""
    kwargs = spec.kwargs
    if not kwargs and spec.weights is not None:
        recorded = zoo.recorded_training_config(spec.name, spec.weights) or {}
        if recorded.get("model") == spec.name:
            kwargs = recorded.get("model_kwargs") or {}
    return vit.create_vit(spec.name, spec.weights, kwargs, server=server, use_ema=spec.use_ema)


def load_pair(
    edge: ModelSpec, server: ModelSpec, dataset: DataSpec, device: str = "cpu",
    with_server: bool = True, precision: str = "float32",
) -> Pair:
    """Build both models and the dataset, and check that they fit together.

    Both models compute in `precision` (precision.PRECISIONS): float32, the exact mode, by
    default.

    With `with_server` False the server model is not built (it runs elsewhere, e.g. behind
    `collabvit serve`); its spec still names the pair's default operating point.

    Raises ValueError (ModelError, DataError) with a one-line reason for any user mistake:
    unknown model or device, unreadable weights, edge and server of different geometry,
    missing or empty data, images of another size than the models take.
    """
    torch_device = resolve_device(device)
    check_precision(precision, torch_device)
    edge_model = load_model(edge)
    server_model = load_model(server, server=True) if with_server else None
    if server_model is not None:
        vit.check_compatible(edge_model, server_model)
    images = data.build_dataset(
        dataset.data_set, dataset.data_path, edge_model, dataset.split, dataset.crop_pct,
        dataset.clutter,
    )
    if dataset.limit is not None:
        images = Subset(images, range(min(dataset.limit, len(images))))
    if len(images) == 0:
        raise data.DataError("the dataset is empty")
    geometry = vit.geometry(edge_model)
    notes = []
    problem = data.label_fit_problem(images, geometry.num_classes)
    if problem:
        notes.append(problem)
    if dataset.data_set in ("fmnist", "fmnist-cluttered") and dataset.split == "val":
        for role, spec in (("edge", edge), ("server", server)):
            recorded = zoo.recorded_training_config(spec.name, spec.weights)
            overlap = data.val_overlap(recorded) if recorded else 0
            if overlap:
                notes.append(
                    f"the {role} model {spec.name} was trained on {overlap} of the "
                    f"validation split's images (its run held out another validation "
                    "split): its accuracy on --split val is optimistic"
                )
    emulated = emulation_warning(precision, torch_device)
    if emulated:
        notes.append(emulated)
    normalization = vit.Normalization.identity() if dataset.inputs_normalized else None
    edge_model = with_precision(edge_model, precision, torch_device)
    if server_model is not None:
        server_model = with_precision(server_model, precision, torch_device)
    pair = Pair(edge_model, server_model, images, torch_device, normalization, edge, server,
                dataset, tuple(notes), precision)  # fmt: skip
    _check_first_image(pair, geometry)
    return pair


def _check_first_image(pair: Pair, geometry: vit.Geometry) -> None:
    """Images of another size than the models take are a clear error before any work."""
    try:
        first = pair.dataset[0][0]
    except data.DataError:
        if pair.data_spec.skip_unreadable:  # the loop skips and counts it
            return
        raise
    shape = tuple(first.shape)
    expected = (geometry.in_chans, *geometry.img_size)
    if shape != expected:
        raise data.DataError(
            f"{pair.data_spec.data_set} images are {'x'.join(map(str, shape))} but the edge "
            f"model takes {'x'.join(map(str, expected))}"
        )
