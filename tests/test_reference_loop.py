"""benchmarks/reference_loop.py, the reference's loop structure, gives collabvit eval's figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from collabvit.algo.metrics import format_summary
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.specs import EdgeConfig
from collabvit.models.pair import load_pair
from collabvit.research.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reference_loop",
                                               REPO / "benchmarks" / "reference_loop.py")
reference_loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_loop)


@pytest.fixture(scope="module")
def pair():
    return load_pair(ModelSpec("collabvit_fmnist_edge"), ModelSpec("collabvit_fmnist_server"),
                     DataSpec(limit=96, batch_size=32))  # fmt: skip


@pytest.mark.parametrize(("attention", "policy", "threshold"), [
    ("mean", "attention_sum_threshold", 0.9),
    ("rollout", "attention_sum_threshold", 0.97),
    ("mean", "attention_threshold", 0.02),
    ("mean", "topk", 20),
    ("rollout", "random", 12),
    ("mean", "attention_sum_threshold", 0.0),  # empty selections
])  # fmt: skip
def test_the_reference_structure_gives_the_same_figures(pair, attention, policy, threshold):
    config = EdgeConfig(attention_mode=attention, masking_mode=policy, masking_th=threshold,
                        uncer_mode="min_entropy", uncer_th=0.5)  # fmt: skip
    ours = evaluate(pair.edge(config), pair.server(), pair.loader(), seed=3, progress=False)
    theirs = reference_loop.reference_evaluate(pair.edge_model, pair.server_model,
                                               pair.loader(), config, seed=3)  # fmt: skip
    lines = (config.masking_mode, config.masking_th, config.uncer_mode, config.uncer_th)
    assert format_summary(theirs, *lines) == format_summary(ours.summary, *lines)
    assert theirs.sent_images == ours.summary.sent_images > 0


def test_the_attention_switch_is_restored(pair):
    model = pair.edge_model
    before = [block.attn.fused_attn for block in model.blocks]
    with reference_loop.full_attention_maps(model) as maps:
        model(pair.loader().dataset.dataset[0][0][None].float())
        assert len(maps) == len(model.blocks) and maps[0].shape[-1] == maps[0].shape[-2] == 50
    assert [block.attn.fused_attn for block in model.blocks] == before
