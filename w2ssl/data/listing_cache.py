"""A folder's listing cached next to the run: ``SAVE_DIR/file_lists/<folder>-<hash>.json``.

Valid while every directory walked has the modification time it had when listed (adding, removing or
renaming an entry changes its directory's mtime, on local filesystems and NFS alike). Limits: a change
to a file's contents is not seen (the list of names is what is cached), nor a change inside a skipped
(hidden or repeated) folder, which the listing ignores anyway; a directory whose mtime was within
:data:`RACY_NS` of the listing is never trusted (a change in the same clock tick would keep its mtime);
a listing with unreadable folders is not cached (permissions may be fixed without any mtime changing).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from w2ssl.data.listing import Folder, Listing, Skipped, walk

CACHE_DIR = "file_lists"
VERSION = 1
RACY_NS = 2_000_000_000  # coarser than any filesystem's mtime granularity (FAT: 2 s)


def cache_path(cache_dir: str | Path, root: str | Path, layout: str) -> Path:
    key = hashlib.sha1(f"{os.path.abspath(root)}\0{layout}".encode()).hexdigest()[:12]
    return Path(cache_dir) / CACHE_DIR / f"{Path(root).name or 'root'}-{key}.json"


def _rel(path: str, root: str) -> str:
    return "" if path == root else path[len(root) + 1:]


def save(listing: Listing, path: Path) -> bool:
    """Write ``listing`` to ``path`` atomically; False (nothing written) when it must not be cached."""
    if listing.skipped.unreadable:
        return False
    root = listing.root
    record = {"version": VERSION, "root": root, "layout": listing.layout, "classes": listing.classes,
              "listed_at_ns": time.time_ns(),
              "folders": [[_rel(f.path, root), f.mtime_ns, f.label, f.images] for f in listing.folders],
              "skipped": {"counts": dict(listing.skipped.counts), "repeated": listing.skipped.repeated}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:  # a full or read-only disk: the run goes on, only uncached
        tmp.unlink(missing_ok=True)
        return False
    return True


def load(path: Path, root: str | Path, layout: str) -> Listing | None:
    """The listing cached at ``path`` if it is for ``root`` in ``layout`` and still valid, else None."""
    root = str(Path(root))
    try:
        record = json.loads(path.read_text())
        if record.get("version") != VERSION or record["root"] != root or record["layout"] != layout:
            return None
        listed_at = record["listed_at_ns"]
        folders = []
        for rel, mtime_ns, label, images in record["folders"]:
            folder = os.path.join(root, rel) if rel else root
            if mtime_ns >= listed_at - RACY_NS or os.stat(folder).st_mtime_ns != mtime_ns:
                return None
            folders.append(Folder(folder, mtime_ns, label, images))
        skipped = Skipped(Counter(record["skipped"]["counts"]), list(record["skipped"]["repeated"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Listing(root, layout, list(record["classes"]), folders, skipped)


def cached_walk(root: str | Path, layout: str, cache_dir: str | Path | None, write: bool = True,
                check: Callable[[Listing], None] | None = None) -> tuple[Listing, str]:
    """The listing of ``root`` (:func:`w2ssl.data.listing.walk`), from the cache in ``cache_dir`` when valid;
    a fresh walk is cached there when ``write`` (the main process) and ``check(listing)`` raises nothing (a
    run refused for its data leaves no file behind). Also says how it was obtained."""
    path = cache_path(cache_dir, root, layout) if cache_dir is not None else None
    start = time.perf_counter()
    if path is not None and (listing := load(path, root, layout)) is not None:
        return listing, f"from the cached list {path} in {time.perf_counter() - start:.2f} s"
    listing = walk(root, layout)
    how = f"listed in {time.perf_counter() - start:.2f} s"
    if check is not None:
        check(listing)
    if path is not None and write and save(listing, path):
        how += f", cached in {path}"
    return listing, how
