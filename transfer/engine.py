"""Fine-tuning loop pieces for torchvision detectors: lr schedule, optimizer, one step, checkpoints.

The recipe is detectron2's: SGD with momentum, linear warm-up, step decay by 10x, no weight decay on
normalisation layers.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from w2ssl.checkpoint import load, save_atomic
from w2ssl.errors import UserError

LAST = "detector_last.pth"
FINAL = "detector_final.pth"


def lr_at(it: int, base_lr: float, steps: list[int], warmup_iters: int, warmup_factor: float = 0.001) -> float:
    """Learning rate of iteration ``it`` (0-based).

    Warm-up ramps the factor linearly from ``warmup_factor`` at ``it = 0`` to 1 at ``warmup_iters``;
    the rate is divided by 10 at each step that ``it`` has reached.
    """
    decay = 0.1 ** sum(it >= s for s in steps)
    if it >= warmup_iters:
        return base_lr * decay
    alpha = it / warmup_iters
    return base_lr * decay * (warmup_factor * (1 - alpha) + alpha)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into ``[decayed, normalisation layers (no decay)]``."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm_ids], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm_ids], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """Targets with their tensors on ``device`` (``image_id`` stays a plain int)."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
            for t in targets]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: list[Tensor], targets: list[dict],
               scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One SGD step on a batch; returns each loss and their ``total`` as floats.

    ``images``/``targets`` already sit on the model's device. Raises ``FloatingPointError`` on a
    non-finite total loss, before any weight changes.
    """
    model.train()
    device_type = images[0].device.type
    autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with autocast:
        losses = model(images, targets)
    total = sum(losses.values())
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss {values}: lower --lr or raise --warmup-iters")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    return {**values, "total": float(total.detach())}


def newest(out_dir: Path) -> Path | None:
    """The most recently written of ``OUT/detector_final.pth`` and ``OUT/detector_last.pth``, if any."""
    saved = [p for p in (out_dir / FINAL, out_dir / LAST) if p.is_file()]
    return max(saved, key=lambda p: p.stat().st_mtime_ns) if saved else None


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
         it: int, args: dict) -> None:
    """Detector weights, optimizer and scaler state after ``it`` iterations, written atomically."""
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "iter": it, "args": args}, path)


def resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
           scaler: torch.amp.GradScaler | None, trust: bool = False) -> int:
    """Restore a :func:`save` file into ``model`` (and ``optimizer``/``scaler``); returns its iteration."""
    state = load(path, trust)
    if not isinstance(state.get("model"), dict) or "iter" not in state:
        raise UserError(f"{path} is not a detector checkpoint written by finetune_torchvision.py")
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} does not fit this run ({str(e).strip().splitlines()[0]}): use the same --model, "
                        "--arch, --trainable-layers and dataset as the run that wrote it") from e
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iter"])


def eta(seconds_per_iter: float, iters_left: int) -> str:
    """``H:MM:SS`` for ``iters_left`` iterations at the given pace."""
    total = math.ceil(seconds_per_iter * iters_left)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
