"""MoCo v3 (w2ssl.methods.mocov3): the published loss, written out by hand; gradients, EMA, layout, world size."""
import functools
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from PIL import Image
from torch import nn

from tests.helpers import small_resnet
from tests.losses.test_infonce import reference_ctr
from w2ssl.data.augment import MEAN, STD
from w2ssl.data.twocrop import two_crop
from w2ssl.dist.syncbn import SyncNorm
from w2ssl.eval.probe_model import build_model
from w2ssl.export import TARGETS, export
from w2ssl.methods.mocov3 import MoCoV3
from w2ssl.trunk_weights import check_trunk, extract_trunk
from w2ssl.trunks import build_trunk
from w2ssl.trunks.resnet import RESNET
from w2ssl.trunks.vit import VIT

DIM, MLP, N, SIZE, T = 8, 16, 4, 16, 0.7


def resnet18() -> functools.partial:
    """The trunk builder MoCo v3's method passes: torchvision's ``zero_init_residual=True``."""
    return functools.partial(build_trunk, "resnet18", zero_init_residual=True)


def small(**options) -> functools.partial:
    """The same on :func:`small_resnet` (resnet18's layout, one block per stage, 64 features): cheap."""
    return functools.partial(small_resnet, zero_init_residual=True, **options)


def vit_tiny() -> functools.partial:
    """A one-block ViT: 32-px views give 2 x 2 patch tokens and the class token."""
    return functools.partial(build_trunk, "vit_small", embed_dim=32, depth=1, num_heads=2)


def tiny(norm_layer=None, trunk=small, family: str = "resnet", **kw) -> MoCoV3:
    """MoCo v3 on ``trunk`` (or a one-block ViT) in float64; the base branch moved off the momentum one (so the
    EMA shows) and off its zero-initialised residual scales (so every block takes part)."""
    torch.manual_seed(0)
    options = {"norm_layer": norm_layer} if norm_layer else {}
    builder = vit_tiny() if family == "vit" else trunk(**options)
    model = MoCoV3(builder, dim=DIM, mlp_dim=MLP, temperature=T, family=VIT if family == "vit" else RESNET,
                   **kw).double()
    with torch.no_grad():
        for p in [*model.base_encoder.parameters(), *model.projector.parameters()]:
            p.mul_(1.25).add_(0.01)
    return model


def views(n: int = N, seed: int = 1, size: int = SIZE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=torch.float64) for _ in range(2)]


def published_mlp(in_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's ``_build_mlp(2, in_dim, MLP, out_dim, last_bn)``."""
    layers = [nn.Linear(in_dim, MLP, bias=False), nn.BatchNorm1d(MLP), nn.ReLU(inplace=True),
              nn.Linear(MLP, out_dim, bias=False)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out_dim, affine=False)] if last_bn else []))


def published_encoder(state: dict, trunk: str, head: str) -> nn.Module:
    """MoCo_ResNet's encoder: a torchvision ResNet (its forward: layers, avgpool, flatten, fc) whose ``fc``
    is the projector, on :func:`small_resnet`'s layers, with our weights."""
    net = torchvision.models.ResNet.__new__(torchvision.models.ResNet)
    nn.Module.__init__(net)
    for name, layer in small_resnet().named_children():
        net.add_module(name, layer)
    net.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    net.fc = published_mlp(net.layer4[0].bn2.num_features, DIM, last_bn=True)
    net.double()
    weights = {k.removeprefix(f"{trunk}."): v for k, v in state.items() if k.startswith(f"{trunk}.")}
    weights |= {"fc." + k.removeprefix(f"{head}."): v for k, v in state.items() if k.startswith(f"{head}.")}
    net.load_state_dict(weights)  # strict: our layout holds exactly the published parameters
    return net


def published_step(model: MoCoV3, x1, x2, m: float):
    """MoCo_ResNet.forward on the weights of ``model``, momentum update by hand; returns (loss, base net,
    predictor) so that its gradients can be compared."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for momentum, base in (("momentum_encoder", "base_encoder"), ("momentum_projector", "projector")):
        for name, _ in model.get_submodule(momentum).named_parameters():
            state[f"{momentum}.{name}"] = m * state[f"{momentum}.{name}"] + (1 - m) * state[f"{base}.{name}"]
    base = published_encoder(state, "base_encoder", "projector")
    momentum = published_encoder(state, "momentum_encoder", "momentum_projector")
    pred = published_mlp(DIM, DIM, last_bn=False).double()  # double first: loading must not round
    pred.load_state_dict({k.removeprefix("predictor."): v for k, v in state.items() if k.startswith("predictor.")})
    q1, q2 = pred(base(x1)), pred(base(x2))
    with torch.no_grad():
        k1, k2 = momentum(x1), momentum(x2)
    loss = reference_ctr(q1, k2, T, 0) + reference_ctr(q2, k1, T, 0)
    return loss, base, pred


def test_forward_is_the_published_loss_and_gradient():
    model = tiny()
    x1, x2 = views()
    ref_loss, ref_base, ref_pred = published_step(tiny(), x1, x2, m=0.9)
    out = model(x1, x2, m=0.9)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-9, atol=0)
    assert out["loss_ctr"].item() == out["loss"].item() and not out["loss_ctr"].requires_grad
    assert 0.0 <= out["ctr_acc"].item() <= 1.0
    out["loss"].backward()
    ref_loss.backward()
    for name, p in ref_base.named_parameters():
        ours = (model.projector if name.startswith("fc.") else model.base_encoder).get_parameter(
            name.removeprefix("fc.")).grad
        torch.testing.assert_close(ours, p.grad, rtol=1e-7, atol=1e-12, msg=name)
    for name, p in ref_pred.named_parameters():
        torch.testing.assert_close(model.predictor.get_parameter(name).grad, p.grad, rtol=1e-7, atol=1e-12)


def test_gradients_reach_only_the_base_branch():
    model = tiny()
    model(*views(), m=0.99)["loss"].backward()
    for module in (model.momentum_encoder, model.momentum_projector):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    for module in (model.base_encoder, model.projector, model.predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_momentum_starts_as_a_copy_and_moves_by_ema_before_the_keys():
    torch.manual_seed(0)
    fresh = MoCoV3(small(), dim=DIM, mlp_dim=MLP)
    for b, m in zip([*fresh.base_encoder.parameters(), *fresh.projector.parameters()],
                    [*fresh.momentum_encoder.parameters(), *fresh.momentum_projector.parameters()]):
        assert torch.equal(b, m)
    model = tiny()
    base = [p.detach().clone() for p in [*model.base_encoder.parameters(), *model.projector.parameters()]]
    before = [p.clone() for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]]
    model(*views(), m=0.75)
    after = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    for b, m0, m1 in zip(base, before, after):
        torch.testing.assert_close(m1, 0.75 * m0 + 0.25 * b, rtol=1e-12, atol=1e-12)


def test_residual_branches_start_at_zero_as_in_moco_v3():
    torch.manual_seed(0)
    model = MoCoV3(resnet18(), dim=DIM, mlp_dim=MLP)
    blocks = [b for layer in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model.base_encoder, layer)]
    assert blocks and all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for b in blocks)
    assert all(torch.equal(b.bn1.weight, torch.ones_like(b.bn1.weight)) for b in blocks)
    assert torch.equal(model.momentum_encoder.layer1[0].bn2.weight, model.base_encoder.layer1[0].bn2.weight)


def test_fused_views_same_loss_and_statistics():
    torch.manual_seed(0)
    separate = MoCoV3(small(), dim=DIM, mlp_dim=MLP)
    fused = MoCoV3(small(), dim=DIM, mlp_dim=MLP, fused_views=True)
    fused.load_state_dict(separate.state_dict())
    x1, x2 = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE) * 2 + 1
    torch.testing.assert_close(fused(x1, x2, m=0.9)["loss"], separate(x1, x2, m=0.9)["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused.buffers(), separate.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sync_batchnorm_everywhere_keeps_keys_and_the_ema_pairs():
    """MoCo v3 converts the whole model; the converted modules must keep the parameters the EMA updates."""
    model = tiny(fused_views=True)
    keys = list(model.state_dict())
    model.convert_sync_batchnorm()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, SyncNorm) and m.views == 2 for m in norms)
    assert list(model.state_dict()) == keys
    before = model.momentum_projector[1].weight.clone()
    model.update_momentum(0.5)
    torch.testing.assert_close(model.momentum_projector[1].weight, (before + model.projector[1].weight) / 2)


def projector_inputs(model: MoCoV3, x1, x2) -> list[torch.Tensor]:
    """What the (base) projector reads in one forward, a call per view."""
    seen = []
    hook = model.projector.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    model(x1, x2, m=0.9)
    hook.remove()
    return seen


def test_a_vit_feeds_its_class_token_to_the_heads_as_moco_v3():
    """MoCo v3's ViT head reads the class token (timm's ``global_pool='token'``), not the patch average."""
    model = tiny(family="vit")
    x1, x2 = views(size=32)
    seen = projector_inputs(model, x1, x2)
    tokens = [model.base_encoder.forward_tokens(x) for x in (x1, x2)]
    assert tokens[0].shape == (N, 1 + 4, 32)
    for got, t in zip(seen, tokens):
        torch.testing.assert_close(got, t[:, 0], rtol=0, atol=0)
        assert not torch.allclose(got, t[:, 1:].mean(dim=1))


def test_a_resnet_feeds_its_averaged_map_to_the_heads():
    model = tiny()
    x1, x2 = views()
    for got, x in zip(projector_inputs(model, x1, x2), (x1, x2)):
        torch.testing.assert_close(got, model.base_encoder(x).mean(dim=(2, 3)), rtol=0, atol=0)


def test_views_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        tiny()(views()[0], views(n=2)[1], m=0.9)


def test_checkpoint_layout_is_w2ssl_s_and_the_trunk_extracts():
    model = tiny(trunk=resnet18)
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"base_encoder", "projector", "predictor", "momentum_encoder",
                                                "momentum_projector"}
    for ckpt in ({"state_dict": state}, {"state_dict": {f"module.{k}": v for k, v in state.items()}}):
        trunk = extract_trunk(ckpt)
        check_trunk(trunk, "resnet18")
        for key, value in trunk.items():
            assert torch.equal(value, state[f"base_encoder.{key}"]), key
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(extract_trunk({"state_dict": state}), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_probe_and_exports_take_a_mocov3_checkpoint(tmp_path):
    model = tiny(trunk=resnet18).float()
    ckpt = tmp_path / "checkpoint_0000.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": model.state_dict()}, ckpt)
    probe, _ = build_model("resnet18", 5, pretrained=ckpt)
    assert torch.equal(probe.trunk.layer4[1].bn2.weight, model.base_encoder.layer4[1].bn2.weight)
    for target in TARGETS:
        weights, _ = export(ckpt, tmp_path / f"{target}.pth", target, "resnet18")
        assert torch.equal(weights["conv1.weight"], model.base_encoder.conv1.weight)


# --- two processes (gloo) against one --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out_dir: str, family: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny(family=family)
    model.convert_sync_batchnorm()  # w2ssl.dist.syncbn: gloo on the CPU runs it
    x1, x2 = views(2 * N, size=SIZES[family])
    half = slice(rank * N, (rank + 1) * N)
    out = model(x1[half], x2[half], m=0.9)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():  # what DDP does
        dist.all_reduce(g)
        g /= world
    losses = [torch.zeros_like(out["loss"]) for _ in range(world)]
    dist.all_gather(losses, out["loss"].detach())
    torch.save({"losses": losses, "grads": grads, "momentum": model.momentum_encoder.state_dict(),
                "buffers": dict(model.named_buffers())}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


SIZES = {"resnet": SIZE, "vit": 32}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_two_processes_equal_one(tmp_path, family):
    """Two gloo processes, every BatchNorm (trunk and heads) synchronised, give the loss, gradients, running
    statistics and momentum weights of one process with the whole batch and plain BatchNorm."""
    model = tiny(family=family)
    x1, x2 = views(2 * N, size=SIZES[family])
    ref = model(x1, x2, m=0.9)
    ref["loss"].backward()

    mp.start_processes(worker, args=(2, free_port(), str(tmp_path), family), nprocs=2, start_method="spawn")
    named, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(sum(res["losses"]) / 2, ref["loss"].detach(), rtol=1e-9, atol=0)
        assert res["grads"].keys() == {n for n, p in named.items() if p.grad is not None}
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, named[name].grad, rtol=1e-7, atol=1e-12, msg=name)
        assert res["buffers"].keys() == buffers.keys()
        for name, b in res["buffers"].items():
            torch.testing.assert_close(b, buffers[name], rtol=1e-9, atol=1e-12, msg=name)
        for key, value in res["momentum"].items():
            torch.testing.assert_close(value, model.momentum_encoder.state_dict()[key], msg=key)


# --- the two-crop transform --------------------------------------------------------------------------------


def test_two_crop_size_and_recipe():
    img = Image.new("RGB", (40, 30), (10, 200, 90))
    crops = two_crop(tile_size=8, crop_min=0.3)(img)
    assert len(crops) == 2 and all(c.shape == (3, 16, 16) for c in crops)
    transform = two_crop(8, 0.3)
    for v, blur in ((transform.view1, 1.0), (transform.view2, 0.1)):
        crop, jitter, gray, blur_step = v.transforms[:4]
        assert crop.size == (16, 16) and crop.scale == (0.3, 1.0)
        assert jitter.p == 0.8 and gray.p == 0.2 and blur_step.p == blur


def test_only_the_second_view_solarizes_one_time_in_five():
    """A flat grey of 230 stays >= 138 through the colour jitter (and blur, crop, flip keep it flat), so a
    pixel below 128 means the view was solarized."""
    transform = two_crop(tile_size=2)
    img = Image.new("RGB", (8, 8), (230, 230, 230))
    random.seed(0)
    torch.manual_seed(0)
    counts = [0, 0]
    for _ in range(400):
        for i, crop in enumerate(transform(img)):
            pixel = crop[0, 0, 0].item() * STD[0] + MEAN[0]
            counts[i] += pixel < 128 / 255
    assert counts[0] == 0 and 50 <= counts[1] <= 110, counts
