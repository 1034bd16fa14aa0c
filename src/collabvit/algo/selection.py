"""Patch selection policies (DESIGN.md section 1, "Patch selection").

Pure tensor functions. A selection is a boolean keep mask [B, N] over the N
patches of each image; an all-False row (empty selection) is legal.
"""

from __future__ import annotations

import numpy as np
import torch

from collabvit.lite.modes import MASKING_MODES, validate_masking  # noqa: F401 - re-exported


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each patch's place in its image's stable descending order of scores.

    Rank 0 is the largest score; ties keep patch order (the lower index ranks first), and NaN
    ranks as the largest, as torch's stable sort orders them. In eager mode the ranks come
    from that sort. While the edge is exported to ONNX, which has no stable sort, they are
    counted by pairwise comparison instead (O(N^2) per image, exact on every runtime); the
    tests check both give the same ranks.

    Args:
        scores: [B, N].

    Returns:
        ranks [B, N] int64, a permutation of 0..N-1 in each row.
    """
    if not torch.compiler.is_exporting():
        order = scores.argsort(dim=1, descending=True, stable=True)
        places = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
        return torch.empty_like(order).scatter_(1, order, places)
    return pairwise_descending_ranks(scores)


def pairwise_descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """descending_ranks by counting, for each patch, the patches that come before it (a
    larger score, or an equal one at a lower index). scores [B, N] -> ranks [B, N] int64."""
    nan = scores.isnan()
    value = torch.where(nan, 0.0, scores)
    other, this = value[:, None, :], value[:, :, None]  # [b, i, j]: patch j against patch i
    both_nan, no_nan = nan[:, None, :] & nan[:, :, None], ~nan[:, None, :] & ~nan[:, :, None]
    above = (nan[:, None, :] & ~nan[:, :, None]) | (no_nan & (other > this))  # NaN is largest
    equal = both_nan | (no_nan & (other == this))
    index = torch.arange(scores.shape[1], device=scores.device)
    return (above | (equal & (index[None, :] < index[:, None]))).sum(dim=2)


def select_topk(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """The k patches with the largest score (ties: the lower patch index first).

    scores [B, N], k an int or a 0-d tensor -> keep [B, N].
    """
    return descending_ranks(scores) < k


def _check_image_ids(image_ids: torch.Tensor, batch: int) -> None:
    """Raise ValueError/TypeError unless image_ids is [B] of non-negative integers."""
    if not isinstance(image_ids, torch.Tensor):
        raise TypeError(
            f"image_ids must be a [B] integer tensor of dataset indices, got {type(image_ids)}"
        )
    if image_ids.dtype.is_floating_point or image_ids.dtype.is_complex:
        raise TypeError(f"image_ids must hold integers, got {image_ids.dtype}")
    if tuple(image_ids.shape) != (batch,):
        raise ValueError(
            f"image_ids must have shape [{batch}] (one per image), got {tuple(image_ids.shape)}"
        )
    if batch and int(image_ids.min()) < 0:
        raise ValueError("image_ids must be non-negative dataset indices")


def select_random(scores: torch.Tensor, k: int, image_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """k distinct patches uniformly at random, drawn per image from (seed, image id).

    Each image gets its own ``numpy.random.default_rng([seed, image_id])``
    (numpy's SeedSequence mixes the pair into the PCG64 state, so nearby ids
    and seeds give unrelated streams) and keeps the first k entries of one
    permutation of its N patches. An image's selection therefore depends only
    on (seed, id, N, k): not on the batch size, the other images in the batch,
    its position in the batch or the device; and for one image the selection
    at k is contained in the selection at every larger k.

    Args:
        scores: [B, N]; only its shape and device are used.
        k: patches to keep per image, 0 <= k <= N.
        image_ids: [B] non-negative integer dataset indices, one per image.
        seed: non-negative run seed.

    Returns:
        keep [B, N] bool on the device of `scores`.
    """
    batch, num_patches = scores.shape
    _check_image_ids(image_ids, batch)
    if seed < 0:
        raise ValueError(f"the random selection seed must be >= 0, got {seed}")
    keep = np.zeros((batch, num_patches), dtype=bool)
    for row, image_id in enumerate(image_ids.tolist()):
        chosen = np.random.default_rng([int(seed), image_id]).permutation(num_patches)[:k]
        keep[row, chosen] = True
    return torch.from_numpy(keep).to(scores.device)


def select_attention_threshold(scores: torch.Tensor,
                               threshold: float | torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Every patch with score >= threshold (a float or 0-d tensor). scores [B, N] -> keep [B, N]."""
    return scores >= threshold


def select_attention_sum_threshold(scores: torch.Tensor,
                                   threshold: float | torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Most attended patches whose cumulative score stays <= threshold.

    Patches are ranked by score, descending (stable: ties keep patch order),
    and kept while the float32 running sum of their scores is <= threshold;
    the patch whose running sum crosses the threshold is not kept, so the
    selection can be empty.

    A threshold >= 1 keeps every patch. This departs on purpose from the
    reference, whose rule applied literally at δ = 1 drops a tail whenever the
    float32 running sum of a normalised row rounds above 1.0 (common for
    softmax rows of 49 or 196 patches), although δ = 1 means "all of the
    attention".

    Args:
        scores: normalised patch scores [B, N].
        threshold: δ, the share of attention to keep (a float or a 0-d tensor).

    Returns:
        keep [B, N] bool.
    """
    ranks = descending_ranks(scores)
    patches = torch.arange(scores.shape[1], device=scores.device).expand_as(ranks)
    order = torch.zeros_like(ranks).scatter(1, ranks, patches)  # order[r]: the patch ranked r
    running = scores.gather(1, order).cumsum(dim=1)
    # one expression for a float and a 0-d tensor δ, so the exported graph runs this very rule
    keep_ranked = (running <= threshold) | (threshold >= 1.0)
    return keep_ranked.gather(1, ranks)


def select_patches(
    scores: torch.Tensor,
    mode: str,
    threshold: float,
    image_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Apply a masking mode. scores [B, N] -> keep [B, N] bool.

    Args:
        scores: normalised patch scores [B, N].
        mode: one of MASKING_MODES.
        threshold: k (count modes, int(threshold)) or score threshold.
        image_ids: [B] dataset indices that key the ``random`` draw; None
            means 0..B-1 (the draw then depends on each image's batch position).
        seed: run seed of the ``random`` draw.
    """
    validate_masking(mode, threshold, scores.shape[1])
    if mode == "topk":
        return select_topk(scores, int(threshold))
    if mode == "random":
        if image_ids is None:
            image_ids = torch.arange(scores.shape[0])
        return select_random(scores, int(threshold), image_ids, seed)
    if mode == "attention_threshold":
        return select_attention_threshold(scores, threshold)
    return select_attention_sum_threshold(scores, threshold)


def selection_statistics(
    scores: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size, minimum and sum of the kept scores per image.

    Args:
        scores: [B, N].
        keep: [B, N] bool.

    Returns:
        counts [B] int64, minimum [B] (+inf for an empty selection), sum [B].
    """
    counts = keep.sum(dim=1)
    minimum = torch.where(keep, scores, torch.inf).amin(dim=1)
    total = torch.where(keep, scores, 0.0).sum(dim=1)
    return counts, minimum, total


def object_recall(keep: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of each image's object patches that the selection keeps.

    keep [B, N] bool, target [B, N] bool (the object's patches) -> [B] float32; an image
    without object patches counts as fully recalled (there was nothing to miss).
    """
    found = (keep & target).sum(dim=1).float()
    wanted = target.sum(dim=1).float()
    return torch.where(wanted > 0, found / wanted.clamp(min=1), torch.ones_like(found))


def selection_composition(keep: torch.Tensor, target: torch.Tensor,
                          occupied: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """What the kept patches of a batch are, as shares of all kept patches.

    keep, target, occupied [B, N] bool: the selection, the object's patches, and the
    patches holding any non-zero pixel. Returns {"object", "clutter", "blank"} summing to 1
    (all 0 when nothing is kept): object patches, other non-blank patches, blank ones.
    """
    kept = keep.sum()
    if kept == 0:
        return {"object": 0.0, "clutter": 0.0, "blank": 0.0}
    shares = {
        "object": (keep & target).sum(),
        "clutter": (keep & ~target & occupied).sum(),
        "blank": (keep & ~target & ~occupied).sum(),
    }
    return {name: float(count) / float(kept) for name, count in shares.items()}
