"""Source images/s of the pre-training input pipelines: per core, through a DataLoader, and on the GPU.

On a generated JPEG ImageFolder (``--images`` photo-like files of 500x375 px at quality 90: smooth colour
fields, solid shapes with hard edges, fine texture and sensor noise; written once into ``--root`` or a
temporary folder; the files then sit in the page cache, so this measures decoding and augmentation):

* ``core``: one process, one thread, the per-core rate of each CPU pipeline on the same files, timed in
  interleaved rounds of ``--batch-size`` images (``--rounds``; load from other processes falls on all
  alike): decode only (PIL open + RGB: the floor), the PIL four-crop (``--cpu-aug pil``, the reference),
  the fast four-crop (``--cpu-aug fast``, the default), and MoCo v3's two-crop both ways (views of
  ``2 x --tile-size``). The ratio fast/PIL is the speed-up per core;
* ``loader``: the trainer's loader (``PretrainDataset``, ``ResumableSampler``, ``--workers`` persistent
  workers) with the PIL and the fast four-crop, ``--iters`` batches after ``--warmup``;
* ``gpu``: ``--gpu-aug``: workers read bytes, ``decode_batch`` and ``GpuFourCrop`` run on ``--device``
  (also on the CPU, slowly, so that it can be tested), and its two stages alone on one fixed batch.

Prints a table, then one JSON line (img/s per core: ``decode_only``, ``pil_fourcrop``, ``fast_fourcrop``,
``pil_twocrop``, ``fast_twocrop``; ``ratio_fast_vs_pil``; ``loader_*`` and ``gpu_*`` img/s).
Example: ``python -m bench.data --device cpu --images 256``.
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

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from bench.common import (
    device_name,
    json_line,
    markdown_table,
    median,
    resolve_device,
    time_interleaved,
    time_iterations,
    versions,
)
from w2ssl.cli import run_main
from w2ssl.data.augment import FourCrop
from w2ssl.data.datasets import PretrainDataset, load_rgb
from w2ssl.data.fast_augment import FastCollate, fast_four_crop, fast_two_crop, load_uint8
from w2ssl.data.gpu_augment import GpuFourCrop
from w2ssl.data.gpu_decode import EncodedImageFolder, collate_encoded, decode_batch
from w2ssl.data.gpu_params import sample_keys
from w2ssl.data.sampler import ResumableSampler, make_loader
from w2ssl.data.twocrop import TwoCrop
from w2ssl.errors import UserError

WIDTH, HEIGHT = 500, 375
NOISE = 3.0  # sensor-like noise std, in grey levels
PIPELINES = ("core", "loader", "gpu")


def synthetic_image(seed: int) -> np.ndarray:
    """``[HEIGHT, WIDTH, 3]`` uint8, photo-like: a smooth colour field, 12 solid shapes with hard edges
    (some softened), a faint stripe texture and mild noise. Pure-noise JPEGs decode at another speed."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(12):
        x0, y0 = rng.integers(0, WIDTH), rng.integers(0, HEIGHT)
        box = [int(x0), int(y0), int(x0 + rng.integers(20, 200)), int(y0 + rng.integers(20, 150))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = np.asarray(field.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32).copy()
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.6)
    img += 6 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
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


def core_pipelines(args: argparse.Namespace) -> dict[str, Callable[[list[str], int], object]]:
    """name -> ``f(paths, first)`` running one CPU pipeline on the files ``paths`` (decode included);
    ``first`` is the first file's sample index (the fast pipelines' keys, as in training)."""
    t, crop_min = args.tile_size, args.crop_min
    pil_four, pil_two = FourCrop(t, crop_min), TwoCrop(2 * t, crop_min)
    fast_four, fast_two = fast_four_crop(t, crop_min), fast_two_crop(2 * t, crop_min)

    def each(transform: Callable) -> Callable[[list[str], int], object]:
        return lambda paths, first: [transform(load_rgb(p)) for p in paths]

    def batched(views: Callable) -> Callable[[list[str], int], object]:
        return lambda paths, first: views([load_uint8(p) for p in paths],
                                          sample_keys(args.seed, [0] * len(paths), range(first, first + len(paths))))

    return {"decode_only": lambda paths, first: [load_rgb(p) for p in paths],
            "pil_fourcrop": each(pil_four), "fast_fourcrop": batched(fast_four),
            "pil_twocrop": each(pil_two), "fast_twocrop": batched(fast_two)}


def per_core(paths: list[str], args: argparse.Namespace) -> dict[str, float]:
    """img/s of each CPU pipeline on one thread, interleaved: round ``r`` gives every pipeline the same
    ``--batch-size`` files (the next ones each round), one untimed round first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs, b = core_pipelines(args), args.batch_size
        batches = iter(range(0, 10**9, b))

        def steps() -> dict[str, Callable[[], object]]:
            first = next(batches) % (len(paths) - b + 1)
            return {name: (lambda run=run: run(paths[first:first + b], first)) for name, run in runs.items()}

        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds + 1):
            for name, seconds in time_interleaved(steps(), iters=1, warmup=0).items():
                if r:  # the first round compiles, opens and caches
                    times[name] += seconds
    finally:
        torch.set_num_threads(threads)
    return {name: b / median(t) for name, t in times.items()}


def loader_pipelines(root: Path, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """img/s of the trainer's loader with the PIL and the fast four-crop (``--workers`` workers)."""
    out = {}
    for name in ("pil", "fast"):
        if name == "pil":
            dataset, collate = PretrainDataset(root, FourCrop(args.tile_size, args.crop_min), args.seed), None
        else:
            dataset = PretrainDataset(root, None, args.seed, loader=load_uint8)
            collate = FastCollate(fast_four_crop(args.tile_size, args.crop_min), args.seed)
        sampler = ResumableSampler(len(dataset), args.batch_size, 1, 0, args.seed)
        batches = make_loader(dataset, sampler, args.workers, pin_memory=device.type == "cuda", collate_fn=collate)
        out[f"loader_{name}_fourcrop"] = throughput(lambda batch: None, batches, args.batch_size, args.warmup,
                                                    args.iters, device)
    return out


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
    p.add_argument("--images", type=int, default=256, help="number of generated JPEGs")
    p.add_argument("--classes", type=int, default=16, help="class sub-folders of the generated set")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (loader and gpu)")
    p.add_argument("--batch-size", type=int, default=32, help="source images per batch (and per core round)")
    p.add_argument("--tile-size", type=int, default=112)
    p.add_argument("--crop-min", type=float, default=0.2)
    p.add_argument("--device", default=None, help="cuda (default when visible), cuda:N or cpu")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per core pipeline (median kept)")
    p.add_argument("--iters", type=int, default=10, help="timed batches per loader or GPU pipeline")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up, cuDNN, nvjpeg)")
    p.add_argument("--pipelines", default=None,
                   help="comma-separated subset of: core, loader, gpu (default: core,loader and, on a GPU, gpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.pipelines is None:
        args.pipelines = "core,loader" + (",gpu" if resolve_device(args.device).type == "cuda" else "")
    args.pipelines = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    if not args.pipelines or any(name not in PIPELINES for name in args.pipelines):
        raise UserError(f"--pipelines {','.join(args.pipelines)!r}: use a comma-separated subset of "
                        f"{', '.join(PIPELINES)}")
    if args.batch_size < 1 or args.images < args.batch_size:
        raise UserError(f"need 1 <= --batch-size <= --images; got {args.batch_size} and {args.images}")
    if args.classes < 1 or args.workers < 0 or args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        raise UserError("need --classes >= 1, --workers >= 0, --iters >= 1, --rounds >= 1 and --warmup >= 0")
    return args


MEASURES = ("decode_only", "pil_fourcrop", "fast_fourcrop", "pil_twocrop", "fast_twocrop",
            "loader_pil_fourcrop", "loader_fast_fourcrop", "gpu_pipeline_img_s", "gpu_decode_img_s",
            "gpu_augment_img_s")


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="w2ssl-bench-data-") as tmp:
        root = args.root if args.root is not None else Path(tmp)
        kb = make_folder(root, args.images, args.classes, max(args.workers, 1))
        paths = [path for path, _ in ImageFolder(str(root)).samples]
        if len(paths) != args.images:
            raise UserError(f"{root} holds other images than the {args.images} generated ones: "
                            "pass the same --images as before or a new --root")
        out: dict = {"device": device_name(device), **dict.fromkeys(MEASURES), "ratio_fast_vs_pil": None,
                     "ratio_fast_vs_pil_twocrop": None, "workers": args.workers, "batch_size": args.batch_size,
                     "tile_size": args.tile_size, "images": args.images, "image_size": [WIDTH, HEIGHT],
                     "mean_file_kb": round(kb, 1), "rounds": args.rounds, "iters": args.iters,
                     "cpu_cores": os.cpu_count(), **versions()}
        if "core" in args.pipelines:
            out.update(per_core(paths, args))
            out["ratio_fast_vs_pil"] = out["fast_fourcrop"] / out["pil_fourcrop"]
            out["ratio_fast_vs_pil_twocrop"] = out["fast_twocrop"] / out["pil_twocrop"]
        if "loader" in args.pipelines:
            out.update(loader_pipelines(root, args, device))
        if "gpu" in args.pipelines:
            out.update(gpu_pipeline(root, args, device))
    return out


ROWS = [("decode only (PIL open + RGB): the floor", "decode_only"),
        ("PIL four-crop (--cpu-aug pil, reference)", "pil_fourcrop"),
        ("fast four-crop (--cpu-aug fast, default)", "fast_fourcrop"),
        ("PIL two-crop (MoCo v3, --cpu-aug pil)", "pil_twocrop"),
        ("fast two-crop (MoCo v3, --cpu-aug fast)", "fast_twocrop")]
LOADER_ROWS = [("PIL four-crop", "loader_pil_fourcrop"), ("fast four-crop", "loader_fast_fourcrop"),
               ("GPU: bytes -> decode -> four crops", "gpu_pipeline_img_s"), ("GPU decode alone", "gpu_decode_img_s"),
               ("GPU four crops alone", "gpu_augment_img_s")]


def report(out: dict) -> str:
    head = (f"{out['device']}, batch {out['batch_size']}, tile {out['tile_size']}, {out['images']} JPEGs of "
            f"{out['image_size'][0]}x{out['image_size'][1]} (~{out['mean_file_kb']} KB)")
    core = markdown_table(["per core (1 process, 1 thread)", "source img/s"],
                          [[name, out[key]] for name, key in ROWS if out[key] is not None])
    ratios = (f"fast / PIL per core: four-crop {out['ratio_fast_vs_pil']:.2f}x, two-crop "
              f"{out['ratio_fast_vs_pil_twocrop']:.2f}x" if out["ratio_fast_vs_pil"] else "")
    loaders = markdown_table([f"through a DataLoader ({out['workers']} workers)", "source img/s"],
                             [[name, out[key]] for name, key in LOADER_ROWS if out[key] is not None])
    return "\n".join([head, core, ratios, loaders])


def benchmark(argv: list[str] | None = None) -> None:
    out = run(parse_args(argv))
    print(report(out))
    print(json_line(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line for bad arguments."""
    return run_main(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
