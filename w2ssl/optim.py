"""LARS (as in MoCo v3), AdamW, and the per-iteration lr and momentum schedules (SPEC §6)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios for parameters with ``ndim > 1``.

    For those: ``g ← g + wd·p``, then ``g ← g·η‖p‖/‖g‖`` when both norms are > 0. 1-D parameters
    (BN, biases) get plain ``g``. Then ``μ ← momentum·μ + g``, ``p ← p − lr·μ``. Vectorised with
    ``torch._foreach_*`` and free of host syncs. Every pass over the parameters counts (the step is
    memory-bound), so the gradient is updated in place (as GradScaler's unscaling already is) and the
    momentum update is one lerp: ``μ + (1 − momentum)·(g/(1 − momentum) − μ)``, the scale ``1/(1 − momentum)``
    riding on the trust-ratio multiply.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1); got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            weight = 1.0 - group["momentum"]
            matrices = [p for p in params if p.ndim > 1]
            vectors = [p.grad for p in params if p.ndim <= 1]
            if vectors:
                torch._foreach_mul_(vectors, 1.0 / weight)
            if matrices:
                grads = [p.grad for p in matrices]
                torch._foreach_add_(grads, matrices, alpha=group["weight_decay"])
                p_norm, g_norm = norms(matrices), norms(grads)
                ok = (p_norm > 0) & (g_norm > 0)
                trust = torch.where(ok, group["trust_coefficient"] * p_norm / g_norm.clamp_min(1e-30),
                                    torch.ones_like(p_norm))
                torch._foreach_mul_(grads, list((trust / weight).to(grads[0].dtype).unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                bufs.append(state["mu"])
            torch._foreach_lerp_(bufs, [p.grad for p in params], weight)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def norms(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of each tensor: ``[len(tensors)]``.

    On GPUs one fused multi-tensor kernel. On CPUs a BLAS dot product per tensor: 1.7x faster there
    than ``_foreach_norm`` (8 vs 14 ms over ResNet-50 + heads, 35 M weights, 2 cores) and more
    accurate (worst relative error against float64 3e-6 vs 2e-4 on those weights).
    """
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors))
    return torch.stack([torch.dot(t.view(-1), t.view(-1)) if _dot_ready(t) else torch.linalg.vector_norm(t) ** 2
                        for t in tensors]).sqrt()


def _dot_ready(t: Tensor) -> bool:
    """BLAS takes it as it is: contiguous (a channels_last weight is not) and float32/float64."""
    return t.is_contiguous() and t.dtype in (torch.float32, torch.float64)


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    """``lars`` or ``adamw`` over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lars":
        return LARS(params, lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use lars or adamw")


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr × batch / 256``."""
    return base_lr * batch_size / 256


def lr_at(epoch: float, lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0 over ``warmup_epochs``, then half-cosine to 0 at ``epochs``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def momentum_at(epoch: float, epochs: float, base_m: float, cosine: bool) -> float:
    """EMA coefficient: ``1 − ½(1 + cos(π·t/epochs))(1 − base_m)`` with ``cosine``, else ``base_m``."""
    if not cosine:
        return base_m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_m)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
