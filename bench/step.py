"""Throughput of one full training step: W2SSL vs MoCo v3 (``w2ssl.methods.mocov3``) vs supervised.

Each step is forward, backward, optimizer and (for the self-supervised ones) the momentum update, on
random tensors already on the device. ``--batch-size`` counts source images: W2SSL gets four tiles
of ``--tile-size`` per image (``view1``/``view2`` = [left, right], each ``[b, 3, t, t]``), MoCo v3 two
views of ``2*tile`` px per image, supervised one image of ``2*tile`` px. MoCo v3 runs twice: one encoder
call per view as in its builder (``mocov3``), and with both views in one call (``mocov3_fused``, the
trick ``--fused-views`` gives both methods), so that W2SSL can be compared with either on equal terms.

Any registered trunk (``--arch``): ResNets train with LARS (supervised: SGD), as MoCo v3's ResNet recipe;
ViTs (``-a vit_small``) with AdamW, the heads of the ViT family, MoCo v3 reading the class token and the
supervised row a linear classifier on the class token (no timm head). For ViTs the table gives the patch
tokens per source image and view: ``2·(t/16)²`` for W2SSL (a ``2t`` montage holds two tiles of each of its
two images; 98 at ``t = 112``) against ``(2t/16)²`` for MoCo v3 (196), and each sequence is ``1 + (2t/16)²``
tokens long, so attention falls more than 2x. Prints a table, then one JSON line.
Example (GPU): ``python -m bench.step --precision bf16 --channels-last``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from functools import partial

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from bench import common
from w2ssl.cli import add_precision, run_main
from w2ssl.engine.optim import LARS
from w2ssl.engine.speed import prepare_model, to_memory_format
from w2ssl.engine.step import TrainStep, resolve_precision
from w2ssl.errors import UserError
from w2ssl.methods.mocov3 import MoCoV3
from w2ssl.methods.w2ssl import W2SSL
from w2ssl.trunks import build_trunk, trunk_names, trunk_spec
from w2ssl.trunks.vit import PATCH

STEPS = ("w2ssl", "mocov3", "mocov3_fused", "supervised")
TRUNKS = ("base_encoder", "momentum_encoder")  # what --compile compiles in the self-supervised models
MOMENTUM = 0.99


def train_step(loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, device: torch.device,
               precision: str) -> Callable[[], Tensor]:
    """One full step as a closure: zero grads, forward under autocast, backward, optimizer (+ scaler).

    Returns the loss tensor (never read on the host in the timed loop).
    """
    one_step = TrainStep(optimizer, device, precision, zero_grad_first=True)
    return lambda: one_step(loss_fn).detach()


class ClassTokenClassifier(nn.Module):
    """Supervised ViT for the benchmark: a linear classifier on the class token, ``[B, 3, H, W] -> [B, k]``."""

    def __init__(self, arch: str, classes: int = 1000):
        super().__init__()
        self.trunk = build_trunk(arch)
        self.fc = nn.Linear(self.trunk.num_features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.trunk.vit_feature(x, "cls"))


def optimizer_for(params, family: str, batch_size: int, supervised: bool) -> torch.optim.Optimizer:
    """MoCo v3's optimisers: LARS (lr 0.6·b/256, wd 1e-6) for ResNets, AdamW (lr 1.5e-4·b/256, wd 0.1) for
    ViTs; supervised ResNets SGD (lr 0.1·b/256, wd 1e-4)."""
    if family == "vit":
        return torch.optim.AdamW(params, lr=1.5e-4 * batch_size / 256, weight_decay=0.1)
    if supervised:
        return torch.optim.SGD(params, lr=0.1 * batch_size / 256, momentum=0.9, weight_decay=1e-4)
    return LARS(params, lr=0.6 * batch_size / 256, weight_decay=1e-6, momentum=0.9)


def tokens(family: str, tile: int) -> dict[str, int | None]:
    """ViT patch tokens per source image and view, and the sequence length, of each step (None for ResNets)."""
    grid = 2 * tile // PATCH  # tokens per side of a 2t-px montage or view
    vit = family == "vit"
    return {"w2ssl_tokens_per_img_view": 2 * (tile // PATCH) ** 2 if vit else None,
            "mocov3_tokens_per_img_view": grid ** 2 if vit else None,
            "seq_len": 1 + grid ** 2 if vit else None}


def build(name: str, args: argparse.Namespace, device: torch.device) -> Callable[[], Tensor]:
    """The training-step closure of ``name`` (one of :data:`STEPS`) with its model, data and optimizer."""
    b, t, cl = args.batch_size, args.tile_size, args.channels_last
    family = trunk_spec(args.arch).family
    gen = torch.Generator(device).manual_seed(0)

    def images(size: int) -> Tensor:
        return to_memory_format(torch.randn(b, 3, size, size, device=device, generator=gen), cl)

    if name == "w2ssl":
        w2ssl = W2SSL(partial(build_trunk, args.arch), family=family, fused_views=args.fused_views)
        model = prepare_model(w2ssl.to(device), cl, args.compile, TRUNKS)
        view1, view2 = [images(t), images(t)], [images(t), images(t)]
        perm = torch.randperm(2 * b)  # on the host, as the trainer draws it
        optimizer = optimizer_for(model.parameters(), family, b, supervised=False)
        return train_step(lambda: model(view1, view2, MOMENTUM, perm)["loss"], optimizer, device, args.precision)
    if name in ("mocov3", "mocov3_fused"):
        options = {"zero_init_residual": True} if family == "resnet" else {}  # as methods/mocov3.build
        mocov3 = MoCoV3(partial(build_trunk, args.arch, **options), family=family,
                        fused_views=name == "mocov3_fused")
        model = prepare_model(mocov3.to(device), cl, args.compile, TRUNKS)
        x1, x2 = images(2 * t), images(2 * t)
        optimizer = optimizer_for(model.parameters(), family, b, supervised=False)
        return train_step(lambda: model(x1, x2, MOMENTUM)["loss"], optimizer, device, args.precision)
    net = ClassTokenClassifier(args.arch) if family == "vit" else torchvision.models.__dict__[args.arch]()
    model = prepare_model(net.to(device), cl, args.compile)
    x = images(2 * t)
    y = torch.randint(0, 1000, (b,), device=device, generator=gen)
    optimizer = optimizer_for(model.parameters(), family, b, supervised=True)
    return train_step(lambda: F.cross_entropy(model(x), y), optimizer, device, args.precision)


def measure(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Per step kind: source images/s, median step ms, its [min, max] and peak GiB (GPU).

    On GPU each kind runs alone, in a clean memory state, so its peak memory is its own. On CPU (no
    memory tracking, often shared with other processes) all kinds are built first and timed in
    interleaved rounds, so that load from elsewhere hits them alike.
    """
    def built(name: str) -> Callable[[], Tensor]:
        torch.manual_seed(0)
        return build(name, args, device)

    if device.type == "cpu":
        steps = {n: built(n) for n in names}
        times = common.time_interleaved(steps, args.iters, args.warmup)
        peaks = dict.fromkeys(names)
    else:
        times, peaks = {}, {}
        for n in names:
            gc.collect()
            common.reset_memory(device)
            times[n] = common.time_iterations(built(n), args.iters, args.warmup, device)
            peaks[n] = common.peak_memory_gib(device)
    medians = {n: common.median(times[n]) for n in names}
    return {n: {"img_s": args.batch_size / medians[n], "step_ms": medians[n] * 1000,
                "step_ms_range": [min(times[n]) * 1000, max(times[n]) * 1000], "peak_gib": peaks[n]}
            for n in names}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("-a", "--arch", default="resnet50", choices=trunk_names())
    p.add_argument("--batch-size", type=int, default=256, help="source images per step (even)")
    p.add_argument("--tile-size", type=int, default=112, help="W2SSL tile side; MoCo v3/supervised get 2x")
    add_precision(p, "autocast dtype; fp16 adds a GradScaler (default: bf16 on GPUs that support it, else fp16 on "
                     "GPU, fp32 on CPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the trunks (supervised: the model)")
    p.add_argument("--fused-views", action=argparse.BooleanOptionalAction, default=False,
                   help="W2SSL: both views in one call per encoder and head (main_moco.py --fused-views)")
    p.add_argument("--iters", type=int, default=30, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning, compile)")
    p.add_argument("--only", choices=STEPS, action="append", help="run only this step (repeatable)")
    args = p.parse_args(argv)
    if args.batch_size < 2 or args.batch_size % 2:
        raise UserError(f"--batch-size must be even and >= 2 (W2SSL builds one montage per 2 images); "
                        f"got {args.batch_size}")
    if args.tile_size < 1:
        raise UserError(f"--tile-size must be positive; got {args.tile_size}")
    if args.iters < 1 or args.warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0; got {args.iters} and {args.warmup}")
    if trunk_spec(args.arch).family == "vit" and args.tile_size % (PATCH // 2):
        raise UserError(f"-a {args.arch} needs 2 x --tile-size to be a multiple of the patch size {PATCH}: "
                        f"pass a --tile-size that is a multiple of {PATCH // 2} (e.g. 112); got {args.tile_size}")
    return args


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def run(args: argparse.Namespace) -> dict:
    device = common.resolve_device(args.device)
    precision = args.precision = resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = True
    names = [n for n in STEPS if not args.only or n in args.only]
    load_before = os.getloadavg()[0]
    results = measure(names, args, device)
    get = {n: results.get(n, {}) for n in STEPS}
    out = {"device": common.device_name(device), "arch": args.arch, "batch_size": args.batch_size,
           "tile_size": args.tile_size, "precision": precision, "channels_last": args.channels_last,
           "compile": args.compile, "fused_views": args.fused_views, "iters": args.iters, "warmup": args.warmup}
    for n in STEPS:
        for key in ("img_s", "step_ms", "step_ms_range", "peak_gib"):
            out[f"{n}_{key}"] = get[n].get(key)
    out["ratio_w2ssl_mocov3"] = ratio(out["w2ssl_img_s"], out["mocov3_img_s"])
    out["ratio_w2ssl_mocov3_fused"] = ratio(out["w2ssl_img_s"], out["mocov3_fused_img_s"])
    out["ratio_w2ssl_supervised"] = ratio(out["w2ssl_img_s"], out["supervised_img_s"])
    # Host load (1-minute average, ours included) before and after: flags runs disturbed by other processes.
    out["load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    out.update(tokens(trunk_spec(args.arch).family, args.tile_size))
    out.update(common.versions())
    out["timm"] = timm.__version__
    return out


def report(out: dict) -> str:
    """The human-readable table and ratios (the JSON line follows it)."""
    fused = "views fused" if out["fused_views"] else "a call per view"
    vit = out["seq_len"] is not None
    opt, sup = ("AdamW", "AdamW, linear on the class token") if vit else ("LARS", "SGD")
    labels = {"w2ssl": f"W2SSL (4 tiles/img, {opt}, {fused})",
              "mocov3": f"MoCo v3-style (2 views/img, {opt}, a call per view)",
              "mocov3_fused": f"MoCo v3-style (2 views/img, {opt}, views fused)",
              "supervised": f"supervised {out['arch']} ({sup})"}
    per_view = {"w2ssl": out["w2ssl_tokens_per_img_view"], "mocov3": out["mocov3_tokens_per_img_view"],
                "mocov3_fused": out["mocov3_tokens_per_img_view"], "supervised": out["mocov3_tokens_per_img_view"]}
    rows = [(labels[n], out[f"{n}_img_s"], out[f"{n}_step_ms"],
             "{:.0f}-{:.0f}".format(*out[f"{n}_step_ms_range"]), out[f"{n}_peak_gib"],
             *([per_view[n]] if vit else []))
            for n in STEPS if out[f"{n}_img_s"] is not None]
    head = (f"{out['device']} | {out['arch']} batch {out['batch_size']} tile {out['tile_size']} | "
            f"{out['precision']}{' channels_last' if out['channels_last'] else ''}"
            f"{' compile' if out['compile'] else ''} | torch {out['torch']} | load {out['load_1m']}")
    columns = ["step", "source img/s", "median step ms", "step ms range", "peak GiB"]
    table = common.markdown_table(columns + (["patch tokens/img/view"] if vit else []), rows)
    lines = [head, table]
    if vit:
        lines.append(f"ViT sequences: {out['seq_len']} tokens (class token + patches) per montage or view")
    for key, text in (("ratio_w2ssl_mocov3", "W2SSL / MoCo v3 (a call per view)"),
                      ("ratio_w2ssl_mocov3_fused", "W2SSL / MoCo v3 (views fused)"),
                      ("ratio_w2ssl_supervised", "W2SSL / supervised")):
        if out[key] is not None:
            lines.append(f"throughput ratio {text}: {out[key]:.2f}")
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
