"""Why does W2SSL's "where" task stay at chance? Remove one cue-hiding factor at a time and measure it.

The where head classifies each view-1 tile as the left or the right region of its image (METHOD §5), from
the tile alone. Three things could hide the answer: the horizontal flip (p 0.5: a mirrored left tile looks
like a right one), the overlap of the regions (``cross`` 0.3: both share the middle 60 % of the width, so
many crops could come from either), and the tile size (at 32 px a ResNet-18 montage's 2x2 map has cells
whose receptive fields cover the whole montage, so a cell's feature also sees the neighbouring tiles).
Each setting trains W2SSL the same way (``main_moco.py``, ResNet-18, the demo's photo set, the same epochs,
seed and lr) and reports the where-accuracy and where-loss of its last epoch (running means over the
epoch, from ``log.txt``); a setting makes the task learnable if its where-accuracy reaches
``LEARNABLE`` %, against 50 % for a coin toss.

``--control`` runs the positive control instead: the same images with a faint diagonal texture, ``/`` on the left half
and ``\\`` on the right (a cue a tile does carry, and that a flip turns into the other side's), trained with
and without the flip: it shows whether the measurement can see a where task that is learnable.

Prints a table and one JSON line. Example: ``python -m bench.where_diagnostic --epochs 10 --control``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import json_line, markdown_table, versions
from bench.quality import thread_env
from bench.quality_kinds import last_epoch_where_acc
from w2ssl import demo
from w2ssl.cli import run_main
from w2ssl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LEARNABLE = 60.0  # where-accuracy (%) that no coin toss reaches over an epoch of hundreds of tiles
LOSS_LOC = re.compile(r"Loss_loc +[0-9.e+-]+ \(([0-9.e+-]+)\)")


def settings(tile: int) -> dict[str, list[str]]:
    """name -> main_moco.py's flags of each setting: the published one, one factor removed at a time, all three."""
    larger = ["--tile-size", str(2 * tile)]
    return {f"published (flip 0.5, cross 0.3, tile {tile})": ["--tile-size", str(tile)],
            "no flip (--flip-p 0)": ["--flip-p", "0", "--tile-size", str(tile)],
            "no overlap (--cross 0)": ["--cross", "0", "--tile-size", str(tile)],
            f"larger tiles (--tile-size {2 * tile})": larger,
            "all three": ["--flip-p", "0", "--cross", "0", *larger]}


def control_dataset(source: Path, out: Path, amplitude: float = 40.0, period: int = 12) -> Path:
    """``out/train/<class>/``: ``source/train``'s images with diagonal stripes, ``/`` on the left half and ``\\``
    on the right (``amplitude`` grey levels, ``period`` px); written once."""
    import numpy as np
    from PIL import Image

    done = out / "train" / ".complete"
    if done.is_file():
        return out
    for path in sorted((source / "train").glob("*/*.jpg")):
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        h, w = img.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        diagonal = np.where(xx < w // 2, xx + yy, xx - yy)  # "/" left, "\\" right
        img = img + amplitude * np.sign(np.sin(2 * np.pi * diagonal / period))[..., None]
        target = out / "train" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(target, quality=95)
    done.touch()
    return out


def last_epoch_loss_loc(log: Path) -> float | None:
    found = None
    for line in log.read_text().splitlines() if log.is_file() else []:
        match = LOSS_LOC.search(line)
        if match and line.startswith("Epoch: "):
            found = float(match.group(1))
    return found


def run_setting(args: argparse.Namespace, name: str, setting: list[str], data: Path, env: dict[str, str]) -> dict:
    run = args.out / "runs" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cmd = [sys.executable, str(ROOT / "main_moco.py"), str(data), "-a", args.arch, "-b", str(args.batch_size),
           "--epochs", str(args.epochs), "--warmup-epochs", str(max(1, args.epochs // 10)), "--lr", str(args.lr),
           "--moco-mlp-dim", str(args.mlp_dim), "--fused-views", "-j", "1", "-p", "100000", "--precision", "fp32",
           "--seed", str(args.seed), "--keep", "1", "--save-dir", str(run), *setting]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    for checkpoint in run.glob("*.pth.tar"):
        checkpoint.unlink()  # only the log is read
    acc = last_epoch_where_acc(run / "log.txt")
    print(f"=> {name}: where-acc {acc} %", flush=True)
    return {"setting": name, "flags": setting, "where_acc": acc,
            "loss_loc": last_epoch_loss_loc(run / "log.txt"), "learnable": acc is not None and acc >= LEARNABLE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="ImageFolder root with train/ (default: the demo's photo set)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "where", help="runs folder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--tile-size", type=int, default=32, help="the published setting's tile (larger: twice it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8.0, help="base lr (bench/quality.py's)")
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="settings trained at a time")
    p.add_argument("--control", action="store_true", help="run the positive control instead (see the docstring)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.jobs < 1 or args.tile_size < 16:
        raise UserError("need --epochs >= 1, --jobs >= 1 and --tile-size >= 16")
    return args


def diagnose(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = args.data or demo.build_dataset(args.out / "photos")
    if not (Path(data) / "train").is_dir():
        raise UserError(f"{data}/train does not exist: --data needs a train/ folder of images")
    env = thread_env(args.jobs)
    jobs = [(name, flags, Path(data)) for name, flags in settings(args.tile_size).items()]
    if args.control:
        control = control_dataset(Path(data), args.out / "control")
        jobs = [(f"control: {name}", flags, control) for name, flags, _ in jobs[:2]]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_setting(args, *job, env), jobs))
    rows = [[r["setting"], r["where_acc"], r["loss_loc"], "yes" if r["learnable"] else "no"] for r in results]
    print(markdown_table(["setting", "where-acc % (last epoch)", "where loss (ln 2 = 0.693)",
                          f"learnable (>= {LEARNABLE:.0f} %)"], rows))
    learnable = [r["setting"] for r in results[1:4] if r["learnable"]]
    if not args.control:
        print("=> one factor alone that makes it learnable: " + (", ".join(learnable) or "none"), flush=True)
    print(json_line({"epochs": args.epochs, "arch": args.arch, "tile_size": args.tile_size, "control": args.control,
                     "results": results,
                     "learnable_alone": learnable, **versions()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line for bad arguments."""
    return run_main(diagnose, argv)


if __name__ == "__main__":
    sys.exit(main())
