"""Half precision and bfloat16 models: float32 in, float32 scores and logits out."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_vit

from collabvit.lite.protocol import patchify
from collabvit.lite.specs import PRECISIONS
from collabvit.models import vit
from collabvit.models.edge import EdgeConfig, EdgeDevice
from collabvit.models.server import Server

# loose: float16 keeps ~3 significant digits, bfloat16 ~2
LOGIT_ATOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def model():
    return tiny_vit(reg_tokens=2)


def images(batch=4, seed=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def uint8_images(batch, seed=0):
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", ["mean", "rollout"])
def test_edge_forward_of_a_low_precision_model(model, dtype, mode):
    low = copy.deepcopy(model).to(dtype)
    x = images()
    with torch.inference_mode():
        logits, scores = vit.forward_with_scores(low, x, mode)
        want_logits, want_scores = vit.forward_with_scores(model, x, mode)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=LOGIT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-2, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "rollout"])
def test_edge_scores_stay_float32_under_autocast(model, mode):
    x = images()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, scores = vit.forward_with_scores(model, x, mode)
    with torch.inference_mode():
        want_logits, want_scores = vit.forward_with_scores(model, x, mode)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=LOGIT_ATOL[torch.bfloat16], rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_server_forward_on_all_patches_equals_the_model_in_its_dtype(model, dtype):
    low = copy.deepcopy(model).to(dtype)
    x = images()
    with torch.inference_mode():
        subset = vit.forward_selected(low, patchify(x, (8, 8)), torch.arange(16).expand(4, -1))
        plain = low(x.to(dtype))
    assert subset.dtype == torch.float32
    torch.testing.assert_close(subset, plain.float(), atol=LOGIT_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fused", [False, True])
def test_low_precision_ragged_batch_equals_each_image_alone(model, dtype, fused):
    low = copy.deepcopy(model).to(dtype)
    for block in low.blocks:
        block.attn.fused_attn = fused
    every = patchify(images(batch=3), (8, 8))
    sizes = [16, 5, 2]
    positions = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))
                             for i in range(3)])  # fmt: skip
    patches = every[torch.arange(3)[:, None], positions]
    valid = torch.arange(16)[None, :] < torch.tensor(sizes)[:, None]
    with torch.inference_mode():
        batched = vit.forward_selected(low, patches, positions, valid)
        alone = torch.cat([
            vit.forward_selected(low, patches[i : i + 1, :n], positions[i : i + 1, :n])
            for i, n in enumerate(sizes)
        ])  # fmt: skip
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=LOGIT_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_edge_device_and_server_run_low_precision_models(model, dtype):
    config = EdgeConfig(masking_mode="topk", masking_th=6, uncer_mode="none")
    pixels = uint8_images(5)
    reference = EdgeDevice(model, config).process(pixels)
    low_edge = EdgeDevice(copy.deepcopy(model).to(dtype), config).process(pixels)
    assert low_edge.logits.dtype == torch.float32 and low_edge.scores.dtype == torch.float32
    torch.testing.assert_close(low_edge.logits, reference.logits, atol=LOGIT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(low_edge.scores.sum(dim=1), torch.ones(5), atol=1e-6, rtol=0)
    assert len(low_edge.payloads) == 5  # no gate: every image is sent
    # the same payloads through a float32 and a low precision server
    server_model = tiny_vit(name="deit_tiny_distilled_patch16_224")
    want = Server(server_model).classify(reference.payloads)
    got = Server(copy.deepcopy(server_model).to(dtype)).classify(reference.payloads)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL[dtype], rtol=0)


# ------------------------------------------------------------------ the precision option


@pytest.mark.parametrize("data_set", ["fmnist", "fmnist-cluttered"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "int8"])
def test_each_precision_runs_eval_end_to_end_on_both_shipped_pairs(run_cli, tmp_path, data_set,
                                                                   precision):  # fmt: skip
    """`collabvit eval --precision P` on each shipped pair: its figures lie near float32's
    (the gate and the answers move a little, not the run), and the results file says which
    precision made them."""
    runs = {}
    for chosen in ("float32", precision):
        out = tmp_path / f"{chosen}.json"
        result = run_cli("eval", "--data-set", data_set, "--limit", "120", "--quiet",
                         "--precision", chosen, "--results-file", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[chosen] = json.loads(out.read_text())
    exact, low = runs["float32"]["summary"], runs[precision]["summary"]
    assert runs[precision]["config"]["run"]["precision"] == precision
    assert runs["float32"]["config"]["run"]["precision"] == "float32"
    assert abs(low["collab_acc"] - exact["collab_acc"]) <= 5.0  # 6 of 120 images at most
    assert abs(low["comm_cost"] - exact["comm_cost"]) <= 0.05
    assert low["images"] == exact["images"] == 120


def test_with_precision_converts_a_copy_and_names_what_it_made(model):
    from collabvit.models.precision import precision_of, with_precision

    cpu = torch.device("cpu")
    assert with_precision(model, "float32", cpu) is model
    for precision in ("bfloat16", "float16", "int8"):
        converted = with_precision(model, precision, cpu)
        assert converted is not model and precision_of(converted) == precision
    assert precision_of(model) == "float32"  # the caller's model is left as it was
    int8 = with_precision(model, "int8", cpu)
    kinds = {name: type(m).__name__ for name, m in int8.named_modules()}
    assert kinds["blocks.0.attn.qkv"] == "Linear" and "Linear" in kinds["blocks.0.mlp.fc1"]
    assert type(int8.blocks[0].mlp.fc1).__module__.startswith("torch.ao.nn.quantized")


def test_a_precision_a_device_cannot_run_is_one_line(run_cli):
    from collabvit.models.precision import check_precision

    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        check_precision("int8", torch.device("cuda"))
    result = run_cli("eval", "--precision", "float8")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run_cli("serve", "--bf16", "--precision", "int8")
    assert result.returncode == 2 and "--bf16 is --precision bfloat16" in result.stderr


def natively(*precisions):
    """A stand-in for runs_natively: these half precisions run natively, others do not."""
    return lambda precision, device: precision in ("float32", "int8", *precisions)


def test_serving_auto_takes_a_half_precision_only_where_native_and_measured(monkeypatch):
    from collabvit.config import ModelSpec
    from collabvit.models import zoo
    from collabvit.serve import model as served

    cpu, shipped = torch.device("cpu"), ModelSpec("collabvit_fmnist_server")
    monkeypatch.setattr(served, "runs_natively", natively("bfloat16", "float16"))
    monkeypatch.setattr(zoo, "precision_change", lambda name, precision: 0.05)
    assert served.served_precision("auto", shipped, cpu) == "bfloat16"
    assert served.served_precision("int8", shipped, cpu) == "int8"  # asked for: taken
    assert served.served_precision("auto", ModelSpec("x", weights="w.pth"), cpu) == "float32"
    monkeypatch.setattr(zoo, "precision_change", lambda name, precision: 0.3)
    assert served.served_precision("auto", shipped, cpu) == "float32"  # measured too far
    monkeypatch.setattr(zoo, "precision_change", lambda name, precision: None)
    assert served.served_precision("auto", shipped, cpu) == "float32"  # never measured
    monkeypatch.setattr(zoo, "precision_change", lambda name, precision: 0.05)
    monkeypatch.setattr(served, "runs_natively", natively())
    assert served.served_precision("auto", shipped, cpu) == "float32"  # emulated: slower
    # a GPU without bfloat16 (float16 only): float16, where the card holds it within bounds
    monkeypatch.setattr(served, "runs_natively", natively("float16"))
    assert served.served_precision("auto", shipped, cpu) == "float16"
    monkeypatch.setattr(zoo, "precision_change",
                        lambda name, precision: 0.05 if precision == "bfloat16" else 0.2)
    assert served.served_precision("auto", shipped, cpu) == "float32"


def test_the_shipped_cards_measure_every_precision_auto_may_choose():
    from collabvit.lite.specs import AUTO_PRECISIONS, SHIPPED_PAIRS
    from collabvit.models import zoo

    for _, server_name in SHIPPED_PAIRS.values():
        for precision in AUTO_PRECISIONS:
            assert zoo.precision_change(server_name, precision) is not None, (server_name,
                                                                               precision)


def test_native_precisions_follow_the_device_and_the_cpu_features(monkeypatch):
    from collabvit.models import precision as p

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(p, "cpu_model", lambda: "Some CPU (avx2, avx512f, avx512_bf16)")
    assert [x for x in PRECISIONS if p.runs_natively(x, cpu)] == ["float32", "bfloat16", "int8"]
    assert p.emulation_warning("bfloat16", cpu) is None
    warning = p.emulation_warning("float16", cpu)
    assert warning.startswith("float16 on a CPU without AVX512-FP16") and "\n" not in warning
    monkeypatch.setattr(p, "cpu_model", lambda: "Old CPU (avx2)")
    assert p.runs_natively("bfloat16", cpu) is False and p.emulation_warning("bfloat16", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert p.runs_natively("float16", gpu) and not p.runs_natively("bfloat16", gpu)
    assert not p.runs_natively("int8", gpu) and p.emulation_warning("float16", gpu) is None


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_half_precision_asked_for_on_a_cpu_that_emulates_it_is_served_with_a_warning(
        monkeypatch, precision):  # fmt: skip
    from collabvit.config import ModelSpec
    from collabvit.models import precision as p
    from collabvit.serve import model as served

    monkeypatch.setattr(p, "cpu_model", lambda: "Old CPU (avx2)")
    heard: list[str] = []
    load, chosen = served.load_served_model(ModelSpec("collabvit_fmnist_server"), "cpu", None,
                                            precision, 8, heard.append)  # fmt: skip
    assert chosen == precision and len(heard) == 1 and "emulated" in heard[0]
    assert load().model.patch_embed.proj.weight.dtype == getattr(torch, precision)


def test_compare_runs_counts_where_two_runs_part(run_cli):
    """Synthetic decisions: one image changes its gate, one sent image its kept patches, one
    its answer; the shares count them, each over the images it concerns."""
    from collabvit.lite.summary import Summary
    from collabvit.research.precision import DecidedRun, compare_runs

    def summary(collab_acc: float) -> Summary:
        return Summary(images=4, num_patches=3, confident_images=1, sent_images=3,
                       sent_tokens=2.0, avg_min_attention=0.1, avg_sum_attention=0.9,
                       comm_cost=0.5, client_acc=50.0, client_acc5=100.0,
                       collab_acc=collab_acc, collab_acc5=100.0)  # fmt: skip

    keep = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], bool)
    exact = DecidedRun(summary(75.0), np.arange(4), np.array([True, False, False, False]), keep,
                       np.array([0, 1, 2, 3]))  # fmt: skip
    other_keep = keep.copy()
    other_keep[1] = [1, 1, 0]  # a sent image keeps another set
    other = DecidedRun(summary(50.0), np.arange(4), np.array([True, False, False, True]),
                       other_keep, np.array([0, 1, 2, 9]))  # fmt: skip
    compared = compare_runs(exact, other)
    assert compared["gate_changed_pct"] == 25.0  # image 3: sent, then confident
    assert compared["kept_set_changed_pct"] == 50.0  # image 1 of the 2 that both runs send
    assert compared["kept_size_change_mean"] == 0.5
    assert compared["answer_agreement_pct"] == 75.0
    assert compared["figures"]["collab_acc"]["change"] == -25.0
    assert compared["largest_change_pt"] == 25.0
    with pytest.raises(ValueError, match="different images"):
        compare_runs(exact, DecidedRun(other.summary, np.arange(1, 5), other.confident,
                                       other.keep, other.answers))


def test_a_run_at_another_precision_is_not_resumed_from_a_float32_one():
    """The resume identities of the edge's records and of reproduce's state name the
    precision, except float32's (so that the records and states of float32 runs stay
    resumable)."""
    from collabvit.config import DataSpec, ModelSpec
    from collabvit.lite.client import run_identity
    from collabvit.research import reproduce

    parts = ({"name": "e"}, "s", {"data_set": "fmnist"}, {"masking_th": 0.9}, "raw", 0, 0.0, {})
    assert run_identity(*parts) == run_identity(*parts, "float32")
    assert run_identity(*parts, "bfloat16") != run_identity(*parts)
    specs = (ModelSpec("e"), ModelSpec("s"), DataSpec(), EdgeConfig(), 0)
    assert "precision" not in reproduce.run_identity(*specs)
    assert reproduce.run_identity(*specs, "int8")["precision"] == "int8"
