"""End-to-end pre-training throughput: real ``main_moco.py`` on a generated JPEG folder, data included.

Runs ``main_moco.py --max-iters N`` in a fresh process (PIL pipeline, or ``--gpu-aug``) and reports the
source images/s over the second half of the steps, from the steps' own durations (data wait included;
checkpoint writes and the work at epoch ends left out, ``--save-freq-iters`` or not), plus the data-loading
time of the first iteration of every epoch after the first (the workers prefetch across epochs: no stall
there). Last line: JSON.
Example (GPU): ``python -m bench.e2e --device cuda --iters 50 --gpu-aug``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.data import make_folder
from w2ssl.cli import check_folder, check_values, nonneg_int, positive_int, run_main

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="dataset root (DATA/train is generated if missing)")
    p.add_argument("--images", type=positive_int, default=3000)
    p.add_argument("--classes", type=positive_int, default=16)
    p.add_argument("--iters", type=positive_int, default=50, help="training steps to run")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--tile-size", type=positive_int, default=112)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--workers", type=nonneg_int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--precision", default=None)
    p.add_argument("--gpu-aug", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--save-freq-iters", type=nonneg_int, default=0, help="also checkpoint every N steps (not timed)")
    args = check_values(p, p.parse_args(argv))
    check_folder(args.root, "--root", output=True)
    return args


def run(args: argparse.Namespace, root: Path) -> dict:
    make_folder(root / "train", args.images, args.classes, args.workers)
    with tempfile.TemporaryDirectory() as save_dir:
        cmd = [sys.executable, str(ROOT / "main_moco.py"), str(root), "-a", args.arch, "-b", str(args.batch_size),
               "--tile-size", str(args.tile_size), "--workers", str(args.workers), "--epochs", "1000",
               "--max-iters", str(args.iters), "--print-freq", str(max(args.iters, 1)), "--resume", "none",
               "--save-dir", save_dir, "--seed", "0", "--save-freq-iters", str(args.save_freq_iters)]
        cmd += ["--gpu-aug"] * args.gpu_aug + ["--compile"] * args.compile
        cmd += ["--precision", args.precision] if args.precision else []
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"main_moco.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    result = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    return {**result, "images": args.images, "arch": args.arch, "tile_size": args.tile_size, "workers": args.workers}


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line."""
    return run_main(benchmark, argv)


def benchmark(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.root is not None:
        out = run(args, args.root)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(args, Path(tmp))
    print(f"end to end: {out['e2e_img_s']:.1f} source img/s on {out['device']} "
          f"(gpu_aug={out['gpu_aug']}); first-batch data time of later epochs: {out['epoch_start_data_s']}")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
