"""The only module that touches timm internals.

Creates and loads ViTs, runs the edge forward (logits + patch scores) and the
server forward on patch subsets. It uses timm's seams (``patch_embed``,
``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``,
``forward_head``, ``num_prefix_tokens``, ``no_embed_class``) and never
copies timm's model code nor flips its global fused-attention switch.

Shapes: B images, C channels, H x W input, P patch size, N patches,
T = prefix + N tokens, L selected patches (padded), E embedding width.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from collabvit.algo.scoring import (
    ATTENTION_MODES,
    attention_probabilities,
    mean_scores,
    rollout_scores,
)
from collabvit.lite.specs import Geometry
from collabvit.models import zoo  # noqa: F401 - registers the shipped models with timm

SUPPORTED = (
    "timm VisionTransformer models with a class token and learned absolute position "
    "embeddings: ViT, DeiT, distilled DeiT, DeiT-III (no_embed_class) and register-token ViTs"
)


class ModelError(ValueError):
    """A model cannot be created, loaded or used by collabvit (a user-facing, one-line reason)."""


def geometry(model: VisionTransformer) -> Geometry:
    """Input size, patch grid, prefix and classes of a supported ViT."""
    embed = model.patch_embed
    return Geometry(
        in_chans=embed.proj.in_channels,
        img_size=tuple(embed.img_size),
        patch_size=tuple(embed.patch_size),
        grid_size=tuple(embed.grid_size),
        num_prefix_tokens=model.num_prefix_tokens,
        num_classes=model.num_classes,
    )


def check_supported(model: nn.Module, server: bool = False) -> None:
    """Raise ModelError naming what is supported if `model` is not.

    Args:
        model: a timm model.
        server: also require what the server forward on subsets needs (class
            token pooling, so that padding never reaches the head).
    """
    name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"{name} ({type(model).__name__}) is not supported; collabvit supports {SUPPORTED}"
        )
    problems = []
    if model.cls_token is None:
        problems.append("it has no class token")
    if model.pos_embed is None:
        problems.append("it has no learned position embedding")
    if getattr(model, "dynamic_img_size", False) or getattr(
        model.patch_embed, "dynamic_img_pad", False
    ):
        problems.append("dynamic_img_size/dynamic_img_pad is on (fixed input size needed)")
    proj = model.patch_embed.proj
    if not (
        isinstance(proj, nn.Conv2d)
        and tuple(proj.kernel_size) == tuple(model.patch_embed.patch_size)
        and tuple(proj.stride) == tuple(proj.kernel_size)
        and tuple(proj.padding) == (0, 0)
    ):
        problems.append("its patch embedding is not a plain non-overlapping patch projection")
    if not all(isinstance(b, Block) and type(b.attn) is Attention for b in model.blocks):
        problems.append("its blocks are not timm's pre-norm Block with standard Attention")
    if server and (model.global_pool != "token" or model.attn_pool is not None):
        problems.append(f"server models need class-token pooling, not {model.global_pool!r}")
    if problems:
        raise ModelError(
            f"{name} is not supported: {'; '.join(problems)}. collabvit supports {SUPPORTED}"
        )


def check_compatible(edge: VisionTransformer, server: VisionTransformer) -> None:
    """Edge and server must share input size, channels, patch grid and classes."""
    e, s = geometry(edge), geometry(server)
    if (e.in_chans, e.img_size, e.patch_size) != (s.in_chans, s.img_size, s.patch_size):
        raise ModelError(
            f"edge and server disagree on the input: edge {e.describe()}, server {s.describe()}; "
            "collabvit never resamples, pick models with the same input size and patch size"
        )
    if e.num_classes != s.num_classes:
        raise ModelError(f"edge has {e.num_classes} classes but server has {s.num_classes}")


@dataclass(frozen=True)
class Normalization:
    """Maps unnormalised pixels (uint8, or float in [0, 1]) to a model's input."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of_model(cls, model: nn.Module) -> Normalization:
        """The model's own mean/std from its timm data config."""
        config = timm.data.resolve_data_config(model=model)
        return cls(tuple(config["mean"]), tuple(config["std"]))

    @classmethod
    def identity(cls) -> Normalization:
        """For inputs that are already normalised (floats are passed through unchanged)."""
        return cls((0.0,), (1.0,))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[..., C, h, w] uint8 (0..255) or float -> float32 normalised, same shape."""
        # One float32 buffer, normalised in place: a batch of 256 images at 224 is 154 MB per
        # copy, and out-of-place arithmetic would hold three (same values either way).
        if pixels.dtype == torch.uint8:
            x = pixels.float().div_(255.0)
        else:
            x = pixels.to(torch.float32, copy=True)
        channels = x.shape[-3]
        mean, std = self.mean, self.std
        if len(mean) != channels:
            if len(mean) != 1 and len(set(mean)) == 1 and len(set(std)) == 1:
                mean, std = mean[:1], std[:1]
            elif len(mean) != 1:
                raise ModelError(
                    f"normalisation has {len(mean)} channels but the images have {channels}"
                )
        mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean_t).div_(std_t)


def _hub_reachable() -> bool:
    """Whether timm's hub can work: offline mode uses the cache, else the host must resolve."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        socket.getaddrinfo(host, 443)
    except (OSError, ImportError):
        return False
    return True


def _local_pretrained_file(name: str) -> Path | None:
    """The local weights file timm's pretrained config names for `name`, if any.

    Raises ModelError when a shipped collabvit model's weights are missing from the package.
    """
    config = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    file = getattr(config, "file", None) if config is not None else None
    if not file:
        return None
    if not Path(file).is_file():
        raise ModelError(f"the weights of {name} are missing from the package (expected {file})")
    return Path(file)


_NOT_WEIGHTS = "expected .safetensors or a PyTorch .pth checkpoint"
_MODEL_KEYS = ("state_dict", "model")
TRAIN_EMA_KEY = "ema"  # where `collabvit train` keeps the weight average in its last.pt
_EMA_KEYS = ("state_dict_ema", "model_ema", TRAIN_EMA_KEY)


def _weights_format(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` or None, judged from the file's content, not its name."""
    with path.open("rb") as file:
        head = file.read(9)
    if head.startswith(b"PK\x03\x04"):
        # torch.save writes a zip with a pickled record; other zips are not checkpoints
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return None
        return "torch" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else None
    if head[:1] == b"\x80":  # a pickle stream: torch.save's legacy (pre-zip) format
        return "torch"
    # safetensors: little-endian u64 header length, then a JSON header
    if len(head) == 9 and head[8:9] == b"{":
        if 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
            return "safetensors"
    return None


def _load_checkpoint(path: Path, kind: str) -> object:
    """The file's content: a flat tensor dict (safetensors) or what torch.save stored."""
    if kind == "safetensors":
        return load_safetensors(str(path))
    # weights_only: never run code from a file. timm's training checkpoints also store
    # their argparse arguments next to the weights, a plain data class that is safe to load.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _pick_state_dict(checkpoint: object, use_ema: bool, path: Path) -> dict[str, torch.Tensor]:
    """The state dict to load from a checkpoint's content.

    A training checkpoint nests the weights under ``state_dict`` or ``model``
    and, with an EMA, the averaged weights under ``state_dict_ema``,
    ``model_ema`` (timm) or ``ema`` (``collabvit train``); a plain one is the
    state dict itself.
    """
    if not isinstance(checkpoint, Mapping):
        raise ModelError(f"{path} holds no model weights (a {type(checkpoint).__name__})")
    keys = _EMA_KEYS if use_ema else _MODEL_KEYS
    nested = [checkpoint[key] for key in keys if isinstance(checkpoint.get(key), Mapping)]
    if nested:
        state = nested[0]
    elif use_ema:
        raise ModelError(
            f"{path} holds no EMA weights (no 'model_ema', 'state_dict_ema' or 'ema'); load "
            "it without use_ema to get its model weights"
        )
    else:
        state = checkpoint
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"{path} holds no model weights: expected a state dict of tensors, or one under "
            "'model' or 'state_dict'"
        )
    return timm.models.clean_state_dict(dict(state))  # drops DDP / torch.compile prefixes


def read_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A timm state dict from a safetensors file or a PyTorch checkpoint.

    Checkpoints are read with ``weights_only``. When a checkpoint holds both
    the trained weights and their EMA, the trained weights (``model``) are
    read unless `use_ema`; `use_ema` on a file without an EMA is an error,
    never a silent fallback.

    Raises:
        ModelError: one-line reason (missing file, not a weights file,
            unreadable, no EMA, no state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    kind = _weights_format(path)
    if kind is None:
        raise ModelError(f"{path} is not a weights file: {_NOT_WEIGHTS}")
    try:
        checkpoint = _load_checkpoint(path, kind)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"cannot read weights from {path}: it stores Python objects other than tensors, "
            "which are never loaded; save the model's state_dict() instead"
        ) from error
    except Exception as error:  # torch and safetensors raise many unrelated types
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise ModelError(f"cannot read weights from {path}: {lines[0]}") from error
    return _pick_state_dict(checkpoint, use_ema, path)


def build_model(name: str, model_kwargs: Mapping | None = None,
                initialise: bool = True) -> nn.Module:  # fmt: skip
    """Any timm model by name, not yet checked (ModelError with a one-line reason for an
    unknown name or arguments it does not take).

    With `initialise` False its parameters and persistent buffers are left uninitialised, for
    a caller that loads all of them; a model with buffers outside its state dict (which no
    load would fill) is initialised all the same.
    """
    kwargs = dict(model_kwargs or {})
    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r} (see timm.list_models('*vit*'))")
    try:
        if initialise:
            return timm.create_model(name, pretrained=False, **kwargs)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise ModelError(f"cannot create {name} with {kwargs}: {error}") from error
    loaded = set(model.state_dict())
    if any(buffer not in loaded for buffer, _ in model.named_buffers()):
        return build_model(name, kwargs)
    return model.to_empty(device="cpu")


def create_vit(
    name: str,
    weights: str | Path | None = None,
    model_kwargs: Mapping | None = None,
    server: bool = False,
    pretrained: bool = True,
    use_ema: bool = False,
) -> VisionTransformer:
    """Create a timm ViT in eval mode, with weights from a file or timm's hub.

    Args:
        name: a timm model name, e.g. ``deit_tiny_patch16_224``.
        weights: local safetensors or .pth; when None the hub is asked
            (only when `pretrained`).
        model_kwargs: overrides of the architecture (img_size, depth, ...).
        server: check what server use needs too.
        pretrained: False gives random weights (tests, training from scratch).
        use_ema: from a checkpoint holding both, load the EMA weights instead
            of the trained ones (an error when the file has no EMA).
    """
    return create_model(name, weights, model_kwargs, pretrained, use_ema,
                        check=lambda model: check_supported(model, server=server))  # fmt: skip


def create_model(
    name: str,
    weights: str | Path | None = None,
    model_kwargs: Mapping | None = None,
    pretrained: bool = True,
    use_ema: bool = False,
    check: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Any timm model in eval mode (a ViT: `create_vit`), with weights from a file, from the
    package (shipped models) or from timm's hub; `check` vets the architecture before any
    weights are read. Arguments as for `create_vit`."""
    kwargs = dict(model_kwargs or {})
    if weights is None and pretrained:
        weights = _local_pretrained_file(name)  # shipped models: no second construction
    # Weights from a file overwrite every parameter, and a model from the hub is built anew
    # once checked, so the random initialisation (most of the time it takes to build a
    # model) is only made for a model that keeps it: the others are built without storage.
    model = build_model(name, kwargs, initialise=weights is None and not pretrained)
    if check is not None:
        check(model)
    if weights is not None:
        state = read_state_dict(weights, use_ema=use_ema)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[-1].strip()
            raise ModelError(f"weights {weights} do not fit {name}: {first}") from error
        if missing or unexpected:
            raise ModelError(
                f"weights {weights} do not fit {name}: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
            )
    elif pretrained:
        if not _hub_reachable():
            raise ModelError(
                f"no weights for {name}: timm's hub is unreachable (offline?). Pass a local "
                "file with --model-weights / --server-weights (.safetensors, or .pth such as "
                "the official DeiT release) or a `collabvit train` folder as --teacher, or "
                "set HF_HUB_OFFLINE=1 to use your hub cache"
            )
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # hub errors come in many types
            raise ModelError(f"cannot fetch pretrained weights for {name}: {error}") from error
    return model.eval()


def compute_dtype(model: VisionTransformer) -> torch.dtype:
    """The dtype the model computes in: that of its parameters (float32, float16, bfloat16)."""
    return model.patch_embed.proj.weight.dtype


def _embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Token sequence entering the first block. images [B, C, H, W] normalised -> [B, T, E]."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _head(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Final norm and classifier. x [B, T, E] -> float32 logits [B, classes]."""
    return model.forward_head(model.norm(x)).float()


def _block_query_key(block: Block, x: torch.Tensor, class_row_only: bool) -> tuple:
    """Queries and keys a block's attention computes on input x [B, T, E].

    With `class_row_only` only the class token's query is projected, and
    neither queries of other tokens nor values are computed.

    Returns:
        q [B, heads, T or 1, D], k [B, heads, T, D], scale.
    """
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    width = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q_bias = bias[:width] if bias is not None else None
    k_bias = bias[width : 2 * width] if bias is not None else None
    q_in = h[:, :1] if class_row_only else h
    q = F.linear(q_in, weight[:width], q_bias)
    k = F.linear(h, weight[width : 2 * width], k_bias)
    q = q.reshape(batch, q_in.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.reshape(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    return attn.q_norm(q), attn.k_norm(k), attn.scale


def _without_autocast(x: torch.Tensor) -> torch.autocast:
    """A context in which float32 inputs compute in float32 even inside an autocast region."""
    return torch.autocast(x.device.type, enabled=False)


def forward_with_scores(
    model: VisionTransformer, images: torch.Tensor, attention_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge forward: logits and normalised patch scores from the class token's attention.

    In ``mean`` mode only the class token's row of the last block is computed
    (from q and k, no T x T map) and every block keeps fused attention. In
    ``rollout`` mode each block's full attention map is needed.

    The blocks run in the model's dtype (or an enclosing autocast's); the
    attention probabilities behind the scores, and the rollout's products, are
    computed in float32 from the blocks' q and k, because in half precision
    the small patch scores that the selection policies threshold lose most of
    their digits.

    Args:
        model: a supported ViT in eval mode, float32, float16 or bfloat16.
        images: normalised [B, C, H, W] float32 (cast to the model's dtype).
        attention_mode: ``mean`` or ``rollout``.

    Returns:
        logits [B, classes] float32, scores [B, N] float32.
    """
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(
            f"unknown attention mode {attention_mode!r}; choose one of {ATTENTION_MODES}"
        )
    prefix = model.num_prefix_tokens
    x = _embed(model, images.to(compute_dtype(model)))
    if attention_mode == "mean":
        *early, last = model.blocks
        for block in early:
            x = block(x)
        q, k, scale = _block_query_key(last, x, class_row_only=True)
        with _without_autocast(x):
            class_row = attention_probabilities(q.float(), k.float(), scale)[:, :, 0]
            scores = mean_scores(class_row, prefix)
        x = last(x)
    else:
        maps = []
        for block in model.blocks:
            q, k, scale = _block_query_key(block, x, class_row_only=False)
            with _without_autocast(x):
                maps.append(attention_probabilities(q.float(), k.float(), scale))
            x = block(x)
        with _without_autocast(x):
            scores = rollout_scores(maps, prefix)
    return _head(model, x), scores


def key_padding_bias(
    valid: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention bias that hides padded keys from every query.

    A float bias (0 or -inf added to the attention logits) means the same to
    PyTorch's fused attention and to timm's explicit softmax path, whatever
    the timm version; a boolean mask does not (older timm added it to the
    logits as 0/1 on the explicit path).

    Args:
        valid: [B, L] bool, False marks a padded patch slot.
        num_prefix_tokens: prefix tokens in front of the patches (always real).
        dtype: the activations' dtype.

    Returns:
        [B, 1, 1, prefix + L] of `dtype`: 0 for real keys, -inf for padded ones.
    """
    keys = torch.cat([valid.new_ones(valid.shape[0], num_prefix_tokens), valid], dim=1)
    bias = torch.zeros(keys.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~keys, float("-inf"))[:, None, None, :]


def forward_selected(
    model: VisionTransformer,
    patches: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Server forward on a batch of patch subsets of different sizes (padded and masked).

    Each kept patch is embedded with the model's own patch projection and gets
    the position embedding of its grid position; prefix tokens are prepended
    with theirs. Padding is excluded from attention by an additive key bias
    (see key_padding_bias) and never reaches the class-token head. With every
    patch kept this equals model(x).

    Args:
        model: a supported ViT in eval mode (class-token pooling), float32,
            float16 or bfloat16.
        patches: normalised pixels [B, L, C, P, P] float32 (cast to the model's dtype).
        positions: row-major grid index of each patch [B, L] int64 (any valid
            index where padded).
        valid: [B, L] bool, False marks padding; None means no padding.

    Returns:
        logits [B, classes] float32.
    """
    batch, length = positions.shape
    proj = model.patch_embed.proj
    tokens = F.linear(patches.flatten(2).to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)
    tokens = model.patch_embed.norm(tokens)
    num_patches = model.patch_embed.num_patches
    # _pos_embed is additive, so embedding zeros yields the position table itself:
    # prefix tokens with their embeddings (if any), then one row per grid position.
    table = model._pos_embed(tokens.new_zeros(1, num_patches, tokens.shape[-1]))
    prefix = model.num_prefix_tokens
    x = torch.cat(
        [table[:, :prefix].expand(batch, -1, -1), tokens + table[0, prefix:][positions]], dim=1
    )
    x = model.norm_pre(x)
    attn_mask = None
    if valid is not None and not bool(valid.all()):
        attn_mask = key_padding_bias(valid, prefix, x.dtype)
    for block in model.blocks:
        x = block(x, attn_mask=attn_mask)
    return _head(model, x)
