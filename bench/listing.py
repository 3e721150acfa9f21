"""Listing a large image folder: torchvision's ImageFolder scan vs our walker (one thread, and a thread pool
over the class folders) vs our cached list, on a generated tree of empty ``.JPEG`` files.

    python -m bench.listing --files 200000 --classes 1000 --repeats 3

"Walk" means no cached list: the OS's directory cache is warm (the tree was just written, or listed by
the previous repeat), as on a machine that listed the folder before; a first listing after a reboot or
on a cold network filesystem is slower. Prints one JSON line and a markdown table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision.datasets import ImageFolder

from w2ssl.data import listing_cache
from w2ssl.data.listing import walk


def generate(root: Path, files: int, classes: int) -> None:
    """``root/n%08d/n%08d_%d.JPEG`` empty files, ``files`` in all, spread evenly over ``classes`` folders."""
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(c, files, classes):
            open(d / f"n{c:08d}_{i}.JPEG", "wb").close()


def age(root: Path) -> None:
    """Folder mtimes a minute back, out of the cache's racy window (a just-written tree is never trusted)."""
    for d in [root, *(e.path for e in os.scandir(root))]:
        st = os.stat(d)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns - 60 * 10**9))


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="threads of the parallel walk")
    parser.add_argument("--root", type=Path, help="where to write the tree (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root, cache_dir = Path(tmp) / "train", Path(tmp) / "run"
        gen_s, _ = timed(generate, root, args.files, args.classes)
        age(root)
        times: dict[str, list[float]] = {"imagefolder": [], "walk_1_thread": [], "walk_parallel": [],
                                          "cache_write": [], "cached": []}
        for _ in range(args.repeats):  # interleaved, so that load from other processes falls on all alike
            t, ref = timed(ImageFolder, str(root), loader=str)
            times["imagefolder"].append(t)
            t, _ = timed(walk, root, "class folders", workers=1)
            times["walk_1_thread"].append(t)
            t, listing = timed(walk, root, "class folders", workers=args.threads)
            times["walk_parallel"].append(t)
            path = listing_cache.cache_path(cache_dir, root, "class folders")
            t, ok = timed(listing_cache.save, listing, path)
            assert ok
            times["cache_write"].append(t)
            t, cached = timed(listing_cache.load, path, root, "class folders")
            times["cached"].append(t)
            assert cached is not None and cached.samples == listing.samples == ref.samples
        record = {"files": args.files, "classes": args.classes, "repeats": args.repeats, "threads": args.threads,
                  "generate_s": round(gen_s, 2), "cache_bytes": path.stat().st_size,
                  "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
                  "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                  "load_1m": os.getloadavg()[0], "cpus": os.cpu_count(), "machine": platform.machine(),
                  "python": platform.python_version(), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "fs": os.statvfs(tmp).f_bsize}
    print(json.dumps(record))
    print(f"\n| {args.files} files, {args.classes} folders | median s |\n|---|---|")
    for k, v in record["median_s"].items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
