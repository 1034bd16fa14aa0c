"""Tests for collabvit.lite.cluttered and the fmnist-cluttered data set."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from collabvit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    ClutteredFashionMNIST,
    DataError,
    FashionMNIST,
    build_dataset,
    item_masks,
)
from collabvit.lite.cluttered import ClutterSpec, compose, layout, random_words

needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(),
                                  reason=f"{FASHION_MNIST_ROOT} not installed")  # fmt: skip


def _items(count: int = 40, side: int = 28, seed: int = 0) -> np.ndarray:
    """Random 'items' with a blank border, as Fashion-MNIST items have."""
    rng = np.random.default_rng(seed)
    items = np.zeros((count, side, side), np.uint8)
    items[:, 4:-4, 6:-6] = rng.integers(1, 256, (count, side - 8, side - 12), dtype=np.uint8)
    return items


def test_a_canvas_depends_only_on_its_key():
    items, spec = _items(), ClutterSpec()
    everything, masks = compose(items, np.arange(40), spec, "test")
    chosen = np.array([39, 3, 17, 3])
    some, some_masks = compose(items, chosen, spec, "test")
    assert np.array_equal(some, everything[chosen]) and np.array_equal(some_masks, masks[chosen])
    again, _ = compose(items, np.arange(40), spec, "test")
    assert np.array_equal(again, everything)
    for other in ({"split": "train"}, {"draw": 1}, {"spec": ClutterSpec(seed=1)}):
        arguments = {"split": "test", "draw": 0, "spec": spec, **other}
        changed, _ = compose(items, np.arange(40), arguments["spec"], arguments["split"],
                             arguments["draw"])  # fmt: skip
        assert (changed != everything).any(axis=(1, 2)).mean() > 0.9, other


def test_random_words_are_pinned():
    """The hash is the data set's definition: these words must never change."""
    words = random_words(0, "test", np.array([0, 1, 9999]), 0, 3)
    digest = hashlib.sha256(words.tobytes()).hexdigest()
    assert words.dtype == np.uint64 and words.shape == (3, 3)
    assert digest == PINNED_WORDS


PINNED_WORDS = "f637866ac33f522df95a42e61f8541901b8664ad927facbe68955fa7551c65d0"


def test_the_layout_is_the_documented_formula():
    """design.md's definition, written out in plain Python integers, gives the same layout."""
    mask, golden = 2**64 - 1, 0x9E3779B97F4A7C15

    def m(z):
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & mask
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def u(w, n):
        return ((w >> 32) * n) >> 32

    spec, items = ClutterSpec(seed=11, fragments=3), 500
    for split, code, i, draw in (("test", 1, 0, 0), ("val", 3, 4999, 7), ("train-all", 4, 77, 31)):
        key = m(m(m(m((spec.seed + golden) & mask) ^ code) ^ draw) ^ i)
        w = [None] + [m((key + k * golden) & mask) for k in range(1, 3 + 5 * spec.fragments)]
        plan = layout(spec, split, np.array([i]), draw, items, 28)
        assert plan.item_yx[0].tolist() == [u(w[1], 56 - 28 + 1), u(w[2], 56 - 28 + 1)]
        for f in range(spec.fragments):
            assert plan.source[0, f] == u(w[3 + 5 * f], items)
            assert plan.source_yx[0, f].tolist() == [u(w[4 + 5 * f], 19), u(w[5 + 5 * f], 19)]
            assert plan.fragment_yx[0, f].tolist() == [u(w[6 + 5 * f], 47), u(w[7 + 5 * f], 47)]


def test_layout_stays_inside_canvas_and_items():
    spec = ClutterSpec()
    plan = layout(spec, "train", np.arange(5000), np.arange(5000) % 7, items=123, item_size=28)
    assert plan.item_yx.min() >= 0 and plan.item_yx.max() <= 56 - 28
    assert plan.source.min() >= 0 and plan.source.max() < 123
    assert plan.source_yx.min() >= 0 and plan.source_yx.max() <= 28 - 10
    assert plan.fragment_yx.min() >= 0 and plan.fragment_yx.max() <= 56 - 10
    # uniform positions: every corner row is used, about equally
    counts = np.bincount(plan.item_yx[:, 0], minlength=29)
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_canvas_holds_the_item_and_the_mask_marks_its_patches():
    items, spec = _items(), ClutterSpec()
    index = np.arange(40)
    canvases, masks = compose(items, index, spec, "val")
    plan = layout(spec, "val", index, 0, len(items), 28)
    assert canvases.shape == (40, 56, 56) and masks.shape == (40, 7, 7)
    for i in index:
        y, x = plan.item_yx[i]
        window = canvases[i, y : y + 28, x : x + 28]
        assert (window >= items[i]).all()  # pixel-wise maximum, the item on top
        expected = np.zeros((56, 56), bool)
        expected[y : y + 28, x : x + 28] = items[i] > 0
        patches = expected.reshape(7, 8, 7, 8).any(axis=(1, 3))
        assert np.array_equal(masks[i], patches)
    # without clutter the canvas is exactly the item on black
    bare, _ = compose(items, index[:3], ClutterSpec(fragments=0), "val")
    for i in range(3):
        y, x = layout(ClutterSpec(fragments=0), "val", index, 0, 40, 28).item_yx[i]
        assert bare[i].sum() == items[i].astype(int).sum()
        assert np.array_equal(bare[i, y : y + 28, x : x + 28], items[i])


def test_clutter_comes_from_fragments_of_the_splits_items():
    items = np.zeros((30, 28, 28), np.uint8)
    items[7] = 200  # the one item that shows clutter
    spec = ClutterSpec(fragments=6)
    canvases, _ = compose(items, np.arange(30), spec, "test")
    plan = layout(spec, "test", np.arange(30), 0, 30, 28)
    for i in range(30):
        pieces = (plan.source[i] == 7).sum()
        lit = (canvases[i] > 0).sum()
        if i == 7:
            assert lit >= 28 * 28
        elif pieces == 0:
            assert lit == 0
        else:
            assert 100 <= lit <= 100 * pieces


@pytest.mark.parametrize(("changes", "message"), [
    ({"canvas": 20}, "must hold an item"), ({"fragments": -1}, "fragments must be >= 0"),
    ({"fragment": 30}, "their side must lie in"), ({"patch": 5}, "must divide the canvas"),
    ({"seed": -2}, r"seed must lie in \[0, 2\*\*64\)"), ({"seed": 2**64}, "seed must lie in"),
    ({"canvas": 56.0}, "canvas must be an integer"), ({"fragments": 2.5}, "fragments must be an"),
    ({"patch": True}, "patch must be an integer"),
])  # fmt: skip
def test_bad_parameters_are_one_line_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        compose(_items(), np.arange(2), ClutterSpec(**changes), "test")


def test_unknown_splits_and_negative_draws_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown split 'dev'; choose one of test, train"):
        compose(_items(), np.arange(2), ClutterSpec(), "dev")
    with pytest.raises(ValueError, match="draws are numbered from 0"):
        compose(_items(), np.arange(2), ClutterSpec(), "test", draw=np.array([0, -1]))
    # numpy integers are as good as Python's
    assert compose(_items(), np.arange(2), ClutterSpec(seed=np.int64(3)), "test")[0].shape == (
        2, 56, 56)


def test_indices_outside_the_split_are_refused():
    with pytest.raises(IndexError, match=r"\[0, 40\)"):
        compose(_items(), np.array([40]), ClutterSpec(), "test")


@needs_fmnist
def test_real_cluttered_split():
    data = ClutteredFashionMNIST(FASHION_MNIST_ROOT, "test")
    items = FashionMNIST(FASHION_MNIST_ROOT, "test")
    assert len(data) == 10000 and torch.equal(data.labels, items.labels)
    image, label = data[123]
    assert image.shape == (1, 56, 56) and image.dtype == torch.uint8
    assert label == int(items.labels[123])
    assert data.masks.shape == (10000, 49) and data.masks.dtype == torch.bool
    covered = data.masks.sum(1).float()
    assert 11 <= covered.mean() <= 15  # the item covers about a quarter of the patches
    # the published test canvases, pinned: any change to the data set fails here
    assert hashlib.sha256(data.images[:500].numpy().tobytes()).hexdigest() == PINNED_TEST
    # any canvas can be made alone, equal to the one in the whole split
    alone, mask = data.canvases([9999, 5], with_masks=True)
    assert torch.equal(alone, data.images[[9999, 5]]) and torch.equal(mask, data.masks[[9999, 5]])


PINNED_TEST = "c2bd4e9d9a1fdfb63c2a62ba971d3aee876fc25a46774bdaf58226102bf43206"


@needs_fmnist
@pytest.mark.parametrize(("split", "draw", "digest"), [
    ("val", 0, "74025b7ffa2d40514d12d22f8fd2c51c08274c248438a7cdf00427c6388cd827"),
    ("train", 0, "bd30ade9b42e307249e7c051c246bdaffcc3c02dc9bca3964b97fc915eb19ddf"),
    ("train-all", 0, "d4bd26d35c594bed8b5f74139d5b753d98af6afc6fd780038db7359179d1dd74"),
    ("test", 5, "d9924456df24c869f04110093f27a2df21a51eeae7f0eeb497eedbb2ea2fe26d"),
])  # fmt: skip
def test_every_split_and_training_draws_are_pinned(split, draw, digest):
    """The first 500 canvases of each split and of a training draw: a change to the
    validation cut (torch's seeded permutation) or to the augmentation fails here."""
    canvases = ClutteredFashionMNIST(split=split).canvases(np.arange(500), draw)
    assert hashlib.sha256(canvases.numpy().tobytes()).hexdigest() == digest


@needs_fmnist
def test_torchvision_style_transforms_and_a_readable_repr():
    plain = ClutteredFashionMNIST(split="val", spec=ClutterSpec(fragments=2))
    shown = ClutteredFashionMNIST(split="val", spec=ClutterSpec(fragments=2),
                                  transform=lambda image: image.float() / 255,
                                  target_transform=FASHION_MNIST_CLASSES.__getitem__)  # fmt: skip
    image, label = shown[3]
    assert image.dtype == torch.float32 and torch.equal(image, plain[3][0].float() / 255)
    assert label == FASHION_MNIST_CLASSES[plain[3][1]]
    assert repr(plain) == (
        "ClutteredFashionMNIST(split='val', 5000 canvases of 56x56, "
        "2 fragments of 10x10, masks on 8x8 patches, seed 0, draw 0)"
    )
    items = FashionMNIST(FASHION_MNIST_ROOT, "val", transform=lambda image: image.flip(-1))
    assert repr(items) == "FashionMNIST(split='val', 5000 images)"
    assert torch.equal(items[0][0], items.images[0].flip(-1))


@needs_fmnist
def test_build_dataset_and_masks_under_a_limit():
    data = build_dataset("fmnist-cluttered", None, model=None, split="val")
    assert isinstance(data, ClutteredFashionMNIST) and len(data) == 5000
    limited = Subset(data, range(300))
    assert torch.equal(item_masks(limited), data.masks[:300])
    assert item_masks(FashionMNIST(FASHION_MNIST_ROOT, "test")) is None


@needs_fmnist
def test_item_masks_follow_the_models_patch_grid():
    """A 56 x 56 ViT of 7 x 7 patches gets masks on its 8 x 8 token grid, not the benchmark's
    7 x 7: they mark the patches its selection keeps or drops."""
    import timm

    import collabvit.models.zoo  # noqa: F401 - registers the architectures

    kwargs = {"depth": 1, "embed_dim": 24, "num_heads": 2}
    fine = timm.create_model("collabvit_cluttered_edge", patch_size=7, **kwargs)
    data = build_dataset("fmnist-cluttered", None, fine, split="test")
    _, expected = compose(data.items, np.arange(50), ClutterSpec(patch=7), "test")
    assert data.masks.shape == (10000, 64)
    assert torch.equal(data.masks[:50], torch.from_numpy(expected.reshape(50, 64)))
    # the published canvases are the same whatever the grid
    published = build_dataset("fmnist-cluttered", None, None, split="test")
    assert torch.equal(data.images[:50], published.images[:50])
    assert published.masks.shape == (10000, 49)
    # patches that do not tile the canvas leave the masks on the benchmark's grid
    coarse = timm.create_model("collabvit_cluttered_edge", patch_size=16, img_size=64, **kwargs)
    assert build_dataset("fmnist-cluttered", None, coarse, "test").masks.shape == (10000, 49)


def test_a_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        ClutteredFashionMNIST(tmp_path / "absent", "test")


@pytest.fixture(scope="module")
def cluttered_pair(tmp_path_factory):
    """Small random cluttered ViTs written as weight files: the command line's flags."""
    import timm
    from safetensors.torch import save_file

    import collabvit.models.zoo  # noqa: F401 - registers the architectures

    folder = tmp_path_factory.mktemp("pair")
    flags = []
    for role, name in (("model", "collabvit_cluttered_edge"),
                       ("server-model", "collabvit_cluttered_server")):  # fmt: skip
        torch.manual_seed(len(role))
        kwargs = {"depth": 1, "embed_dim": 24, "num_heads": 2}
        path = folder / f"{name}.safetensors"
        save_file(timm.create_model(name, **kwargs).state_dict(), str(path))
        prefix = "model" if role == "model" else "server"
        flags += [f"--{role}", name, f"--{prefix}-weights", str(path),
                  f"--{prefix}-kwargs", json.dumps(kwargs)]  # fmt: skip
    return flags


@needs_fmnist
def test_eval_sweep_and_visualize_run_on_cluttered_canvases(run_cli, cluttered_pair, tmp_path):
    data = ["--data-set", "fmnist-cluttered", "--limit", "100", "--batch-size", "50"]
    result = run_cli("eval", *cluttered_pair, *data, "--masking-th", "0.9",
                     "--results-file", str(tmp_path / "eval.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["summary"]["images"] == 100 and saved["summary"]["num_patches"] == 49
    assert saved["config"]["data"]["data_set"] == "fmnist-cluttered"
    sweep = run_cli("sweep", *cluttered_pair, *data, "--out-dir", str(tmp_path / "sweep"),
                    "--policy", "attention_sum_threshold=0.5,0.9", "--policy", "random=10,20",
                    "--num-etas", "3", "--quiet")  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert report["images"] == 100
    assert report["provenance"]["data"]["data_set"] == "fmnist-cluttered"
    assert report["points"] == 12  # 4 selections x 3 gates
    views = run_cli("visualize", *cluttered_pair, *data, "--indices", "7",
                    "--output-dir", str(tmp_path / "views"))  # fmt: skip
    assert views.returncode == 0, views.stderr
    assert (tmp_path / "views" / "00007_masked.png").stat().st_size > 1000
    assert (tmp_path / "views" / "views.png").stat().st_size > 1000


@needs_fmnist
def test_the_cluttered_data_set_runs_its_own_pair_at_its_operating_point(run_cli, tmp_path):
    from collabvit.models import zoo

    result = run_cli("eval", "--data-set", "fmnist-cluttered", "--limit", "200",
                     "--results-file", str(tmp_path / "eval.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "eval.json").read_text())["config"]
    assert config["edge_model"]["name"] == zoo.CLUTTERED_EDGE
    assert config["server_model"]["name"] == zoo.CLUTTERED_SERVER
    point = zoo.model_card(zoo.CLUTTERED_EDGE)["operating_point"]
    assert point["server"] == zoo.CLUTTERED_SERVER
    for field in ("masking_mode", "masking_th", "uncer_mode", "uncer_th"):
        assert config["edge"][field] == point[field], field


def test_a_shipped_model_without_its_weights_is_a_clear_error(monkeypatch, tmp_path):
    import timm

    from collabvit.models import vit, zoo
    from collabvit.models.vit import ModelError

    config = timm.models.get_pretrained_cfg(zoo.CLUTTERED_EDGE)
    config.file = str(tmp_path / "gone.safetensors")  # a package whose weights were lost
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name, **_: config)
    with pytest.raises(ModelError, match="collabvit_cluttered_edge are missing from the package"):
        vit.create_vit(zoo.CLUTTERED_EDGE)


@pytest.mark.parametrize(("args", "message"), [
    (["--data-set", "fmnist", "--clutter", '{"fragments": 3}'],
     "--clutter changes fmnist-cluttered canvases, not fmnist images"),
    (["--data-set", "fmnist-cluttered", "--clutter", '{"patch": 4, "fragment": 3}'],
     "--clutter: clutter parameters are canvas, fragments, fragment, seed; not patch"),
    (["--data-set", "fmnist-cluttered", "--clutter", '{"fragment": 40}'],
     r"--clutter: fragments are cut from 28-pixel items: their side must lie in \[1, 28\]"),
    (["--data-set", "fmnist-cluttered", "--clutter", '{"fragments": 2.5}'],
     "--clutter: fragments must be an integer, got 2.5"),
])  # fmt: skip
def test_bad_clutter_is_one_line_and_status_2(run_cli, args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


@needs_fmnist
def test_clutter_changes_the_canvases_of_every_reader(run_cli, cluttered_pair, tmp_path):
    """--clutter reaches the evaluated canvases (and their record), the torch-free reader
    makes the same ones, and a canvas the models cannot take is a clear error."""
    from collabvit.lite.fashion import read_split_images

    busier = {"fragments": 12, "seed": 5}
    data = build_dataset("fmnist-cluttered", None, None, "test", clutter=busier)
    expected = ClutteredFashionMNIST(split="test", spec=ClutterSpec(fragments=12, seed=5))
    first = np.arange(200)  # made alone, equal to those of the whole split (see above)
    canvases, masks = expected.canvases(first, with_masks=True)
    assert torch.equal(data.images[:200], canvases) and torch.equal(data.masks[:200], masks)
    light, labels = read_split_images("fmnist-cluttered", None, "test", 200, busier)
    assert np.array_equal(light, canvases.numpy())
    assert np.array_equal(labels, expected.labels[:200].numpy())
    # busier canvases light more pixels than the published ones
    published = ClutteredFashionMNIST(split="test").canvases(first)
    assert (canvases > 0).sum() > (published > 0).sum()

    flags = ["--data-set", "fmnist-cluttered", "--limit", "100", "--clutter", json.dumps(busier)]
    result = run_cli("eval", *cluttered_pair, *flags, "--results-file", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["config"]["data"]["clutter"] == busier
    larger = run_cli("eval", *cluttered_pair, "--data-set", "fmnist-cluttered", "--limit", "10",
                     "--clutter", '{"canvas": 64}')  # fmt: skip
    assert larger.returncode == 2
    assert "images are 1x64x64 but the edge model takes 1x56x56" in larger.stderr
    assert "Traceback" not in larger.stderr


def test_item_boxes_hold_exactly_the_items_pixels():
    """Without clutter the box is the tight box of the canvas's non-zero pixels; with it, the
    item's pixels lie inside and its masked patches are the ones the box's pixels reach."""
    from collabvit.lite.cluttered import item_boxes, item_extents

    items = _items()
    items[3] = 0  # a blank item: its whole frame
    items[5, 2, 9] = 7  # one stray pixel widens the box upwards
    extents = item_extents(items)
    assert extents[0].tolist() == [6, 4, 22, 24] and extents[3].tolist() == [0, 0, 28, 28]
    assert extents[5].tolist() == [6, 2, 22, 24]
    index = np.arange(40)
    bare_spec = ClutterSpec(fragments=0)
    bare, _ = compose(items, index, bare_spec, "val", draw=2)
    boxes = item_boxes(items, index, bare_spec, "val", draw=2)
    for i in index:
        if i == 3:
            continue
        ys, xs = np.nonzero(bare[i])
        assert boxes[i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the layout depends on the key, not on the clutter count: the same boxes with clutter
    canvases, masks = compose(items, index, ClutterSpec(), "val", draw=2)
    assert np.array_equal(item_boxes(items, index, ClutterSpec(), "val", draw=2), boxes)
    for i in index:
        x0, y0, x1, y1 = boxes[i]
        inside = np.zeros((56, 56), bool)
        inside[y0:y1, x0:x1] = True
        reached = inside.reshape(7, 8, 7, 8).any(axis=(1, 3))
        assert not (masks[i] & ~reached).any()  # every item patch is within the box
        assert masks[i].any() == (i != 3)  # the blank item has no patch


@needs_fmnist
def test_real_canvases_know_their_items_boxes():
    data = ClutteredFashionMNIST(FASHION_MNIST_ROOT, "test")
    boxes = data.boxes
    assert boxes.shape == (10000, 4) and boxes.dtype == torch.int64
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 56).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert torch.equal(data.item_boxes([9999, 5]), boxes[[9999, 5]])
    # other draws move the item: the same item, the same size, elsewhere
    moved = data.item_boxes([0, 1, 2], draw=3)
    size = lambda b: b[:, 2:] - b[:, :2]  # noqa: E731
    assert torch.equal(size(moved), size(boxes[:3])) and not torch.equal(moved, boxes[:3])
    with pytest.raises(IndexError, match=r"\[0, 10000\)"):
        data.item_boxes([10000])
