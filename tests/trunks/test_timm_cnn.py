"""timm's ResNet-D as a registered trunk: timm's names, a feature map, MoCo v3's zero start, pre-training with
W2SSL and export to timm, all from one module (w2ssl/trunks/timm_cnn.py)."""
from __future__ import annotations

from argparse import Namespace

import pytest
import timm
import torch

from tests.helpers import TINY
from w2ssl import cli
from w2ssl.export import main as export_main
from w2ssl.methods.registry import build_model
from w2ssl.trunk_weights import load_trunk
from w2ssl.trunks import average_map, build_trunk, trunk_names, trunk_shapes, trunk_spec
from w2ssl.trunks.timm_cnn import TIMM_CNN, TIMM_CNNS


def test_resnet_d_trunks_are_timm_models_without_classifier():
    assert trunk_names("timm") == TIMM_CNNS and trunk_spec("resnet50d").family is TIMM_CNN
    with torch.device("meta"):  # names and shapes only
        reference = timm.create_model("resnet50d")
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert trunk_shapes("resnet50d") == expected  # timm's own names: the export is the identity
    trunk = build_trunk("resnet18d").eval()
    with torch.no_grad():
        fmap = trunk(torch.randn(2, 3, 64, 64))
    assert fmap.shape == (2, 512, 2, 2) and trunk.num_features == 512
    assert trunk.layer1[0].bn2.weight.abs().min() > 0  # every residual branch live, as our torchvision ResNets


def test_methods_pair_it_with_resnet_heads_and_mocov3_zeroes_the_residual_branches():
    assert torch.equal(build_trunk("resnet18d", **TIMM_CNN.zero_init).layer1[0].bn2.weight, torch.zeros(64))
    args = Namespace(method="mocov3", arch="resnet18d", stop_grad_conv1=False, moco_dim=8, moco_mlp_dim=16, moco_t=1.0,
                     fused_views=False)
    with torch.device("meta"):
        mocov3, byol = build_model(args), build_model(Namespace(**{**vars(args), "method": "byol"}))
    assert sum(isinstance(m, torch.nn.Linear) for m in mocov3.projector) == 2  # MoCo v3's ResNet projector
    assert mocov3.feature is byol.feature is average_map  # no class token: both read the averaged map


@pytest.mark.slow  # end to end: a W2SSL run in this process, its probe and fine-tuning, its export loaded into timm
def test_w2ssl_pretrains_it_and_the_export_loads_into_timm(image_root, tmp_path, capsys):
    argv = [image_root, *TINY, "-a", "resnet18d", "--tile-size", "32", "-b", "8", "--workers", "0", "--epochs", "1",
            "--save-dir", tmp_path / "run"]
    import main_moco

    assert cli.run_main(main_moco.main, [str(a) for a in argv]) == 0
    ckpt = tmp_path / "run" / "checkpoint_0000.pth.tar"
    out = tmp_path / "resnet18d.pth"
    assert export_main([str(ckpt), str(out), "--to", "timm"]) == 0
    assert 'load into timm.create_model("resnet18d") with strict=False' in capsys.readouterr().out
    model = timm.create_model("resnet18d")
    missing, unexpected = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    trunk = build_trunk("resnet18d")
    trunk.load_state_dict(load_trunk(ckpt))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), trunk.eval()(x))
    assert export_main([str(ckpt), str(out), "--to", "torchvision"]) == 2
    err = capsys.readouterr().err
    assert err == "error: a resnet18d trunk has no torchvision counterpart with these weights: export --to timm\n"
    import main_finetune
    import main_lincls

    for main, name in ((main_lincls, "probe"), (main_finetune, "finetune")):
        argv = [image_root, "--pretrained", ckpt, "--epochs", "1", "-b", "8", "--workers", "0", "--input-size", "32",
                "--save-dir", tmp_path / name]
        assert cli.run_main(main.main, [str(a) for a in argv]) == 0
        assert "resnet18d" in capsys.readouterr().out
