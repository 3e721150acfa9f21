"""Pre-training in one process of a run: build data, model and optimiser, resume, loop, checkpoint.

The method (``--method``, :mod:`w2ssl.methods.registry`) gives the model, the per-sample transform, the
model's inputs from a batch and its console fields; the loop knows no method by name.
"""
from __future__ import annotations

import time
from argparse import Namespace
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor, nn

from w2ssl import checkpoint as ckpt_io
from w2ssl.data.augment import MEAN, STD
from w2ssl.data.datasets import BadImages, seed_everything
from w2ssl.data.gpu_augment import augment_batch
from w2ssl.data.sources import load_subset
from w2ssl.dist import distributed as D
from w2ssl.engine.guard import Guard
from w2ssl.engine.monitor import ETA, EpochProgress, LoaderCheck, Logger, format_duration, report_throughput
from w2ssl.engine.optim import build_optimizer, scaled_lr
from w2ssl.engine.runstate import plain_args, rng_state, set_rng_state, shared_seed
from w2ssl.engine.speed import prepare_model
from w2ssl.engine.step import PRECISIONS, TrainStep, resolve_precision
from w2ssl.errors import UserError
from w2ssl.eval.knn import folder_loaders, format_knn, knn_eval, knn_scalars
from w2ssl.methods.registry import StepKey, build_model, method_spec
from w2ssl.system.disk import DiskPlan, checkpoint_bytes
from w2ssl.system.runlock import run_locked
from w2ssl.train.pretrain_data import pretrain_data
from w2ssl.train.resume_args import reconcile
from w2ssl.trunks import trunk_spec


class Pretrainer:
    """One process's share of a pre-training run."""

    def __init__(self, ctx: D.Context, args: Namespace):
        self.ctx, self.args, self.device = ctx, args, ctx.device
        self.logger = Logger(args.save_dir, ctx.is_main)
        # Found before the data: a resumed run keeps its own seed, which decides its batches and augmentations
        # (the dataset's, the sampler's and the collate's draws; resume_args warns about another --seed).
        self.found = self._find_checkpoint()
        kept = self.found[1].get("seed") if self.found is not None else None
        self.seed = int(kept) if kept is not None else shared_seed(args.seed, self.device)
        seed_everything(self.seed)
        self.precision = resolve_precision(args.precision, self.device)
        self.method = method_spec(args.method)

        data = pretrain_data(ctx, args, self.method, self.seed, self.logger)
        self.dataset, self.sampler, self.loader, self.gpu_crop = data.dataset, data.sampler, data.loader, data.gpu_crop
        self.iters_per_epoch = self.sampler.batches_per_epoch

        self.model = build_model(args).to(self.device)
        if ctx.world_size > 1:  # each process's heads see only its own samples: statistics over all of them
            self.model.convert_sync_batchnorm()
        self.channels_last = self.device.type == "cuda" if args.channels_last is None else args.channels_last
        prepare_model(self.model, self.channels_last, args.compile, self.model.compiled)
        self.lr = scaled_lr(args.lr, args.batch_size)
        self.schedules = self.method.schedules(args, self.lr)
        self.optimizer = build_optimizer(args.optimizer, self.model.param_groups(), self.lr, args.weight_decay,
                                         args.momentum)
        self.train_step = TrainStep(self.optimizer, self.device, self.precision, clip_grad=args.clip_grad)
        self.scaler = self.train_step.scaler
        self.net: nn.Module = self.model
        if ctx.world_size > 1:
            # No device_ids: the inputs are already on the device, and DDP would also move host-side
            # inputs (W2SSL's tile permutation) to the GPU, where they would have to be read back.
            self.net = D.ddp(self.model)
        self.guard = Guard(max_nonfinite=args.max_nonfinite if self.precision == "fp16" else 0)
        self.epoch, self.iteration, self.step = args.start_epoch, 0, args.start_epoch * self.iters_per_epoch
        self.bad_files: set[str] = set()
        # --max-iters (benchmarks): seconds of the newest steps (data wait + step, no checkpoint writes or
        # epoch ends), and the data wait of the newest epochs' first batches after the run's first step.
        self.step_seconds: deque[float] = deque(maxlen=max(args.max_iters // 2, 1))
        self.epoch_start_data: deque[float] = deque(maxlen=16)
        self._knn_loaders: tuple | None = None
        self.loader_check = LoaderCheck(self.logger.warn, args.batch_size, data.workers)

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {"epoch": self.epoch, "iteration": self.iteration, "global_step": self.step,
                "arch": self.args.arch, "method": self.args.method, "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "args": plain_args(self.args),
                "seed": self.seed, "rng": rng_state(), "bad_files": sorted(self.bad_files)}

    def save(self, epoch_end: bool) -> None:
        """Checkpoint on rank 0: ``checkpoint_last`` always, ``checkpoint_%04d`` at an epoch's end."""
        self.guard.flush()  # never write a checkpoint from a non-finite state
        if self.ctx.is_main:
            save_dir = Path(self.args.save_dir)
            state = self.state()
            epoch_file = [save_dir / ckpt_io.epoch_name(self.epoch - 1)] if epoch_end else []
            ckpt_io.save_all(state, [*epoch_file, save_dir / ckpt_io.LAST])
            ckpt_io.prune(save_dir, self.args.keep)
        D.barrier()

    def resume(self) -> None:
        if self.found is None:
            if self.args.resume == "auto":  # said once the run's checks passed: a failed run leaves no log.txt
                self.logger.info(f"=> no checkpoint in {self.args.save_dir}: starting from scratch")
            return
        path, state = self.found
        reconcile(state, self.args, path, self.logger.warn)  # other arguments than the checkpoint's: refused or warned
        ckpt_io.load_into(self.model, state["state_dict"], path, f"this model (--arch {self.args.arch})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state.get("iteration", 0)
        self.step = state.get("global_step", self.epoch * self.iters_per_epoch + self.iteration)
        old_batch = state.get("args", {}).get("batch_size", self.args.batch_size)
        if old_batch != self.args.batch_size:
            self._continue_with_batch(old_batch)
        # Saved after an epoch's last step: the loop then ends that epoch and writes its checkpoint.
        self.iteration = min(self.iteration, self.iters_per_epoch)
        self.bad_files = set(state.get("bad_files", []))
        if "rng" in state:
            set_rng_state(state["rng"])
        self.logger.info(f"=> resumed from {path} at epoch {self.epoch} iteration {self.iteration} "
                         f"(global step {self.step})")

    def _continue_with_batch(self, old_batch: int) -> None:
        """Resuming with another ``--batch-size``: go on from the same number of source images seen in
        the epoch (each epoch's global order does not depend on the batch), rounded down to whole new
        batches, so no image is skipped; the step count and schedule follow the new batch."""
        seen = self.iteration * old_batch
        self.iteration = min(seen // self.args.batch_size, self.iters_per_epoch)
        self.step = self.epoch * self.iters_per_epoch + self.iteration
        self.logger.warn(f"the checkpoint was written with --batch-size {old_batch}, this run has "
                         f"{self.args.batch_size}: epoch {self.epoch} goes on from image {seen} at iteration "
                         f"{self.iteration} of {self.iters_per_epoch} (global step {self.step}) with the new batch")

    def _log_disk_plan(self) -> None:
        """Say what the checkpoints still to come will take, and warn when the disk cannot hold them."""
        per_file = checkpoint_bytes(self.model, self.args.optimizer)
        plan = DiskPlan.of(self.args.save_dir, per_file, self.args.epochs - self.epoch, self.args.keep)
        (self.logger.info if plan.fits else self.logger.warn)(plan.message())

    def _find_checkpoint(self) -> tuple[Path, dict] | None:
        resume = self.args.resume
        if resume in ("", "none"):
            return None
        if resume == "auto":
            return ckpt_io.find_resumable(self.args.save_dir, self.args.trust_checkpoint, warn=self.logger.warn)
        return Path(resume), ckpt_io.load_pretraining(resume, self.args.trust_checkpoint)

    # ----------------------------------------------------------------- training
    def run(self) -> None:
        args = self.args
        self.resume()
        if self.ctx.is_main and not args.max_iters and self.epoch < args.epochs:
            self._log_disk_plan()
        self.logger.info(f"=> {args.method} on {args.arch}, {self.precision}, {self.ctx.world_size} process(es) on "
                         f"{self.device.type}, batch {args.batch_size} images, lr {self.lr:.4g}, "
                         f"{self.iters_per_epoch} iterations per epoch, seed {self.seed}")
        eta = ETA(args.epochs * self.iters_per_epoch, self.step)
        # One stream of batches for the rest of the run: the workers prefetch across epoch boundaries.
        self.sampler.set_epoch(self.epoch, self.iteration, until=args.epochs)
        batches = iter(self.loader) if self.epoch < args.epochs else iter(())
        try:
            while self.epoch < args.epochs and not self._iteration_budget_spent():
                self._train_epoch(batches, eta)
                if self.iteration < self.iters_per_epoch:
                    break  # --max-iters reached mid-epoch
                self.epoch, self.iteration = self.epoch + 1, 0
                self.save(epoch_end=True)
                self.logger.info(f"=> epoch {self.epoch - 1} done; bad image files so far: {len(self.bad_files)}; "
                                 f"saved {ckpt_io.epoch_name(self.epoch - 1)}")
                if self.guard.stop:  # signalled in the epoch's last step: its checkpoint is written
                    self._stop_on_signal(saved=True)
                if args.knn_every and self.epoch % args.knn_every == 0:
                    self._knn()
            if args.max_iters:
                report_throughput(self.logger, self.step_seconds, self.device, {
                    "iters": self.step, "batch_size": args.batch_size, "device": str(self.device),
                    "gpu_aug": args.gpu_aug, "cpu_aug": args.cpu_aug, "precision": self.precision,
                    "epoch_start_data_s": [round(t, 3) for t in self.epoch_start_data]})
        finally:
            self.logger.close()

    def _iteration_budget_spent(self) -> bool:
        return bool(self.args.max_iters) and self.step >= self.args.max_iters

    def _train_epoch(self, batches: Iterator, eta: ETA) -> None:
        """Steps from ``self.iteration`` to the epoch's end (or the ``--max-iters`` budget)."""
        start = self.iteration
        progress = EpochProgress(self.logger, self.device, self.args.batch_size, self.iters_per_epoch, self.epoch,
                                 self.method.console)
        self.logger.start_bar(self.iters_per_epoch - start, f"epoch {self.epoch}")
        end = time.perf_counter()
        for batch, bad in islice(batches, self.iters_per_epoch - start):
            data_s = time.perf_counter() - end
            first = self.iteration == start
            inputs = self._inputs(batch, bad, first)
            parts, scheduled = self._step(inputs, self.epoch + self.iteration / self.iters_per_epoch)
            self.iteration, self.step = self.iteration + 1, self.step + 1
            self.guard.push(self.epoch, self.iteration - 1, self.step - 1, parts)
            batch_s = time.perf_counter() - end  # checkpoint writes below are not training time
            self._record_time(data_s, batch_s, first)
            self.loader_check.record(data_s, batch_s)
            progress.record(parts, scheduled, data_s, batch_s)
            self._after_step(progress, eta)
            if self._iteration_budget_spent():
                break
            end = time.perf_counter()
        self.guard.flush()
        if self.guard.stop and self.iteration < self.iters_per_epoch:
            self._stop_on_signal()
        self.logger.close_bar()

    def _inputs(self, batch: object, bad: list[str], first: bool) -> dict[str, object]:
        """The model's inputs from a loader batch; notes unreadable files, shows the epoch's first inputs."""
        views, decode_bad = self._views(batch)
        self._note_bad([*bad, *decode_bad])
        if first and self.ctx.is_main and self.method.preview is not None:
            for tag, images in self.method.preview(views, self.epoch).items():
                self.logger.images(self.step, tag, images, MEAN, STD)
            self.logger.flush()
        return self.method.inputs(views, StepKey(self.seed, self.epoch, self.iteration, self.ctx.world_size))

    def _record_time(self, data_s: float, batch_s: float, first: bool) -> None:
        """For ``--max-iters``' throughput report: the newest steps' seconds, and the data wait of each
        epoch's first batch after the run's first step (bounded windows)."""
        if first and self.step_seconds:
            self.epoch_start_data.append(data_s)
        self.step_seconds.append(batch_s)

    def _after_step(self, progress: EpochProgress, eta: ETA) -> None:
        """Between steps: the log line every ``--print-freq``, a stop on an agreed signal, the periodic save."""
        args, mid_epoch = self.args, self.iteration < self.iters_per_epoch
        self.logger.advance_bar()
        if self.iteration % args.print_freq == 0 or not mid_epoch:
            progress.line(self.step, self.iteration, eta.step(self.step), {"bad_files": len(self.bad_files)})
        if self.guard.poll_signal() and mid_epoch:
            self._stop_on_signal()
        if args.save_freq_iters and self.step % args.save_freq_iters == 0 and mid_epoch:
            self.save(epoch_end=False)
            self.logger.info(f"=> saved {ckpt_io.LAST} at epoch {self.epoch} iteration {self.iteration}")

    def _views(self, batch: object) -> tuple[list[Tensor], list[str]]:
        """The method's sample tensors ``[b, 3, s, s]`` on the device, and files that failed to decode."""
        if self.gpu_crop is None:
            return [t.to(self.device, non_blocking=True) for t in batch], []
        return augment_batch(batch, self.gpu_crop, self.seed, self.device)

    def _step(self, inputs: dict[str, object], t: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One optimiser step at fractional epoch ``t`` with the method's schedules; the model's outputs and
        the scheduled values the step ran with (for the monitor)."""
        lr, scheduled = self.schedules.lr(t), self.schedules.inputs(t)
        wd = None if self.schedules.weight_decay is None else self.schedules.weight_decay(t)
        parts = self.train_step(lambda: self.net(**inputs, **scheduled), lr, weight_decay=wd,
                                after_backward=lambda: self.model.after_backward(t))
        return parts, self.schedules.logged(lr, wd, scheduled)

    def _note_bad(self, bad: list[str]) -> None:
        new = [p for joined in bad if joined for p in joined.split("\n")]
        if not new:
            return
        if self.args.strict_data:  # stop every process at the same step (the others may not see it)
            self.guard.fail(UserError(f"unreadable image file {new[0]}: remove or replace it (or drop "
                                      f"--strict-data to skip bad files)"))
            return
        for path in new:
            if path not in self.bad_files:
                self.bad_files.add(path)
                self.logger.warn(f"unreadable image file {path} replaced by another sample "
                                 f"({len(self.bad_files)} bad so far)")

    def _knn(self) -> None:
        """kNN top-1/top-5 of the base trunk on ``--knn-data`` (every process takes part)."""
        if self._knn_loaders is None:
            self._knn_loaders = folder_loaders(self.args.knn_data, self.args.knn_size, 256, min(self.args.workers, 8),
                                               BadImages(self.args.strict_data, self.logger.warn),
                                               subset=load_subset(self.args.subset), cache_dir=self.args.save_dir)
        train, val, classes = self._knn_loaders
        result = knn_eval(self.model.base_encoder, train, val, self.device, classes,
                          channels_last=self.channels_last, autocast_dtype=PRECISIONS[self.precision],
                          readout=trunk_spec(self.args.arch).family.readout())
        self.logger.info(f"=> epoch {self.epoch - 1} {format_knn(result)}")
        self.logger.scalars(self.step, knn_scalars(result), prefix="eval/")

    def _stop_on_signal(self, saved: bool = False) -> None:
        """Every process agreed on a stop signal: save ``checkpoint_last`` (unless just done) and exit 128+signal."""
        if not saved:
            self.save(epoch_end=False)
        raise self.guard.stopped(Path(self.args.save_dir) / ckpt_io.LAST, self.epoch, self.iteration)


def train(ctx: D.Context, args: Namespace) -> None:
    """The worker that :func:`w2ssl.dist.distributed.launch` runs in every process."""
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    # One run per folder: rank 0, the process that writes it, holds its lock before it reads a checkpoint there
    run_locked(ctx.is_main, args.save_dir, lambda: Pretrainer(ctx, args))
    if ctx.is_main:
        print(f"=> finished in {format_duration(time.perf_counter() - start)}", flush=True)
