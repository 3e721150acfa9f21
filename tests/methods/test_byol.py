"""BYOL (w2ssl.methods.byol): its loss and EMA written out by hand, gradients, layout, and a run end to end."""
import functools
import math

import pytest
import torch
from torch import nn

from tests.helpers import TINY, logged_losses, run_script, small_resnet
from w2ssl.export import TARGETS, export
from w2ssl.methods.byol import BYOL
from w2ssl.methods.registry import method_spec
from w2ssl.trunk_weights import extract_trunk

DIM, MLP, N, SIZE = 8, 16, 4, 16


def tiny(**kw) -> BYOL:
    torch.manual_seed(0)
    model = BYOL(functools.partial(small_resnet), dim=DIM, mlp_dim=MLP, **kw).double()
    with torch.no_grad():  # move the online branch off the target, so that the EMA shows
        for p in [*model.base_encoder.parameters(), *model.projector.parameters()]:
            p.mul_(1.25).add_(0.01)
    return model


def views(n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


def byol_mlp(in_dim: int) -> nn.Sequential:
    """BYOL's MLP (its paper, section 3.3): Linear, BN, ReLU, Linear, with biases only where BN has none."""
    return nn.Sequential(nn.Linear(in_dim, MLP, bias=False), nn.BatchNorm1d(MLP), nn.ReLU(), nn.Linear(MLP, DIM,
                                                                                                        bias=False))


def reference_step(model: BYOL, x1, x2, m: float) -> torch.Tensor:
    """BYOL by hand: target ξ ← m ξ + (1 − m) θ first, then Σ over both orders of mean(2 − 2 cos(q, z'))."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for target, online in (("momentum_encoder", "base_encoder"), ("momentum_projector", "projector")):
        for name, _ in model.get_submodule(target).named_parameters():
            state[f"{target}.{name}"] = m * state[f"{target}.{name}"] + (1 - m) * state[f"{online}.{name}"]
    trunk, target_trunk = small_resnet().double(), small_resnet().double()
    heads = {name: byol_mlp(DIM if name == "predictor" else 64).double()
             for name in ("projector", "predictor", "momentum_projector")}
    for prefix, module in [("base_encoder", trunk), ("momentum_encoder", target_trunk), *heads.items()]:
        module.load_state_dict({k.removeprefix(f"{prefix}."): v for k, v in state.items()
                                if k.startswith(f"{prefix}.")})  # strict: BYOL's layout, parameter for parameter
    online = [heads["predictor"](heads["projector"](trunk(x).mean(dim=(2, 3)))) for x in (x1, x2)]
    with torch.no_grad():
        target = [heads["momentum_projector"](target_trunk(x).mean(dim=(2, 3))) for x in (x1, x2)]

    def regression(q, z):
        return (2 - 2 * (q * z).sum(1) / (q.norm(dim=1) * z.norm(dim=1))).mean()

    return regression(online[0], target[1]) + regression(online[1], target[0])


def test_forward_is_byols_loss_and_ema():
    model = tiny()
    x1, x2 = views()
    expected = reference_step(model, x1, x2, m=0.9)
    target_before = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    online = {k: v.clone() for k, v in model.base_encoder.state_dict().items()}
    out = model(x1, x2, m=0.9)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-10, atol=0)
    assert out["loss_byol"] == out["loss"].detach() and 0 <= out["loss"].item() <= 8  # two terms in [0, 4]
    assert out["cos_sim"].item() == pytest.approx(1 - out["loss"].item() / 4)
    for name, p in model.momentum_encoder.named_parameters():
        torch.testing.assert_close(p, 0.9 * target_before[name] + 0.1 * online[name], msg=name)


def test_gradients_reach_only_the_online_branch():
    model = tiny()
    model(*views(), m=0.99)["loss"].backward()
    for prefix in ("base_encoder", "projector", "predictor"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.get_submodule(prefix).parameters())
    for prefix in ("momentum_encoder", "momentum_projector"):
        assert all(p.grad is None and not p.requires_grad for p in model.get_submodule(prefix).parameters())


def test_fused_views_give_the_same_loss():
    x1, x2 = views()
    torch.testing.assert_close(tiny(fused_views=True)(x1, x2, m=0.9)["loss"], tiny()(x1, x2, m=0.9)["loss"],
                               rtol=1e-10, atol=0)


def test_layout_heads_and_registration():
    model = tiny()
    assert {k.split(".")[0] for k in model.state_dict()} == {"base_encoder", "projector", "predictor",
                                                             "momentum_encoder", "momentum_projector"}
    assert not any(isinstance(m, nn.BatchNorm1d) and not m.affine for m in model.modules())  # no MoCo-style last BN
    trunk = extract_trunk({"state_dict": model.state_dict()})
    assert all(torch.equal(v, model.state_dict()[f"base_encoder.{k}"]) for k, v in trunk.items())
    spec = method_spec("byol")
    assert spec.input_size(32) == 64 and spec.fast_transform is not None
    with pytest.raises(ValueError, match="same shape"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.float64), torch.zeros(2, 3, 8, 8, dtype=torch.float64), m=0.9)
    assert math.isclose(spec.input_size(112), 224)


@pytest.mark.slow
def test_byol_pretrains_probes_and_exports(image_root, tmp_path):
    run = tmp_path / "run"
    res = run_script("main_moco.py", image_root, *TINY, "--method", "byol", "-b", "8", "--epochs", "2",
                     "--moco-m", "0.996", "--moco-m-cos", "--save-dir", run)
    assert res.returncode == 0, res.stderr
    losses = logged_losses(run / "log.txt")
    assert len(losses) == 6 and all(0 < float(v) < 8 for v in losses.values())
    assert "loss_byol" in (run / "log.txt").read_text().lower()
    probe = run_script("main_lincls.py", image_root, "-a", "resnet18", "--input-size", "32", "-b", "8", "--workers",
                       "0", "--epochs", "1", "--pretrained", run / "checkpoint_0001.pth.tar", "--save-dir",
                       tmp_path / "probe")
    assert probe.returncode == 0, probe.stderr
    for target in TARGETS:
        weights, _ = export(run / "checkpoint_0001.pth.tar", tmp_path / f"{target}.pth", target, "resnet18")
        assert weights["conv1.weight"].shape == (64, 3, 7, 7)
