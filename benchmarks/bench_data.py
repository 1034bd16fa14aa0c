"""Cluttered canvases: is making them ever the bottleneck?

    python -m benchmarks.bench_data [--batches 20] [--repeats 5]

Times, interleaved: composing one training batch of cluttered canvases (new draws and
flips, as `collabvit train --data-set fmnist-cluttered` makes them every step), one
training step of the cluttered server and edge on such a batch, and making a whole split
(the 10,000 test canvases with their item masks, as `--data-set fmnist-cluttered` does once
per run). Reports the time per batch and the share of a training step it costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.harness import add_suite_arguments, apply_quick, load_average, publish, section
from collabvit.config.train import TrainConfig
from collabvit.data import ClutteredFashionMNIST
from collabvit.research.train import Trainer

STEP_MODELS = (
    ("collabvit_cluttered_server", {"token_drop": 0.5, "bf16": True}),
    ("collabvit_cluttered_edge", {}),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), batches=2, repeats=1, batch_size=16)
    began, load_at_start = time.perf_counter(), load_average()
    trainers = {name: Trainer(TrainConfig(model=name, data_set="fmnist-cluttered",
                                          batch_size=args.batch_size, **extra),
                              "/nonexistent", progress=False)
                for name, extra in STEP_MODELS}  # fmt: skip
    data = next(iter(trainers.values())).data
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, len(data.labels), (args.batch_size,), generator=generator),
                data.draw(args.batch_size, generator)) for _ in range(args.batches)]  # fmt: skip

    def compose_batches() -> None:
        for index, augmentations in batches:
            data.batch(index, augmentations)

    def train_steps(trainer: Trainer):
        def run() -> None:
            trainer.model.train()
            for index, augmentations in batches:
                loss, _ = trainer._loss(data.batch(index, augmentations),
                                        trainer.train_labels[index], generator)  # fmt: skip
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()

        return run

    def whole_split() -> None:
        split = ClutteredFashionMNIST(split="test")
        split.canvases(np.arange(len(split.labels)), with_masks=True)

    variants = {"compose": compose_batches, "whole test split": whole_split,
                **{name: train_steps(trainer) for name, trainer in trainers.items()}}  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:  # warm-up
        variants[name]()
    for repeat in range(args.repeats):
        order = list(variants)[repeat % len(variants):] + list(variants)[: repeat % len(variants)]
        for name in order:
            started = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - started)
    per_batch = {name: 1000 * statistics.median(values) / args.batches
                 for name, values in seconds.items() if name != "whole test split"}  # fmt: skip
    split_seconds = statistics.median(seconds["whole test split"])
    rows = [f"| composing a batch of {args.batch_size} canvases | {per_batch['compose']:.1f} | |"]
    shares = {}
    for name, _ in STEP_MODELS:
        shares[name] = per_batch["compose"] / per_batch[name]
        rows.append(f"| a `{name}` training step (batch included) | {per_batch[name]:.0f} | "
                    f"**{100 * shares[name]:.1f} %** |")  # fmt: skip
    body = f"""Composing cluttered canvases against training on them: batches of {args.batch_size}
random training canvases (new draws, flips), median of {args.repeats} interleaved repetitions of
{args.batches} batches after warm-up. The last column is the composing's share of a step.
Making the whole test split (10,000 canvases and their item masks) takes
**{split_seconds:.2f} s** ({10000 / split_seconds:,.0f} canvases/s).

| work | ms per batch | composing's share |
|---|---:|---:|
{chr(10).join(rows)}"""
    text = section("bench_data", "Cluttered canvases: composing against training",
                   body.splitlines(), load_at_start, time.perf_counter() - began)
    publish(args, "bench_data", text, {"compose_ms": per_batch["compose"],
                                       "split_seconds": split_seconds, "shares": shares})


if __name__ == "__main__":
    main()
