"""Cluttered, translated Fashion-MNIST canvases: the benchmark where *which* patches matter.

One Fashion-MNIST item is pasted at a uniformly random position of a blank canvas, together
with clutter: fragments cut at random from random items of the same split, each pasted at a
random position; pixels combine by their maximum. The label is the item's. This is the
cluttered-MNIST construction of the visual-attention literature (Mnih et al. 2014; the
spatial transformer paper) on Fashion-MNIST: the object covers about a quarter of the
canvas and clutter competes for the model's attention.

Every canvas is a pure function of (seed, split, index, draw): its random numbers come
from a counter-based hash (splitmix64) of those four integers, not from a random stream, so
any canvas can be made without making the others, and the same on every machine and with
any version of numpy. `draw` 0 is the published data set; training draws other canvases of
the same items (a new position and new clutter), which is its augmentation.

numpy only: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

# Codes of the splits in the hash: a canvas of one split never repeats another split's.
SPLIT_CODES = {"test": 1, "train": 2, "val": 3, "train-all": 4}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class ClutterSpec:
    """The parameters of the cluttered canvases; the defaults are the published benchmark's.

    canvas: side of the square canvas in pixels; fragments: clutter pieces per canvas;
    fragment: side of a piece in pixels; patch: side of the patches the item mask is given
    on (the shipped cluttered models' 8); seed: the data set's seed.
    """

    canvas: int = 56
    fragments: int = 6
    fragment: int = 10
    patch: int = 8
    seed: int = 0

    def check(self, item_size: int) -> None:
        """ValueError with a one-line reason unless canvases of `item_size` items can be made."""
        for name in ("canvas", "fragments", "fragment", "patch", "seed"):
            value = getattr(self, name)
            # numpy's integers are welcome, bools and floats would fail deep inside numpy
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        problems = [
            (self.canvas >= item_size, f"the canvas ({self.canvas}) must hold an item "
             f"({item_size} pixels)"),
            (self.fragments >= 0, f"fragments must be >= 0, got {self.fragments}"),
            (1 <= self.fragment <= item_size, f"fragments are cut from {item_size}-pixel items: "
             f"their side must lie in [1, {item_size}], got {self.fragment}"),
            (self.patch >= 1 and self.canvas % self.patch == 0, f"the patch side "
             f"({self.patch}) must divide the canvas ({self.canvas})"),
            (0 <= self.seed < 2**64, f"the seed must lie in [0, 2**64), got {self.seed}"),
        ]  # fmt: skip
        for holds, reason in problems:
            if not holds:
                raise ValueError(reason)


# What `--clutter` may change; the masks' patch side follows the model instead.
CHANGEABLE = ("canvas", "fragments", "fragment", "seed")
ITEM_SIDE = 28  # Fashion-MNIST's


def mask_patch_side(canvas: int, model_patch: int | None = None) -> int:
    """The side of the patches the item masks are given on: the model's, so that they line
    up with its tokens, where they tile the canvas; else the benchmark's 8, or failing that
    one patch (a model that cannot take the canvas is then refused by the image-size check)."""
    candidates = ([model_patch] if model_patch else []) + [ClutterSpec.patch, canvas]
    return next(side for side in candidates if canvas % side == 0)


def spec_with(changes: Mapping[str, int] | None, model_patch: int | None = None) -> ClutterSpec:
    """The published ClutterSpec with `changes` ({name: value} of CHANGEABLE), its masks on
    `mask_patch_side`; ValueError with a one-line reason for an unknown name or a bad value."""
    changes = dict(changes or {})
    unknown = sorted(set(changes) - set(CHANGEABLE))
    if unknown:
        raise ValueError(f"clutter parameters are {', '.join(CHANGEABLE)}; "
                         f"not {', '.join(unknown)}")  # fmt: skip
    spec = replace(ClutterSpec(), patch=1, **changes)
    spec.check(ITEM_SIDE)  # every value but the patch side, which is derived next
    return replace(spec, patch=mask_patch_side(spec.canvas, model_patch))


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic), elementwise."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def random_words(seed: int, split: str, index: np.ndarray, draw: np.ndarray | int,
                 count: int) -> np.ndarray:  # fmt: skip
    """`count` pseudo-random uint64 words per canvas, from (seed, split, index, draw) alone.

    index [B] int, draw [B] int or one int -> [B, count] uint64.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_CODES)}")
    if np.any(np.asarray(draw) < 0):
        raise ValueError("draws are numbered from 0 (the published canvases) up")
    index = np.asarray(index, dtype=np.uint64)
    draw = np.broadcast_to(np.asarray(draw, dtype=np.uint64), index.shape)
    with np.errstate(over="ignore"):
        key = _mix(np.full(index.shape, seed, dtype=np.uint64) + _GOLDEN)
        key = _mix(key ^ np.uint64(SPLIT_CODES[split]))
        key = _mix(key ^ draw)
        key = _mix(key ^ index)
        counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        return _mix(key[:, None] + counters[None, :])


def below(words: np.ndarray, bound: int | np.ndarray) -> np.ndarray:
    """Map uint64 words onto integers in [0, bound) (the top 32 bits, scaled): int64."""
    high = words >> np.uint64(32)
    return ((high * np.asarray(bound, dtype=np.uint64)) >> np.uint64(32)).astype(np.int64)


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a batch of B canvases (see `layout`).

    item_yx [B, 2]: the item's top-left corner; source [B, F]: the item index (into the
    split) each fragment is cut from; source_yx [B, F, 2]: the fragment's top-left corner
    inside its source item; fragment_yx [B, F, 2]: its top-left corner on the canvas.
    """

    item_yx: np.ndarray
    source: np.ndarray
    source_yx: np.ndarray
    fragment_yx: np.ndarray


def layout(spec: ClutterSpec, split: str, index: np.ndarray, draw: np.ndarray | int,
           items: int, item_size: int) -> Layout:  # fmt: skip
    """The random choices of canvases `index` [B] of `split` (draw 0: the published ones),
    for a split of `items` items of side `item_size`."""
    fragments = spec.fragments
    words = random_words(spec.seed, split, index, draw, 2 + 5 * fragments)
    item_yx = below(words[:, :2], spec.canvas - item_size + 1)
    per_fragment = words[:, 2:].reshape(len(words), fragments, 5)
    source = below(per_fragment[..., 0], items)
    source_yx = below(per_fragment[..., 1:3], item_size - spec.fragment + 1)
    fragment_yx = below(per_fragment[..., 3:5], spec.canvas - spec.fragment + 1)
    return Layout(item_yx, source, source_yx, fragment_yx)


def item_extents(items: np.ndarray) -> np.ndarray:
    """The tight box of each item's non-zero pixels inside its own frame: items [n, S, S]
    -> int64 [n, 4] (x0, y0, x1, y1), ends exclusive; a blank item gets its whole frame."""
    filled = items > 0
    x0, x1 = _filled_span(filled.any(axis=1))  # columns holding a pixel
    y0, y1 = _filled_span(filled.any(axis=2))  # rows holding one
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def _filled_span(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lines [n, S] bool -> the first True [n] and one past the last [n]; (0, S) if none."""
    side = lines.shape[1]
    blank = ~lines.any(axis=1)
    first = np.where(blank, 0, lines.argmax(axis=1))
    past_last = np.where(blank, side, side - lines[:, ::-1].argmax(axis=1))
    return first, past_last


def _check_indices(index: np.ndarray, count: int) -> None:
    """IndexError unless every canvas index lies in the split's [0, count)."""
    if index.size and (index.min() < 0 or index.max() >= count):
        raise IndexError(f"canvas indices must lie in [0, {count}) for this split")


def item_boxes(items: np.ndarray, index: np.ndarray, spec: ClutterSpec, split: str,
               draw: np.ndarray | int = 0) -> np.ndarray:  # fmt: skip
    """The item's box on canvases `index` [B] of `split` (as `compose` places it): int64
    [B, 4] (x0, y0, x1, y1) in canvas pixels, ends exclusive, the tight box of the item's
    non-zero pixels; clutter inside the box is not the item's."""
    index = np.asarray(index, dtype=np.int64)
    _check_indices(index, len(items))
    plan = layout(spec, split, index, draw, len(items), items.shape[-1])
    y, x = plan.item_yx[:, 0], plan.item_yx[:, 1]
    return item_extents(items[index]) + np.stack([x, y, x, y], axis=1)


def _paste_max(canvases: np.ndarray, pieces: np.ndarray, corners: np.ndarray) -> None:
    """In place: canvases[b, y:y+h, x:x+w] = max(that, pieces[b]) with (y, x) = corners[b].

    canvases [B, S, S], pieces [B, h, w], corners [B, 2] int.
    """
    batch, height, width = pieces.shape
    rows = corners[:, 0, None, None] + np.arange(height)[None, :, None]
    cols = corners[:, 1, None, None] + np.arange(width)[None, None, :]
    where = (np.arange(batch)[:, None, None], rows, cols)
    canvases[where] = np.maximum(canvases[where], pieces)


def compose(items: np.ndarray, index: np.ndarray, spec: ClutterSpec, split: str,
            draw: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Canvases `index` [B] of `split`, made from that split's `items` [n, S_i, S_i] uint8.

    Canvas i shows item i (its label is item i's) at a random position and
    spec.fragments fragments of random items of the split. Returns
    (canvases [B, canvas, canvas] uint8, item masks [B, G, G] bool with G = canvas /
    spec.patch: the patches holding at least one non-zero pixel of the item).
    """
    index = np.asarray(index, dtype=np.int64)
    count, item_size = len(items), items.shape[-1]
    spec.check(item_size)
    _check_indices(index, count)
    plan = layout(spec, split, index, draw, count, item_size)
    batch, side = len(index), spec.canvas
    canvases = np.zeros((batch, side, side), dtype=np.uint8)
    span = np.arange(spec.fragment)
    for piece in range(spec.fragments):
        top, left = plan.source_yx[:, piece, 0], plan.source_yx[:, piece, 1]
        cut = items[plan.source[:, piece, None, None], top[:, None, None] + span[None, :, None],
                    left[:, None, None] + span[None, None, :]]  # fmt: skip
        _paste_max(canvases, cut, plan.fragment_yx[:, piece])
    pasted = items[index]
    _paste_max(canvases, pasted, plan.item_yx)
    footprint = np.zeros((batch, side, side), dtype=np.uint8)
    _paste_max(footprint, (pasted > 0).astype(np.uint8), plan.item_yx)
    grid = side // spec.patch
    masks = footprint.reshape(batch, grid, spec.patch, grid, spec.patch).any(axis=(2, 4))
    return canvases, masks
