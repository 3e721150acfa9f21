import torch
from torch import nn

from w2ssl.methods.heads import predictor, projector, where_head


def kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_projector_layout():
    p = projector(2048, 4096, 256)
    assert kinds(p) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert (p[0].in_features, p[0].out_features, p[0].bias) == (2048, 4096, None)
    assert (p[3].in_features, p[3].out_features, p[3].bias) == (4096, 256, None)
    assert p[1].affine and p[1].num_features == 4096
    assert not p[4].affine and p[4].weight is None and p[4].num_features == 256


def test_predictor_layout():
    p = predictor(256, 4096)
    assert kinds(p) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (p[0].in_features, p[0].out_features, p[0].bias) == (256, 4096, None)
    assert (p[3].in_features, p[3].out_features, p[3].bias) == (4096, 256, None)


def test_where_head_and_shapes():
    h = where_head(2048)
    assert h.bias is not None and h.weight.shape == (2, 2048)
    x = torch.randn(6, 32)
    assert projector(32, 64, 16)(x).shape == (6, 16)
    assert predictor(16, 64)(torch.randn(6, 16)).shape == (6, 16)
