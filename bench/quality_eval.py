"""Evaluation of one bench/quality.py run, after it trained: kNN at chosen epochs, the cached probe at the last.

Reads the run's ``checkpoint_%04d.pth.tar`` files (any pre-training layout whose trunk is ``base_encoder.*``),
so nothing is added to the training loop. kNN: weighted, k = 20, T = 0.07 (w2ssl.eval.knn) on centre crops of
``--size`` pixels. Probe: ``main_lincls.py --cached`` (features extracted once, a linear layer trained on them)
in a subprocess; its last epoch's val top-1 is kept. Writes ``RUN/eval.json``; ``--delete`` then removes the
checkpoints and the probe's folder (a resnet18 pre-training checkpoint with heads and optimizer state is
about 150 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from w2ssl.checkpoint import epoch_name
from w2ssl.eval.knn import folder_loaders, knn_eval
from w2ssl.trunk_weights import load_trunk
from w2ssl.trunks import build_trunk

ROOT = Path(__file__).resolve().parents[1]
K = 20
PROBE_ACC = re.compile(r" \* Acc@1 ([0-9.]+)")


def random_checkpoint(path: Path, arch: str, seed: int) -> None:
    """A randomly initialised trunk (torchvision's init, ``seed``) saved in the pre-training layout."""
    torch.manual_seed(seed)
    trunk = build_trunk(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": arch, "state_dict": {f"base_encoder.{k}": v for k, v in trunk.state_dict().items()}}, path)


def knn_top1(path: Path, arch: str, loaders: tuple) -> float:
    """kNN top-1 (%) of the trunk in checkpoint ``path`` on ``loaders`` (train bank, val, classes)."""
    trunk = build_trunk(arch)
    trunk.load_state_dict(load_trunk(path, arch))
    train, val, classes = loaders
    return knn_eval(trunk, train, val, "cpu", classes, ks=(K,)).accuracy[K][0]


def probe_top1(path: Path, data: str, size: int, epochs: int, save_dir: Path, seed: int) -> float:
    """``main_lincls.py --cached`` on ``path``'s trunk: val top-1 (%) after its last epoch."""
    cmd = [sys.executable, str(ROOT / "main_lincls.py"), data, "--pretrained", str(path), "--cached",
           "--input-size", str(size), "--epochs", str(epochs), "-b", "256", "--workers", "0", "--seed", str(seed),
           "--print-freq", "1000", "--save-dir", str(save_dir), "--resume", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    found = PROBE_ACC.findall(out.stdout)
    if out.returncode or not found:
        raise RuntimeError(f"probe of {path} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return float(found[-1])


def evaluate(run: Path, data: str, arch: str, size: int, epochs: list[int], probe_epochs: int,
             seed: int) -> dict:
    """``{"knn": {epoch: top-1 %}, "probe": top-1 % of the last epoch (None if probe_epochs is 0)}``."""
    loaders = folder_loaders(data, size, 256, 0)
    start = time.perf_counter()
    knn = {e: knn_top1(run / epoch_name(e), arch, loaders) for e in epochs}
    probe = probe_top1(run / epoch_name(epochs[-1]), data, size, probe_epochs, run / "probe", seed) \
        if probe_epochs else None
    return {"knn": knn, "probe": probe, "eval_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="folder of checkpoint_%%04d.pth.tar files")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, required=True, help="evaluation crop side")
    p.add_argument("--epochs", required=True, help="comma-separated epoch indices to evaluate (last: probed)")
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", action="store_true",
                   help="first write checkpoint_0000 as a randomly initialised trunk (seeded by --seed)")
    p.add_argument("--delete", action="store_true", help="remove the run's checkpoints afterwards")
    args = p.parse_args(argv)
    if args.random_init:
        random_checkpoint(args.run / epoch_name(0), args.arch, args.seed)
    result = evaluate(args.run, args.data, args.arch, args.size, [int(e) for e in args.epochs.split(",")],
                      args.probe_epochs, args.seed)
    (args.run / "eval.json").write_text(json.dumps(result))
    if args.delete:
        for path in args.run.glob("checkpoint_*.pth.tar"):
            path.unlink()
        shutil.rmtree(args.run / "probe", ignore_errors=True)  # the probe's checkpoints hold the trunk too
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
