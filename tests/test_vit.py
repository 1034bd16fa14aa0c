"""vit.py: the timm seams, edge scores, server subsets, loading and support checks."""

from __future__ import annotations

import argparse
import copy
import datetime
import zipfile

import pytest
import timm
import torch
from conftest import tiny_vit
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from collabvit.algo.scoring import normalize_scores
from collabvit.models import vit

ARCHITECTURES = {
    "vit": dict(),
    "distilled_deit": dict(name="deit_tiny_distilled_patch16_224"),
    "deit3_no_embed_class": dict(name="deit3_small_patch16_224", embed_dim=48, num_heads=3,
                                 init_values=1e-1),
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "registers_embed_class": dict(reg_tokens=2),
}  # fmt: skip


@pytest.fixture(params=list(ARCHITECTURES), scope="module")
def model(request):
    return tiny_vit(**ARCHITECTURES[request.param])


def images(batch=3, size=32, channels=3, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def explicit_attention_maps(model):
    """Every block's softmax attention via timm's own non-fused path, on a copy.

    Returns (copy, maps) where maps fills with [B, H, T, T] per block on forward.
    """
    twin = copy.deepcopy(model)
    maps = []
    for block in twin.blocks:
        block.attn.fused_attn = False  # this instance only; timm's global switch is untouched
        block.attn.attn_drop.register_forward_hook(lambda m, inputs, out: maps.append(inputs[0]))
    return twin, maps


def test_prefix_tokens_are_counted(model):
    g = vit.geometry(model)
    expected = 1 + (model.reg_token.shape[1] if model.reg_token is not None else 0)
    expected += 1 if isinstance(model, timm.models.deit.VisionTransformerDistilled) else 0
    assert g.num_prefix_tokens == expected
    assert g.num_patches == 16


@pytest.mark.parametrize("mode", ["mean", "rollout"])
def test_edge_logits_equal_plain_model(model, mode):
    x = images()
    with torch.inference_mode():
        logits, scores = vit.forward_with_scores(model, x, mode)
        plain = model(x)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert scores.shape == (3, 16)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(3))


def test_mean_mode_equals_the_explicit_class_token_row(model):
    """Mean mode computes only row 0 from q and k; it must equal timm's explicit attention row."""
    x = images()
    twin, maps = explicit_attention_maps(model)
    with torch.inference_mode():
        twin(x)
        _, scores = vit.forward_with_scores(model, x, "mean")
    prefix = model.num_prefix_tokens
    explicit = normalize_scores(maps[-1][:, :, 0, prefix:].mean(dim=1))
    torch.testing.assert_close(scores, explicit, atol=1e-6, rtol=0)
    # fused attention stays on: neither the model's blocks nor timm's global switch changed
    assert all(block.attn.fused_attn for block in model.blocks)
    assert timm.layers.use_fused_attn()


def test_rollout_equals_the_reference_definition(model):
    x = images()
    twin, maps = explicit_attention_maps(model)
    with torch.inference_mode():
        twin(x)
        _, scores = vit.forward_with_scores(model, x, "rollout")
    eye = torch.eye(maps[0].shape[-1])
    rollout = eye
    for attention in maps:  # R = (A_L + I) ... (A_1 + I), later block on the left, per head
        rollout = (attention + eye) @ rollout
    prefix = model.num_prefix_tokens
    expected = normalize_scores(rollout[:, :, 0, prefix:].mean(dim=1))
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


def test_server_forward_on_all_patches_equals_plain_model(model):
    from collabvit.lite.protocol import patchify

    x = images()
    with torch.inference_mode():
        subset = vit.forward_selected(model, patchify(x, (8, 8)), torch.arange(16).expand(3, -1))
        plain = model(x)
    torch.testing.assert_close(subset, plain, atol=1e-5, rtol=0)


def test_server_forward_ignores_patch_order(model):
    from collabvit.lite.protocol import patchify

    x = images(batch=1)
    patches = patchify(x, (8, 8))
    keep = torch.tensor([[3, 7, 0, 12, 9]])
    shuffled = keep[:, [4, 2, 0, 3, 1]]
    with torch.inference_mode():
        a = vit.forward_selected(model, patches[:, keep[0]], keep)
        b = vit.forward_selected(model, patches[:, shuffled[0]], shuffled)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def ragged_batch(x, sizes, seed=0):
    """Padded subsets of x's patches: (patches [B, L, C, 8, 8], positions [B, L], valid [B, L])."""
    from collabvit.lite.protocol import patchify

    generator = torch.Generator().manual_seed(seed)
    every = patchify(x, (8, 8))
    length = max(sizes)
    patches = torch.zeros(len(sizes), length, *every.shape[2:])
    positions = torch.zeros(len(sizes), length, dtype=torch.int64)
    valid = torch.zeros(len(sizes), length, dtype=torch.bool)
    for row, size in enumerate(sizes):
        chosen = torch.randperm(16, generator=generator)[:size]
        patches[row, :size], positions[row, :size] = every[row, chosen], chosen
        valid[row, :size] = True
    return patches, positions, valid


@pytest.mark.parametrize("fused", [False, True])
def test_server_ragged_batch_equals_each_image_alone(model, fused):
    """Padded keys must be invisible on timm's explicit softmax path and on the fused one."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.attn.fused_attn = fused  # this instance only; timm's global switch is untouched
    sizes = [16, 3, 0, 9, 1]
    patches, positions, valid = ragged_batch(images(batch=5, seed=4), sizes)
    with torch.inference_mode():
        batched = vit.forward_selected(twin, patches, positions, valid)
        alone = torch.cat([
            vit.forward_selected(twin, patches[i : i + 1, :n], positions[i : i + 1, :n])
            for i, n in enumerate(sizes)
        ])  # fmt: skip
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_key_padding_bias_is_additive_in_the_activation_dtype():
    valid = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    bias = vit.key_padding_bias(valid, 1, torch.float16)
    assert bias.dtype == torch.float16 and bias.shape == (3, 1, 1, 4)
    inf = float("inf")
    expected = [[0, 0, 0, -inf], [0, 0, -inf, -inf], [0, -inf, -inf, -inf]]
    assert bias[:, 0, 0].tolist() == expected


def test_server_forward_hands_every_block_a_float_key_bias(model):
    seen = []
    hooks = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attn_mask"]), with_kwargs=True
        )
        for block in model.blocks
    ]
    patches, positions, valid = ragged_batch(images(batch=2), [4, 2])
    try:
        with torch.inference_mode():
            vit.forward_selected(model, patches, positions, valid)
    finally:
        for hook in hooks:
            hook.remove()
    prefix = model.num_prefix_tokens
    assert len(seen) == len(model.blocks)
    for mask in seen:
        assert mask.dtype == torch.float32 and mask.shape == (2, 1, 1, prefix + 4)
        assert mask[0].eq(0).all()
        assert mask[1, 0, 0].tolist() == [0.0] * (prefix + 2) + [float("-inf")] * 2


def test_unknown_attention_mode_is_rejected():
    with pytest.raises(ValueError, match="attention mode"):
        vit.forward_with_scores(tiny_vit(), images(), "max")


@pytest.mark.parametrize(
    "name, kwargs, reason",
    [
        ("convnext_atto", {}, "not supported"),
        ("swin_tiny_patch4_window7_224",
         dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), "not supported"),
        ("vit_tiny_patch16_224", dict(img_size=32, dynamic_img_size=True), "dynamic_img_size"),
        ("vit_tiny_patch16_224", dict(img_size=32, class_token=False, global_pool="avg"),
         "class token"),
    ],
)  # fmt: skip
def test_unsupported_architectures_fail_clearly(name, kwargs, reason):
    with pytest.raises(vit.ModelError, match=reason) as info:
        vit.create_vit(name, model_kwargs=kwargs, pretrained=False)
    assert "collabvit supports" in str(info.value)


def test_avg_pooling_is_fine_at_the_edge_but_not_on_the_server():
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, global_pool="avg")
    vit.create_vit("vit_tiny_patch16_224", model_kwargs=kwargs, pretrained=False)
    with pytest.raises(vit.ModelError, match="class-token pooling"):
        vit.create_vit("vit_tiny_patch16_224", model_kwargs=kwargs, pretrained=False, server=True)


def test_weights_from_safetensors_and_nested_pth(tmp_path):
    source = tiny_vit(num_classes=5)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(
        {"model": source.state_dict(), "epoch": 3}, tmp_path / "w.pth"
    )  # DeiT release layout
    x = images()
    with torch.inference_mode():
        want = source(x)
        for file in ("w.safetensors", "w.pth"):
            loaded = vit.create_vit("vit_tiny_patch16_224", tmp_path / file, kwargs)
            torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(vit.ModelError, match="unknown timm model"):
        vit.create_vit("deit_enormous", tmp_path / "x.safetensors")
    with pytest.raises(vit.ModelError, match="not found"):
        vit.create_vit("vit_tiny_patch16_224", tmp_path / "missing.safetensors", kwargs)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(vit.ModelError, match="not a weights file"):
        vit.create_vit("vit_tiny_patch16_224", tmp_path / "junk.pth", kwargs)
    save_file(tiny_vit(embed_dim=96).state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(vit.ModelError, match="do not fit"):
        vit.create_vit("vit_tiny_patch16_224", tmp_path / "other.safetensors", kwargs)
    monkeypatch.setattr(vit, "_hub_reachable", lambda: False)
    with pytest.raises(vit.ModelError, match="--model-weights"):
        vit.create_vit("deit_tiny_patch16_224")


TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)


@pytest.mark.parametrize("keys", [("model", "model_ema"), ("state_dict", "state_dict_ema")])
def test_checkpoint_with_ema_loads_the_trained_weights_unless_asked(tmp_path, keys):
    trained = tiny_vit().state_dict()
    averaged = {name: tensor + 1 for name, tensor in trained.items()}
    path = tmp_path / "checkpoint.pth"
    # timm's training layout, argparse arguments included
    torch.save({keys[0]: trained, keys[1]: averaged, "epoch": 9,
                "args": argparse.Namespace(lr=0.1)}, path)  # fmt: skip
    weight = "blocks.0.attn.qkv.weight"
    assert torch.equal(vit.read_state_dict(path)[weight], trained[weight])
    assert torch.equal(vit.read_state_dict(path, use_ema=True)[weight], averaged[weight])
    model = vit.create_vit("vit_tiny_patch16_224", path, TINY_KWARGS)
    ema = vit.create_vit("vit_tiny_patch16_224", path, TINY_KWARGS, use_ema=True)
    assert torch.equal(model.state_dict()[weight], trained[weight])
    assert torch.equal(ema.state_dict()[weight], averaged[weight])


def test_use_ema_without_an_ema_is_an_error(tmp_path):
    state = tiny_vit().state_dict()
    torch.save({"model": state}, tmp_path / "plain.pth")
    save_file(state, str(tmp_path / "plain.safetensors"))
    for file in ("plain.pth", "plain.safetensors"):
        with pytest.raises(vit.ModelError, match="no EMA weights") as info:
            vit.create_vit("vit_tiny_patch16_224", tmp_path / file, TINY_KWARGS, use_ema=True)
        assert "\n" not in str(info.value)


def test_files_that_are_not_weights_are_named_as_such(tmp_path):
    archive = tmp_path / "archive.pth"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("readme.txt", "hello")
    files = {
        "notes.txt": b"epoch 3: loss 0.41\n",
        "junk.pth": b"not a checkpoint",
        "fake.safetensors": b'{"weights": []}',
        "empty.pth": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    for path in [archive, *(tmp_path / name for name in files)]:
        with pytest.raises(vit.ModelError) as info:
            vit.read_state_dict(path)
        assert str(info.value) == (
            f"{path} is not a weights file: expected .safetensors or a PyTorch .pth checkpoint"
        )


def test_checkpoint_with_arbitrary_objects_is_refused_in_one_line(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": tiny_vit().state_dict(), "saved": datetime.date(2024, 1, 2)}, path)
    with pytest.raises(vit.ModelError, match="objects other than tensors") as info:
        vit.read_state_dict(path)
    assert "\n" not in str(info.value)


def test_edge_server_mismatch_is_an_error():
    with pytest.raises(vit.ModelError, match="disagree"):
        vit.check_compatible(tiny_vit(), tiny_vit(patch_size=4))
    with pytest.raises(vit.ModelError, match="classes"):
        vit.check_compatible(tiny_vit(), tiny_vit(num_classes=3))


def test_normalization_of_uint8_and_float():
    norm = vit.Normalization((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = norm(pixels)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    torch.testing.assert_close(norm(pixels.float() / 255), out)
    # patches [B, L, C, P, P] normalise per channel too
    torch.testing.assert_close(norm(pixels.unsqueeze(1))[0, 0], out[0])
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(vit.Normalization.identity()(x), x)


def test_model_normalization_comes_from_its_config():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    assert isinstance(model, VisionTransformer)
    norm = vit.Normalization.of_model(model)
    assert norm.mean == pytest.approx((0.485, 0.456, 0.406))
