"""The linear probe (METHOD §7, §11) in one process of a run: frozen registered trunk, trained ``fc``.

MoCo v3's protocol: SGD on ``fc`` only with lr = ``--lr`` × batch / 256 on a per-epoch half-cosine,
the trunk in ``eval()`` mode (BatchNorm statistics frozen), top-1/top-5 on val after every epoch,
the best kept, and a check that no trunk weight moved. ``--cached`` trains on features extracted
once (:mod:`w2ssl.eval.probe_cache`); ``--knn`` runs a weighted kNN evaluation instead.
"""
from __future__ import annotations

import math
import time
from argparse import Namespace
from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from w2ssl import checkpoint as ckpt_io
from w2ssl.data.datasets import (
    BadImages,
    LabelledLoader,
    check_same_classes,
    eval_transform,
    labelled_loader,
    seed_everything,
    train_transform,
)
from w2ssl.data.label_subset import LabelSubset
from w2ssl.data.sources import load_subset
from w2ssl.dist import distributed as D
from w2ssl.engine.guard import Guard
from w2ssl.engine.monitor import ETA, AverageMeter, Logger, format_duration
from w2ssl.engine.optim import scaled_lr
from w2ssl.engine.runstate import plain_args, shared_seed
from w2ssl.engine.speed import prepare_model, to_memory_format
from w2ssl.engine.step import TrainStep, autocast
from w2ssl.errors import UserError
from w2ssl.eval.knn_probe import knn_probe
from w2ssl.eval.metrics import Tally, coverage, evaluate
from w2ssl.eval.probe_cache import FeatureCache
from w2ssl.eval.probe_folder import (
    BEST,
    CHECKPOINT,
    check_resumable,
    describe_record,
    load_probe,
    no_weights_message,
    pretrained_record,
    resume_path,
)
from w2ssl.eval.probe_model import build_model, changed_weights, trunk_state
from w2ssl.schedules import lr_at
from w2ssl.system.runlock import run_locked


class LinearProbe:
    """One process's share of a linear evaluation (full protocol, or ``--cached``).

    Fine-tuning (:class:`w2ssl.eval.finetune.FineTune`) is this loop with another model, optimiser and
    schedule: it overrides :meth:`_build`, :meth:`learning_rate`, :meth:`train_transform`,
    :meth:`_train_outputs` and the checks.
    """

    PROTOCOL = "probe"  # written into checkpoints: a fine-tuning run does not resume a probe, nor the reverse
    VERB = "probing"

    def __init__(self, ctx: D.Context, args: Namespace):
        self.ctx, self.args, self.device = ctx, args, ctx.device
        self.logger = Logger(args.save_dir, ctx.is_main)
        self.seed = shared_seed(args.seed, self.device)
        seed_everything(self.seed)
        self.precision = args.precision or "fp32"  # the published probe runs in float32
        self.local_batch = args.batch_size // ctx.world_size
        self.workers = math.ceil(args.workers / ctx.local_world_size)
        self.root = Path(args.data)
        self.bad = BadImages(args.strict_data, self.logger.warn if ctx.is_main else None)
        self.labels = LabelSubset.from_args(args)  # None: every training label
        self.subset = load_subset(args.subset)
        self.val_loader, classes = self._loader("val", eval_transform(args.input_size), "validation", training=False)
        self.channels_last = self.device.type == "cuda"
        self.lr = scaled_lr(args.lr, args.batch_size)
        self._build(classes)
        self.epoch, self.best_acc1 = args.start_epoch, 0.0
        self.iteration = 0  # batches of epoch ``self.epoch`` done (a run stopped by a signal saves mid-epoch)
        self.guard = Guard(max_nonfinite=0)
        self.train_loader = None
        self.cache: FeatureCache | None = None
        self.record = pretrained_record(args)

    def _build(self, classes: int) -> None:
        """The frozen trunk with a new ``fc`` for ``classes`` classes, its optimiser and step."""
        args = self.args
        self.model, self.reference = build_model(args.arch, classes, args.pretrained, args.trust_checkpoint,
                                                 args.vit_feature)
        self.model.to(self.device)
        prepare_model(self.model, self.channels_last)
        self.fc: nn.Module = self.model.fc
        if self.ctx.world_size > 1:  # only fc trains, so only fc needs gradient averaging
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fc = nn.parallel.DistributedDataParallel(self.model.fc, device_ids=ids)
        self.optimizer = torch.optim.SGD(self.model.fc.parameters(), self.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        self.train_step = TrainStep(self.optimizer, self.device, "fp32")  # fc trains in float32 (features: above)

    def _loader(self, split: str, transform: Callable, what: str, shuffle: bool = False,
                training: bool = True) -> tuple[LabelledLoader, int]:
        """Training loaders replace an unreadable image by another (equal steps on every process) and hold
        only the labelled subset, if any; the validation loader leaves unreadable images out (accuracy is
        over the readable images)."""
        return labelled_loader(self.root / split, transform, self.local_batch, self.workers, shuffle, what,
                               training=training, bad=self.bad, select=self.labels if split == "train" else None,
                               subset=self.subset, cache_dir=self.args.save_dir)

    # ----------------------------------------------------------------- features and data
    @torch.no_grad()
    def trunk_features(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images -> ``[B, C]`` float32 trunk features (:meth:`Probe.features`, no gradient)."""
        images = to_memory_format(images.to(self.device, non_blocking=True), self.channels_last)
        with autocast(self.device, self.precision):
            return self.model.features(images).float()

    def _features(self, x: Tensor) -> Tensor:
        """Images through the trunk, or cached ``[B, C]`` features as float32."""
        return self.trunk_features(x) if self.cache is None else x.to(self.device).float()

    def prepare(self) -> None:
        """The training data: an augmenting loader, or (``--cached``) the features extracted once."""
        if self.args.evaluate:
            return
        size, classes = self.args.input_size, self.val_loader.dataset.classes
        if self.args.cached:
            views = [self._loader("train", eval_transform(size), "training")[0]]
            views += [self._loader("train", train_transform(size), "training")[0] for _ in range(self.args.cached_aug)]
            start = time.perf_counter()
            self.cache = FeatureCache.extract(self.trunk_features, views, self.val_loader, self.model.fc.in_features,
                                              self.device)
            self.logger.info(f"=> cached {self.cache.describe()} in {format_duration(time.perf_counter() - start)}")
            train_classes = views[0].dataset.classes
        else:
            self.train_loader, _ = self._loader("train", self.train_transform(size), "training", shuffle=True)
            train_classes = self.train_loader.dataset.classes
        check_same_classes(train_classes, classes, self.root)
        if self.labels is not None:
            self.labels.record(self.args.save_dir, self.device, self.logger.info)

    def train_transform(self, size: int) -> Callable:
        """The augmentation of the training images: RandomResizedCrop and flip (the probe protocol)."""
        return train_transform(size)

    def _train_batches(self) -> tuple[Iterable[tuple[Tensor, Tensor]], int]:
        """The rest of this epoch's batches (after the ``self.iteration`` done) and the epoch's length."""
        if self.cache is not None:
            batches, n = self.cache.train_batches(self.local_batch, self.seed, self.epoch, self.ctx.rank)
            return islice(batches, self.iteration, None), n  # the same order: skip those done
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        n = len(self.train_loader)
        # Skipping would decode the images done once more: a resumed epoch draws as many as were left.
        return islice(self.train_loader, n - self.iteration), n

    def _train_outputs(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """``fc`` on the features of images (or cached features) ``x``: ``[B, K]`` logits, cross-entropy loss."""
        logits = self.fc(self._features(x))
        return {"logits": logits, "loss": F.cross_entropy(logits, target)}

    def _val_batches(self) -> tuple[Iterable[tuple[Tensor, Tensor]], int]:
        if self.cache is not None:
            return self.cache.val_batches(self.local_batch)
        return self.val_loader, len(self.val_loader)

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        """What a checkpoint holds (and :meth:`_load_state` reads back)."""
        return {"epoch": self.epoch, "iteration": self.iteration, "arch": self.args.arch,
                "state_dict": self.model.state_dict(), "best_acc1": self.best_acc1,
                "optimizer": self.optimizer.state_dict(), "args": plain_args(self.args),
                "pretrained": self.record, "protocol": self.PROTOCOL}

    def save(self, is_best: bool) -> None:
        self.guard.flush()  # never write a checkpoint from a non-finite state
        if self.ctx.is_main:
            save_dir = Path(self.args.save_dir)
            ckpt_io.save_all(self._state(), [save_dir / CHECKPOINT, *([save_dir / BEST] if is_best else [])])
        D.barrier()

    def resume(self) -> None:
        path = resume_path(self.args)
        if path is not None:
            state = load_probe(path, self.args.trust_checkpoint)
            check_resumable(state, self.args, path, self.PROTOCOL)
            self.record = self.record or state.get("pretrained")
            ckpt_io.load_into(self.model, state["state_dict"], path,
                              f"--arch {self.args.arch} with {self.model.fc.out_features} classes")
            self._load_state(state)
            self.logger.info(f"=> resumed from {path} at epoch {self.epoch} iteration {self.iteration} "
                             f"(best Acc@1 {self.best_acc1:.3f})")
        self._check_reference(path)

    def _load_state(self, state: dict) -> None:
        """The optimiser and the position of checkpoint ``state`` (its weights are loaded and checked)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_acc1 = int(state["epoch"]), float(state["best_acc1"])
        self.iteration = int(state.get("iteration", 0))

    def _check_reference(self, path: Path | None) -> None:
        """The trunk the sanity check compares with: the pre-trained one, which a resumed probe must hold."""
        if self.reference is None:
            if path is None:
                raise UserError(no_weights_message(self.args))
            self.reference = trunk_state(self.model)
        elif path is not None and changed_weights(self.model.state_dict(), self.reference):
            raise UserError(f"--resume {path} holds another trunk than --pretrained {self.args.pretrained}: "
                            f"pass the pair from the same run (or drop --pretrained)")

    def sanity_check(self) -> None:
        """Fail loudly if any trunk parameter or BatchNorm statistic moved (a bug, not bad input)."""
        changed = changed_weights(self.model.state_dict(), self.reference)
        if changed:
            raise RuntimeError(f"trunk weights changed during linear evaluation: {changed[:3]}")
        self.logger.info("=> sanity check passed: every trunk weight equals the pre-trained one")

    # ----------------------------------------------------------------- loops
    def run(self) -> None:
        args = self.args
        try:
            self.resume()
            probed = describe_record(self.record)
            self.logger.info(f"=> {self.VERB} {probed}")
            self.logger.text("probe/pretrained", probed)
            self.logger.info(self.summary())
            self.prepare()
            if args.evaluate:
                self.validate()
                return
            if self.epoch >= args.epochs:
                self.logger.info(f"=> the probe in {args.save_dir} already ran its {args.epochs} epochs: nothing to "
                                 f"train (raise --epochs to go on, or -e to evaluate it)")
            first, self.eta = self.epoch, ETA(args.epochs - self.epoch, 0)
            while self.epoch < args.epochs:
                self._train_epoch()
                acc1, acc5 = self.validate()
                self.epoch, self.iteration = self.epoch + 1, 0
                is_best = acc1 > self.best_acc1
                self.best_acc1 = max(acc1, self.best_acc1)
                self.save(is_best)
                self.logger.scalars(self.epoch, {"acc1": acc1, "acc5": acc5, "best_acc1": self.best_acc1},
                                    prefix="eval/")
                self.logger.info(f"=> epoch {self.epoch - 1}: Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}, best Acc@1 "
                                 f"{self.best_acc1:.3f}; saved {CHECKPOINT}; ETA {self.eta.step(self.epoch - first)}")
                if self.epoch - 1 == first and self.epoch < args.epochs:  # MoCo v3's check after the first epoch
                    self.sanity_check()
                if self.epoch < args.epochs:
                    self.guard.check_now(self.device)  # a signal during validation stops here, all saved
                    if self.guard.stop:
                        raise self.guard.stopped(Path(args.save_dir) / CHECKPOINT, self.epoch, 0)
            self.sanity_check()
            self.logger.info(f"=> best Acc@1 {self.best_acc1:.3f}")
        finally:
            self.logger.close()

    def summary(self) -> str:
        """The run's one-line description, logged at its start."""
        args = self.args
        mode = "cached features" if args.cached else "full protocol"
        return (f"=> linear probe ({mode}): {args.arch}, {self.model.fc.out_features} classes, "
                f"{self.ctx.world_size} process(es) on {self.device.type}, {self.precision}, batch "
                f"{args.batch_size}, lr {self.lr:.4g} (base {args.lr:g} x {args.batch_size}/256), "
                f"input {args.input_size}, seed {self.seed}")

    def learning_rate(self, i: int, n: int) -> float:
        """The lr of batch ``i`` of ``n`` in epoch ``self.epoch``: MoCo v3's per-epoch half-cosine, no warm-up."""
        return lr_at(self.epoch, self.lr, 0, self.args.epochs)

    def _train_epoch(self) -> None:
        args, device = self.args, self.device
        batches, n = self._train_batches()
        lr = self.learning_rate(self.iteration, n)
        start = self.iteration
        batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
        tally, end = Tally(device), time.perf_counter()
        for i, (x, target, *_) in enumerate(batches, start=start):
            data_time.update(time.perf_counter() - end)
            target = target.to(device, non_blocking=True)
            lr = self.learning_rate(i, n)
            out = self.train_step(partial(self._train_outputs, x, target), lr)
            logits, loss = out["logits"].detach(), out["loss"].detach()
            self.iteration = i + 1
            self.guard.push(self.epoch, i, self.epoch * n + i, {"loss": loss})
            tally.add(loss * len(target), logits, target)
            batch_time.update(time.perf_counter() - end)
            if i % args.print_freq == 0 and self.ctx.is_main:
                last = tally.last.tolist()
                self.logger.info(f"Epoch: [{self.epoch}][{i:>{len(str(n))}}/{n}]\t{batch_time}\t{data_time}\t"
                                 f"{tally.text()}")
                self.logger.scalars(self.epoch * n + i, {"loss": last[0] / last[3], "acc1": 100 * last[1] / last[3]})
            end = time.perf_counter()
            if self.guard.poll_signal():
                break
        self.guard.flush()
        if self.guard.stop and self.iteration < n:  # stopped mid-epoch: save what this epoch did so far
            self.save(is_best=False)
            raise self.guard.stopped(Path(args.save_dir) / CHECKPOINT, self.epoch, self.iteration)
        self.logger.scalars(self.epoch, {"lr": lr})

    def validate(self) -> tuple[float, float]:
        """Top-1 and top-5 (%) over the readable val images, each counted once over all processes."""
        batches, n = self._val_batches()
        size = len(self.val_loader.dataset)
        info = self.logger.info if self.ctx.is_main else None
        rows, acc1, acc5 = evaluate(lambda x: self.model.fc(self._features(x)), batches, n, self.device, info,
                                    self.args.print_freq)
        if rows == 0:
            raise UserError(f"none of the {size} images of {self.root}/val could be read: check the dataset")
        self.logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} over {coverage(rows, size)}")
        return acc1, acc5


def worker(ctx: D.Context, args: Namespace) -> None:
    """What :func:`w2ssl.dist.distributed.launch` runs in every process of ``main_lincls.py``."""
    torch.backends.cudnn.benchmark = True
    if args.knn:
        knn_probe(ctx, args)  # nothing to save: a signal ends it at once
    else:
        run_locked(ctx.is_main, args.save_dir, lambda: LinearProbe(ctx, args))
