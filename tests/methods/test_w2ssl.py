import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import random_views, tiny_model
from w2ssl.methods.w2ssl import W2SSL
from w2ssl.trunks import build_trunk
from w2ssl.trunks.resnet import TRUNK_LAYERS
from w2ssl.trunks.vit import VIT


def test_momentum_encoder_starts_as_copy_and_gets_no_grad():
    model = tiny_model()
    for base, mom in zip(model.momentum_pairs.base, model.momentum_pairs.momentum):
        assert torch.equal(base, mom) and not mom.requires_grad


def test_ema_closed_form():
    model = tiny_model()
    start = [mom.clone() for _, mom in zip(model.momentum_pairs.base, model.momentum_pairs.momentum)]
    with torch.no_grad():
        for p in [*model.base_encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    m, k = 0.9, 3
    for _ in range(k):
        model.update_momentum(m)
    for (base, mom), m0 in zip(zip(model.momentum_pairs.base, model.momentum_pairs.momentum), start):
        torch.testing.assert_close(mom, m ** k * m0 + (1 - m ** k) * base)


def test_resnet50_forward_backward_at_tile_32():
    torch.manual_seed(0)
    model = W2SSL(functools.partial(build_trunk, "resnet50"), dim=16, mlp_dim=32)  # the trunk is the point
    view1, view2 = random_views(4, 32)
    out = model(view1, view2, m=0.99, perm=torch.randperm(8))
    assert set(out) == {"loss", "loss_what", "loss_where", "where_acc"}
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].detach(), out["loss_what"] + out["loss_where"])
    out["loss"].backward()
    momentum = {id(p) for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]}
    for name, p in model.named_parameters():
        if id(p) in momentum:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    keys = model.state_dict()
    assert "base_encoder.layer4.2.conv3.weight" in keys and "base_encoder.fc.weight" not in keys


def test_loss_magnitudes_and_weights():
    torch.manual_seed(0)
    model = tiny_model(loss_where_weight=0.5, loss_what_weight=2.0)
    out = model(*random_views(8, 16), m=0.99, perm=torch.randperm(16))
    torch.testing.assert_close(out["loss"].detach(), 0.5 * out["loss_where"] + 2.0 * out["loss_what"])
    # At initialisation the where head is near chance and SupCon near (τ/τ_b)·log(4N−1) per view pair.
    assert abs(out["loss_where"].item() - 0.693) < 0.3
    assert 0.5 < out["loss_what"].item() / (2 * 0.3 / 0.07 * torch.log(torch.tensor(31.0)).item()) < 1.5


def _reference_grid(trunk, montages):
    """METHOD §3 as the authors compute it: the trunk's layers in order, bilinear resize to 8x8, then a
    2x2 average pool: ``[M, 3, 2t, 2t] -> [M, C, 2, 2]``."""
    x = montages
    for name in TRUNK_LAYERS:
        x = getattr(trunk, name)(x)
    return F.adaptive_avg_pool2d(F.interpolate(x, (8, 8), mode="bilinear", align_corners=False), 2)


def _reference_supcon(z, labels, t=0.3, t0=0.07):
    """METHOD §5's SupCon, a loop per anchor and positive."""
    total = z.new_zeros(())
    for i in range(len(z)):
        s = z @ z[i] / t
        log_denom = torch.logsumexp(torch.cat([s[:i], s[i + 1:]]), dim=0)
        pos = [j for j in range(len(z)) if j != i and labels[j] == labels[i]]
        total = total - t0 ** -1 * t * sum(s[j] - log_denom for j in pos) / len(pos)
    return total / len(z)


def reference_losses(model, view1, view2, m, perm):
    """METHOD §2–§5 written out on a copy of ``model``'s modules: the EMA, montages by hand, the
    resize-then-pool read-out, SupCon over ``[p1; k2]`` and ``[p2; k1]`` and the where cross-entropy."""
    model = copy.deepcopy(model)
    n = len(view1[0])
    params = dict(model.named_parameters())
    with torch.no_grad():  # §4: the momentum weights move before they compute anything
        for name, p in params.items():
            for mom, base in (("momentum_encoder.", "base_encoder."), ("momentum_projector.", "projector.")):
                if name.startswith(mom):
                    p.copy_(m * p + (1 - m) * params[base + name.removeprefix(mom)])

    def tile_features(trunk, view):  # §2–§3: row k is the feature of S[k] = T[perm[k]]
        s = torch.cat(view)[perm]
        mm = n // 2
        montages = torch.stack([torch.cat([torch.cat([s[j], s[mm + j]], dim=2),
                                           torch.cat([s[2 * mm + j], s[3 * mm + j]], dim=2)], dim=1)
                                for j in range(mm)])
        grid = _reference_grid(trunk, montages)
        return torch.stack([grid[k % mm, :, k // mm // 2, k // mm % 2] for k in range(2 * n)])

    q1, q2 = tile_features(model.base_encoder, view1), tile_features(model.base_encoder, view2)
    with torch.no_grad():
        f1, f2 = tile_features(model.momentum_encoder, view1), tile_features(model.momentum_encoder, view2)
        k1, k2 = model.momentum_projector(f1), model.momentum_projector(f2)
    p1, p2 = model.predictor(model.projector(q1)), model.predictor(model.projector(q2))
    source, pos = perm % n, (perm >= n).long()
    logits = model.where_head(q1)
    loss_where = -sum(logits[i, pos[i]] - torch.logsumexp(logits[i], dim=0) for i in range(2 * n)) / (2 * n)
    labels = torch.cat([source, source])
    loss_what = (_reference_supcon(F.normalize(torch.cat([p1, k2]), dim=1), labels)
                 + _reference_supcon(F.normalize(torch.cat([p2, k1]), dim=1), labels))
    return {"loss": model.loss_where_weight * loss_where + model.loss_what_weight * loss_what,
            "loss_what": loss_what, "loss_where": loss_where,
            "where_acc": (logits.argmax(dim=1) == pos).double().mean()}


def w2ssl_outputs(model, view1, view2, m, perm):
    """One W2SSL forward (the call the reference is checked against)."""
    return model(view1, view2, m=m, perm=perm)


def test_losses_equal_a_direct_reference_implementation():
    """Tile 32 -> 64 px montages -> 2x2 layer4 maps, so the four grid cells differ; momentum weights
    moved away from the base ones so that the EMA's order matters."""
    torch.manual_seed(0)
    model = tiny_model(loss_where_weight=0.7, loss_what_weight=1.3).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("momentum_"):
                p.add_(0.05 * torch.randn_like(p))
    view1, view2 = random_views(4, 32, dtype=torch.float64)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    ref = reference_losses(model, view1, view2, 0.9, perm)
    out = w2ssl_outputs(model, view1, view2, 0.9, perm)
    for key, value in ref.items():
        torch.testing.assert_close(out[key].detach(), value.detach(), rtol=1e-10, atol=1e-12, msg=key)
    assert 0 < ref["where_acc"] < 1  # a swapped where label would change it


def test_fused_views_equal_a_call_per_view():
    """Both views in one call per encoder and head: same losses, gradients and BatchNorm statistics."""
    torch.manual_seed(0)
    separate = tiny_model().double()
    fused = tiny_model(fused_views=True).double()
    fused.load_state_dict(separate.state_dict())
    view1, view2 = random_views(8, 16, dtype=torch.float64)
    perm = torch.randperm(16)
    outs = [model(view1, view2, m=0.9, perm=perm) for model in (separate, fused)]
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-9, atol=1e-12, msg=key)
    for out in outs:
        out["loss"].backward()
    grads = dict(separate.named_parameters())
    for name, p in fused.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-7, atol=1e-10, msg=name)
    buffers = dict(separate.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-9, atol=1e-12, msg=name)
    assert fused.base_encoder.bn1.num_batches_tracked.item() == 2
    # The momentum encoder's statistics moved too (it runs in training mode, as in MoCo v3).
    stats = fused.momentum_encoder.bn1.running_mean
    assert not torch.equal(stats, torch.zeros_like(stats))


@pytest.mark.parametrize("views, message", [
    (lambda: random_views(3, 16), "odd number"),
    (lambda: ([torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 8, 8)], [torch.zeros(4, 3, 16, 16)] * 2), "same shape"),
    (lambda: ([torch.zeros(4, 3, 16, 16)], [torch.zeros(4, 3, 16, 16)] * 2), "pair"),
])
def test_bad_input_raises_value_error(views, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(*views(), m=0.99, perm=torch.randperm(8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_loss_matches_cpu_and_bf16_channels_last_is_close():
    torch.manual_seed(0)
    model = tiny_model()
    view1, view2 = random_views(8, 32)
    perm = torch.randperm(16)
    ref = model(view1, view2, m=0.99, perm=perm)["loss"].item()
    gpu = tiny_model().cuda()
    gpu.load_state_dict(model.state_dict())
    cuda = [[t.cuda() for t in v] for v in (view1, view2)]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    assert gpu(*cuda, m=0.99, perm=perm.cuda())["loss"].item() == pytest.approx(ref, rel=1e-4)
    gpu.load_state_dict(model.state_dict())
    gpu.to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = gpu(*cuda, m=0.99, perm=perm.cuda())["loss"].item()
    assert fast == pytest.approx(ref, rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_training_step_makes_no_host_sync(fused):
    from w2ssl.engine.optim import LARS

    torch.manual_seed(0)
    model = tiny_model(fused_views=fused).cuda().to(memory_format=torch.channels_last)
    opt = LARS([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-6)
    view1, view2 = [[t.cuda() for t in v] for v in random_views(8, 32)]
    gen = torch.Generator().manual_seed(0)

    def step():
        perm = torch.randperm(16, generator=gen)  # on the host, as the trainer draws it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(view1, view2, m=0.99, perm=perm)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()  # warm-up: cuDNN plans, cached pooling matrices, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_head_flops_formula_of_bench_heads_matches_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from bench.heads import head_flops

    torch.manual_seed(0)
    model, n = tiny_model(), 8
    width = model.base_encoder.num_features
    q1, q2 = [torch.randn(2 * n, width).requires_grad_() for _ in range(2)]
    f1, f2 = [torch.randn(2 * n, width) for _ in range(2)]
    with FlopCounterMode(display=False) as counter:
        model.heads(q1, q2, f1, f2, torch.randperm(2 * n), n)["loss"].backward()
    assert counter.get_total_flops() == head_flops(n, 1, width=width, hidden=32, dim=16)


def test_vit_small_w2ssl_loss_falls_over_a_few_steps():
    """The real vit_small on 64-px montages (tile 32, a 4x4 patch grid, 2x2 grid pooled), MoCo v3's ViT heads."""
    torch.manual_seed(0)
    model = W2SSL(functools.partial(build_trunk, "vit_small"), dim=16, mlp_dim=32, family=VIT)
    assert model.base_encoder.num_features == 384 and len(model.projector) == 8
    view1, view2 = random_views(4, 32)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        out = model(view1, view2, m=0.99, perm=perm)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_the_where_head_learns_a_cue_that_tiles_carry():
    # The where task is learnable when left and right tiles differ (here: a bright left edge on left tiles,
    # a bright right edge on right ones): a broken label, permutation or read-out would keep it at chance.
    torch.manual_seed(0)
    model = tiny_model(loss_what_weight=0.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    accs = []
    for step in range(20):  # the mean of steps 10-19 is 1.0 for torch seeds 0-4 (with other views too)
        (l1, r1), (l2, r2) = random_views(8, 32, seed=step)
        for left, right in ((l1, r1), (l2, r2)):
            left[..., :8] += 3.0
            right[..., -8:] += 3.0
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(step))
        out = model([l1, r1], [l2, r2], m=0.99, perm=perm)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        accs.append(out["where_acc"].item())
    assert sum(accs[:5]) / 5 < 0.8 and sum(accs[-10:]) / 10 > 0.9, accs
