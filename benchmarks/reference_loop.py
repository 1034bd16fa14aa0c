"""The structure of the paper's reference evaluation loop, re-created for benchmarking.

What makes it the reference's, and what it costs:

- the edge runs timm's unfused attention and keeps every block's full attention
  map [B, H, T, T] (captured after the softmax), then scores patches from them;
- the server embeds the whole image and then gathers the kept tokens, instead of
  embedding only the kept patches;
- under the threshold policies, whose selections differ in size from image to
  image, the server is called one image at a time; under `topk` and `random`
  (one size for all) it takes the batch's sent images at once.

The arithmetic (scores, gate, selection, figures) is collabvit's own, so the
figures must equal `collabvit eval`'s; only the structure, and so the time and
memory, differ. The attention switch is flipped per module and restored after,
never timm's global one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from timm.models.vision_transformer import VisionTransformer

from collabvit.algo.metrics import RunningSummary, Summary
from collabvit.algo.scoring import mean_scores, rollout_scores
from collabvit.algo.selection import selection_statistics
from collabvit.lite.modes import COUNT_MODES
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit
from collabvit.models.edge import gate, select


@contextmanager
def full_attention_maps(model: VisionTransformer) -> Iterator[list[torch.Tensor]]:
    """Run `model` with unfused attention and collect each block's map [B, H, T, T]."""
    maps: list[torch.Tensor] = []
    handles, fused = [], []
    for block in model.blocks:
        fused.append(block.attn.fused_attn)
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(
            lambda module, inputs, output: maps.append(output)))  # fmt: skip
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for block, was_fused in zip(model.blocks, fused, strict=True):
            block.attn.fused_attn = was_fused


@torch.inference_mode()
def reference_edge(model: VisionTransformer, images: torch.Tensor,
                   mode: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Edge logits [B, classes] and patch scores [B, N] from every block's full map.

    images: normalised [B, C, H, W].
    """
    prefix = model.num_prefix_tokens
    with full_attention_maps(model) as maps:
        logits = model(images.to(vit.compute_dtype(model))).float()
    maps = [m.float() for m in maps]
    scores = mean_scores(maps[-1][:, :, 0], prefix) if mode == "mean" \
        else rollout_scores(maps, prefix)  # fmt: skip
    return logits, scores


@torch.inference_mode()
def reference_server(model: VisionTransformer, images: torch.Tensor,
                     keep: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Server logits [B, classes]: embed the whole images, then gather the kept tokens.

    images: normalised [B, C, H, W]; keep [B, N] bool with the same count in every row.
    """
    prefix = model.num_prefix_tokens
    tokens = vit._embed(model, images.to(vit.compute_dtype(model)))  # [B, prefix + N, E]
    count = int(keep[0].sum()) if len(keep) else 0
    index = torch.nonzero(keep)[:, 1].reshape(keep.shape[0], count) + prefix
    kept = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    x = model.blocks(torch.cat([tokens[:, :prefix], kept], dim=1))
    return vit._head(model, x)


def reference_evaluate(
    edge_model: VisionTransformer,
    server_model: VisionTransformer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    config: EdgeConfig,
    seed: int = 0,
    normalization: vit.Normalization | None = None,
) -> Summary:
    """The collaborative figures the reference's loop structure computes.

    batches: (unnormalised images [B, C, H, W], targets [B], dataset indices [B]), moved to
        the edge model's device.
    normalization: for both models (default: each model's own).
    """
    device = next(edge_model.parameters()).device
    edge_norm = normalization or vit.Normalization.of_model(edge_model)
    server_norm = normalization or vit.Normalization.of_model(server_model)
    running = RunningSummary(num_patches=vit.geometry(edge_model).num_patches)
    one_size = config.masking_mode in COUNT_MODES
    for images, targets, indices in batches:
        images, targets = images.to(device), targets.to(device)
        logits, scores = reference_edge(edge_model, edge_norm(images), config.attention_mode)
        confident = gate(logits, config)
        keep = select(scores, config, indices, seed)
        final = logits.clone()
        sent = torch.nonzero(~confident).flatten()
        server_images = server_norm(images)
        if one_size and len(sent):
            final[sent] = reference_server(server_model, server_images[sent], keep[sent])
        else:
            for row in sent.tolist():  # one image at a time
                final[row] = reference_server(server_model, server_images[row : row + 1],
                                              keep[row : row + 1])[0]  # fmt: skip
        running.update(targets, logits, final, confident, *selection_statistics(scores, keep))
    return running.summary()
