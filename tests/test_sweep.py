"""sweep.py: cached edge pass + per-selection server pass == `collabvit eval` figures."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from collabvit import vit
from collabvit.edge import EdgeConfig, EdgeDevice
from collabvit.evaluate import evaluate
from collabvit.server import Server
from collabvit.sweep import run_edge, select, server_logits, summarize


@pytest.mark.parametrize("attention", ["mean", "rollout"])
def test_every_eta_from_one_pass_matches_full_evaluations(golden, attention):
    identity = vit.Normalization.identity()
    edge_model, server = golden.edge_model(), Server(golden.server_model(), normalization=identity)
    loader = DataLoader(TensorDataset(golden.images, golden.targets), batch_size=8)
    base = EdgeConfig(attention, "attention_sum_threshold", 0.9, "min_entropy", 2.2)
    cached = run_edge(EdgeDevice(edge_model, base, normalization=identity), loader, progress=False)
    keep = select(cached, "attention_sum_threshold", 0.9)
    server_out = server_logits(server, cached.images, keep, batch_size=5)
    for measure, eta in [
        ("min_entropy", 2.2),
        ("min_entropy", 2.0),
        ("margin", 0.04),
        ("none", 0.0),
    ]:
        config = EdgeConfig(attention, "attention_sum_threshold", 0.9, measure, eta)
        edge = EdgeDevice(edge_model, config, normalization=identity)
        expected = evaluate(edge, server, loader, progress=False).summary
        assert summarize(cached, keep, server_out, measure, eta) == pytest.approx(
            expected, abs=1e-9
        )


def test_server_logits_cover_every_image_in_order(golden):
    identity = vit.Normalization.identity()
    server = Server(golden.server_model(), normalization=identity)
    keep = torch.ones(16, 16, dtype=torch.bool)
    out = server_logits(server, golden.images, keep, batch_size=6)
    expected = torch.tensor(golden.expected["server_full_logits"])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
