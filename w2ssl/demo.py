"""``main_moco.py --demo``: a small real-photo dataset from scikit-image's wheel, CPU-sized settings,
and a kNN comparison of the learned trunk with a random one.

Each of 20 bundled photos is a class; its samples are random crops of it (train and val disjoint
draws). kNN accuracy on val says how well a trunk's features tell the photos apart from small crops.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from w2ssl import cli
from w2ssl.checkpoint import LAST, load
from w2ssl.data.augment import MEAN, STD
from w2ssl.errors import UserError
from w2ssl.eval.knn import extract_features, knn_accuracy
from w2ssl.trunk_weights import load_trunk
from w2ssl.trunks import build_trunk

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
          "coffee.png", "coins.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg",
          "ihc.png", "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg",
          "rocket.jpg", "text.png")
CROP = (96, 72)  # width, height of each sample
PER_CLASS = {"train": 24, "val": 8}
DEFAULTS = dict(arch="resnet18", tile_size=32, batch_size=32, epochs=12, warmup_epochs=1, lr=0.6,
                moco_mlp_dim=1024, workers=2, print_freq=5, seed=0, save_dir="outputs/demo", keep=1)
EVAL_SIZE = 96  # kNN input: each 96x72 sample resized to 128x96, then its centre 96x96


def photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise UserError("--demo uses the photos bundled with scikit-image: pip install scikit-image "
                        "(or pip install -r requirements.txt)")
    return Path(spec.origin).parent / "data"


def build_dataset(root: Path) -> Path:
    """Write ``root/{train,val}/<photo>/<i>.jpg`` once (about 640 small JPEGs) and return ``root``."""
    if (root / "val").is_dir() and len(list((root / "val").iterdir())) == len(PHOTOS):
        return root
    rng = random.Random(0)
    source = photo_dir()
    for name in PHOTOS:
        # Grey levels only: colour alone tells these photos apart, and W2SSL's colour augmentations
        # teach colour invariance, so the demo asks for what it does learn (shapes and textures).
        img = Image.open(source / name).convert("L").convert("RGB")
        w, h = img.size
        for split, count in PER_CLASS.items():
            out = root / split / Path(name).stem
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                scale = rng.uniform(0.25, 0.6)
                cw, ch = int(w * scale), int(w * scale * CROP[1] / CROP[0])
                ch = min(ch, h)
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                img.crop((x, y, x + cw, y + ch)).resize(CROP, Image.BICUBIC).save(out / f"{i}.jpg", quality=90)
    return root


def prepare(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Arguments for the demo: its defaults, then whatever the command line says."""
    parser.set_defaults(**DEFAULTS)
    args = cli.parse(parser, argv)
    if not args.data:
        args.data = str(build_dataset(Path(args.save_dir) / "photos"))
    return args


def previous_run(args: argparse.Namespace) -> str | None:
    """What ``--resume auto`` will do with a demo folder that already holds a run, in one line (or None)."""
    last = Path(args.save_dir) / LAST
    if args.resume != "auto" or not last.is_file():
        return None
    try:
        state = load(last, args.trust_checkpoint)
    except UserError:
        return None  # the resume itself skips a bad file with a warning
    epoch, iteration = state.get("epoch", 0), state.get("iteration", 0)
    if epoch >= args.epochs:
        return (f"=> demo already trained in {args.save_dir} (epoch {epoch}/{args.epochs}): re-using it without "
                f"training; delete the folder to train again")
    return (f"=> demo partly trained in {args.save_dir} (epoch {epoch}/{args.epochs}, iteration {iteration}): "
            f"continuing it; delete the folder to start again")


def _loader(root: Path) -> DataLoader:
    tf = transforms.Compose([transforms.Resize(EVAL_SIZE), transforms.CenterCrop(EVAL_SIZE),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return DataLoader(torchvision.datasets.ImageFolder(str(root), tf), batch_size=64, num_workers=0)


def knn_top1(trunk: torch.nn.Module, data: Path) -> float:
    train_feats, train_labels = extract_features(trunk, _loader(data / "train"), torch.device("cpu"))
    val_feats, val_labels = extract_features(trunk, _loader(data / "val"), torch.device("cpu"))
    return knn_accuracy(train_feats, train_labels, val_feats, val_labels, len(PHOTOS), ks=(20,))[20][0]


def report(args: argparse.Namespace) -> None:
    """Print kNN top-1 of the pre-trained trunk next to a randomly initialised one."""
    data = Path(args.data)
    torch.manual_seed(0)
    random_trunk = build_trunk(args.arch)
    learned = build_trunk(args.arch)
    learned.load_state_dict(load_trunk(Path(args.save_dir) / LAST, args.arch))
    before, after = knn_top1(random_trunk, data), knn_top1(learned, data)
    print(f"=> demo kNN top-1 (k=20, {len(PHOTOS)} photos, {EVAL_SIZE}px crops): random trunk {before:.1f} %, "
          f"W2SSL-pretrained trunk {after:.1f} %", flush=True)
