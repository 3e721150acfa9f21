"""Listing image collections: one ``os.scandir`` walk, each directory followed once (by device and inode).

Three layouts (:func:`detect_layout`): ``class folders`` (torchvision's ImageFolder: ``root/<class>/...``),
``folder tree`` (images anywhere under ``root``, no class structure needed) and ``path list`` (a text file,
one image path per line, relative to the file). Names starting with ``.`` are skipped, as is every
directory reached a second time (a symlink loop, or a second link to a folder already listed), and both are
reported. Images are the names ending (any case) in torchvision's ``IMG_EXTENSIONS``.

The class-folder listing equals ImageFolder's: sorted class names, files in ``sorted(os.walk(...))`` order
(directories by path string, names sorted within each), the same extensions, broken links kept (the loaders
count them as unreadable); it differs only where ImageFolder would loop or take hidden entries.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from w2ssl.errors import UserError, key_list

LAYOUTS = ("class folders", "folder tree", "path list")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass
class Skipped:
    """What a listing left out: counts by reason, and the directories skipped by path."""

    counts: Counter = field(default_factory=Counter)  # "hidden", "not an image", "outside class folders"
    repeated: list[str] = field(default_factory=list)  # directories reached a second time (symlink loops)
    unreadable: list[str] = field(default_factory=list)  # directories that could not be listed

    def add(self, other: Skipped) -> None:
        self.counts.update(other.counts)
        self.repeated += other.repeated
        self.unreadable += other.unreadable

    def describe(self) -> str:
        parts = [f"{n} {reason}" for reason, n in sorted(self.counts.items()) if n]
        if self.repeated:
            parts.append(f"{len(self.repeated)} folder(s) reached a second time (symlink loops or repeated links, "
                         f"followed once): {key_list(sorted(self.repeated))}")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable folder(s): {key_list(sorted(self.unreadable))}")
        return "; ".join(parts) or "nothing"


@dataclass
class Folder:
    """One walked directory: its path, modification time (ns), label (-1: none) and image names, sorted."""

    path: str
    mtime_ns: int
    label: int
    images: list[str]


@dataclass
class Listing:
    """The images of ``root`` in ``layout``; ``classes`` are the class folders (class layout) or the top-level
    folders (tree layout; images directly in ``root`` have label -1). ``folders`` are in sample order."""

    root: str
    layout: str
    classes: list[str]
    folders: list[Folder]
    skipped: Skipped = field(default_factory=Skipped)
    paths_listed: list[str] | None = None  # path lists: the files' lines, in order (no folders walked)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` in ImageFolder's order."""
        if self.paths_listed is not None:
            return [(path, -1) for path in self.paths_listed]
        return [(os.path.join(f.path, name), f.label) for f in self.folders for name in f.images]

    def __len__(self) -> int:
        if self.paths_listed is not None:
            return len(self.paths_listed)
        return sum(len(f.images) for f in self.folders)

    def describe(self) -> str:
        """``"N images in ROOT (layout ...)"`` for the start summary."""
        how = self.layout
        if self.layout == "class folders":
            how += f", {len(self.classes)} classes"
        elif self.layout == "folder tree":
            how += f", {len(self.folders)} folders"
        return f"{len(self)} images in {self.root} ({how}); skipped: {self.skipped.describe()}"


def _scan(path: str, skipped: Skipped) -> tuple[list[str], list[str]] | None:
    """``(image names, sub-directory paths)`` of one directory, sorted, or None if it cannot be listed."""
    images, subdirs = [], []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    skipped.counts["hidden"] += 1
                    continue
                try:
                    is_dir = entry.is_dir()  # follows links; a broken link is a file (ImageFolder's rule)
                except OSError:
                    is_dir = False
                if is_dir:
                    subdirs.append(entry.path)
                elif is_image(entry.name):
                    images.append(entry.name)
                else:
                    skipped.counts["not an image"] += 1
    except OSError:
        skipped.unreadable.append(path)
        return None
    return sorted(images), sorted(subdirs)


def _stat(path: str, skipped: Skipped) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        skipped.unreadable.append(path)
        return None


def _walk_tree(top: str, label: int, seen: set[tuple[int, int]]) -> tuple[list[tuple[tuple[int, int], Folder]],
                                                                           Skipped]:
    """Depth-first walk of ``top`` (names in sorted order), each directory once: those whose
    ``(st_dev, st_ino)`` is in ``seen`` (filled as it goes) are skipped and reported."""
    out, skipped, stack = [], Skipped(), [top]
    while stack:
        path = stack.pop()
        st = _stat(path, skipped)
        if st is None:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            skipped.repeated.append(path)
            continue
        seen.add(key)
        scanned = _scan(path, skipped)
        if scanned is None:
            continue
        images, subdirs = scanned
        out.append((key, Folder(path, st.st_mtime_ns, label, images)))
        stack.extend(reversed(subdirs))
    return out, skipped


def walk(root: str | Path, layout: str, workers: int = 4) -> Listing:
    """List ``root`` (``class folders`` or ``folder tree``): its top-level folders are walked in parallel
    (a thread pool: directory listing releases the GIL; 4 threads are as fast as one on a warm local disk,
    BENCHMARKS.md, and overlap the latency of network filesystems, not measured here), each with its own
    record of the directories it has been through; if two of them met the same directory, they are walked
    again one after the other (sorted order) with one record, so the result never depends on the threads'
    timing."""
    root = str(Path(root))
    skipped = Skipped()
    st, scanned = _stat(root, skipped), _scan(root, skipped)
    if st is None or scanned is None:
        raise UserError(f"cannot list {root}: check that it is a readable folder")
    images, subdirs = scanned
    root_key = (st.st_dev, st.st_ino)
    classes = [os.path.basename(d) for d in subdirs]
    folders: list[tuple[tuple[int, int], Folder]] = []
    if layout == "folder tree":
        folders.append((root_key, Folder(root, st.st_mtime_ns, -1, images)))
    else:  # ImageFolder takes no file of the root itself
        skipped.counts["outside class folders"] += len(images)
        folders.append((root_key, Folder(root, st.st_mtime_ns, -1, [])))
    with ThreadPoolExecutor(max(1, min(workers, len(subdirs)))) as pool:
        walked = list(pool.map(lambda i: _walk_tree(subdirs[i], i, {root_key}), range(len(subdirs))))
    keys = [key for tree, _ in walked for key, _ in tree]
    if len(set(keys)) < len(keys):  # top-level folders share directories (links across them): walk again in
        seen = {root_key}           # order with one record, so that each is listed once, the first time met
        walked = [_walk_tree(top, i, seen) for i, top in enumerate(subdirs)]
    for tree, tree_skipped in walked:
        skipped.add(tree_skipped)
        folders += tree
    ordered = sorted((f for _, f in folders), key=lambda f: f.path)  # sorted(os.walk(...)) order
    return Listing(root, layout, classes, ordered, skipped)


def read_path_list(file: str | Path) -> Listing:
    """The images named by ``file``: one path a line, relative to the file's folder (or absolute); blank
    lines and lines starting with ``#`` are ignored, lines not naming an image file are skipped."""
    file = Path(file)
    base, skipped, paths = file.parent, Skipped(), []
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the path list {file} ({e}): pass a text file of image paths") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_image(line):
            paths.append(os.path.join(base, line))
        else:
            skipped.counts["not an image"] += 1
    return Listing(str(file), "path list", [], [], skipped, paths_listed=paths)


def detect_layout(data: str | Path) -> tuple[str, Path]:
    """Pre-training's ``DATA``: a text file -> ``path list``; a folder with ``train/`` -> ``class folders``
    of ``DATA/train`` (the ImageNet layout); any other folder -> ``folder tree`` of ``DATA``."""
    data = Path(data)
    if data.is_file():
        return "path list", data
    if (data / "train").is_dir():
        return "class folders", data / "train"
    if data.is_dir():
        return "folder tree", data
    raise UserError(f"{data} does not exist: pass a folder of images (DATA/train/<class>/... as ImageNet, or any "
                    f"tree of images) or a text file listing image paths")
