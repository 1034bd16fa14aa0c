"""The weights a training run starts from (`collabvit train --init-weights`): a weights file,
or the model's pretrained weights as timm knows them (shipped with collabvit, or from timm's
hub), fitted to the model being trained.

Fitting is timm's own: a ViT's checkpoint goes through timm's checkpoint filter for vision
transformers (position embeddings resampled to the model's grid, a patch embedding of
another size resampled), and where the class count differs the classifier is left as the
model initialised it, a new head. Anything else that does not fit is a one-line error,
never a silent partial load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from collabvit.models import vit

# --init-weights PRETRAINED: the pretrained weights timm knows for the model
PRETRAINED = "pretrained"


def weights_address(name: str) -> str:
    """Where timm's hub keeps the pretrained weights of `name`, for a one-line hint."""
    config = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    if config is None:
        return "no address: timm knows no pretrained weights for it"
    if getattr(config, "hf_hub_id", None):
        return f"https://huggingface.co/{config.hf_hub_id}"
    return getattr(config, "url", None) or "no address known to timm"


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The pretrained weights timm knows for `name`: a shipped model's from the package, any
    other's from timm's hub (ModelError, one line, when it cannot be reached: pass the file
    instead)."""
    shipped = vit._local_pretrained_file(name)
    if shipped is not None:
        return vit.read_state_dict(shipped)
    if not vit._hub_reachable():
        raise vit.ModelError(f"no pretrained weights for {name}: timm's hub is unreachable "
                             f"(offline?). Pass --init-weights FILE, the file at "
                             f"{weights_address(name)}")  # fmt: skip
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:  # hub errors come in many types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise vit.ModelError(f"cannot fetch pretrained weights for {name}: {first}") from error


def fitted_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module,
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
    """`state` fitted to `model`, and the names of the classifier's tensors left out because
    their shapes differ (a new head)."""
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    heads = (head,) if isinstance(head, str) else tuple(head)
    replaced = [key for key, value in state.items()
                if key.split(".")[0] in heads and key in own and own[key].shape != value.shape]
    return {k: v for k, v in state.items() if k not in replaced}, replaced


def load_initial_weights(model: torch.nn.Module, name: str, source: str) -> dict:
    """Load `source` (a weights file, or 'pretrained') into `model` in place; returns what the model
    card records of it: the source, its sha256 (a file), and whether the head is new.

    Raises ModelError (one line) when the file is unreadable or its tensors do not fit the
    model beyond the classifier."""
    if source == PRETRAINED:
        state, digest = pretrained_state_dict(name), None
    else:
        state = vit.read_state_dict(source)
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    try:
        fitted, replaced = fitted_state_dict(state, model)
        missing, unexpected = model.load_state_dict(fitted, strict=False)
    except (RuntimeError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
        raise vit.ModelError(f"initial weights {source} do not fit {name}: {first}") from error
    missing = [key for key in missing if key not in replaced]
    if missing or unexpected:
        raise vit.ModelError(f"initial weights {source} do not fit {name}: {len(missing)} "
                             f"missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                             f"{unexpected[:3]}")  # fmt: skip
    return {"source": source, **({"sha256": digest} if digest else {}),
            "new_head": sorted(replaced)}
