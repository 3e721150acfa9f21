"""Per-view BatchNorm: one call on the concatenated views equals one call per view."""
import copy

import pytest
import torch
from torch import nn

from tests.helpers import tiny_model
from w2ssl.dist.viewnorm import PerViewNorm, normalise_per_view, per_view

NORMS = [
    (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    (lambda: nn.BatchNorm1d(6), (5, 6)),
    (lambda: nn.BatchNorm1d(6, affine=False), (5, 6)),
]


def two_views(shape, seed=0):
    """Two float64 batches with clearly different statistics (scale 1 and 3, mean 0 and 2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + 2 * i) + 2 * i for i in range(2)]


def random_affine(norm: nn.Module) -> nn.Module:
    if norm.affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return norm


@pytest.mark.parametrize("make, shape", NORMS)
def test_one_call_equals_a_call_per_view(make, shape):
    torch.manual_seed(0)
    separate = random_affine(make().double())
    fused = normalise_per_view(copy.deepcopy(separate), 2)
    xs = [x.requires_grad_() for x in two_views(shape)]
    x = torch.cat([x.detach() for x in xs]).requires_grad_()
    ys = [separate(v) for v in xs]
    y = fused(x)
    torch.testing.assert_close(y, torch.cat(ys))
    upstream = torch.randn_like(y)
    torch.autograd.backward(ys, list(upstream.chunk(2)))
    y.backward(upstream)
    torch.testing.assert_close(x.grad, torch.cat([v.grad for v in xs]))
    for (name, a), b in zip(fused.named_parameters(), separate.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # Running statistics: updated once per view, in order, exactly as by two calls.
    for (name, a), b in zip(fused.named_buffers(), separate.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    assert fused.num_batches_tracked.item() == 2
    # A plain joint call mixes the views' statistics: the comparison above can tell.
    joint = random_affine(make().double())
    joint.load_state_dict(separate.state_dict())
    assert not torch.allclose(joint(x.detach()), y)


def test_running_statistics_mode_is_one_call():
    separate = random_affine(nn.BatchNorm2d(3).double())
    separate(torch.cat(two_views((4, 3, 5, 5))))  # some running statistics
    fused = normalise_per_view(copy.deepcopy(separate), 2).eval()
    x = torch.cat(two_views((4, 3, 5, 5), seed=1))
    torch.testing.assert_close(fused(x), separate.eval()(x))
    assert fused.num_batches_tracked.item() == 1


def test_names_types_and_undo():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(3)))
    keys = list(model.state_dict())
    normalise_per_view(model, 2)
    assert list(model.state_dict()) == keys
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[1], PerViewNorm) and model[1].views == 2
    assert isinstance(model[2][0], nn.BatchNorm1d) and model[2][0].views == 2
    assert type(model[1]) is type(copy.deepcopy(model)[1])
    x = torch.cat(two_views((2, 3, 4, 4)))
    normalise_per_view(model[1], 1)
    torch.testing.assert_close(model[1](x.float()), nn.BatchNorm2d(3)(x.float()))


def test_bad_views_raise():
    norm = normalise_per_view(nn.BatchNorm1d(4), 2)
    with pytest.raises(ValueError, match="does not split into 2 equal views"):
        norm(torch.randn(5, 4))
    with pytest.raises(ValueError, match="views must be >= 1"):
        normalise_per_view(norm, 0)


def test_per_view_calls_once_when_fused():
    calls = []

    def fn(x):
        calls.append(len(x))
        return x * 2

    xs = [torch.ones(3), torch.zeros(3)]
    for fused, expected in ((False, [3, 3]), (True, [6])):
        calls.clear()
        out = per_view(fn, xs, fused)
        assert calls == expected and len(out) == 2
        torch.testing.assert_close(out[0], 2 * torch.ones(3))
        torch.testing.assert_close(out[1], torch.zeros(3))


def test_sync_batchnorm_conversion_keeps_per_view_statistics():
    from w2ssl.dist.syncbn import SyncNorm

    model = tiny_model(fused_views=True)
    keys = list(model.state_dict())
    model.convert_sync_batchnorm()
    assert list(model.state_dict()) == keys
    for part in (model.base_encoder, model.projector, model.predictor, model.momentum_projector):
        norms = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, SyncNorm) and isinstance(m, PerViewNorm) and m.views == 2 for m in norms)


def test_channels_last_stays_channels_last():
    norm = normalise_per_view(nn.BatchNorm2d(8), 2)
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    y = norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.cat([nn.BatchNorm2d(8)(v) for v in x.chunk(2)]))
