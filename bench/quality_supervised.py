"""The supervised ceiling of bench/quality.py: the same trunk trained with labels, cross-entropy.

One ``--size``-pixel view per image (RandomResizedCrop down to ``--crop-min`` as pre-training, flip), LARS with
the linear-scaling rule, warm-up and half-cosine schedule (w2ssl.engine.optim), as the self-supervised
runs. Each epoch writes ``checkpoint_%04d.pth.tar`` in the pre-training layout (``state_dict`` with
``base_encoder.<torchvision key>``, ``arch``), so kNN and ``main_lincls.py --pretrained`` read it, and
``epochs.json``: seconds since the start at each epoch's end. ``--max-iters N`` only times N steps.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms

from w2ssl.checkpoint import epoch_name, save_atomic
from w2ssl.data.augment import MEAN, STD
from w2ssl.data.datasets import image_folder, seed_everything
from w2ssl.engine.optim import build_optimizer, scaled_lr, set_lr
from w2ssl.schedules import lr_at
from w2ssl.trunks import build_trunk


class Classifier(nn.Module):
    """``[B, 3, H, W] -> [B, classes]``: a registered trunk (``base_encoder``), average pool, linear ``fc``."""

    def __init__(self, arch: str, classes: int):
        super().__init__()
        self.base_encoder = build_trunk(arch)
        self.fc = nn.Linear(self.base_encoder.num_features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.base_encoder(x).mean(dim=(2, 3)))


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    seed_everything(args.seed)
    torch.manual_seed(args.seed)
    augment = transforms.Compose([transforms.RandomResizedCrop(args.size, scale=(args.crop_min, 1.0)),
                                  transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                  transforms.Normalize(MEAN, STD)])
    dataset = image_folder(Path(args.data) / "train", transform=augment)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, generator=generator)
    model = Classifier(args.arch, len(dataset.classes))
    lr = scaled_lr(args.lr, args.batch_size)
    optimizer = build_optimizer("lars", model, lr, args.wd, 0.9)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    ends, steps = [], []
    for epoch in range(args.epochs):
        model.train()
        tic = time.perf_counter()
        for i, (images, labels) in enumerate(loader):
            set_lr(optimizer, lr_at(epoch + i / len(loader), lr, args.warmup_epochs, args.epochs))
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps.append(time.perf_counter() - tic)
            if len(steps) == args.max_iters:  # a timing run: images/s over the second half, as main_moco.py
                window = steps[len(steps) // 2:]
                print(json.dumps({"e2e_img_s": round(len(window) * args.batch_size / sum(window), 1)}), flush=True)
                return
            tic = time.perf_counter()
        state = {"epoch": epoch + 1, "arch": args.arch, "state_dict": model.state_dict()}
        save_atomic(state, save_dir / epoch_name(epoch))
        ends.append(time.perf_counter() - start)
        print(f"=> supervised epoch {epoch} loss {loss.item():.3f} at {ends[-1]:.0f} s", flush=True)
    (save_dir / "epochs.json").write_text(json.dumps({"epoch_end_s": ends, "images_per_epoch":
                                                      len(loader) * args.batch_size}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="ImageFolder root with train/")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="crop side (W2SSL's montage / MoCo v3's view side)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.6)
    p.add_argument("--crop-min", type=float, default=0.2, help="minimum RandomResizedCrop scale (main_moco.py's)")
    p.add_argument("--wd", type=float, default=1e-6)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--max-iters", type=int, default=0, help="only time N steps and print images/s (no checkpoint)")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
