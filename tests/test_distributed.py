"""Distributed eval and sweep: shards, exact merging, and 2 processes (torchrun, gloo) = 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from collabvit.algo.metrics import RunningSummary
from collabvit.research.distributed import Processes, block_span, shard_block
from collabvit.research.passes import ServerPasses, server_logits


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 1001, 10_000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_spans_cover_every_image_once_in_whole_blocks(count, world_size):
    block = 256
    spans = [block_span(count, block, rank, world_size) for rank in range(world_size)]
    assert [i for span in spans for i in span] == list(range(count))  # in order, no repeats
    for span in spans:
        assert span.start % block == 0 or span.start == count


def test_a_block_is_whole_batches_of_about_256_images():
    assert shard_block(64) == 256 and shard_block(100) == 300 and shard_block(1000) == 1000
    assert shard_block(1) == 256


def test_a_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with Processes("cpu") as processes:
        assert not processes.distributed and processes.is_main and not processes.group_created
        assert processes.span(1001, 256) == range(1001)
        assert processes.gather("x") == ["x"]


def test_merged_summaries_equal_one_pass_over_all_images():
    generator = torch.Generator().manual_seed(0)
    n, classes = 50, 10
    args = (torch.randint(0, classes, (n,), generator=generator),
            torch.randn(n, classes, generator=generator),
            torch.randn(n, classes, generator=generator),
            torch.rand(n, generator=generator) < 0.4,
            torch.randint(0, 17, (n,), generator=generator),
            torch.rand(n, generator=generator) / 10,
            torch.rand(n, generator=generator))  # fmt: skip
    whole = RunningSummary(num_patches=16)
    whole.update(*args)
    parts = []
    for piece in (slice(0, 7), slice(7, 31), slice(31, 50)):
        part = RunningSummary(num_patches=16)
        part.update(*(a[piece] for a in args))
        parts.append(part)
    merged = RunningSummary.merged(list(reversed(parts)))  # the order does not matter
    assert merged == whole and merged.summary() == whole.summary()
    assert isinstance(merged.sum_of_min_attention, Fraction)


def test_server_passes_of_shards_equal_the_whole_pass(shipped_server):
    """Each shard classifies its blocks exactly as a single process does."""
    generator = torch.Generator().manual_seed(3)
    count = 300
    images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=generator)
    keep = torch.rand(count, 49, generator=generator) < 0.6
    rows = torch.nonzero(torch.rand(count, generator=generator) < 0.5).flatten()
    whole = server_logits(shipped_server, images, keep, block=64, rows=rows)
    for rank in range(3):
        span = block_span(count, 64, rank, 3)
        part = ServerPasses(shipped_server, images[span.start : span.stop], span, count, 64)
        out = part(keep, rows)
        local = rows[(rows >= span.start) & (rows < span.stop)]
        assert torch.equal(out[local], whole[local])  # bit for bit


def _collabvit(*args: str, processes: int = 1, cwd=None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={processes}", "-m", "collabvit"] if processes > 1
                else [sys.executable, "-m", "collabvit"])  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, as stated
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=cwd,
                            env=environment, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # two torchrun launches: about a minute; CI runs it (make test-all)
def test_two_processes_give_exactly_the_one_process_eval_and_sweep(tmp_path):
    """torchrun with 2 CPU processes (gloo) over 1,001 test images (not a multiple of 2 or of
    the batch size): the same summary, per-image rows, points and picks as one process."""
    for processes in (1, 2):
        out = tmp_path / str(processes)
        printed = _collabvit("eval", "--limit", "1001", "--quiet",
                             "--results-file", str(out / "eval.json"),
                             "--per-image", str(out / "eval.csv"),
                             processes=processes).stdout  # fmt: skip
        (out / "eval.txt").write_text(printed)
        printed = _collabvit("sweep", "--limit", "1001", "--quiet",
                             "--out-dir", str(out / "sweep"),
                             "--policy", "attention_sum_threshold=0.9,0.99",
                             "--policy", "random=20", "--uncer-modes", "min_entropy", "margin",
                             "--num-etas", "4", "--budget", "0.2", "--temperature-scaling",
                             processes=processes).stdout  # fmt: skip
        (out / "sweep.txt").write_text(printed.replace(str(out), "OUT"))
    one, two = tmp_path / "1", tmp_path / "2"
    assert (one / "eval.txt").read_text() == (two / "eval.txt").read_text()
    assert (one / "eval.csv").read_bytes() == (two / "eval.csv").read_bytes()
    eval_one, eval_two = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert eval_one["summary"] == eval_two["summary"] and eval_one["summary"]["images"] == 1001
    assert (eval_one["config"]["processes"], eval_two["config"]["processes"]) == (1, 2)
    assert (one / "sweep.txt").read_text() == (two / "sweep.txt").read_text()
    for name in ("points.csv", "points.jsonl"):
        assert (one / "sweep" / name).read_bytes() == (two / "sweep" / name).read_bytes()
    sweep_one, sweep_two = (json.loads((d / "sweep" / "sweep.json").read_text())
                            for d in (one, two))  # fmt: skip
    for key in ("images", "edge_acc", "server_acc", "points", "comparison", "temperature",
                "pick"):
        assert sweep_one[key] == sweep_two[key], key
