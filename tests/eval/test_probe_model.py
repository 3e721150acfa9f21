"""The linear-probe network: frozen trunk, fresh ``fc``, and the moved-weights check."""
import torch

from w2ssl.eval.probe_model import build_model, changed_weights, trunk_state


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
        model.layer1[0].bn1.running_mean.add_(1.0)
    assert changed_weights(model.state_dict(), state) == ["layer1.0.bn1.running_mean"]
