"""Fine-tune torchvision's Faster / Mask R-CNN (ResNet-FPN) from a pre-training checkpoint, no detectron2.

One process:   python -m transfer.finetune_torchvision --checkpoint CKPT --train-json TRAIN.json
                   --train-images TRAIN_DIR --val-json VAL.json --val-images VAL_DIR --output-dir OUT
Several GPUs:  torchrun --nproc_per_node 8 -m transfer.finetune_torchvision ...

Reports COCO box AP (and mask AP for ``--model mask``) with pycocotools; writes ``detector_last.pth``
every ``--ckpt-period`` iterations, then ``detector_final.pth`` and ``metrics.json``, into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from transfer import engine
from transfer.coco_data import CocoDetection, eval_loader, train_loader
from transfer.coco_eval import evaluate, predict
from transfer.detector import MODELS, NORMS, build_detector
from w2ssl import cli
from w2ssl.cli import add_precision, add_trust_checkpoint
from w2ssl.data.datasets import BadImages
from w2ssl.dist.distributed import init_torchrun, is_dist, is_main, rank, world_size
from w2ssl.engine.monitor import ETA
from w2ssl.engine.step import PRECISIONS, TrainStep
from w2ssl.errors import TrainingStopped, UserError
from w2ssl.trunk_weights import read_trunk
from w2ssl.trunks import trunk_names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune a torchvision detector from a pre-training checkpoint.")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="pre-training checkpoint: ours, the authors' W2SSL or MoCo v3 (also needed with --eval-only)")
    add_trust_checkpoint(g)
    g.add_argument("--arch", default=None, choices=trunk_names("resnet"),
                   help="trunk architecture (default: the checkpoint's own, read from its weights)")
    g.add_argument("--model", default="faster", choices=sorted(MODELS), help="Faster R-CNN or Mask R-CNN")
    g.add_argument("--norm", default="sync", choices=sorted(NORMS),
                   help="backbone BN: fine-tuned and synchronised (sync), per process (bn) or frozen")
    g.add_argument("--trainable-layers", type=int, default=5, choices=range(6),
                   help="trunk stages fine-tuned from the top (5: all, as detectron2's FREEZE_AT 0)")
    g.add_argument("--roi-batch-size", type=int, default=512,
                   help="proposals sampled per image for the box head (detectron2's ROI_HEADS.BATCH_SIZE_PER_IMAGE)")
    g = p.add_argument_group("data (COCO-format instances json + image folder)")
    g.add_argument("--train-json")
    g.add_argument("--train-images")
    g.add_argument("--val-json")
    g.add_argument("--val-images")
    g.add_argument("--min-size", type=int, nargs="+", default=[640, 672, 704, 736, 768, 800],
                   help="training shorter sides, one drawn per batch; evaluation uses the last")
    g.add_argument("--max-size", type=int, default=1333)
    g.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unreadable image instead of skipping it (and counting it)")
    g = p.add_argument_group("schedule (defaults: COCO 1x at a total batch of 16)")
    g.add_argument("--batch-size", type=int, default=2, help="images per process")
    g.add_argument("--lr", type=float, default=0.02, help="for the total batch: scale it linearly with it")
    g.add_argument("--momentum", type=cli.below_one, default=0.9)
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=1e-4)
    g.add_argument("--iters", type=int, default=90000)
    g.add_argument("--steps", type=int, nargs="*", default=[60000, 80000], help="iterations where lr drops 10x")
    g.add_argument("--warmup-iters", type=int, default=1000)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="outputs/finetune_torchvision")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision(g, "autocast dtype on CUDA; fp16 adds loss scaling", default="fp32")
    g.add_argument("--amp", dest="precision", default=argparse.SUPPRESS, choices=tuple(PRECISIONS),
                   type=lambda v: "fp32" if v == "off" else v, metavar="{off,fp16,bf16}",
                   help="the same as --precision (off: fp32)")
    g.add_argument("--print-freq", type=int, default=20)
    g.add_argument("--ckpt-period", type=int, default=5000, help="iterations between detector_last.pth saves")
    g.add_argument("--eval-period", type=int, default=0, help="iterations between evaluations (0: at the end)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest of OUTPUT_DIR/detector_{final,last}.pth if present")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the newest of OUTPUT_DIR/detector_{final,last}.pth")
    g.add_argument("--seed", type=int, default=0)
    return cli.check_values(p, p.parse_args(argv))


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`UserError` for inconsistent options, before anything heavy runs."""
    if not args.eval_only and not (args.train_json and args.train_images):
        raise UserError("training needs --train-json and --train-images (or pass --eval-only)")
    if bool(args.val_json) != bool(args.val_images):
        raise UserError("pass --val-json and --val-images together")
    if args.eval_only and not args.val_json:
        raise UserError("--eval-only needs --val-json and --val-images")
    sizes = (args.iters, args.batch_size, args.roi_batch_size, args.print_freq, args.ckpt_period, args.max_size)
    if min(*sizes, *args.min_size) < 1:
        raise UserError("--iters, --batch-size, --roi-batch-size, --print-freq, --ckpt-period, --min-size, "
                        "--max-size must be positive")
    if args.steps != sorted(set(args.steps)) or any(s < 1 for s in args.steps):
        raise UserError(f"--steps {args.steps} must be increasing positive iterations")
    if args.lr <= 0 or args.warmup_iters < 0 or args.workers < 0 or args.eval_period < 0:
        raise UserError("--lr must be positive; --warmup-iters, --workers, --eval-period not negative")
    for flag in ("checkpoint", "train_json", "val_json"):
        cli.check_file(getattr(args, flag), "--" + flag.replace("_", "-"))
    for flag in ("train_images", "val_images"):
        cli.check_folder(getattr(args, flag), "--" + flag.replace("_", "-"))
    cli.check_folder(args.output_dir, "--output-dir", output=True)
    if args.precision != "fp32" and not args.device.startswith("cuda"):
        raise UserError(f"--precision {args.precision} needs a CUDA --device; use --precision fp32 on {args.device}")


def setup_device(args: argparse.Namespace) -> torch.device:
    """Join torchrun's process group if launched by it; the device this process uses."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible: pass --device cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        cuda = args.device.startswith("cuda")
        if args.norm == "sync" and not cuda:
            raise UserError("--norm sync across processes needs GPUs: use --norm bn or frozen on CPU")
        return init_torchrun(cuda=cuda).device
    return torch.device(args.device)


def log(text: str, out_dir: Path) -> None:
    """Print on the main process and append to ``OUT/log.txt``."""
    if is_main():
        print(text, flush=True)
        with open(out_dir / "log.txt", "a") as f:
            f.write(text + "\n")


def noting(loader: Iterable, bad: BadImages) -> Iterator[tuple[list, list]]:
    """``loader``'s ``(images, targets)``, its unreadable files noted in ``bad``."""
    for images, targets, unreadable in loader:
        bad.note(unreadable)
        yield images, targets


def run_eval(model: nn.Module, val_set: CocoDetection, args: argparse.Namespace, device: torch.device,
             out_dir: Path, bad: BadImages) -> dict[str, float]:
    """Box (and mask) AP over the readable val images, each process predicting its share; main process scores."""
    loader = eval_loader(val_set, args.batch_size, args.workers, rank(), world_size())
    parts = [predict(model, noting(loader, bad), device, val_set.category_of)]
    if is_dist():
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    metrics: dict[str, float] = {}
    if is_main():
        ids = [i for p in parts for i in p[2]]
        kinds = [("bbox", 0)] + ([("segm", 1)] if args.model == "mask" else [])
        for iou_type, k in kinds:
            scores, summary = evaluate(val_set.coco, [r for p in parts for r in p[k]], iou_type, ids)
            seen, size = len(set(ids)), len(val_set)
            over = f"{size} images" if seen == size else f"{seen} of {size} images ({size - seen} unreadable skipped)"
            log(f"{iou_type} AP over {over}:\n{summary.rstrip()}", out_dir)
            metrics.update({f"{iou_type}/{m}": v for m, v in scores.items()})
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def train(model: nn.Module, train_set: CocoDetection, val_set: CocoDetection | None, args: argparse.Namespace,
          device: torch.device, out_dir: Path, bad: BadImages) -> dict[str, float]:
    """Iterations ``start..--iters`` (resuming if asked), checkpoints, evaluations; returns the last metrics."""
    bare = model
    optimizer = engine.build_optimizer(bare, args.lr, args.momentum, args.weight_decay)
    step = TrainStep(optimizer, device, args.precision)
    start, saved = 0, engine.newest(out_dir) if args.resume else None
    if saved is not None:
        start = engine.resume(saved, bare, step, args.trust_checkpoint)
        log(f"resumed from {saved} at iteration {start}", out_dir)
    if is_dist():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = train_loader(train_set, args.batch_size, args.workers, is_dist(), args.seed)
    metrics: dict[str, float] = {}
    it, epoch, tic, last_log, eta = start, 0, time.perf_counter(), start, ETA(args.iters, start)
    while it < args.iters:
        if is_dist():
            loader.sampler.set_epoch(epoch)
        for images, targets, unreadable in loader:
            if it >= args.iters:
                break
            bad.note(unreadable)
            lr = engine.lr_at(it, args.lr, args.steps, args.warmup_iters)
            try:
                losses = engine.train_step(model, step, [i.to(device, non_blocking=True) for i in images],
                                           engine.to_device(targets, device), lr)
            except FloatingPointError as e:
                raise TrainingStopped(f"iteration {it + 1}: {e}, then --resume (stopped without saving: the newest "
                                      f"checkpoint in {out_dir} is unchanged)", code=3) from None
            it += 1
            if it % args.print_freq == 0 or it == args.iters:
                pace = (time.perf_counter() - tic) / (it - last_log)
                tic, last_log = time.perf_counter(), it
                parts = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
                log(f"iter {it}/{args.iters}  lr {optimizer.param_groups[0]['lr']:.6f}  {parts}  "
                    f"{pace:.3f} s/it  eta {eta.step(it)}", out_dir)
            if is_main() and it % args.ckpt_period == 0 and it < args.iters:
                engine.save(out_dir / engine.LAST, bare, step, it, vars(args))
            if val_set is not None and args.eval_period and it % args.eval_period == 0 and it < args.iters:
                metrics = run_eval(bare, val_set, args, device, out_dir, bad)
        epoch += 1
    if is_main():
        engine.save(out_dir / engine.FINAL, bare, step, it, vars(args))
    if val_set is not None:
        metrics = run_eval(bare, val_set, args, device, out_dir, bad)
    return metrics


def run(args: argparse.Namespace) -> dict[str, float]:
    """Everything after parsing: returns the last evaluation's metrics (empty without a val set)."""
    check_args(args)
    device = setup_device(args)
    torch.manual_seed(args.seed + rank())
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = args.model == "mask"
    train_set = None if args.eval_only else CocoDetection(args.train_json, args.train_images, train=True, masks=masks)
    val_set = CocoDetection(args.val_json, args.val_images, train=False, masks=masks) if args.val_json else None
    if train_set is not None and val_set is not None and train_set.label_of != val_set.label_of:
        raise UserError("--train-json and --val-json list different category ids: use one label set")
    num_classes = (train_set if train_set is not None else val_set).num_classes
    trunk, args.arch = read_trunk(args.checkpoint, args.arch, args.trust_checkpoint, family="resnet")
    model = build_detector(trunk, num_classes, model=args.model, arch=args.arch, norm=args.norm,
                           trainable_layers=args.trainable_layers, min_size=tuple(args.min_size),
                           max_size=args.max_size, box_batch_size_per_image=args.roi_batch_size).to(device)
    loaded = sum(not k.endswith("num_batches_tracked") for k in trunk)
    log(f"{MODELS[args.model].__name__}, {args.arch}-FPN backbone: all {loaded} trunk tensors of "
        f"{args.checkpoint} loaded and verified; {num_classes - 1} classes", out_dir)
    bad = BadImages(args.strict_data, (lambda line: log(f"WARNING: {line}", out_dir)) if is_main() else None)
    if train_set is not None:
        return train(model, train_set, val_set, args, device, out_dir, bad)
    saved = engine.newest(out_dir)
    if saved is None:
        raise UserError(f"--eval-only found neither {engine.FINAL} nor {engine.LAST} in {out_dir}")
    engine.resume(saved, model, None, args.trust_checkpoint)
    return run_eval(model, val_set, args, device, out_dir, bad)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # only the process that hit it stops here: each one says so
        print(f"error: {e}", file=sys.stderr)
        return e.code
    finally:
        if is_dist():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
