"""End-to-end fine-tuning of a pre-trained registered trunk with labels: the probe's loop, every weight trained.

The loop, loaders (unreadable images tolerated), labelled subset, validation, best/last checkpoints,
resume and stop signals are :class:`~w2ssl.eval.lincls.LinearProbe`'s; this class trains the whole
:class:`~w2ssl.eval.probe_model.Probe` (trunk in train mode, DDP over all of it) in ``--precision``, with
the trunk family's standard recipe (``Family.finetune_recipe``, the defaults of ``main_finetune.py``):

* ResNets: SimCLR's fine-tuning (Chen et al. 2020, appendix B.5; BYOL's semi-supervised protocol is
  the same optimiser): SGD with Nesterov momentum 0.9, lr 0.05 × batch / 256, no warm-up, no weight
  decay, a cosine decay per iteration; 60 epochs (SimCLR: 60 for 1 % of the labels, 30 for 10 %).
* ViTs: MAE's fine-tuning (He et al. 2022, appendix A.2; DeiT's recipe with BEiT's layer-wise decay):
  AdamW (0.9, 0.999), lr 5e-4 × batch / 256, weight decay 0.05 (none on norms, biases and the class
  token), layer-wise lr decay 0.65 (:mod:`w2ssl.engine.param_groups`), 5 warm-up epochs then cosine
  per iteration, drop path 0.1, label smoothing 0.1; 100 epochs; RandAugment ``rand-m9-mstd0.5-inc1`` and
  random erasing 0.25 (:mod:`w2ssl.data.finetune_augment`), mixup 0.8 / CutMix 1.0 (:mod:`w2ssl.eval.mixup`).
"""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from w2ssl.data.datasets import stream_seed
from w2ssl.data.finetune_augment import finetune_transform
from w2ssl.dist import distributed as D
from w2ssl.engine.guard import Guard
from w2ssl.engine.param_groups import param_groups
from w2ssl.engine.speed import prepare_model, to_memory_format
from w2ssl.engine.step import TrainStep, resolve_precision
from w2ssl.errors import UserError
from w2ssl.eval.lincls import LinearProbe
from w2ssl.eval.mixup import Mixer, soft_cross_entropy
from w2ssl.eval.probe_model import build_model, changed_weights
from w2ssl.schedules import lr_at
from w2ssl.system.runlock import run_locked
from w2ssl.trunks import trunk_spec

# The flags a family's fine-tuning recipe fills when the command line leaves them unset (main_finetune.py).
RECIPE_FLAGS = ("optimizer", "lr", "weight_decay", "epochs", "warmup_epochs", "layer_decay", "drop_path", "smoothing",
                "mixup", "cutmix", "aa", "reprob", "head_init_std")

def apply_recipe(args: Namespace) -> None:
    """Fill the flags left unset (None) with the fine-tuning recipe of ``args.arch``'s family; check the schedule."""
    family = trunk_spec(args.arch).family
    for key, value in family.finetune_recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    missing = [key for key in RECIPE_FLAGS if getattr(args, key) is None]
    if missing:
        raise UserError(f"--arch {args.arch} has no fine-tuning recipe for --{missing[0].replace('_', '-')}: pass it")
    if args.layer_decay != 1.0 and family.layer_depth is None:
        raise UserError(f"--layer-decay {args.layer_decay:g} is layer-wise lr decay over a ViT's blocks; --arch "
                        f"{args.arch} has none: drop --layer-decay")
    if args.drop_path and not family.drop_path:
        raise UserError(f"--drop-path {args.drop_path:g} drops a ViT's residual branches; --arch {args.arch} has "
                        f"none: drop --drop-path")
    if not 0 < args.layer_decay <= 1 or not 0 <= args.drop_path < 1 or not 0 <= args.smoothing < 1:
        raise UserError("--layer-decay must be in (0, 1], --drop-path and --smoothing in [0, 1)")
    if args.mixup < 0 or args.cutmix < 0 or not 0 <= args.reprob <= 1 or args.head_init_std <= 0:
        raise UserError("--mixup and --cutmix must be >= 0 (0 turns them off), --reprob in [0, 1], --head-init-std "
                        "> 0")
    finetune_transform(args.input_size, args.aa, args.reprob)  # an unknown --aa policy fails here, in one line
    if not 0 <= args.warmup_epochs < args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs:g} must be below --epochs {args.epochs}: pass fewer "
                        f"warm-up epochs (the ViT recipe has 5)")


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    """``sgd`` (Nesterov, ``momentum``) or ``adamw`` (betas 0.9, 0.999) over ``groups``, each with its own
    weight decay and ``lr_scale``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr, betas=(0.9, 0.999))


class FineTune(LinearProbe):
    """One process's share of fine-tuning: the probe's loop with a trainable trunk."""

    PROTOCOL, VERB = "finetune", "fine-tuning"

    def __init__(self, ctx: D.Context, args: Namespace):
        super().__init__(ctx, args)
        # fp16's GradScaler skips a step whose loss overflowed: tolerate a few in a row, as pre-training does
        self.guard = Guard(max_nonfinite=args.max_nonfinite if self.precision == "fp16" else 0)

    def _build(self, classes: int) -> None:
        args = self.args
        family = trunk_spec(args.arch).family
        options = {"drop_path_rate": args.drop_path} if family.drop_path else {}
        self.model, self.reference = build_model(args.arch, classes, args.pretrained, args.trust_checkpoint,
                                                 args.vit_feature, args.head_init_std, **options)
        self.model.requires_grad_(True).train().to(self.device)
        prepare_model(self.model, self.channels_last)
        self.net: nn.Module = self.model
        if self.ctx.world_size > 1:  # torchvision's fine-tuning DDP: rank 0's BatchNorm statistics to all
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        depth = None if family.layer_depth is None else family.layer_depth(self.model.trunk)
        self.groups = param_groups(self.model, args.weight_decay, args.layer_decay, depth, prefix="trunk.")
        self.optimizer = build_optimizer(args.optimizer, self.groups, self.lr, args.momentum)
        self.precision = resolve_precision(args.precision, self.device)
        self.train_step = TrainStep(self.optimizer, self.device, self.precision)
        self.mixer = Mixer(args.mixup, args.cutmix, args.smoothing, classes)

    def train_transform(self, size: int) -> Callable:
        return finetune_transform(size, self.args.aa, self.args.reprob)

    def learning_rate(self, i: int, n: int) -> float:
        """Linear warm-up then half-cosine, per iteration (each group times its ``lr_scale``)."""
        return lr_at(self.epoch + i / n, self.lr, self.args.warmup_epochs, self.args.epochs)

    def _train_outputs(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """``[B, 3, H, W]`` images through trunk and ``fc``: ``[B, K]`` logits, the (smoothed) cross-entropy;
        with mixup or CutMix, of the mixed batch against its mixed targets (the draws: this step's, this rank's)."""
        x = x.to(self.device, non_blocking=True)
        if self.mixer.active:
            draw = self.iteration * self.ctx.world_size + self.ctx.rank  # a resumed run mixes the same way
            rng = np.random.default_rng(stream_seed(self.seed, "mixup", self.epoch, draw))
            x, soft = self.mixer(x, target, rng)
        logits = self.net(to_memory_format(x, self.channels_last))
        if self.mixer.active:
            return {"logits": logits, "loss": soft_cross_entropy(logits, soft)}
        return {"logits": logits, "loss": F.cross_entropy(logits.float(), target, label_smoothing=self.args.smoothing)}

    def _train_epoch(self) -> None:
        self.model.train()
        super()._train_epoch()

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        self.model.eval()  # BatchNorm running statistics, no drop path
        return super().validate()

    def _state(self) -> dict:
        return {**super()._state(), "scaler": self.train_step.scaler.state_dict()}

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        if "scaler" in state:
            self.train_step.scaler.load_state_dict(state["scaler"])

    def _check_reference(self, path: Path | None) -> None:
        """Fine-tuning moves the trunk: only some weights must be given (``--pretrained`` or ``--resume``)."""
        if self.reference is None and path is None:
            super()._check_reference(path)  # the no-weights error

    def sanity_check(self) -> None:
        """Log how many trunk tensors moved from the pre-trained ones (all trainable ones should)."""
        if self.reference is not None:
            moved = changed_weights(self.model.state_dict(), self.reference)
            self.logger.info(f"=> {len(moved)} of the {len(self.reference)} trunk tensors moved from the "
                             f"pre-trained ones")

    def summary(self) -> str:
        args = self.args
        decay = f", layer decay {args.layer_decay:g}" if args.layer_decay != 1.0 else ""
        return (f"=> fine-tuning: {args.arch}, {self.model.fc.out_features} classes, {self.ctx.world_size} "
                f"process(es) on {self.device.type}, {self.precision}, batch {args.batch_size}, {args.optimizer} lr "
                f"{self.lr:.4g} (base {args.lr:g} x {args.batch_size}/256){decay}, weight decay "
                f"{args.weight_decay:g}, warm-up {args.warmup_epochs:g} of {args.epochs} epochs, drop path "
                f"{args.drop_path:g}, smoothing {args.smoothing:g}, mixup {args.mixup:g}, cutmix {args.cutmix:g}, "
                f"RandAugment {args.aa}, erasing {args.reprob:g}, head init N(0, {args.head_init_std:g}), input "
                f"{args.input_size}, seed {self.seed}")


def worker(ctx: D.Context, args: Namespace) -> None:
    """What :func:`w2ssl.dist.distributed.launch` runs in every process of ``main_finetune.py``."""
    torch.backends.cudnn.benchmark = True
    run_locked(ctx.is_main, args.save_dir, lambda: FineTune(ctx, args))
