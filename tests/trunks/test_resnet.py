import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

import w2ssl.trunks.resnet
from tests.helpers import random_views, tiny_model
from w2ssl.engine.optim import LARS
from w2ssl.methods.gridpool import grid_pool
from w2ssl.trunks.resnet import ResNetTrunk


def reference(fmap: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(F.interpolate(fmap, (8, 8), mode="bilinear", align_corners=False), 2)


@pytest.mark.parametrize("size", [(7, 7), (4, 4), (2, 2), (1, 1), (5, 3), (9, 11), (8, 8), (14, 14)])
def test_grid_pool_equals_resize_then_pool(size):
    fmap = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    out, ref = grid_pool(fmap), reference(fmap)
    assert out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    (g_out,) = torch.autograd.grad((out * w).sum(), fmap)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), fmap)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-12, atol=1e-12)


def test_grid_pool_channels_last_float32():
    fmap = torch.randn(4, 16, 7, 7).to(memory_format=torch.channels_last)
    torch.testing.assert_close(grid_pool(fmap), reference(fmap.contiguous()), rtol=1e-5, atol=1e-6)


def test_grid_pool_compiles_with_its_matrices_from_the_cache():
    fmap = torch.randn(2, 3, 7, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(grid_pool, backend="aot_eager")(fmap)
    assert not [w for w in caught if "lru_cache" in str(w.message)]  # dynamo would trace the builder
    torch.testing.assert_close(out, grid_pool(fmap))


def training_losses(steps: int = 2) -> torch.Tensor:
    """Losses of ``steps`` W2SSL training steps (LARS) from seed 0; tile 48 -> 3x3 layer4 maps."""
    torch.manual_seed(0)
    model = tiny_model()
    view1, view2 = random_views(4, 48)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    optimizer = LARS(model.parameters(), lr=0.5, weight_decay=1e-6)
    losses = []
    for _ in range(steps):
        loss = model(view1, view2, 0.99, perm=perm)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_training_step_same_with_resize_then_pool(monkeypatch):
    separable = training_losses()
    assert separable[0] != separable[1], "the steps must change the weights"
    monkeypatch.setattr(w2ssl.methods.w2ssl, "grid_pool", reference)
    torch.testing.assert_close(training_losses(), separable, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(w2ssl.methods.w2ssl, "grid_pool", lambda f: F.adaptive_avg_pool2d(f, 2))
    with pytest.raises(AssertionError):  # a different pooling changes the loss: the check can see it
        torch.testing.assert_close(training_losses(steps=1), separable[:1], rtol=1e-5, atol=1e-5)


def test_trunk_keys_load_into_torchvision_without_fc():
    trunk = ResNetTrunk("resnet18")
    result = torchvision.models.resnet18().load_state_dict(trunk.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


def test_resnet50_grid_shape():
    trunk = ResNetTrunk("resnet50").eval()
    with torch.no_grad():
        out = grid_pool(trunk(torch.randn(1, 3, 64, 64)))
    assert out.shape == (1, 2048, 2, 2)
    assert trunk.num_features == 2048


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        ResNetTrunk("vgg16")
