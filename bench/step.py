"""Throughput of one full training step: every registered method (W2SSL, MoCo v3, BYOL, ...) vs supervised.

Each method's step is built as the trainer builds it (``w2ssl/train/pretrain.py``): its recipe parsed by
``main_moco.parse`` (``--method NAME -a ARCH``: optimiser, lr, weight decay, heads, a ViT's defaults), the
model from the method registry (``build_model``), the optimiser from ``build_optimizer`` at the scaled lr,
the inputs from the method's own ``inputs`` and the step from :class:`~w2ssl.engine.step.TrainStep`:
forward, backward, optimizer and the momentum update, on random tensors already on the device, shaped as
the method's transform shapes a sample. ``--batch-size`` counts source images: W2SSL gets four tiles of
``--tile-size`` per image (``view1``/``view2`` = [left, right], each ``[b, 3, t, t]``), MoCo v3 and BYOL
two views of ``2*tile`` px per image. MoCo v3, the baseline, runs twice: one encoder call per view as in
its builder (``mocov3``), and with both views in one call (``mocov3_fused``, the trick ``--fused-views``
gives every method), so that W2SSL can be compared with either on equal terms; the other methods follow
``--fused-views``. The supervised row, the physical floor, is one image of ``2*tile`` px through the same
trunk and a linear classifier, cross-entropy: ResNets with SGD (lr 0.1·b/256, wd 1e-4), ViTs on the class
token (no timm head) with the recipe's AdamW.

For ViTs (``-a vit_small``) the table gives the patch tokens per source image and view: ``2·(t/16)²`` for
W2SSL (a ``2t`` montage holds two tiles of each of its two images; 98 at ``t = 112``) against ``(2t/16)²``
for the two-view methods (196), and each sequence is ``1 + (2t/16)²`` tokens long, so attention falls more
than 2x. Prints a table, then one JSON line.
Example (GPU), from the repository root: ``python -m bench.step --precision bf16 --channels-last``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import main_moco
from bench import common
from w2ssl.cli import add_precision, run_main
from w2ssl.engine.optim import build_optimizer, scaled_lr
from w2ssl.engine.speed import prepare_model, to_memory_format
from w2ssl.engine.step import TrainStep, resolve_precision
from w2ssl.errors import UserError
from w2ssl.methods.registry import Method, StepKey, build_model, method_names, method_spec
from w2ssl.trunks import build_trunk, trunk_names, trunk_spec
from w2ssl.trunks.vit import PATCH

REFERENCE = "w2ssl"  # the method every ratio compares
BASELINE = "mocov3"  # the same-trainer baseline: timed with a call per view and with both views fused
SUPERVISED = "supervised"
NAMES = {"w2ssl": "W2SSL", "mocov3": "MoCo v3", "byol": "BYOL"}  # table labels; other methods show their name
CLASSES = 1000


def steps() -> tuple[str, ...]:
    """The rows, in order: every registered method (the baseline twice), then the supervised floor."""
    rows: list[str] = []
    for name in method_names():
        rows += [name, f"{name}_fused"] if name == BASELINE else [name]
    return (*rows, SUPERVISED)


def method_of(row: str, fused_views: bool) -> tuple[str, bool]:
    """The method of a self-supervised row and whether its views are fused (the baseline's rows fix it)."""
    if row == f"{BASELINE}_fused":
        return BASELINE, True
    return row, False if row == BASELINE else fused_views


def is_vit(arch: str) -> bool:
    """Where this tool needs a ViT by name: its supervised row takes MoCo v3's ViT recipe (AdamW), and the table
    counts its patch tokens."""
    return trunk_spec(arch).family.name == "vit"


class Step(NamedTuple):
    """A built step: ``run()`` takes one training step and returns its loss (never read on the host in the
    timed loop); ``info`` says what it is for the table (its optimiser; views per image and their side)."""

    run: Callable[[], Tensor]
    info: dict


class Classifier(nn.Module):
    """The supervised floor: a registered trunk and a linear classifier, ``[B, 3, H, W] -> [B, classes]``, on
    the class token where the trunk has one (ViTs), else on the averaged feature map (as torchvision's)."""

    def __init__(self, arch: str, classes: int = CLASSES):
        super().__init__()
        family = trunk_spec(arch).family
        self.trunk, self.readout = build_trunk(arch), family.readouts.get("cls", family.readout())
        self.fc = nn.Linear(self.trunk.num_features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.readout(self.trunk, x))


def recipe(args: argparse.Namespace, *flags: str) -> argparse.Namespace:
    """main_moco.py's arguments for ``-a ARCH`` at this batch and tile size, with ``flags`` (e.g. ``--method``);
    everything else is its default (the published recipe, MoCo v3's for ViTs)."""
    argv = ["-a", args.arch, "-b", str(args.batch_size), "--tile-size", str(args.tile_size), *flags]
    return main_moco.parse(main_moco.build_parser(), argv)


def sample_shapes(method: Method, recipe_args: argparse.Namespace) -> list[torch.Size]:
    """The shapes of one sample of the method's own transform (its views), from a random image 4x the tile."""
    side = 4 * recipe_args.tile_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    return [view.shape for view in method.transform(recipe_args)(image)]


def tokens(vit: bool, tile: int) -> dict[str, int | None]:
    """ViT patch tokens per source image and view, and the sequence length, of each step (None for ResNets)."""
    grid = 2 * tile // PATCH  # tokens per side of a 2t-px montage or view
    return {"w2ssl_tokens_per_img_view": 2 * (tile // PATCH) ** 2 if vit else None,
            "mocov3_tokens_per_img_view": grid ** 2 if vit else None,
            "seq_len": 1 + grid ** 2 if vit else None}


def build(row: str, args: argparse.Namespace, device: torch.device) -> Step:
    """The training step of ``row`` (one of :func:`steps`) with its model, data and optimizer."""
    b, cl = args.batch_size, args.channels_last
    gen = torch.Generator(device).manual_seed(0)

    def images(shape: tuple[int, ...]) -> Tensor:
        return to_memory_format(torch.randn(b, *shape, device=device, generator=gen), cl)

    if row == SUPERVISED:
        return build_supervised(args, device, images)
    name, fused = method_of(row, args.fused_views)
    r = recipe(args, "--method", name, "--fused-views" if fused else "--no-fused-views")
    model = build_model(r).to(device)  # first: the seed's weights
    prepare_model(model, cl, args.compile, model.compiled)
    method = method_spec(name)
    shapes = sample_shapes(method, r)
    inputs = method.inputs([images(s) for s in shapes], StepKey(seed=0, epoch=0, iteration=0, world=1))
    lr = scaled_lr(r.lr, b)
    optimizer = build_optimizer(r.optimizer, model.param_groups(), lr, r.weight_decay, r.momentum)
    scheduled = method.schedules(r, lr).inputs(0.0)  # the model's scheduled inputs (the EMA's m) at the start
    one_step = TrainStep(optimizer, device, args.precision)  # as pretrain's: old gradients freed after the forward
    info = {"optimizer": type(optimizer).__name__, "views": [len(shapes), shapes[0][-1]]}
    return Step(lambda: one_step(lambda: model(**inputs, **scheduled))["loss"].detach(), info)


def build_supervised(args: argparse.Namespace, device: torch.device,
                     images: Callable[[tuple[int, ...]], Tensor]) -> Step:
    """Cross-entropy on one ``2*tile`` px image per source image; SGD for ResNets, the recipe's AdamW for ViTs."""
    b, size = args.batch_size, 2 * args.tile_size
    model = prepare_model(Classifier(args.arch).to(device), args.channels_last, args.compile)
    if is_vit(args.arch):
        r = recipe(args)
        optimizer = build_optimizer(r.optimizer, model, scaled_lr(r.lr, b), r.weight_decay, r.momentum)
    else:  # torchvision's supervised ResNet recipe
        optimizer = torch.optim.SGD(model.parameters(), lr=scaled_lr(0.1, b), momentum=0.9, weight_decay=1e-4)
    x = images((3, size, size))
    y = torch.randint(0, CLASSES, (b,), device=device, generator=torch.Generator(device).manual_seed(1))
    one_step = TrainStep(optimizer, device, args.precision)
    info = {"optimizer": type(optimizer).__name__, "views": [1, size]}
    return Step(lambda: one_step(lambda: F.cross_entropy(model(x), y)).detach(), info)


def measure(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Per step kind: source images/s, median step ms, its [min, max], peak GiB (GPU) and its ``info``.

    On GPU each kind runs alone, in a clean memory state, so its peak memory is its own. On CPU (no
    memory tracking, often shared with other processes) all kinds are built first and timed in
    interleaved rounds, so that load from elsewhere hits them alike.
    """
    def built(name: str) -> Step:
        torch.manual_seed(0)
        return build(name, args, device)

    if device.type == "cpu":
        built_steps = {n: built(n) for n in names}
        times = common.time_interleaved({n: s.run for n, s in built_steps.items()}, args.iters, args.warmup)
        peaks, info = dict.fromkeys(names), {n: s.info for n, s in built_steps.items()}
    else:
        times, peaks, info = {}, {}, {}
        for n in names:
            gc.collect()
            common.reset_memory(device)
            one = built(n)
            times[n] = common.time_iterations(one.run, args.iters, args.warmup, device)
            peaks[n], info[n] = common.peak_memory_gib(device), one.info
            del one  # its model and optimizer state must not count in the next kind's peak
    medians = {n: common.median(times[n]) for n in names}
    return {n: {"img_s": args.batch_size / medians[n], "step_ms": medians[n] * 1000,
                "step_ms_range": [min(times[n]) * 1000, max(times[n]) * 1000], "peak_gib": peaks[n], **info[n]}
            for n in names}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("-a", "--arch", default="resnet50", choices=trunk_names())
    p.add_argument("--batch-size", type=int, default=256, help="source images per step")
    p.add_argument("--tile-size", type=int, default=112, help="W2SSL tile side; the two-view methods and "
                                                              "supervised get 2x")
    add_precision(p, "autocast dtype; fp16 adds a GradScaler (default: bf16 on GPUs that support it, else fp16 on "
                     "GPU, fp32 on CPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the trunks (supervised: the model)")
    p.add_argument("--fused-views", action=argparse.BooleanOptionalAction, default=False,
                   help="every method but the baseline's two rows: both views in one call per encoder and head "
                        "(main_moco.py --fused-views)")
    p.add_argument("--iters", type=int, default=30, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning, compile)")
    p.add_argument("--only", choices=steps(), action="append", help="run only this step (repeatable)")
    args = p.parse_args(argv)
    if args.tile_size < 1:
        raise UserError(f"--tile-size must be positive; got {args.tile_size}")
    if args.iters < 1 or args.warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0; got {args.iters} and {args.warmup}")
    for row in args.only or steps():
        if row != SUPERVISED:  # each method's own batch check, as main_moco.py's (one process)
            method_spec(method_of(row, args.fused_views)[0]).check_batch(args.batch_size, 1)
    if is_vit(args.arch) and args.tile_size % (PATCH // 2):
        raise UserError(f"-a {args.arch} needs 2 x --tile-size to be a multiple of the patch size {PATCH}: "
                        f"pass a --tile-size that is a multiple of {PATCH // 2} (e.g. 112); got {args.tile_size}")
    return args


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def run(args: argparse.Namespace) -> dict:
    device = common.resolve_device(args.device)
    precision = args.precision = resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = True
    rows = steps()
    names = [n for n in rows if not args.only or n in args.only]
    load_before = os.getloadavg()[0]
    results = measure(names, args, device)
    out = {"device": common.device_name(device), "arch": args.arch, "batch_size": args.batch_size,
           "tile_size": args.tile_size, "precision": precision, "channels_last": args.channels_last,
           "compile": args.compile, "fused_views": args.fused_views, "iters": args.iters, "warmup": args.warmup,
           "steps": list(rows)}
    for n in rows:
        for key in ("img_s", "step_ms", "step_ms_range", "peak_gib", "optimizer", "views"):
            out[f"{n}_{key}"] = results.get(n, {}).get(key)
    for n in rows:
        if n != REFERENCE:
            out[f"ratio_{REFERENCE}_{n}"] = ratio(out[f"{REFERENCE}_img_s"], out[f"{n}_img_s"])
    # Host load (1-minute average, ours included) before and after: flags runs disturbed by other processes.
    out["load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    out.update(tokens(is_vit(args.arch), args.tile_size))
    out.update(common.versions())
    out["timm"] = timm.__version__
    return out


def label(out: dict, row: str, short: bool = False) -> str:
    """A row's name in the table (``short``: in the ratio lines)."""
    if row == SUPERVISED:
        on = ", linear on the class token" if out["seq_len"] is not None else ""
        return "supervised" if short else f"supervised {out['arch']} ({out[f'{row}_optimizer']}{on})"
    name, fused = method_of(row, out["fused_views"])
    calls = "views fused" if fused else "a call per view"
    if short:
        return f"{NAMES.get(name, name)} ({calls})"
    views, side = out[f"{row}_views"]
    return f"{NAMES.get(name, name)} ({views} x {side} px/img, {out[f'{row}_optimizer']}, {calls})"


def report(out: dict) -> str:
    """The human-readable table and ratios (the JSON line follows it)."""
    vit = out["seq_len"] is not None
    ran = [n for n in out["steps"] if out[f"{n}_img_s"] is not None]
    rows = [(label(out, n), out[f"{n}_img_s"], out[f"{n}_step_ms"],
             "{:.0f}-{:.0f}".format(*out[f"{n}_step_ms_range"]), out[f"{n}_peak_gib"],
             *([out["w2ssl_tokens_per_img_view" if n == REFERENCE else "mocov3_tokens_per_img_view"]] if vit else []))
            for n in ran]
    head = (f"{out['device']} | {out['arch']} batch {out['batch_size']} tile {out['tile_size']} | "
            f"{out['precision']}{' channels_last' if out['channels_last'] else ''}"
            f"{' compile' if out['compile'] else ''} | torch {out['torch']} | load {out['load_1m']}")
    columns = ["step", "source img/s", "median step ms", "step ms range", "peak GiB"]
    table = common.markdown_table(columns + (["patch tokens/img/view"] if vit else []), rows)
    lines = [head, table]
    if vit:
        lines.append(f"ViT sequences: {out['seq_len']} tokens (class token + patches) per montage or view")
    for n in ran:
        if n != REFERENCE and out[f"ratio_{REFERENCE}_{n}"] is not None:
            lines.append(f"throughput ratio {NAMES[REFERENCE]} / {label(out, n, short=True)}: "
                         f"{out[f'ratio_{REFERENCE}_{n}']:.2f}")
    return "\n".join(lines)


def benchmark(argv: list[str] | None = None) -> None:
    out = run(parse_args(argv))
    print(report(out))
    print(common.json_line(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line for bad arguments."""
    return run_main(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
