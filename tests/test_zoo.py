"""The shipped pairs: registered with timm, load offline, match their cards."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import SHIPPED_IMAGES

import collabvit.models.zoo  # noqa: F401 - registers the shipped models
from collabvit.algo.metrics import Summary, format_summary
from collabvit.models import vit, zoo

pytestmark = pytest.mark.skipif(
    not (zoo.is_shipped(zoo.EDGE) and zoo.is_shipped(zoo.SERVER)),
    reason="the Fashion-MNIST pair is not in src/collabvit/weights yet (scripts/ship_model.py)",
)


SHIPPED = [name for name in zoo.ARCHITECTURES if zoo.is_shipped(name)]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_by_name_offline(name, monkeypatch):
    monkeypatch.setattr(vit, "_hub_reachable", lambda: False)  # must not need the hub
    model = timm.create_model(name, pretrained=True)
    card = zoo.model_card(name)
    assert card["name"] == name and card["storage"] in ("float16", "float32")
    assert card["recipe"].startswith("collabvit train") and "seed" in card["run_card"]["training"]
    assert vit.geometry(model).num_patches == 49
    same = vit.create_vit(name)  # the CLI's path
    x = torch.rand(2, 1, *vit.geometry(model).img_size)
    with torch.inference_mode():
        torch.testing.assert_close(same(x), model.eval()(x), atol=0, rtol=0)


def test_shipped_sizes_and_files():
    assert {zoo.EDGE, zoo.SERVER} <= set(SHIPPED)
    params = {
        n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in (zoo.EDGE, zoo.SERVER)
    }
    assert 0.4e6 <= params[zoo.EDGE] <= 0.6e6
    assert 2.5e6 <= params[zoo.SERVER] <= 3.0e6
    total = sum(zoo.weights_file(n).stat().st_size for n in SHIPPED)
    assert total <= 24 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(zoo.ARCHITECTURES))
def test_every_registered_vit_is_a_49_patch_model_of_its_data_set(name):
    model = timm.create_model(name)  # the architecture, to train
    family = zoo.FAMILIES[name]
    geometry = vit.geometry(model)
    assert geometry.num_patches == 49 and geometry.in_chans == 1
    assert geometry.img_size == (family.input["img_size"],) * 2
    assert model.pretrained_cfg["mean"] == family.mean
    assert name in zoo.SHIPPED_PAIRS[family.data_set]


def test_cluttered_teacher_takes_canvases_at_the_cost_of_the_fashion_mnist_one():
    canvases = torch.rand(2, 1, 56, 56)
    teacher = timm.create_model(zoo.CLUTTERED_TEACHER)
    assert teacher.eval()(canvases).shape == (2, 10)
    small = timm.create_model(zoo.TEACHER)
    # the stride-2 stem: the same feature maps (28, 14, 7) from twice the side
    assert teacher.features(canvases).shape == small.features(torch.rand(2, 1, 28, 28)).shape


def test_eval_without_arguments_runs_the_shipped_pair_on_fashion_mnist(shipped_eval):
    """`collabvit eval` alone: the shipped Fashion-MNIST pair at its card's operating point,
    eight lines that are its results file's figures (tests/test_shipped_slices.py compares
    those figures with the stored ones)."""
    lines, summary = shipped_eval
    point = zoo.model_card(zoo.EDGE)["operating_point"]
    assert lines == format_summary(Summary(**summary), "attention_sum_threshold",
                                   point["masking_th"], "min_entropy",
                                   point["uncer_th"]).splitlines()  # fmt: skip
    assert summary["images"] == SHIPPED_IMAGES and summary["num_patches"] == 49
