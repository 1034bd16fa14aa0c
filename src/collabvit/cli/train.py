"""`collabvit train`: a small ViT (or its CNN teacher) on the built-in data sets, resumable,
one line per epoch."""

from __future__ import annotations

import argparse

from collabvit.cli.common import UsageError, fail
from collabvit.cli.flags import add_config_arguments, given_values
from collabvit.config import TrainConfig, TrainRun

SUMMARY = ("train a small ViT on Fashion-MNIST or its cluttered canvases (optionally with token "
           "drop and a teacher)")  # fmt: skip
DESCRIPTION = (
    "Train a timm ViT (or the CNN teacher) on Fashion-MNIST or cluttered Fashion-MNIST: "
    "AdamW, cosine schedule with warm-up, label smoothing, augmentation, the fixed "
    "validation split; resumable; deterministic given --seed.")  # fmt: skip

# --augment is on unless --no-augment is given
TRAIN_FLAGS = {"augment": "--no-augment"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser.add_argument_group("recipe"), TrainConfig, TRAIN_FLAGS)
    add_config_arguments(parser.add_argument_group("run"), TrainRun)


def run(args: argparse.Namespace) -> int:
    try:
        config = TrainConfig(**given_values(TrainConfig, args, TRAIN_FLAGS))
        train_run = TrainRun(**given_values(TrainRun, args))
        from collabvit.research.train import train

        for line in train(config, train_run):
            print(line, flush=True)
    except (UsageError, ValueError, OSError) as error:
        return fail("train", error)
    return 0
