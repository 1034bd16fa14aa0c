"""What edge and server agree on, as small frozen dataclasses: the geometry, the paper's knobs
(EdgeConfig), the data sets' names and the shipped pairs.

This module imports neither torch nor timm: the light edge, the command line's flags and the
torch side all read it. Values are validated on construction (ValueError with a one-line
reason); `flag` metadata gives each field its command-line help (cli/flags.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from collabvit.lite.modes import (
    ATTENTION_MODES,
    MASKING_MODES,
    UNCERTAINTY_MODES,
    canonical_uncertainty_mode,
    validate_masking,
)

# float32 is the reference implementation's arithmetic: the exact mode; float16 is for GPUs
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
# the lower precisions `collabvit serve --precision auto` considers, in order of preference
AUTO_PRECISIONS = ("bfloat16", "float16")
DATA_SETS = ("fmnist", "fmnist-cluttered", "imagenet", "tensors")
FASHION_MNIST_SPLITS = ("test", "val", "train", "train-all")

# The shipped (edge, server) pair that runs on each data set when no model is named; other
# data sets get the Fashion-MNIST pair's names.
SHIPPED_PAIRS = {
    "fmnist": ("collabvit_fmnist_edge", "collabvit_fmnist_server"),
    "fmnist-cluttered": ("collabvit_cluttered_edge", "collabvit_cluttered_server"),
}


def shipped_pair(data_set: str) -> tuple[str, str]:
    """The names of the shipped (edge, server) pair for `data_set` (SHIPPED_PAIRS)."""
    return SHIPPED_PAIRS.get(data_set, SHIPPED_PAIRS["fmnist"])


# The paper's operating point, for models that do not ship one of their own.
PAPER_DELTA = 0.97
PAPER_ETA = 1.0


def flag(help: str, **argparse_options) -> dict:
    """Field metadata for flags.py: the help text and argparse options of one flag."""
    return {"help": help, **argparse_options}


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def finite(value) -> bool:
    """A real, finite number (bools and strings are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Geometry:
    """What edge and server must agree on, and the sizes the algorithms need (of a torch model:
    vit.geometry; of an exported edge: its card)."""

    in_chans: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_classes: int

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def describe(self) -> str:
        return (
            f"{self.in_chans}x{self.img_size[0]}x{self.img_size[1]} input, "
            f"{self.patch_size[0]}x{self.patch_size[1]} patches "
            f"({self.grid_size[0]}x{self.grid_size[1]} grid)"
        )



@dataclass(frozen=True)
class EdgeConfig:
    """The paper's knobs: patch scores, selection and the transmission gate."""

    attention_mode: str = field(default="mean", metadata=flag(
        "patch scores from the last block's class-token attention (mean) or the reference's "
        "attention rollout (default: %(default)s)", choices=ATTENTION_MODES))
    masking_mode: str = field(default="attention_sum_threshold", metadata=flag(
        "patch selection policy (default: %(default)s)", choices=MASKING_MODES))
    masking_th: float = field(default=PAPER_DELTA, metadata=flag(
        "k for random/topk, score threshold for attention_threshold, cumulative share delta in "
        "[0, 1] for attention_sum_threshold (default: the shipped pair's validation-chosen "
        "point for the shipped models, else the paper's 0.97)", type="finite", metavar="TH"))
    uncer_mode: str = field(default="min_entropy", metadata=flag(
        "uncertainty measure of the transmission gate; none sends every image "
        "(default: %(default)s)", type="uncertainty_mode",
        metavar="{" + ",".join(UNCERTAINTY_MODES) + "}"))
    uncer_th: float = field(default=PAPER_ETA, metadata=flag(
        "gate threshold eta: entropies below it / a margin above it stay at the edge (default: "
        "the shipped pair's validation-chosen point for the shipped models, else the paper's "
        "1.0)", type="finite", metavar="ETA"))

    def __post_init__(self) -> None:
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(
                f"unknown attention mode {self.attention_mode!r}; "
                f"choose one of {', '.join(ATTENTION_MODES)}"
            )
        validate_masking(self.masking_mode, self.masking_th)
        object.__setattr__(self, "uncer_mode", canonical_uncertainty_mode(self.uncer_mode))
        if not finite(self.uncer_th):
            raise ValueError(f"uncertainty threshold must be a finite number, got {self.uncer_th}")

    def moved(self, masking_th: float | None = None, uncer_th: float | None = None,
              num_patches: int | None = None) -> EdgeConfig:  # fmt: skip
        """This config at another (δ or k, η), None keeping a value; checked against
        `num_patches` (k may not exceed it)."""
        config = replace(self, masking_th=self.masking_th if masking_th is None else masking_th,
                         uncer_th=self.uncer_th if uncer_th is None else uncer_th)
        validate_masking(config.masking_mode, config.masking_th, num_patches)
        return config
