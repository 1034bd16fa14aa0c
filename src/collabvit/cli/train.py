"""`collabvit train`: a ViT (or a CNN teacher) on the built-in data sets or an image folder,
from scratch or fine-tuned, resumable, in one process or under torchrun, one line per
epoch."""

from __future__ import annotations

import argparse

from collabvit.cli.common import UsageError, fail
from collabvit.cli.flags import add_config_arguments, given_values
from collabvit.config.train import TrainConfig, TrainRun

SUMMARY = ("train or fine-tune a ViT on Fashion-MNIST, its cluttered canvases or an image "
           "folder (optionally with token drop and a teacher; torchrun for several processes)")
DESCRIPTION = (
    "Train a timm ViT (or a CNN teacher) on Fashion-MNIST, cluttered Fashion-MNIST or an "
    "ImageNet-style image folder, from scratch or from pretrained weights (--init-weights): "
    "AdamW, cosine schedule with warm-up, label smoothing, augmentation, a fixed validation "
    "split; resumable; deterministic given --seed. Under torchrun every process trains on "
    "its share of each --batch-size images and the gradients are averaged: the same steps "
    "as one process.")  # fmt: skip

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
