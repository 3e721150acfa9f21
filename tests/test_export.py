"""Exporting trunks from the three checkpoint layouts to torchvision and timm key names."""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from w2ssl.export import main
from w2ssl.trunks import build_trunk
from w2ssl.trunks.vit import ConvStem

ROOT = Path(__file__).resolve().parents[1]
FC = ["fc.bias", "fc.weight"]


@functools.cache  # built once per test session: the tests only read it
def trunk_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``arch`` trunk (no fc) with non-default BN statistics, so that every tensor is distinctive."""
    torch.manual_seed(seed)
    state = torchvision.models.__dict__[arch]().state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.copy_(torch.randn_like(value))
        else:
            value.fill_(seed + 7)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def ours(trunk):
    """main_moco.py: the W2SSL module's state dict, no ``module.`` prefix."""
    state = {f"base_encoder.{k}": v for k, v in trunk.items()}
    state.update({f"momentum_encoder.{k}": v + 1 for k, v in trunk.items()})
    state.update({"projector.0.weight": torch.randn(8, 4), "where_head.weight": torch.randn(2, 4)})
    return {"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def authors(trunk):
    """The authors' W2SSL: MoCo v3 code, DDP ``module.`` prefix, projector in ``base_encoder.fc`` plus crop heads."""
    state = {f"module.base_encoder.{k}": v for k, v in trunk.items()}
    state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in trunk.items()})
    state.update({"module.base_encoder.fc.0.weight": torch.randn(8, 4), "module.fc_crop.weight": torch.randn(2, 4),
                  "module.fc_loc.weight": torch.randn(4, 4), "module.predictor.0.weight": torch.randn(8, 8)})
    return {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 1024.0}}


def mocov3(trunk):
    state = {f"module.base_encoder.{k}": v for k, v in trunk.items()}
    state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in trunk.items()})
    state.update({"module.base_encoder.fc.0.weight": torch.randn(8, 4), "module.predictor.0.weight": torch.randn(8, 8)})
    return {"epoch": 300, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


@functools.cache  # every load overwrites all trunk tensors and check_loads compares all of them
def target_model(to, arch):
    return torchvision.models.__dict__[arch]() if to == "torchvision" else timm.create_model(arch, pretrained=False)


def check_loads(out: Path, trunk, to: str, arch: str) -> None:
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert set(exported) == set(trunk)
    model = target_model(to, arch)
    result = model.load_state_dict(exported, strict=False)
    assert sorted(result.missing_keys) == FC and result.unexpected_keys == []
    loaded = model.state_dict()
    for key, value in trunk.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Callable[[Callable[[dict], dict]], Path]:
    """``layout -> file`` of that layout of ``trunk_state("resnet18")``, each saved once (~90 MB): the tests
    only read them."""
    folder = tmp_path_factory.mktemp("r18")

    @functools.cache
    def saved(layout: Callable[[dict], dict]) -> Path:
        torch.save(layout(trunk_state("resnet18")), folder / f"{layout.__name__}.pth.tar")
        return folder / f"{layout.__name__}.pth.tar"
    return saved


@pytest.mark.parametrize(("layout", "to"), [(ours, "torchvision"), (authors, "timm"), (mocov3, "torchvision"),
                                             (ours, "timm")])
def test_export_resnet18_all_layouts(resnet18_file, tmp_path, layout, to, capsys):
    assert main([str(resnet18_file(layout)), str(tmp_path / "out.pth"), "--to", to, "--arch", "resnet18"]) == 0
    assert "only fc.weight and fc.bias are missing" in capsys.readouterr().out
    check_loads(tmp_path / "out.pth", trunk_state("resnet18"), to, "resnet18")


@pytest.fixture(scope="module")
def authors_resnet50(tmp_path_factory) -> Path:
    """The authors' layout of a ResNet-50 (two trunks, ~190 MB), written once for both targets."""
    path = tmp_path_factory.mktemp("r50") / "ckpt.pth.tar"
    torch.save(authors(trunk_state("resnet50", seed=1)), path)
    return path


@pytest.mark.parametrize("to", ["torchvision", "timm"])
def test_export_resnet50_default_arch(authors_resnet50, tmp_path, to):
    assert main([str(authors_resnet50), str(tmp_path / "out.pth"), "--to", to]) == 0
    check_loads(tmp_path / "out.pth", trunk_state("resnet50", seed=1), to, "resnet50")


def run_error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("layout", [ours, authors, mocov3])
def test_arch_defaults_to_the_checkpoints_own(resnet18_file, tmp_path, layout, capsys):
    """authors()/mocov3() say arch resnet50 although they hold a resnet18: the weights decide."""
    assert main([str(resnet18_file(layout)), str(tmp_path / "out.pth"), "--to", "torchvision"]) == 0
    assert "(resnet18 trunk, torchvision keys)" in capsys.readouterr().out
    check_loads(tmp_path / "out.pth", trunk_state("resnet18"), "torchvision", "resnet18")


def test_bad_file_exits_2(resnet18_file, tmp_path, capsys):
    whole = resnet18_file(ours).read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    assert "truncated" in run_error([tmp_path / "cut.pth", tmp_path / "out.pth", "--to", "torchvision"], capsys)
    (tmp_path / "text.pth").write_bytes(b"not a checkpoint")
    assert "not a PyTorch checkpoint" in run_error([tmp_path / "text.pth", tmp_path / "out.pth", "--to", "timm"],
                                                   capsys)
    assert "does not exist" in run_error([tmp_path / "nope.pth", tmp_path / "out.pth", "--to", "timm"], capsys)
    assert not (tmp_path / "out.pth").exists()


def test_linear_probe_checkpoint_exits_2(tmp_path, capsys):
    probe = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save({"epoch": 90, "state_dict": probe}, tmp_path / "lincls.pth.tar")
    err = run_error([tmp_path / "lincls.pth.tar", tmp_path / "out.pth", "--to", "torchvision", "--arch", "resnet18"],
                    capsys)
    assert "linear-probe" in err


def test_wrong_arch_and_bad_output_exit_2(resnet18_file, tmp_path, capsys):
    ckpt = resnet18_file(ours)
    err = run_error([ckpt, tmp_path / "out.pth", "--to", "timm", "--arch", "resnet50"], capsys)
    assert "trunk is a resnet18 but --arch resnet50 was given" in err
    assert "does not exist" in run_error([ckpt, tmp_path / "no" / "out.pth", "--to", "timm", "--arch", "resnet18"],
                                         capsys)
    assert "is a folder, not a file" in run_error([ckpt, tmp_path, "--to", "timm", "--arch", "resnet18"], capsys)
    assert "is the input" in run_error([ckpt, ckpt, "--to", "timm", "--arch", "resnet18"], capsys)


def test_untrusted_pickle_needs_flag(tmp_path, capsys):
    ckpt = ours(trunk_state("resnet18"))
    ckpt["args"] = argparse.Namespace(lr=0.1)  # the authors' scripts may pickle their arguments
    torch.save(ckpt, tmp_path / "ckpt.pth.tar")
    argv = [tmp_path / "ckpt.pth.tar", tmp_path / "out.pth", "--to", "torchvision", "--arch", "resnet18"]
    assert "--trust-checkpoint" in run_error(argv, capsys)
    assert main([str(a) for a in argv] + ["--trust-checkpoint"]) == 0
    check_loads(tmp_path / "out.pth", trunk_state("resnet18"), "torchvision", "resnet18")


@pytest.mark.slow
def test_module_cli_end_to_end(tmp_path):
    trunk = trunk_state("resnet18", seed=2)
    torch.save(mocov3(trunk), tmp_path / "ckpt.pth.tar")
    cmd = [sys.executable, "-m", "w2ssl.export", str(tmp_path / "ckpt.pth.tar"), str(tmp_path / "out.pth"),
           "--to", "timm", "--arch", "resnet18"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    check_loads(tmp_path / "out.pth", trunk, "timm", "resnet18")


# ----------------------------------------------------------------- ViT trunks
def vit_checkpoint(path: Path, arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fake pre-training checkpoint of a real ``arch`` trunk, in MoCo v3's layout (``module.`` prefix, a
    ``pos_embed`` weight and a projector under ``base_encoder.head``); returns the trunk's state."""
    torch.manual_seed(seed)
    trunk = build_trunk(arch).state_dict()
    state = {f"module.base_encoder.{k}": v for k, v in trunk.items()}
    state.update({"module.base_encoder.pos_embed": torch.zeros(1, 197, trunk["cls_token"].shape[-1]),
                  "module.base_encoder.head.0.weight": torch.zeros(8, trunk["cls_token"].shape[-1])})
    torch.save({"epoch": 300, "arch": arch, "state_dict": state}, path)
    return trunk


@pytest.fixture(scope="module")
def vit_small_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("vit") / "vit_small.pth.tar"
    return path, vit_checkpoint(path, "vit_small")


def test_export_vit_small_loads_into_timm_with_only_head_missing(vit_small_ckpt, tmp_path, capsys):
    ckpt, trunk = vit_small_ckpt
    assert main([str(ckpt), str(tmp_path / "out.pth"), "--to", "timm"]) == 0
    assert ("(vit_small trunk, timm keys)" in (out := capsys.readouterr().out)
            and 'timm.create_model("vit_small_patch16_224", num_heads=12)' in out
            and "only head.weight and head.bias are missing" in out), out
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert exported.keys() == {*trunk, "pos_embed"} and exported["pos_embed"].shape == (1, 197, 384)
    with torch.device("meta"):  # timm's vit_small has 6 heads: the same weight shapes
        model = timm.create_model("vit_small_patch16_224", pretrained=False)
    missing, unexpected = model.load_state_dict(exported, strict=False, assign=True)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    assert all(torch.equal(exported[k], v) for k, v in trunk.items())


def test_export_vit_to_torchvision_is_refused_naming_timm(vit_small_ckpt, tmp_path, capsys):
    err = run_error([vit_small_ckpt[0], tmp_path / "out.pth", "--to", "torchvision"], capsys)
    assert "a vit_small trunk has no torchvision counterpart with these weights: export --to timm" in err
    err = run_error([vit_small_ckpt[0], tmp_path / "out.pth", "--to", "timm", "--arch", "vit_base"], capsys)
    assert "trunk is a vit_small but --arch vit_base was given" in err
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.slow  # two full ViT-B builds and a 224-px forward
def test_export_vit_base_computes_the_same_features_in_timm(tmp_path, capsys):
    trunk = vit_checkpoint(tmp_path / "vit_base.pth.tar", "vit_base")
    assert main([str(tmp_path / "vit_base.pth.tar"), str(tmp_path / "out.pth"), "--to", "timm"]) == 0
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    missing, unexpected = model.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    ours = build_trunk("vit_base").eval()
    ours.load_state_dict(trunk)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours.forward_tokens(x), atol=1e-4, rtol=1e-4)


def test_export_conv_stem_vit_keeps_proj_names_and_says_timm_needs_the_stem(tmp_path, capsys):
    trunk = vit_checkpoint(tmp_path / "conv.pth.tar", "vit_conv_small")
    assert main([str(tmp_path / "conv.pth.tar"), str(tmp_path / "out.pth"), "--to", "timm"]) == 0
    assert "embed_layer=ConvStem" in capsys.readouterr().out
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert "patch_embed.proj.0.weight" in exported and exported.keys() == {*trunk, "pos_embed"}
    with torch.device("meta"):
        model = timm.models.VisionTransformer(embed_dim=384, depth=11, num_heads=12, embed_layer=ConvStem)
    missing, unexpected = model.load_state_dict(exported, strict=False, assign=True)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
