"""Does bfloat16 autocast speed up training here? An A/B of training steps in one process.

For each model (the CNN teacher, the edge ViT, the server ViT with token drop), the
same `Trainer` step (augment, forward, loss, backward, AdamW) on the same batches is
timed with and without `--bf16` autocast, the two variants interleaved repetition by
repetition after warm-up. Whether bf16 helps depends on the CPU (AVX512-BF16 / AMX);
`collabvit train --bf16` is used for a recipe only where this shows a gain.

Usage:
    python -m benchmarks.bench_train [--steps 10] [--repeats 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import add_suite_arguments, apply_quick, load_average, publish, section
from collabvit.config.train import TrainConfig
from collabvit.research.train import Trainer
from collabvit.research.train_data import augment

MODELS = (
    ("collabvit_fmnist_cnn", {}),
    ("collabvit_fmnist_edge", {}),
    ("collabvit_fmnist_server", {"token_drop": 0.5}),
)


def time_steps(trainer: Trainer, steps: int, batch_size: int) -> float:
    """Seconds for `steps` training steps on fixed batches (same data every call)."""
    generator = torch.Generator().manual_seed(0)
    trainer.model.train()
    started = time.perf_counter()
    for step in range(steps):
        images = trainer.data.images[step * batch_size : (step + 1) * batch_size]
        labels = trainer.train_labels[step * batch_size : (step + 1) * batch_size]
        loss, _ = trainer._loss(augment(images, generator), labels, generator)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    add_suite_arguments(parser)
    args = apply_quick(parser.parse_args(argv), steps=2, repeats=1, batch_size=16)
    began, load_at_start = time.perf_counter(), load_average()
    limit = args.steps * args.batch_size
    rows = []
    for name, extra in MODELS:
        trainers = {
            bf16: Trainer(TrainConfig(model=name, batch_size=args.batch_size, train_limit=limit,
                                      bf16=bf16, **extra), "/nonexistent", progress=False)
            for bf16 in (False, True)
        }  # fmt: skip
        for trainer in trainers.values():
            time_steps(trainer, 2, args.batch_size)  # warm-up
        times = {False: [], True: []}
        for repeat in range(args.repeats):
            for bf16 in ((False, True) if repeat % 2 == 0 else (True, False)):
                times[bf16].append(time_steps(trainers[bf16], args.steps, args.batch_size))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        per_step = 1000 / args.steps
        rows.append(f"| {name}{' (token drop 0.5)' if extra else ''} | {fp32 * per_step:.0f} | "
                    f"{bf16 * per_step:.0f} | **{bf16 / fp32:.2f}** |")  # fmt: skip
        print(rows[-1], flush=True)
    body = f"""One `collabvit train` step (shift/flip augmentation, forward, loss, backward,
AdamW) at batch {args.batch_size}, with and without `--bf16` (bfloat16 autocast), the same batches,
interleaved, median of {args.repeats} repetitions of {args.steps} steps after warm-up. A
ratio below 1 means bf16 is faster.

| model | float32 ms/step | bfloat16 ms/step | bf16 / fp32 |
|---|---:|---:|---:|
{chr(10).join(rows)}"""
    text = section("bench_train", "Training: bfloat16 autocast against float32",
                   body.splitlines(), load_at_start, time.perf_counter() - began)
    publish(args, "bench_train", text)


if __name__ == "__main__":
    main()
