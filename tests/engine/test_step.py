"""The one training step and the precision names: hand-computed SGD, loss scaling, defaults per device."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from w2ssl.engine import step as step_mod
from w2ssl.engine.step import PRECISIONS, TrainStep, autocast, check_precision, resolve_precision
from w2ssl.errors import UserError

CPU = torch.device("cpu")
X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]])
Y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])


def linear() -> nn.Linear:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]]))
        model.bias.copy_(torch.tensor([0.1, -0.1]))
    return model


def mse_outputs(model: nn.Module, weight: float = 1.0) -> dict[str, torch.Tensor]:
    out = model(X)
    return {"out": out, "loss": weight * ((out.float() - Y) ** 2).mean()}


def test_fp32_step_is_a_hand_written_sgd_step():
    model = linear()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    outputs = TrainStep(optimizer, CPU, "fp32")(lambda: mse_outputs(model), lr=0.1)
    r = X @ w.T + b - Y  # residuals [2, 2]; loss = mean(r^2) over 4 entries
    assert torch.allclose(outputs["out"], X @ w.T + b)
    assert torch.allclose(model.weight, w - 0.1 * (2 / 4) * r.T @ X)
    assert torch.allclose(model.bias, b - 0.1 * (2 / 4) * r.sum(0))
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_clip_grad_scales_the_gradient_to_the_global_norm_before_the_step():
    model = linear()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    r = X @ w.T + b - Y
    gw, gb = (2 / 4) * r.T @ X, (2 / 4) * r.sum(0)  # the hand gradient of test_fp32_step_...
    norm = torch.cat([gw.flatten(), gb]).norm()
    assert norm > 0.5
    TrainStep(torch.optim.SGD(model.parameters(), lr=1.0), CPU, "fp32", clip_grad=0.5)(lambda: mse_outputs(model), 0.1)
    scale = 0.5 / (norm + 1e-6)  # torch's clip_grad_norm_: max_norm / (total + 1e-6)
    torch.testing.assert_close(model.weight, w - 0.1 * scale * gw)
    torch.testing.assert_close(model.bias, b - 0.1 * scale * gb)


def test_weight_decay_is_set_per_group_and_the_hook_sees_unscaled_gradients():
    """A scheduled weight decay reaches each group times its ``wd_scale``; ``after_backward`` runs after the
    backward on the true (unscaled, fp16) gradients, before the step, and what it cancels does not move."""
    model = linear()
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "wd_scale": 0.0}], lr=0.1)
    step = TrainStep(optimizer, CPU, "fp16")
    seen = []

    def hook() -> None:
        seen.append(model.weight.grad.detach().clone())
        model.bias.grad = None

    b = model.bias.detach().clone()
    step(lambda: mse_outputs(model, 1e-3), weight_decay=0.3, after_backward=hook)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    reference = linear()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = mse_outputs(reference, 1e-3)["loss"]
    loss.backward()
    torch.testing.assert_close(seen[0], reference.weight.grad, rtol=1e-2, atol=1e-6)  # not x 2^16
    assert torch.equal(model.bias, b)


@pytest.mark.parametrize("first", [False, True])
def test_stale_gradients_are_dropped_before_or_after_the_forward(first):
    model = linear()
    model.weight.grad = torch.full_like(model.weight, 100.0)
    seen = []

    def forward() -> dict[str, torch.Tensor]:
        seen.append(model.weight.grad is None)
        return mse_outputs(model)

    reference = linear()
    TrainStep(torch.optim.SGD(reference.parameters(), lr=0.1), CPU, "fp32")(lambda: mse_outputs(reference))
    TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), CPU, "fp32", zero_grad_first=first)(forward)
    assert seen == [first]
    assert torch.equal(model.weight, reference.weight)


def test_a_tensor_output_is_its_own_loss_and_a_failing_loss_changes_nothing():
    model = linear()
    before = model.weight.detach().clone()
    step = TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), CPU, "bf16")
    in_autocast = []

    def refuse(loss: torch.Tensor) -> torch.Tensor:
        in_autocast.append(torch.is_autocast_enabled("cpu"))
        raise FloatingPointError("no")

    with pytest.raises(FloatingPointError):
        step(lambda: model(X).sum(), loss=refuse)
    assert in_autocast == [False] and torch.equal(model.weight, before) and model.weight.grad is None
    loss = step(lambda: model(X).float().sum())
    assert loss.dim() == 0 and not torch.equal(model.weight, before)


def test_fp16_scales_the_loss_skips_an_inf_step_and_halves_the_scale():
    model = linear()
    step = TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), CPU, "fp16")
    assert step.scaler.is_enabled() and step.scaler.get_scale() == 2.0 ** 16
    start = model.weight.detach().clone()
    out = step(lambda: mse_outputs(model, 1e-3))  # small: the scaled fp16 gradients (x 2^16) stay in range
    assert out["out"].dtype == torch.float16  # the linear layer ran under fp16 autocast
    assert not torch.equal(model.weight, start) and step.scaler.get_scale() == 2.0 ** 16
    after_one = model.weight.detach().clone()
    step(lambda: {"loss": model(X).float().sum() * float("inf")})
    assert torch.equal(model.weight, after_one) and step.scaler.get_scale() == 2.0 ** 15


def test_bf16_autocast_on_cpu_runs_without_loss_scaling():
    model = linear()
    step = TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), CPU, "bf16")
    out = step(lambda: mse_outputs(model))
    assert out["out"].dtype == torch.bfloat16 and not step.scaler.is_enabled()
    assert step.scaler.state_dict() == {}  # checkpointed as such: nothing to restore
    assert model.weight.dtype == torch.float32


def test_precision_defaults_per_device(monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_precision(None, CPU) == "fp32"
    monkeypatch.setattr(step_mod.torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision(None, cuda) == "bf16"
    monkeypatch.setattr(step_mod.torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision(None, cuda) == "fp16"
    assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="unknown precision 'fp8': use one of fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)


def test_precision_names_and_autocast():
    assert {name: check_precision(name) for name in PRECISIONS} == {
        "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    with autocast(CPU, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(UserError, match="unknown precision"):
        TrainStep(torch.optim.SGD(linear().parameters(), lr=0.1), CPU, "fp8")
