"""LARS (as in MoCo v3), AdamW, and setting a step's lr and weight decay on the parameter groups (METHOD §6)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios for parameters with ``ndim > 1``.

    For those: ``u = g + wd·p``, then ``u ← u·η‖p‖/‖u‖`` when both norms are > 0. 1-D parameters
    (BN, biases) get plain ``u = g``. Then ``μ ← momentum·μ + u``, ``p ← p − lr·μ``. ``p.grad`` is left as
    it is: ``u`` lives in a scratch buffer (one flat tensor per parameter group, a view of it per
    parameter, laid out like the parameter). Free of host syncs, and on GPUs a fixed handful of fused
    kernels whatever the number of parameters: the per-parameter scale (a device tensor) is applied to
    the flat buffer in one multiply, since ``_foreach_mul_`` with a list of 0-d tensors launches one kernel
    per tensor. The momentum update is one lerp, ``μ + (1 − momentum)·(u/(1 − momentum) − μ)``, the
    scale ``1/(1 − momentum)`` riding on that multiply.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1); got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)
        self._scratch: dict[int, Scratch] = {}  # per group; not optimizer state (never checkpointed)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            scratch = self._scratch.get(index)
            if scratch is None or not scratch.holds(params):
                scratch = self._scratch[index] = Scratch(params)
            matrices = scratch.matrices
            weight = 1.0 - group["momentum"]
            fused = params[0].device.type != "cpu"
            write_updates(scratch.views, [p.grad for p in params], params, matrices, group["weight_decay"], fused)
            scale = torch.full((len(params),), 1.0 / weight, device=params[0].device)
            if matrices:
                p_norm, u_norm = norms([params[i] for i in matrices]), norms([scratch.views[i] for i in matrices])
                ok = (p_norm > 0) & (u_norm > 0)
                trust = torch.where(ok, group["trust_coefficient"] * p_norm / u_norm.clamp_min(1e-30),
                                    torch.ones_like(p_norm))
                scale.index_copy_(0, scratch.matrix_index, trust / weight)
            scratch.scale_(scale)
            bufs = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                bufs.append(state["mu"])
            torch._foreach_lerp_(bufs, scratch.views, weight)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


class Scratch:
    """One flat buffer of rows of ``ROW`` elements; parameter ``i`` gets a view (its shape and strides)
    starting on a row of its own, so that a per-parameter scale is one row-wise multiply."""

    ROW = 1024

    def __init__(self, params: list[Tensor]):
        if len({(p.device, p.dtype) for p in params}) > 1:
            raise ValueError("LARS needs one device and dtype per parameter group")
        device = params[0].device
        rows = [-(-p.numel() // self.ROW) for p in params]
        self.params = params
        self.matrices = [i for i, p in enumerate(params) if p.ndim > 1]
        # Index tensors on the device once: built from host lists at every step they would be copied over.
        self.matrix_index = torch.tensor(self.matrices, dtype=torch.long).to(device)
        self.owner = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(rows)).to(device)
        self.flat = params[0].new_zeros(sum(rows), self.ROW)
        starts = torch.tensor([0, *rows]).cumsum(0)[:-1].tolist()
        self.views = [self.flat[s:s + r].view(-1)[:p.numel()].as_strided(p.shape, _dense_strides(p))
                      for p, s, r in zip(params, starts, rows)]

    def holds(self, params: list[Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def scale_(self, scale: Tensor) -> None:
        """Multiply view ``i`` by ``scale[i]`` (``[len(params)]``, on the device): one gather, one multiply."""
        self.flat.mul_(scale.to(self.flat.dtype)[self.owner].unsqueeze(1))


def _dense_strides(p: Tensor) -> tuple[int, ...]:
    """``p``'s strides when it is dense (contiguous, channels_last...), so that foreach ops with it stay
    fused; else contiguous strides."""
    spans = sorted((s, n) for s, n in zip(p.stride(), p.shape) if n > 1)
    expected = 1
    for stride, size in spans:
        if stride != expected:
            return torch.empty(p.shape, device="meta").stride()
        expected *= size
    return p.stride()


def write_updates(out: list[Tensor], grads: list[Tensor], params: list[Tensor], matrices: list[int],
                  weight_decay: float, fused: bool) -> None:
    """``out[i] = grads[i] + weight_decay·params[i]`` for ``i`` in ``matrices``, ``out[i] = grads[i]`` for the rest.

    ``fused``: two multi-tensor kernels (copy, then add); else one ``add(out=)`` per tensor, one pass less
    (CPUs have no multi-tensor kernels: foreach ops loop over the tensors anyway).
    """
    if fused:
        torch._foreach_copy_(out, grads)
        if matrices:
            torch._foreach_add_([out[i] for i in matrices], [params[i] for i in matrices], alpha=weight_decay)
        return
    is_matrix = set(matrices)
    for i, (o, g, p) in enumerate(zip(out, grads, params)):
        if i in is_matrix:
            torch.add(g, p, alpha=weight_decay, out=o)
        else:
            o.copy_(g)


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


def build_optimizer(name: str, model: nn.Module | list[dict], lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    """``lars`` or ``adamw`` over the trainable parameters of ``model``, or over parameter ``groups`` (dicts
    with ``params`` and optionally their own ``weight_decay``, ``lr_scale``, ``wd_scale``)."""
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else model
    if name == "lars":
        return LARS(params, lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use lars or adamw")


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr × batch / 256``."""
    return base_lr * batch_size / 256


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` on every parameter group, times the group's ``lr_scale`` where it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """``weight_decay`` on every parameter group, times the group's ``wd_scale`` where it has one (0: no decay)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
