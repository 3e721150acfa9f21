"""Mixup and CutMix of a batch with soft targets, as MAE's / DeiT's fine-tuning applies them.

The same operation as timm's ``Mixup(mode="batch", prob=1.0, switch_prob=0.5, correct_lam=True)``: each
batch is mixed with itself reversed (sample ``i`` with sample ``B-1-i``), by mixup (``x·λ + x'·(1-λ)``) or,
with probability ``switch_prob`` when both are on, by CutMix (a box of ``x'`` pasted into ``x``, ``λ`` then
the uncovered area); ``λ ~ Beta(α, α)``. The targets are label-smoothed one-hots mixed with the same ``λ``.
timm draws from NumPy's global generator; here every draw comes from a generator the caller seeds per
step, so a resumed or re-run fine-tuning mixes the same batches the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def smoothed_one_hot(target: Tensor, classes: int, smoothing: float) -> Tensor:
    """``[B]`` labels -> ``[B, K]``: ``1 - smoothing + smoothing/K`` at the label, ``smoothing/K`` elsewhere."""
    off = smoothing / classes
    out = torch.full((target.numel(), classes), off, device=target.device)
    return out.scatter_(1, target.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The box ``(top, bottom, left, right)`` CutMix pastes for ``λ``: sides ``√(1-λ)`` of the image's,
    centred on a uniform pixel and clipped to the image (timm's ``rand_bbox``)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


@dataclass(frozen=True)
class Mixer:
    """``mixup_alpha`` / ``cutmix_alpha``: the Beta parameters (0 turns that one off; MAE: 0.8 / 1.0)."""

    mixup_alpha: float
    cutmix_alpha: float
    smoothing: float
    classes: int
    switch_prob: float = 0.5

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, x: Tensor, target: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W]``, ``target [B]`` -> mixed images ``[B, C, H, W]`` (a new tensor) and soft
        targets ``[B, K]`` that sum to 1 per row."""
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        reversed_x = x.flip(0)
        if use_cutmix:
            top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
            mixed = x.clone()
            mixed[..., top:bottom, left:right] = reversed_x[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
        else:
            mixed = x * lam + reversed_x * (1.0 - lam)
        soft = smoothed_one_hot(target, self.classes, self.smoothing)
        return mixed, soft * lam + soft.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: Tensor, soft: Tensor) -> Tensor:
    """``[B, K]`` logits and ``[B, K]`` target distributions -> the mean cross-entropy (a scalar)."""
    return torch.sum(-soft * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
