"""Golden parity: reproduce every entry of tests/golden/expected.json (floats within 1e-4)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from collabvit.algo.selection import select_patches
from collabvit.algo.uncertainty import is_confident, uncertainty
from collabvit.cli import main
from collabvit.lite.protocol import PatchPayload, patchify
from collabvit.models import vit
from collabvit.models.edge import EdgeConfig, EdgeDevice
from collabvit.models.server import Server
from collabvit.research.evaluate import evaluate

ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(golden):
    return golden.edge_model(), golden.server_model()


def parse_key(key: str) -> tuple[str, str, float]:
    """'mean/topk@5' -> ('mean', 'topk', 5.0)."""
    attention, rest = key.split("/")
    policy, threshold = rest.split("@")
    return attention, policy, float(threshold)


@pytest.mark.parametrize("mode", ["mean", "rollout"])
def test_edge_logits_and_scores(golden, pair, mode):
    edge, _ = pair
    with torch.inference_mode():
        logits, scores = vit.forward_with_scores(edge, golden.images, mode)
    torch.testing.assert_close(
        logits, torch.tensor(golden.expected["edge_logits"]), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        scores, torch.tensor(golden.expected["scores"][mode]), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("measure", ["shannon_entropy", "min_entropy", "margin"])
def test_uncertainty(golden, measure):
    logits = torch.tensor(golden.expected["edge_logits"])
    expected = torch.tensor(golden.expected["uncertainty"][measure])
    torch.testing.assert_close(uncertainty(logits, measure), expected, atol=ATOL, rtol=0)


def test_confidence_gates(golden):
    logits = torch.tensor(golden.expected["edge_logits"])
    assert golden.expected["confident"], "golden file lists no gates"
    for key, expected in golden.expected["confident"].items():
        measure, eta = key.split("@")
        assert is_confident(logits, measure, float(eta)).tolist() == expected, key


def test_server_full_logits(golden, pair):
    _, server_model = pair
    server = Server(server_model, normalization=vit.Normalization.identity())
    everything = torch.arange(16)
    payloads = [PatchPayload(everything, p) for p in patchify(golden.images, (8, 8))]
    expected = torch.tensor(golden.expected["server_full_logits"])
    torch.testing.assert_close(server.classify(payloads), expected, atol=ATOL, rtol=0)


def test_selections_and_server_logits(golden, pair):
    edge_model, server_model = pair
    server = Server(
        server_model,
        normalization=vit.Normalization.identity(),
        max_batch=5,
        max_padding=float("inf"),
    )
    patches = patchify(golden.images, (8, 8))
    assert len(golden.expected["selections"]) == 12
    for key, expected in golden.expected["selections"].items():
        attention, policy, threshold = parse_key(key)
        with torch.inference_mode():
            _, scores = vit.forward_with_scores(edge_model, golden.images, attention)
        keep = select_patches(scores, policy, threshold)
        kept = [torch.nonzero(row).flatten() for row in keep]
        assert [set(k.tolist()) for k in kept] == [set(k) for k in expected["keep"]], key
        payloads = [PatchPayload(k, patches[i, k]) for i, k in enumerate(kept)]
        want = torch.tensor(expected["server_logits"])
        # ragged batches (max_batch=5 mixes sizes) and one image at a time
        torch.testing.assert_close(server.classify(payloads), want, atol=ATOL, rtol=0, msg=key)
        alone = torch.cat([server.classify([p]) for p in payloads])
        torch.testing.assert_close(alone, want, atol=ATOL, rtol=0, msg=key)


def test_summaries_through_evaluate(golden, pair):
    """Every summary through EdgeDevice/Server/evaluate, the path `collabvit eval` runs."""
    edge_model, server_model = pair
    identity = vit.Normalization.identity()
    server = Server(server_model, normalization=identity)
    ids = torch.arange(len(golden.targets))
    loader = DataLoader(TensorDataset(golden.images, golden.targets, ids), batch_size=8)
    assert len(golden.expected["summaries"]) == 24
    for key, expected in golden.expected["summaries"].items():
        attention, policy, threshold = parse_key(key.rsplit("/", 1)[0])
        measure, eta = key.rsplit("/", 1)[1].split("@")
        config = EdgeConfig(attention, policy, threshold, measure, float(eta))
        edge = EdgeDevice(edge_model, config, normalization=identity)
        summary = evaluate(edge, server, loader, progress=False).summary
        for name, value in expected.items():
            assert getattr(summary, name) == pytest.approx(value, abs=ATOL), f"{key}: {name}"


def test_summary_through_the_cli(golden, capsys, tmp_path):
    """One summary end to end through `collabvit eval`, reference flag spellings included."""
    key = "rollout/attention_threshold@0.07/margin@0.04"
    expected = golden.expected["summaries"][key]
    status = main(["eval", *golden.cli_model_args(), "--attention_mode", "rollout",
                   "--masking_mode", "attention_threshold", "--masking_th", "0.07",
                   "--uncer_mode", "margin", "--uncer_th", "0.04", "--quiet",
                   "--results-file", str(tmp_path / "r.json")])  # fmt: skip
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0]
        == "* Masking mode:: attention_threshold, 0.07 / Confidence criterion:: margin, 0.04"
    )
    assert lines[2] == f"* Total confident image:: {int(expected['confident_images'])}"
    assert float(lines[3].split("::")[1]) == pytest.approx(expected["comm_cost"], abs=ATOL)
    assert lines[4] == f"Client only accuracy: {round(expected['client_acc'], 4)} %"
    assert lines[5] == f"Collaborative accuracy: {round(expected['collab_acc'], 4)} %"
