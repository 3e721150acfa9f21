"""The trunk inside a checkpoint (w2ssl/trunk_weights.py): every layout, every registered trunk, the errors."""
import argparse

import pytest
import torch
import torchvision

from tests.test_checkpoint import layouts
from w2ssl.checkpoint import save_atomic
from w2ssl.errors import UserError
from w2ssl.trunk_weights import check_trunk, extract_trunk, load_trunk, read_trunk, stored_arch, trunk_arch
from w2ssl.trunks import register_trunk, registry, trunk_names, trunk_shapes
from w2ssl.trunks.resnet import RESNET


@pytest.mark.parametrize("layout", ["ours", "authors", "mocov3"])
def test_extract_trunk_from_every_layout(layout, tmp_path):
    trunk, ckpts = layouts()
    save_atomic(ckpts[layout], tmp_path / "c.pth.tar")
    got = load_trunk(tmp_path / "c.pth.tar", "resnet18")
    assert got.keys() == trunk.keys()
    assert all(torch.equal(got[k], trunk[k]) for k in trunk)


def test_linear_probe_and_wrong_arch_are_refused():
    trunk, _ = layouts()
    probe = {"state_dict": {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}}
    with pytest.raises(UserError, match="linear-probe"):
        extract_trunk(probe)
    with pytest.raises(UserError, match="trunk is a resnet18 but --arch resnet50 was given"):
        check_trunk(trunk, "resnet50")
    with pytest.raises(UserError, match=r"does not match --arch resnet18 \(missing 'layer1.0.conv1.weight'"):
        check_trunk({k: v for k, v in trunk.items() if not k.startswith("layer1.0.conv1")}, "resnet18")


@pytest.mark.parametrize("layout", ["ours", "authors", "mocov3"])
def test_arch_is_the_checkpoints_own(layout, tmp_path):
    """The weights' shapes decide; the arch field or the saved arguments only when they cannot."""
    trunk, ckpts = layouts()
    save_atomic({**ckpts[layout], "arch": "resnet50"}, tmp_path / "c.pth.tar")  # a wrong field is overruled
    assert read_trunk(tmp_path / "c.pth.tar")[1] == "resnet18"
    assert stored_arch({"arch": "resnet34"}) == "resnet34"
    assert stored_arch({"args": {"arch": "resnet101"}}) == "resnet101"
    assert stored_arch({"args": argparse.Namespace(arch="resnet152")}) == "resnet152"
    assert stored_arch({"arch": "vit_base", "args": {}}) == "vit_base" and stored_arch({"arch": "vit_huge"}) is None
    odd = {**trunk, "extra.weight": torch.zeros(1)}  # no torchvision trunk: fall back to what the file says
    assert trunk_arch(odd, {"args": {"arch": "resnet34"}}) == "resnet34" and trunk_arch(odd, {}) is None


def fake_trunk(arch: str) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of ``arch``'s names and shapes (``torch.empty`` touches no memory: any size is cheap)."""
    return {k: torch.empty(shape) for k, shape in trunk_shapes(arch).items()}


@pytest.mark.parametrize("arch", trunk_names())
def test_every_registered_trunk_is_recognised_by_its_shapes(arch):
    ckpt = {"state_dict": {f"module.base_encoder.{k}": v for k, v in fake_trunk(arch).items()}, "arch": "resnet50"}
    trunk = extract_trunk(ckpt)
    assert trunk.keys() == trunk_shapes(arch).keys()
    assert trunk_arch(trunk, ckpt) == arch  # the shapes overrule a wrong arch field
    check_trunk(trunk, arch)


def test_a_moco_v3_vit_checkpoint_drops_its_projector_and_pos_embed():
    trunk = fake_trunk("vit_small")
    state = {f"module.base_encoder.{k}": v for k, v in trunk.items()}
    state.update({f"module.momentum_encoder.{k}": v for k, v in trunk.items()})
    state.update({"module.base_encoder.pos_embed": torch.zeros(1, 197, 384),
                  "module.base_encoder.head.0.weight": torch.zeros(4096, 384),
                  "module.predictor.0.weight": torch.zeros(4096, 256)})
    got = extract_trunk({"state_dict": state, "arch": "vit_small"})
    assert got.keys() == trunk.keys() and trunk_arch(got) == "vit_small"


@pytest.mark.parametrize("own, given", [("vit_small", "resnet50"), ("vit_base", "vit_small"),
                                        ("vit_conv_small", "vit_small"), ("resnet18", "vit_small")])
def test_another_registered_arch_names_the_checkpoints_own(own, given):
    with pytest.raises(UserError, match=f"trunk is a {own} but --arch {given} was given: drop --arch .* "
                                        f"or pass --arch {own}"):
        check_trunk(fake_trunk(own), given)


def test_unknown_arch_and_unknown_trunk_name_the_choices():
    with pytest.raises(UserError, match="unknown --arch vit_huge: choose one of resnet18, .*vit_small"):
        check_trunk(fake_trunk("vit_small"), "vit_huge")
    odd = {k: v for k, v in fake_trunk("vit_small").items() if not k.startswith("blocks.11.")}
    with pytest.raises(UserError, match=r"does not match --arch vit_small \(missing 'blocks.11.norm1.weight'.*"
                                        r"nor any of resnet18, .*: pass the arch it was trained with"):
        check_trunk(odd, "vit_small")


def test_a_consumer_of_one_family_refuses_the_other(tmp_path):
    _, ckpts = layouts()
    save_atomic(ckpts["ours"], tmp_path / "r18.pth.tar")
    with pytest.raises(UserError, match="holds a resnet18 trunk; this tool takes a vit .*vit_small.*: pass a vit"):
        read_trunk(tmp_path / "r18.pth.tar", family="vit")
    assert read_trunk(tmp_path / "r18.pth.tar", family="resnet")[1] == "resnet18"


def conv_trunk(width: int, root: str):
    """A trunk builder: one conv of ``width`` channels under the key root ``root``."""
    def build(**_options) -> torch.nn.Module:
        net = torch.nn.Sequential()
        net.add_module(root, torch.nn.Conv2d(3, width, 4, stride=4))
        net.num_features = width
        return net
    return build


def test_a_trunk_registered_after_a_first_call_is_seen(monkeypatch):
    """Shapes and key roots follow the registry: neither is cached past a registration."""
    monkeypatch.setattr(registry, "_TRUNKS", dict(registry._TRUNKS))
    register_trunk("late_cnn", RESNET)(conv_trunk(8, "stem"))
    assert trunk_shapes("late_cnn") == {"stem.weight": (8, 3, 4, 4), "stem.bias": (8,)}
    ckpt = {"state_dict": {"base_encoder.stem.weight": torch.zeros(8, 3, 4, 4),
                           "base_encoder.stem.bias": torch.zeros(8)}}
    assert extract_trunk(ckpt).keys() == {"stem.weight", "stem.bias"}  # "stem" is a trunk root now
    later = {"state_dict": {"base_encoder.patchify.weight": torch.zeros(4, 3, 4, 4)}}
    with pytest.raises(UserError, match="no pre-trained trunk"):
        extract_trunk(later)
    register_trunk("later_cnn", RESNET)(conv_trunk(4, "patchify"))
    assert extract_trunk(later).keys() == {"patchify.weight"} and trunk_arch(extract_trunk(later)) is None
    # The same name registered anew (another registry) is built anew, not read from the first one's cache.
    monkeypatch.setattr(registry, "_TRUNKS", dict(registry._TRUNKS))
    del registry._TRUNKS["late_cnn"]
    register_trunk("late_cnn", RESNET)(conv_trunk(16, "stem"))
    assert trunk_shapes("late_cnn")["stem.weight"] == (16, 3, 4, 4)
