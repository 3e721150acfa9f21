"""Fine-tuning loop pieces for torchvision detectors: lr schedule, optimizer, one step, checkpoints.

The recipe is detectron2's: SGD with momentum, linear warm-up, step decay by 10x, no weight decay on
normalisation layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from w2ssl.checkpoint import load, save_atomic
from w2ssl.engine.step import TrainStep
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


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """Targets with their tensors on ``device`` (``image_id`` stays a plain int)."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
            for t in targets]


def finite_total(losses: dict[str, Tensor]) -> Tensor:
    """The sum of a detector's losses; ``FloatingPointError`` naming each one when it is not finite."""
    total = sum(losses.values())
    if not torch.isfinite(total):
        values = {k: float(v.detach()) for k, v in losses.items()}
        raise FloatingPointError(f"non-finite loss {values}: lower --lr or raise --warmup-iters")
    return total


def train_step(model: nn.Module, step: TrainStep, images: list[Tensor], targets: list[dict],
               lr: float | None = None) -> dict[str, float]:
    """One step of ``step``'s optimizer on a batch (at ``lr`` if given); returns each loss and their ``total``.

    ``images``/``targets`` already sit on the model's device. Raises ``FloatingPointError`` on a
    non-finite total loss, before any weight changes.
    """
    model.train()
    losses = step(lambda: model(images, targets), lr, finite_total)
    values = {k: float(v.detach()) for k, v in losses.items()}
    return {**values, "total": float(sum(losses.values()).detach())}


def newest(out_dir: Path) -> Path | None:
    """The most recently written of ``OUT/detector_final.pth`` and ``OUT/detector_last.pth``, if any."""
    saved = [p for p in (out_dir / FINAL, out_dir / LAST) if p.is_file()]
    return max(saved, key=lambda p: p.stat().st_mtime_ns) if saved else None


def save(path: Path, model: nn.Module, step: TrainStep, it: int, args: dict) -> None:
    """Detector weights, optimizer and scaler state after ``it`` iterations, written atomically."""
    save_atomic({"model": model.state_dict(), "optimizer": step.optimizer.state_dict(),
                 "scaler": step.scaler.state_dict(), "iter": it, "args": args}, path)


def resume(path: Path, model: nn.Module, step: TrainStep | None, trust: bool = False) -> int:
    """Restore a :func:`save` file into ``model`` (and ``step``'s optimizer and scaler); returns its iteration."""
    state = load(path, trust)
    if not isinstance(state.get("model"), dict) or "iter" not in state:
        raise UserError(f"{path} is not a detector checkpoint written by finetune_torchvision.py")
    try:
        model.load_state_dict(state["model"])
        if step is not None:
            step.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} does not fit this run ({str(e).strip().splitlines()[0]}): use the same --model, "
                        "--arch, --trainable-layers and dataset as the run that wrote it") from e
    if step is not None and state.get("scaler"):  # None or {}: written without loss scaling
        step.scaler.load_state_dict(state["scaler"])
    return int(state["iter"])
