"""ViT trunks and their heads: MoCo v3's choices, the grid read-out of the token map, timm export."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from w2ssl.methods.gridpool import grid_pool
from w2ssl.methods.heads import predictor, projector
from w2ssl.trunks import build_trunk, trunk_names, trunk_spec
from w2ssl.trunks.vit import (
    VIT,
    ConvStem,
    ViTTrunk,
    build_vit,
    sincos_2d,
    to_timm_state_dict,
    token_map,
    vit_conv_base,
    vit_conv_small,
    vit_small,
)

TINY = dict(embed_dim=32, depth=1, num_heads=2)


def tiny(**kwargs) -> ViTTrunk:
    torch.manual_seed(0)
    return build_vit("vit_small", **{**TINY, **kwargs}).eval()


def test_sincos_is_moco_v3s_formula_on_a_2x2_grid():
    # dim 8: two frequencies ω = (1, 1/100); token (y, x) -> [sin yω, cos yω, sin xω, cos xω]
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 0, 1, 1],            # (0, 0)
        [0, 0, 1, 1, s1, s2, c1, c2],        # (0, 1)
        [s1, s2, c1, c2, 0, 0, 1, 1],        # (1, 0)
        [s1, s2, c1, c2, s1, s2, c1, c2],    # (1, 1)
    ])
    torch.testing.assert_close(sincos_2d(2, 2, 8), expected)


def test_sincos_equals_moco_v3s_meshgrid_on_a_square_grid():
    # MoCo v3 meshes (w, h) with "ij" indexing and flattens: on square grids its first half encodes the row
    n, dim = 14, 384
    first, second = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32),
                                   indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4) / (dim // 4))
    a, b = torch.outer(first.flatten(), omega), torch.outer(second.flatten(), omega)
    torch.testing.assert_close(sincos_2d(n, n, dim), torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1))


def test_the_trunk_adds_the_embedding_of_the_input_grid():
    trunk = tiny()
    tokens = trunk._pos_embed(torch.zeros(1, 3, 5, 32))  # [B, h, w, C] patch embeddings
    torch.testing.assert_close(tokens[0, 0], trunk.cls_token[0, 0])  # the class token's embedding is zero
    torch.testing.assert_close(tokens[0, 1:], sincos_2d(3, 5, 32))
    assert not any("pos_embed" in k for k in trunk.state_dict())  # fixed, so not a weight


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (224, 224)])
def test_feature_map_shapes_any_multiple_of_16(size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fmap = tiny()(x)
    assert fmap.shape == (2, 32, size[0] // 16, size[1] // 16)


def test_sizes_that_are_not_multiples_of_16_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny()(torch.randn(1, 3, 64, 72))


def test_token_map_puts_token_y_w_plus_x_at_y_x():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).view(1, 7, 6).expand(2, 7, 6)  # 1 + 2·3 tokens, C = 6
    fmap = token_map(tokens, 2, 3)
    for y in range(2):
        for x in range(3):
            torch.testing.assert_close(fmap[:, :, y, x], tokens[:, 1 + 3 * y + x])


def test_tile_vectors_pool_each_quadrants_tokens_only():
    # A 224-px montage gives 14 x 14 tokens; bilinear 14 -> 8 then the mean of 4 weighs the 7 rows
    # (columns) of a tile's half by [5, 3, 7, 2, 7, 3, 5] / 32 and the other half's by 0.
    weights = torch.tensor([5, 3, 7, 2, 7, 3, 5], dtype=torch.float32) / 32
    with torch.no_grad():
        fmap = tiny()(torch.randn(2, 3, 224, 224))
    cells = grid_pool(fmap)
    for i in range(2):
        for j in range(2):
            quadrant = fmap[:, :, 7 * i:7 * i + 7, 7 * j:7 * j + 7]
            expected = torch.einsum("h,bchw,w->bc", weights, quadrant, weights)
            torch.testing.assert_close(cells[:, :, i, j], expected, rtol=1e-5, atol=1e-6)


def test_a_64_px_montage_gives_one_vector_per_tile_from_its_own_quadrant_and_a_sixteenth_spill():
    # 64 px -> 4 x 4 tokens, each tile a 2 x 2 quadrant. Bilinear 4 -> 8 then the mean of 4 weighs the token
    # rows (columns) by [8, 7, 1, 0] / 16 for the top (left) tiles and [0, 1, 7, 8] / 16 for the others:
    # 1/16 falls on the neighbouring quadrant's nearest row (METHOD §11: exact split from 224 px on).
    weights = torch.tensor([[8, 7, 1, 0], [0, 1, 7, 8]], dtype=torch.float32) / 16
    x = torch.randn(2, 3, 64, 64)
    trunk = tiny()
    with torch.no_grad():
        tokens = trunk.forward_tokens(x)[:, 1:].reshape(2, 4, 4, 32)  # row-major patch tokens
        cells = grid_pool(trunk(x))
    assert cells.shape == (2, 32, 2, 2)
    for i in range(2):
        for j in range(2):
            expected = torch.einsum("h,bhwc,w->bc", weights[i], tokens, weights[j])
            torch.testing.assert_close(cells[:, :, i, j], expected, rtol=1e-5, atol=1e-6)


def test_vit_feature_avg_and_cls():
    trunk, x = tiny(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, fmap = trunk.forward_tokens(x), trunk(x)
        torch.testing.assert_close(trunk.vit_feature(x), fmap.mean(dim=(2, 3)))
        torch.testing.assert_close(trunk.vit_feature(x, "cls"), tokens[:, 0])
    with pytest.raises(ValueError, match="unknown ViT feature"):
        trunk.vit_feature(x, "max")


def test_stop_grad_conv1_freezes_a_random_patch_projection():
    trunk = tiny(stop_grad_conv1=True).train()
    trunk(torch.randn(2, 3, 32, 32)).square().mean().backward()
    proj = trunk.patch_embed.proj
    assert proj.weight.grad is None and proj.bias.grad is None and proj.weight.abs().sum() > 0
    assert all(p.grad is not None for n, p in trunk.named_parameters() if not n.startswith("patch_embed"))
    with pytest.raises(ValueError, match="conv-stem"):
        vit_conv_small(stop_grad_conv1=True, **TINY)


def test_moco_v3_initialisation():
    trunk, dim = tiny(), 32
    qkv, fc1, proj = trunk.blocks[0].attn.qkv, trunk.blocks[0].mlp.fc1, trunk.patch_embed.proj
    for weight, bound in [(qkv.weight, math.sqrt(6 / (dim + dim))),  # Q, K and V each xavier on their own
                          (fc1.weight, math.sqrt(6 / (dim + 4 * dim))),
                          (proj.weight, math.sqrt(6 / (3 * 16 * 16 + dim)))]:
        assert 0.9 * bound < weight.abs().max() <= bound
    assert qkv.bias.abs().sum() == fc1.bias.abs().sum() == proj.bias.abs().sum() == 0
    assert trunk.cls_token.abs().max() < 1e-5


@pytest.mark.parametrize("build, dim", [(vit_conv_small, 384), (vit_conv_base, 768)])
def test_conv_stem_variants_run_at_64_px(build, dim):
    torch.manual_seed(0)
    trunk = build(depth=1)
    stem = trunk.patch_embed.proj
    widths = [m.out_channels for m in stem if isinstance(m, nn.Conv2d)]
    assert widths == [dim // 8, dim // 4, dim // 2, dim, dim] and stem[-1].kernel_size == (1, 1)
    assert isinstance(stem[1], nn.BatchNorm2d) and stem[0].bias is None
    assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, dim, 4, 4)


@pytest.mark.parametrize("arch, timm_name, blocks", [("vit_small", "vit_small_patch16_224", 12),
                                                     ("vit_base", "vit_base_patch16_224", 12),
                                                     ("vit_conv_small", None, 11),
                                                     ("vit_conv_base", None, 11)])
def test_real_configs_and_timm_keys(arch, timm_name, blocks):
    with torch.device("meta"):
        trunk = build_vit(arch)
        exported = to_timm_state_dict(trunk.state_dict())
        reference = timm.create_model(timm_name, pretrained=False) if timm_name else None
    assert len(trunk.blocks) == blocks and trunk.blocks[0].attn.num_heads == 12
    if reference is None:
        stem = sum(p.numel() for p in trunk.patch_embed.parameters())
        c = trunk.num_features
        assert stem == 9 * (3 * c // 8 + c // 8 * c // 4 + c // 4 * c // 2 + c // 2 * c) + 2 * (15 * c // 8) + c * c + c
        return
    ours = {k: v.shape for k, v in exported.items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("head.")}
    assert ours == theirs


@pytest.mark.parametrize("arch", ["vit_small", "vit_conv_small"])
def test_timm_export_loads_and_computes_the_same_tokens(arch):
    torch.manual_seed(0)
    trunk = build_vit(arch, depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    if arch == "vit_small":  # MoCo v3's ViT-S has 12 heads where timm's has 6
        model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, num_heads=12)
    else:
        model = timm.models.VisionTransformer(embed_dim=384, depth=2, num_heads=12, embed_layer=ConvStem)
    missing, unexpected = model.load_state_dict(to_timm_state_dict(trunk.state_dict()), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), trunk.forward_tokens(x))


def test_timm_export_refuses_other_state_dicts():
    state = tiny().state_dict()
    with pytest.raises(ValueError, match="multiple of 16"):
        to_timm_state_dict(state, img_size=200)
    with pytest.raises(ValueError, match="w2ssl ViT trunk state dict"):
        to_timm_state_dict({f"base_encoder.{k}": v for k, v in state.items()})


def test_bf16_autocast_forward():
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fmap = tiny()(torch.randn(2, 3, 64, 64))
    assert fmap.shape == (2, 32, 4, 4) and torch.isfinite(fmap).all()


def test_vit_heads_are_moco_v3s():
    def layout(seq):
        return [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None),
                 getattr(m, "affine", None)) for m in seq]

    lin, bn, relu = "Linear", "BatchNorm1d", "ReLU"
    heads, hidden = VIT.heads, [(bn, None, None, True), (relu, None, None, None)]
    assert layout(projector(384, 64, 16, heads)) == [(lin, 384, 64, None), *hidden, (lin, 64, 64, None), *hidden,
                                                     (lin, 64, 16, None), (bn, None, None, False)]
    assert layout(predictor(16, 64, heads)) == [(lin, 16, 64, None), (bn, None, None, True), (relu, None, None, None),
                                                (lin, 64, 16, None), (bn, None, None, False)]
    assert all(m.bias is None for m in projector(8, 4, 2, VIT.heads) if isinstance(m, nn.Linear))


def test_vit_small_at_224_shape():
    torch.manual_seed(0)
    with torch.no_grad():
        assert vit_small().eval()(torch.randn(1, 3, 224, 224)).shape == (1, 384, 14, 14)


def test_the_vits_are_registered_trunks_of_family_vit():
    assert trunk_names("vit") == ("vit_small", "vit_base", "vit_conv_small", "vit_conv_base")
    assert all(trunk_spec(name).family is VIT for name in trunk_names("vit"))
    trunk = build_trunk("vit_conv_small", depth=1)
    assert isinstance(trunk, ViTTrunk) and isinstance(trunk.patch_embed, ConvStem) and trunk.num_features == 384
