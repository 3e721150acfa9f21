"""Does W2SSL learn as well as MoCo v3 at equal compute? Pre-train both, evaluate, compare over seeds.

Both methods run the same trainer (``main_moco.py --method {w2ssl,mocov3}``), data, trunk, optimizer
(LARS) and schedule (warm-up for a tenth of the epochs, half-cosine) for the same budget, in their own
processes, each epoch writing a checkpoint. The budget is one of: wall-clock seconds per run
(``--budget-s``, from a short timed run of each method), source images seen (``--budget-images``) or
measured trunk GFLOPs (``--budget-gflops``; bench/quality_flops.py: base encoder forward + backward and
momentum encoder forward, counted on one real step). It becomes a whole number of epochs per method.
Afterwards (bench/quality_eval.py) each run's trunk is evaluated by kNN at ``--points`` epochs and by
the cached linear probe at its last. A random-init trunk (floor) and a supervised run on the labels with
the same budget (ceiling, bench/quality_supervised.py) are the reference rows. Data: ``--data DIR``
(ImageFolder with train/ and val/) or an embedded set (``--dataset``): the demo's photo crops (default) or
the letters of :mod:`w2ssl.data.glyphs`.

``--methods`` picks the rows: registered methods and variants such as ``w2ssl-nowhere`` (W2SSL without its
where loss; bench/quality_kinds.py). ``--lr-sweep`` first picks each method's base lr on a validation split
carved from the training images (bench/quality_sweep.py). Writes ``OUT/quality.json``, ``OUT/quality.png``
and ``OUT/runs/<method>-<seed>/``; prints a table, whether each difference exceeds the seed spread, and,
last, one JSON line (``<method>_knn``, ``<method>_probe``, ``where_acc``: W2SSL's last-epoch where-accuracy,
``seeds``). Five seeds by default; ``--quick``: a small set, three seeds, a short budget (minutes on a
2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import main_moco
from bench import quality_report
from bench.common import json_line, versions
from bench.quality_flops import method_gflops, supervised_gflops
from bench.quality_kinds import last_epoch_where_acc, parse_kinds, resolve
from bench.quality_sweep import DEFAULT_LRS, carve_validation, choose, parse_lrs, sweep
from w2ssl import demo
from w2ssl.checkpoint import epoch_name
from w2ssl.data import glyphs
from w2ssl.data.datasets import image_folder
from w2ssl.errors import UserError
from w2ssl.trunks import build_trunk

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(seeds=3, budget_gflops=1120.0, probe_epochs=10, points=2, jobs=2)
IMG_S = re.compile(r'"e2e_img_s": ([0-9.]+)')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: an embedded set, --dataset)")
    p.add_argument("--dataset", choices=("photos", "glyphs"), default="photos",
                   help="embedded set without --data: the demo's 20 scikit-image photos (classes: which photo a "
                        "crop is from) or the rendered letters of w2ssl.data.glyphs (see BENCHMARKS.md)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "quality", help="results folder")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-s", type=float, help="wall-clock seconds of training per run (default 300)")
    budget.add_argument("--budget-images", type=float, help="source images seen per run")
    budget.add_argument("--budget-gflops", type=float, help="trunk GFLOPs per run (measured, see the docstring)")
    p.add_argument("--methods", default="w2ssl,mocov3",
                   help="comma-separated registered methods and variants (w2ssl-nowhere: W2SSL without its where "
                        "loss), each a row of the report")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--tile-size", type=int, default=32,
                   help="W2SSL tile side; montages and MoCo v3 views are 2x (ResNets: 32 or more, see check_tile)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8.0,
                   help="base lr of every run, x batch/256 (LARS; the published 0.6 at batch 4096 is 9.6 per "
                        "step: at batch 32 the trunks barely move from 0.6, see BENCHMARKS.md)")
    p.add_argument("--sup-lr", type=float, default=8.0,
                   help="base lr of the supervised ceiling (LARS; at batch 32 it learns little at 0.6 in minutes)")
    p.add_argument("--lr-sweep", nargs="?", const=",".join(map(str, DEFAULT_LRS)), metavar="LRS",
                   help="first choose each method's base lr among LRS (default 2,8,32) on a validation split "
                        "of the training images (bench/quality_sweep.py), then run the seeds at it")
    p.add_argument("--mlp-dim", type=int, default=1024, help="hidden width of the projector/predictor MLPs")
    p.add_argument("--points", type=int, default=6, help="kNN evaluations per run (epochs spread evenly)")
    p.add_argument("--probe-epochs", type=int, default=30, help="cached linear probe epochs (0: no probe)")
    p.add_argument("--no-supervised", action="store_true", help="leave out the supervised ceiling")
    p.add_argument("--cpu-aug", choices=("fast", "pil"), default="fast",
                   help="main_moco.py's augmentation pipeline (fast: the default; pil: the reference)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores/jobs threads)")
    p.add_argument("--per-class", type=int, default=glyphs.PER_CLASS["train"], help="glyphs: train images per class")
    p.add_argument("--val-per-class", type=int, default=glyphs.PER_CLASS["val"], help="glyphs: val images per class")
    p.add_argument("--quick", action="store_true", help=f"small and short: {QUICK} unless given")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.lstrip("-").replace("-", "_").split("=")[0] for a in (argv or sys.argv[1:]) if a.startswith("--"))
        for key, value in QUICK.items():
            if key not in given and not (key.startswith("budget") and {"budget_s", "budget_images"} & given):
                setattr(args, key, value)
    if args.budget_s is None and args.budget_images is None and args.budget_gflops is None:
        args.budget_s = 300.0
    if args.seeds < 1 or args.jobs < 1 or args.points < 1:
        raise UserError("--seeds, --jobs and --points must be at least 1")
    args.methods = parse_kinds(args.methods)
    args.lr_sweep = parse_lrs(args.lr_sweep) if args.lr_sweep else None
    args.lrs = {}  # kind -> base lr, when the sweep chose one
    return args


def embedded(args: argparse.Namespace) -> str:
    """Write the ``--dataset`` ImageFolder under ``--out`` once; its root."""
    if args.dataset == "photos":
        return str(demo.build_dataset(args.out / "photos"))
    return str(glyphs.build(args.out / f"glyphs-{args.per_class}-{args.val_per_class}",
                            {"train": args.per_class, "val": args.val_per_class}))


def check_tile(arch: str, tile: int) -> None:
    """W2SSL reads each montage's last feature map as a 2x2 grid, one cell per tile (METHOD §3): a map of
    1x1 (a ResNet montage under 64 px) gives all four tiles the same feature, and W2SSL learns nothing."""
    with torch.device("meta"):
        side = min(build_trunk(arch)(torch.empty(2, 3, 2 * tile, 2 * tile)).shape[-2:])
    if side < 2:
        raise UserError(f"--tile-size {tile} leaves {arch} a {side}x{side} map per montage, so W2SSL's four tiles "
                        f"share one feature: pass a tile size whose montage (2 x tile) gives a 2x2 map or more "
                        f"(32 for ResNets)")


def budget(args: argparse.Namespace) -> dict:
    for kind in ("s", "images", "gflops"):
        value = getattr(args, f"budget_{kind}")
        if value is not None:
            if value <= 0:
                raise UserError(f"--budget-{kind} must be positive, got {value}")
            return {"kind": kind, "value": value}
    raise AssertionError("parse_args sets a budget")


def moco_args(args: argparse.Namespace, kind: str, data: str, lr: float | None = None) -> list[str]:
    """main_moco.py's flags shared by every run of ``kind`` (epochs, seed and folder come per run); base lr
    ``lr``, else the one the sweep chose, else ``--lr``. The EMA and weight decay are the same for every method
    (W2SSL's published 0.99 and 1e-6), whatever a method's own defaults (BYOL's 0.996 on a cosine, 1.5e-6), so
    that only the method differs between rows."""
    method, extra = resolve(kind)
    lr = lr if lr is not None else args.lrs.get(kind, args.lr)
    return [data, "--method", method, "-a", args.arch, "--tile-size", str(args.tile_size), "-b", str(args.batch_size),
            "--lr", str(lr), "--moco-mlp-dim", str(args.mlp_dim), "--moco-m", "0.99", "--no-moco-m-cos", "--wd", "1e-6",
            "--fused-views", "-j", "1",
            "-p", "100000", "--precision", "fp32", "--cpu-aug", args.cpu_aug, *extra]


def thread_env(jobs: int) -> dict[str, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // jobs))}


def train_cmd(args: argparse.Namespace, kind: str, data: str, epochs: int, seed: int, run: Path,
              extra: list[str] = (), lr: float | None = None) -> list[str]:
    warmup = str(round(epochs / 10))
    if kind == "supervised":
        return [sys.executable, "-m", "bench.quality_supervised", data, "--arch", args.arch,
                "--size", str(2 * args.tile_size), "--epochs", str(epochs), "--warmup-epochs", warmup,
                "--batch-size", str(args.batch_size), "--lr", str(args.sup_lr), "--seed", str(seed),
                "--save-dir", str(run), *extra]
    return [sys.executable, str(ROOT / "main_moco.py"), *moco_args(args, kind, data, lr), "--epochs", str(epochs),
            "--warmup-epochs", warmup, "--seed", str(seed), "--save-dir", str(run), "--keep", "0", *extra]


def images_per_second(args: argparse.Namespace, kind: str, data: str, env: dict[str, str]) -> float:
    """Training throughput of ``kind`` from a short run (``--max-iters 8``: the second half's steps)."""
    run = args.out / "calibrate" / kind
    out = subprocess.run(train_cmd(args, kind, data, 1, 0, run, ["--max-iters", "8"]), capture_output=True,
                         text=True, env=env)
    found = IMG_S.findall(out.stdout)
    if out.returncode or not found:
        raise RuntimeError(f"timing run of {kind} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return float(found[-1])


def epochs_for(budget: float, cost_per_epoch: float) -> int:
    """Whole epochs closest to ``budget`` (seconds, images or GFLOPs) at ``cost_per_epoch``; at least one."""
    return max(1, round(budget / cost_per_epoch))


def eval_epochs(epochs: int, points: int) -> list[int]:
    """``points`` epoch indices spread evenly over ``0 .. epochs-1``, the last always included."""
    return sorted({round((epochs - 1) * (i + 1) / points) for i in range(points)} | {epochs - 1})


def run_one(args: argparse.Namespace, kind: str, seed: int, epochs: int, data: str, env: dict[str, str],
            run: Path | None = None, lr: float | None = None, points: int | None = None) -> dict:
    """Train (unless ``kind`` is random or the run is already done), time the epochs, evaluate, clean up.
    ``run``: its folder (default ``OUT/runs/<kind>-<seed>``); ``lr``: its base lr (default: :func:`moco_args`')."""
    run = run or args.out / "runs" / f"{kind}-{seed}"
    done = run / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    wall: list[float] = []
    if kind != "random":
        start = time.time()
        out = subprocess.run(train_cmd(args, kind, data, epochs, seed, run, lr=lr), capture_output=True, text=True,
                             env=env)
        if out.returncode:
            raise RuntimeError(f"{kind} seed {seed} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        # Epoch ends from the checkpoints' write times: the training loop keeps no benchmark records.
        wall = [(run / epoch_name(e)).stat().st_mtime - start for e in range(epochs)]
    points = eval_epochs(epochs, points or args.points) if kind != "random" else [0]
    cmd = [sys.executable, "-m", "bench.quality_eval", str(run), "--data", data, "--arch", args.arch,
           "--size", str(2 * args.tile_size), "--epochs", ",".join(map(str, points)),
           "--probe-epochs", str(args.probe_epochs), "--seed", str(seed), "--delete"]
    if kind == "random":
        cmd.append("--random-init")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"evaluation of {kind} seed {seed} failed:\n{out.stderr[-3000:]}")
    evaluation = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"kind": kind, "seed": seed, "epochs": epochs if kind != "random" else 0, "wall_s": wall,
              "knn": {int(e): v for e, v in evaluation["knn"].items()}, "probe": evaluation["probe"],
              "where_acc": last_epoch_where_acc(run / "log.txt")}
    done.write_text(json.dumps(result))
    print(f"=> {kind} seed {seed}: {epochs if kind != 'random' else 0} epochs, kNN {result['knn']}, "
          f"probe {result['probe']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spent = budget(args)
    check_tile(args.arch, args.tile_size)
    data = args.data or embedded(args)
    for split in ("train", "val"):
        if not (Path(data) / split).is_dir():
            raise UserError(f"{Path(data) / split} does not exist: --data needs train/ and val/ class folders")
    train_set = image_folder(Path(data) / "train")
    per_epoch = len(train_set) // args.batch_size * args.batch_size
    if per_epoch == 0:
        raise UserError(f"{len(train_set)} training images are fewer than one batch: lower --batch-size")
    kinds = [*args.methods, *([] if args.no_supervised else ["supervised"])]
    parser = main_moco.build_parser()
    gflops = {m: method_gflops(parser.parse_args(moco_args(args, m, data))) for m in args.methods}
    gflops["supervised"] = supervised_gflops(args.arch, 2 * args.tile_size, len(train_set.classes))
    env = thread_env(args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    rate = {k: images_per_second(args, k, data, thread_env(1)) for k in kinds} if spent["kind"] == "s" else {}
    per_image = {"s": lambda k: 1 / rate[k], "images": lambda k: 1.0, "gflops": lambda k: gflops[k]["trunk"]}
    epochs = {k: epochs_for(spent["value"], per_epoch * per_image[spent["kind"]](k)) for k in kinds}
    print(f"=> {len(train_set)} training images ({per_epoch} per epoch), budget {spent}: epochs {epochs}; "
          f"trunk GFLOPs/image {({k: round(v['trunk'], 3) for k, v in gflops.items()})}", flush=True)
    swept = lr_sweep(args, epochs, data, env) if args.lr_sweep else None
    jobs = [(k, s) for s in range(args.seeds) for k in [*kinds, "random"]]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(args, job[0], job[1], epochs.get(job[0], 0), data, env), jobs))
    summary = quality_report.summarise(results, per_epoch, gflops, [*kinds, "random"])
    settings = ("arch", "tile_size", "batch_size", "lr", "sup_lr", "mlp_dim", "probe_epochs", "cpu_aug", "methods")
    record = {"data": data, "train_images": len(train_set), "classes": len(train_set.classes), "budget": spent,
              "epochs": epochs, "gflops_per_image": gflops, "img_s": rate, "lr_sweep": swept,
              "settings": {k: getattr(args, k) for k in settings}, "base_lr": {k: args.lrs.get(k, args.lr)
                                                                               for k in args.methods},
              "versions": versions(), "summary": summary, "runs": results}
    (args.out / "quality.json").write_text(json.dumps(record, indent=1))
    quality_report.plot(summary, args.out / "quality.png")
    print(quality_report.table(summary), flush=True)
    print(quality_report.verdicts(summary, args.methods), flush=True)
    last = {f"{k}_knn": summary[k]["knn_mean"] for k in summary}
    last.update({f"{k}_probe": summary[k]["probe_mean"] for k in summary}, seeds=args.seeds, budget=spent)
    last.update(where_acc=summary.get("w2ssl", {}).get("where_acc"), base_lr=record["base_lr"])
    print(json_line(last), flush=True)
    return last


def lr_sweep(args: argparse.Namespace, epochs: dict[str, int], data: str, env: dict[str, str]) -> dict:
    """Choose each method's base lr on a validation split of the training images (bench/quality_sweep.py);
    sets ``args.lrs`` and returns the sweep's kNN top-1 per method and lr, and the choice."""
    split = str(carve_validation(data, args.out / "sweep" / "data"))

    def score(kind: str, lr: float) -> float:
        run = args.out / "sweep" / "runs" / f"{kind}-lr{lr:g}"
        result = run_one(args, kind, 0, epochs[kind], split, env, run=run, lr=lr, points=1)
        return result["knn"][max(result["knn"])]

    with ThreadPoolExecutor(args.jobs) as pool:  # kinds in parallel, each kind's lrs in turn
        scores = dict(zip(args.methods, pool.map(lambda k: sweep([k], args.lr_sweep, score)[k], args.methods)))
    args.lrs = choose(scores)
    print(f"=> lr sweep (kNN top-1 % on held-out training images): {scores}; chosen base lr {args.lrs}", flush=True)
    return {"knn": {k: {f"{lr:g}": v for lr, v in by_lr.items()} for k, by_lr in scores.items()}, "chosen": args.lrs}


if __name__ == "__main__":
    from w2ssl.cli import with_error_boundary
    with_error_boundary(main)()
