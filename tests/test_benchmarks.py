"""The benchmark suite's harness: FLOP counting, results sections, and a --quick run of all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.__main__ import SECTION_END, SECTION_START, SUITE, fixed_share, write_at_top
from benchmarks.bench_compute import vit_flops
from benchmarks.harness import write_section

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "collabvit_fmnist_server"])
def test_flops_from_shapes_match_torch_flop_counter_on_the_linear_layers(name):
    model = timm.create_model(name, pretrained=False).eval()
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size))
    # torch counts convolutions and matrix products but not the fused attention kernel
    attention = 2 * 2 * tokens * tokens * model.embed_dim * len(model.blocks)
    assert vit_flops(model, tokens) - attention == counter.get_total_flops()


def test_a_section_is_replaced_in_place_and_the_targets_go_first(tmp_path):
    results = tmp_path / "RESULTS.md"
    write_section(results, "<!-- a:start -->\nA1\n<!-- a:end -->\n", "<!-- a:start -->",
                  "<!-- a:end -->")  # fmt: skip
    write_section(results, "<!-- b:start -->\nBBB\n<!-- b:end -->\n", "<!-- b:start -->",
                  "<!-- b:end -->")  # fmt: skip
    write_section(results, "<!-- a:start -->\nA2\n<!-- a:end -->\n", "<!-- a:start -->",
                  "<!-- a:end -->")  # fmt: skip
    write_at_top(results, f"{SECTION_START}\nT1\n{SECTION_END}\n")
    write_at_top(results, f"{SECTION_START}\nT2\n{SECTION_END}\n")
    text = results.read_text()
    assert "A1" not in text and "T1" not in text
    assert text.index("T2") < text.index("A2") < text.index("BBB")
    assert text.count("<!-- a:start -->") == text.count(SECTION_START) == 1


@pytest.mark.slow
def test_the_quick_suite_runs_every_benchmark_and_writes_every_section(tmp_path):
    output = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "benchmarks", "--quick", "--output", str(output)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = output.read_text()
    for name in SUITE:
        assert f"<!-- {name}:start" in text and f"<!-- {name}:end -->" in text, name
    targets = text[text.index("## Targets"):text.index("<!-- targets:end -->")]
    for measured in ("eval throughput / reference loop, deit", "batch-1 latency",
                     "server forward GFLOP/s", "served / in-process",
                     "composing cluttered canvases", "batch-1 latency / the torch edge's",
                     "hostile 16 MiB body refused", "idle sockets held",
                     "during three 16 MiB JSON bodies", "stalled 16 MiB uploads"):
        assert measured in targets


def test_the_fixed_share_of_server_time_is_the_intercept_over_the_token_share():
    rows = [{"bound_fraction": x, "batched_ratio": 0.1 + 0.9 * x} for x in (0.26, 0.5, 0.76, 1)]
    assert fixed_share(rows, "batched") == pytest.approx(0.1)
