"""Source images/s delivered by the pre-training input pipeline: PIL on CPU workers vs ``--gpu-aug``.

On a generated JPEG ImageFolder (``--images`` files of 460x365 px, about 80 KB each: smooth colour
fields, stripes and noise, written once into ``--root`` or a temporary folder) it times, after
``--warmup`` batches, ``--iters`` batches of ``--batch-size`` source images each:

* ``cpu``: ``ImageFolder`` + ``w2ssl.data.augment.FourCrop`` in a ``DataLoader`` with ``--workers``
  persistent workers (pinned memory on CUDA), the four tile batches then copied to ``--device``;
* ``gpu``: ``EncodedImageFolder`` (workers only read bytes), ``decode_batch`` and ``GpuFourCrop`` on
  ``--device`` (runs on CPU too, slowly, so that it can be tested).

The trainer wraps the same transforms and decode in ``w2ssl.data.datasets.PretrainDataset`` (with
``--gpu-aug``: ``encoded_with_path``, ``collate_pretrain``, ``augment_batch``), adding bad-file tolerance.

It also times the GPU pipeline's two stages alone on one fixed batch (decode; four crops). The files
sit in the page cache after they are written: this measures decoding and augmentation, not the disk.
Prints a table, then one JSON line. Example (GPU): ``python bench/data.py --workers 16``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing import Pool
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bench.common import device_name, json_line, markdown_table, median, resolve_device, time_iterations, versions  # noqa: E402
from w2ssl.cli import run_main  # noqa: E402
from w2ssl.data.augment import FourCrop  # noqa: E402
from w2ssl.data.gpu_augment import GpuFourCrop  # noqa: E402
from w2ssl.data.gpu_decode import EncodedImageFolder, collate_encoded, decode_batch  # noqa: E402
from w2ssl.data.gpu_params import sample_keys  # noqa: E402
from w2ssl.errors import UserError  # noqa: E402

WIDTH, HEIGHT = 460, 365
NOISE = 17.0  # pixel noise std: with quality 90 the files are about 80 KB
PIPELINES = ("cpu", "gpu")


def synthetic_image(seed: int) -> np.ndarray:
    """``[HEIGHT, WIDTH, 3]`` uint8: an upsampled random colour field, three stripe patterns and noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
    img = np.asarray(field, dtype=np.float32).copy()
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for _ in range(3):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.2)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
        img += rng.uniform(10, 40) * wave[..., None] * rng.uniform(-1, 1, 3)
    img += rng.normal(0, NOISE, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_one(job: tuple[str, int]) -> int:
    path, seed = job
    Image.fromarray(synthetic_image(seed)).save(path, quality=90)
    return os.path.getsize(path)


def make_folder(root: Path, images: int, classes: int, workers: int) -> float:
    """Write ``root/c<k>/<i>.jpg`` for the missing images; returns the mean file size in KB."""
    jobs = []
    for i in range(images):
        path = root / f"c{i % classes}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            jobs.append((str(path), i))
    if workers > 1 and len(jobs) > workers:
        with Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_one(job)
    sizes = [(root / f"c{i % classes}" / f"{i}.jpg").stat().st_size for i in range(images)]
    return float(np.mean(sizes)) / 1000


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def throughput(consume: Callable[[object], None], loader: DataLoader, batch_size: int, warmup: int, iters: int,
               device: torch.device) -> float:
    """Source images/s of ``consume`` over ``iters`` loader batches after ``warmup`` (wall clock)."""
    batches = endless(loader)
    for _ in range(warmup):
        consume(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        consume(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return iters * batch_size / (time.perf_counter() - start)


def loader(dataset, args: argparse.Namespace, device: torch.device, **kw) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      persistent_workers=args.workers > 0, pin_memory=device.type == "cuda", drop_last=True, **kw)


def cpu_pipeline(root: Path, args: argparse.Namespace, device: torch.device) -> float:
    dataset = ImageFolder(str(root), transform=FourCrop(args.tile_size, args.crop_min))

    def consume(batch) -> None:
        tiles, _ = batch
        for t in tiles:
            t.to(device, non_blocking=True)

    return throughput(consume, loader(dataset, args, device), args.batch_size, args.warmup, args.iters, device)


def gpu_pipeline(root: Path, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images/s of the whole GPU pipeline, and of its decode and four-crop stages on one fixed batch."""
    dataset = EncodedImageFolder(str(root))
    crop = GpuFourCrop(args.tile_size, args.crop_min)
    samples = range(args.batch_size)

    def augment(images: list[torch.Tensor]) -> None:
        crop(images, sample_keys(args.seed, [0] * len(samples), samples))  # the keys' host cost included

    def consume(batch) -> None:
        data, _ = batch
        augment(decode_batch(data, device))

    out = {"gpu_pipeline_img_s": throughput(consume, loader(dataset, args, device, collate_fn=collate_encoded),
                                            args.batch_size, args.warmup, args.iters, device)}
    data, _ = collate_encoded([dataset[i] for i in range(args.batch_size)])
    images = decode_batch(data, device)
    stages = {"gpu_decode_img_s": lambda: decode_batch(data, device),
              "gpu_augment_img_s": lambda: augment(images)}
    for key, stage in stages.items():
        out[key] = args.batch_size / median(time_iterations(stage, args.iters, max(args.warmup, 1), device))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None,
                   help="folder for the generated JPEGs (kept, reused); default: a temporary folder")
    p.add_argument("--images", type=int, default=4096, help="number of generated JPEGs")
    p.add_argument("--classes", type=int, default=16, help="class sub-folders of the generated set")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=256, help="source images per batch")
    p.add_argument("--tile-size", type=int, default=112)
    p.add_argument("--crop-min", type=float, default=0.2)
    p.add_argument("--device", default=None, help="cuda (default when visible), cuda:N or cpu")
    p.add_argument("--iters", type=int, default=10, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up, cuDNN, nvjpeg)")
    p.add_argument("--pipelines", default="cpu,gpu", help="comma-separated subset of: cpu, gpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.pipelines = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    if not args.pipelines or any(name not in PIPELINES for name in args.pipelines):
        raise UserError(f"--pipelines {','.join(args.pipelines)!r}: use a comma-separated subset of cpu, gpu")
    if args.batch_size < 1 or args.images < args.batch_size:
        raise UserError(f"need 1 <= --batch-size <= --images; got {args.batch_size} and {args.images}")
    if args.classes < 1 or args.workers < 0 or args.iters < 1 or args.warmup < 0:
        raise UserError("need --classes >= 1, --workers >= 0, --iters >= 1 and --warmup >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="w2ssl-bench-data-") as tmp:
        root = args.root if args.root is not None else Path(tmp)
        kb = make_folder(root, args.images, args.classes, max(args.workers, 1))
        if len(ImageFolder(str(root))) != args.images:
            raise UserError(f"{root} holds other images than the {args.images} generated ones: "
                            "pass the same --images as before or a new --root")
        out = {"device": device_name(device), "cpu_pipeline_img_s": None, "gpu_pipeline_img_s": None,
               "gpu_decode_img_s": None, "gpu_augment_img_s": None, "workers": args.workers,
               "batch_size": args.batch_size, "tile_size": args.tile_size, "images": args.images,
               "image_size": [WIDTH, HEIGHT], "mean_file_kb": round(kb, 1), "iters": args.iters,
               "cpu_cores": os.cpu_count(), **versions()}
        if "cpu" in args.pipelines:
            out["cpu_pipeline_img_s"] = cpu_pipeline(root, args, device)
        if "gpu" in args.pipelines:
            out.update(gpu_pipeline(root, args, device))
    return out


def report(out: dict) -> str:
    rows = [[name, out[key]] for name, key in [("PIL on CPU workers", "cpu_pipeline_img_s"),
                                               ("GPU: bytes -> decode -> four crops", "gpu_pipeline_img_s"),
                                               ("GPU decode alone", "gpu_decode_img_s"),
                                               ("GPU four crops alone", "gpu_augment_img_s")]]
    head = (f"{out['device']}, {out['workers']} workers, batch {out['batch_size']}, tile {out['tile_size']}, "
            f"{out['images']} JPEGs of {out['image_size'][0]}x{out['image_size'][1]} (~{out['mean_file_kb']} KB)")
    return head + "\n" + markdown_table(["pipeline", "source img/s"], rows)


def benchmark(argv: list[str] | None = None) -> None:
    out = run(parse_args(argv))
    print(report(out))
    print(json_line(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line for bad arguments."""
    return run_main(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
