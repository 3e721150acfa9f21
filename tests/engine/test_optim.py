import pytest
import torch

from w2ssl.engine.optim import LARS, Scratch, build_optimizer, norms, scaled_lr, write_updates


def test_linear_scaling():
    assert scaled_lr(0.6, 512) == pytest.approx(1.2)
    assert scaled_lr(0.6, 2048) == pytest.approx(4.8)
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)


def test_lars_one_step_by_hand():
    w = torch.tensor([[3.0, 4.0]], requires_grad=True)    # ‖w‖ = 5
    b = torch.tensor([1.0, -1.0], requires_grad=True)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([w, b], lr=2.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    g = torch.tensor([[0.3, 1.4]])                         # grad + wd * w
    g = g * (0.001 * 5.0 / g.norm())
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 2.0 * g)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0, -1.0]) - 2.0 * torch.tensor([0.5, 0.5]))
    # second step: momentum buffer carries 0.9 x the first update
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    before = b.detach().clone()
    opt.step()
    torch.testing.assert_close(b.detach(), before - 2.0 * (0.9 * 0.5 + 0.5) * torch.ones(2))


def test_norms_match_float64_for_every_layout_and_dtype():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(64, 32, 3, 3, generator=g)
    tensors = [conv, conv.to(memory_format=torch.channels_last), torch.randn(300, 200, generator=g).double(),
               torch.zeros(3, 3), torch.tensor([[3.0, 4.0]])]
    expected = torch.stack([t.double().norm() for t in tensors])
    torch.testing.assert_close(norms(tensors).double(), expected, rtol=1e-6, atol=0)
    assert norms(tensors)[-1].item() == 5.0
    half = torch.randn(50, 40, generator=g).bfloat16()  # not for BLAS: computed in its own precision
    torch.testing.assert_close(norms([half]).double(), half.double().norm().view(1), rtol=1e-2, atol=0)


def test_lars_zero_norms_get_plain_gradient():
    w = torch.zeros(2, 2, requires_grad=True)
    w.grad = torch.ones(2, 2)
    LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0).step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))


def test_build_optimizer_skips_frozen_and_rejects_unknown():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad = False
    opt = build_optimizer("adamw", model, 1e-3, 0.0, 0.9)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups[0]["params"]) == 3
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", model, 1e-3, 0.0, 0.9)


def test_lars_rejects_momentum_of_one():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        LARS([torch.zeros(2, requires_grad=True)], momentum=1.0)


def loop_lars(params, grads, lr, weight_decay, momentum=0.9, eta=0.001):
    """Straightforward per-parameter LARS (METHOD §6), in place on ``params``; ``grads`` one list per step."""
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, g, mu in zip(params, step_grads, bufs):
            if g is None:
                continue
            if p.ndim > 1:
                g = g + weight_decay * p
                p_norm, g_norm = torch.norm(p), torch.norm(g)
                if p_norm > 0 and g_norm > 0:
                    g = g * (eta * p_norm / g_norm)
            mu.mul_(momentum).add_(g)
            p.sub_(lr * mu)


def test_lars_equals_loop_and_leaves_grad_alone():
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (16, 8), (16,), (8,), (4, 4), (5, 2), (3,), (6, 4, 1, 1)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    start[4].zero_()  # ||p|| = 0: trust ratio 1
    grads = []
    for step in range(5):
        g = [torch.randn(s, generator=gen) for s in shapes]
        g[5] = torch.zeros(shapes[5])  # ||g|| = 0 (no weight decay in its group): trust ratio 1
        g[6] = None  # no gradient: untouched
        if step < 2:
            g[7] = None  # the set of parameters with a gradient changes after two steps
        grads.append(g)
    ours = [p.clone() for p in start]
    ours[0] = ours[0].to(memory_format=torch.channels_last)  # its scratch view keeps the layout
    wd, lr = 0.01, 0.5
    opt = LARS([{"params": ours[:5] + ours[7:]}, {"params": ours[5:7], "weight_decay": 0.0}], lr=lr, weight_decay=wd)
    for step_grads in grads:
        for p, g in zip(ours, step_grads):
            p.grad = None if g is None else g.clone().to(memory_format=torch.preserve_format)
        ours[0].grad = ours[0].grad.to(memory_format=torch.channels_last)
        opt.step()
        for p, g in zip(ours, step_grads):
            assert (p.grad is None) if g is None else torch.equal(p.grad, g), "p.grad must stay the gradient"
    loop = [p.clone() for p in start]
    loop_lars(loop[:5] + loop[7:], [g[:5] + g[7:] for g in grads], lr, wd)
    loop_lars(loop[5:7], [g[5:7] for g in grads], lr, 0.0)
    for a, b in zip(ours, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # to rounding: the momentum update is a lerp
    assert not torch.equal(ours[0], start[0]) and torch.equal(ours[6], start[6])
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


def test_scratch_views_keep_each_layout_and_scale_on_their_own():
    params = [torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last), torch.randn(5),
              torch.randn(Scratch.ROW + 1, 2), torch.randn(3, 2).t(), torch.randn(2, 6)[:, ::2]]
    scratch = Scratch(params)
    assert [v.stride() for v in scratch.views[:4]] == [p.stride() for p in params[:4]]  # dense: same layout
    assert scratch.views[4].is_contiguous()  # a strided slice: contiguous instead
    assert scratch.flat.shape == (1 + 1 + 3 + 1 + 1, Scratch.ROW)  # each view starts on a row of its own
    values = [torch.randn(p.shape) for p in params]
    for v, x in zip(scratch.views, values):
        v.copy_(x)
    scales = (2.0, -1.0, 0.5, 3.0, 4.0)
    scratch.scale_(torch.tensor(scales))
    for v, x, s in zip(scratch.views, values, scales):
        torch.testing.assert_close(v, x * s)


@pytest.mark.parametrize("fused", [False, True])
def test_write_updates_adds_weight_decay_to_matrices_only(fused):
    torch.manual_seed(0)
    params = [torch.randn(3, 2, 2, 2).to(memory_format=torch.channels_last), torch.randn(4), torch.randn(5, 3)]
    grads = [torch.randn_like(p) for p in params]
    out = Scratch(params).views
    write_updates(out, grads, params, [0, 2], 0.1, fused)
    for i, expected in enumerate([grads[0] + 0.1 * params[0], grads[1], grads[2] + 0.1 * params[2]]):
        torch.testing.assert_close(out[i], expected)
