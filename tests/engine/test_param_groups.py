"""Fine-tuning's parameter groups: MAE's layer-wise lr decay and no-decay rules, checked by hand on a tiny ViT."""
import pytest
import torch

from w2ssl.engine.optim import set_lr
from w2ssl.engine.param_groups import param_groups, vit_layer
from w2ssl.eval.probe_model import Probe
from w2ssl.trunks.vit import build_vit


def tiny_vit_probe() -> Probe:
    return Probe(build_vit("vit_small", depth=2, embed_dim=32, num_heads=2), 3)


def test_vit_layers():
    names = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias",
             "norm.weight", "fc.weight")
    assert [vit_layer(n, 12) for n in names] == [0, 0, 0, 1, 12, 13, 13]


def test_layer_decay_groups_have_the_hand_computed_lrs():
    model = tiny_vit_probe()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, depth=2, prefix="trunk.")
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    set_lr(optimizer, 1e-3)
    lr = {name: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for name in g["names"]}
    # depth 2: layers 0 (tokens, patch embedding), 1 and 2 (blocks), 3 (final norm, fc); lr 1e-3 x 0.5^(3 - layer)
    expected = {
        "trunk.cls_token": (1.25e-4, 0.0),
        "trunk.patch_embed.proj.weight": (1.25e-4, 0.05),
        "trunk.patch_embed.proj.bias": (1.25e-4, 0.0),
        "trunk.blocks.0.norm1.weight": (2.5e-4, 0.0),
        "trunk.blocks.0.attn.qkv.weight": (2.5e-4, 0.05),
        "trunk.blocks.0.attn.qkv.bias": (2.5e-4, 0.0),
        "trunk.blocks.1.mlp.fc2.weight": (5e-4, 0.05),
        "trunk.norm.weight": (1e-3, 0.0),
        "trunk.norm.bias": (1e-3, 0.0),
        "fc.weight": (1e-3, 0.05),
        "fc.bias": (1e-3, 0.0),
    }
    for name, (want_lr, want_wd) in expected.items():
        assert lr[name] == (pytest.approx(want_lr), want_wd), name
    assert set(lr) == {n for n, _ in model.named_parameters()}  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(groups) == 4 * 2  # 4 layers x (decay, no decay)


def test_without_depth_every_group_trains_at_the_full_rate_and_frozen_ones_are_left_out():
    model = tiny_vit_probe()
    model.trunk.patch_embed.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.0)
    assert {g["lr_scale"] for g in groups} == {1.0} and {g["weight_decay"] for g in groups} == {0.0}
    names = [n for g in groups for n in g["names"]]
    assert not any(n.startswith("trunk.patch_embed") for n in names) and "fc.weight" in names
