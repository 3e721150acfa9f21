"""The linear-probe network: frozen registered trunk, its read-out, a fresh ``fc``; the moved-weights check."""
from pathlib import Path

import pytest
import torch
import torchvision

from w2ssl.checkpoint import save_atomic
from w2ssl.errors import UserError
from w2ssl.eval.probe_model import Probe, build_model, changed_weights, trunk_state
from w2ssl.trunks import build_trunk


def test_changed_weights():
    ref = {"a": torch.zeros(2), "b": torch.ones(1)}
    assert changed_weights({"a": torch.zeros(2), "b": torch.ones(1), "fc.weight": torch.ones(1)}, ref) == []
    assert changed_weights({"a": torch.tensor([0.0, 1e-7]), "b": torch.ones(1)}, ref) == ["a"]
    assert changed_weights({"a": torch.zeros(2)}, ref) == ["b"]


def test_random_model_is_frozen_but_fc_and_its_trunk_state_has_no_fc():
    torch.manual_seed(0)
    model, reference = build_model("resnet18", 5)
    assert reference is None and not model.training
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    state = trunk_state(model)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
    assert not changed_weights(model.state_dict(), state)
    with torch.no_grad():
        model.trunk.layer1[0].bn1.running_mean.add_(1.0)
    assert changed_weights(model.state_dict(), state) == ["layer1.0.bn1.running_mean"]


def test_a_resnet_probe_is_torchvisions_resnet_key_for_key_and_logit_for_logit():
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 5)
    reference = torchvision.models.resnet18(num_classes=5).eval()
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    model.load_state_dict(reference.state_dict())  # torchvision -> probe
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        probe = torchvision.models.resnet18(num_classes=5).eval()
        probe.load_state_dict(model.state_dict())  # probe -> torchvision (users load probe checkpoints there)
        torch.testing.assert_close(probe(x), reference(x))


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A fake pre-training checkpoint of a real vit_small trunk, and the trunk's state; read-only."""
    path = tmp_path_factory.mktemp("vit") / "vit.pth.tar"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trunk = build_trunk("vit_small").state_dict()
    save_atomic({"epoch": 1, "arch": "vit_small", "state_dict": {f"base_encoder.{k}": v for k, v in trunk.items()}},
                path)
    return path, trunk


@pytest.mark.parametrize("feature", ["avg", "cls"])
def test_a_vit_probe_reads_the_patch_token_average_or_the_class_token(vit_checkpoint, feature):
    path, trunk = vit_checkpoint
    torch.manual_seed(1)
    model, reference = build_model("vit_small", 3, path, vit_feature=feature)
    assert isinstance(model, Probe) and not changed_weights(model.state_dict(), trunk)
    assert list(model.state_dict()) == [*trunk, "fc.weight", "fc.bias"]  # timm names, then the linear head
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.trunk.forward_tokens(x)  # [2, 1 + 2·2, 384]
        feature_ref = tokens[:, 1:].mean(dim=1) if feature == "avg" else tokens[:, 0]
        torch.testing.assert_close(model(x), feature_ref @ model.fc.weight.T + model.fc.bias)


def test_a_probe_of_another_arch_names_the_checkpoints_own(vit_checkpoint):
    with pytest.raises(UserError, match="--pretrained .*trunk is a vit_small but --arch resnet18 was given"):
        build_model("resnet18", 3, vit_checkpoint[0])
