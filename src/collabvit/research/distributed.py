"""One command on several processes (torchrun): contiguous shards and exact reductions.

Under torchrun (WORLD_SIZE > 1 in the environment) each process evaluates a
contiguous span of the dataset. Spans are made of whole blocks of
`shard_block(batch_size)` images, the same blocks a single process uses to
chunk its server passes, so every forward sees exactly the images it would
see in one process: the results are the same, not merely close. Counts and
exact sums are combined as such (never averages of averages), and only rank 0
writes. A single process needs no torchrun and creates no process group.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# Images per block: shards start at block boundaries, and server passes are chunked by block.
BLOCK_IMAGES = 256


def shard_block(batch_size: int) -> int:
    """Images per block: a whole number of batches, about BLOCK_IMAGES."""
    return batch_size * max(1, round(BLOCK_IMAGES / batch_size))


def block_span(count: int, block: int, rank: int, world_size: int) -> range:
    """The dataset positions of `rank`: a contiguous run of whole blocks (the last may be
    short). Ranks in order cover 0..count-1 once; a rank may get nothing."""
    blocks = -(-count // block)
    first = blocks * rank // world_size
    last = blocks * (rank + 1) // world_size
    return range(min(first * block, count), min(last * block, count))


class Processes:
    """This process's place among the processes of a run (one, or torchrun's).

    Owns the torch.distributed process group when there is more than one process;
    use as a context manager so that it is destroyed at the end.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world_size > 1 and device.startswith("cuda") and ":" not in device:
            self.device = f"cuda:{self.local_rank}"  # each process its own GPU
        self.group_created = False
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(torch.device(self.device))
            dist.init_process_group(backend, timeout=timedelta(minutes=60))
            self.group_created = True

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.group_created and dist.is_initialized():
            if exc_type is None:
                # a rank that tears gloo down while another still talks to it can abort the
                # process ("terminate called without an active exception"): leave together
                dist.barrier()
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def span(self, count: int, block: int) -> range:
        """This process's share of `count` images (see block_span)."""
        return block_span(count, block, self.rank, self.world_size)

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """The first process's `value` (any picklable object), on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of every process's `tensor` (counts, sums), on the CPU."""
        if not self.distributed:
            return tensor
        on_device = tensor.to(self.device) if self.device.startswith("cuda") else tensor.clone()
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.cpu()

    def concat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Each process's `tensor`, concatenated along dim 0 in rank order (= dataset order)."""
        return torch.cat(self.gather(tensor.cpu()))

    def fill(self, rows: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...],
             fill_value: float) -> torch.Tensor:  # fmt: skip
        """A [shape] tensor holding each process's `values` at its `rows`, else `fill_value`.

        Every row is computed by exactly one process, so no value is summed with another.
        """
        out = torch.full(shape, fill_value, dtype=values.dtype)
        for part_rows, part_values in self.gather((rows.cpu(), values.cpu())):
            out[part_rows] = part_values
        return out
