"""``--subset FILE``: keep some classes (e.g. ImageNet-100's WordNet ids) or some images of a listing.

The file holds one entry a line (blank lines and ``#`` comments ignored): either class names (class
folders; in a folder tree, its top-level folders), or image paths, relative to the file's folder or
absolute. Class subsets number the kept classes in sorted order, as an ImageFolder holding only those
folders would. A path subset filters only the folders it names images in, so that a subset of training
images leaves the validation folder whole; paths are compared after ``os.path.abspath`` (links unresolved).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from w2ssl.data.listing import Folder, Listing, Skipped, is_image
from w2ssl.errors import UserError, key_list


@dataclass(frozen=True)
class Subset:
    """The entries of a subset file: ``classes`` (sorted, unique) or ``paths`` (absolute), never both."""

    file: str
    classes: tuple[str, ...] | None = None
    paths: frozenset[str] | None = None


def read_subset(file: str | Path) -> Subset:
    file = Path(file)
    if not file.is_file():
        raise UserError(f"--subset {file} does not exist: pass a text file of class names or image paths")
    try:
        lines = [s.strip() for s in file.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --subset {file} ({e}): pass a text file of class names or image paths") from None
    entries = [s for s in lines if s and not s.startswith("#")]
    if not entries:
        raise UserError(f"--subset {file} names nothing: one class name or image path a line")
    images = [is_image(s) for s in entries]
    if all(images):
        base = file.parent
        return Subset(str(file), paths=frozenset(os.path.abspath(os.path.join(base, s)) for s in entries))
    if any(images):
        first = entries[images.index(True)]
        raise UserError(f"--subset {file} mixes image paths (e.g. {first}) and class names (e.g. "
                        f"{entries[images.index(False)]}): one kind a file")
    if any("/" in s or os.sep in s for s in entries):
        raise UserError(f"--subset {file}: class names have no '/', and paths must name image files")
    return Subset(str(file), classes=tuple(sorted(set(entries))))


def apply_subset(listing: Listing, subset: Subset | None) -> Listing:
    """``listing`` restricted to ``subset``; what it removes is counted in ``skipped`` ("not in --subset")."""
    if subset is None:
        return listing
    if subset.classes is not None:
        return _keep_classes(listing, subset)
    return _keep_paths(listing, subset)


def _keep_classes(listing: Listing, subset: Subset) -> Listing:
    if listing.layout == "path list":
        raise UserError(f"--subset {subset.file} names classes, and {listing.root} is a list of paths without "
                        f"classes: pass a subset of image paths, or a folder of class sub-folders")
    missing = sorted(set(subset.classes) - set(listing.classes))
    if missing:
        raise UserError(f"--subset {subset.file}: {len(missing)} of its {len(subset.classes)} classes have no "
                        f"folder in {listing.root}: {key_list(missing)}")
    index = {name: i for i, name in enumerate(subset.classes)}
    old = {i: name for i, name in enumerate(listing.classes)}
    folders = [Folder(f.path, f.mtime_ns, index[old[f.label]], f.images)
               for f in listing.folders if old.get(f.label) in index]
    return _with_removed(replace(listing, classes=list(subset.classes), folders=folders), len(listing))


def _keep_paths(listing: Listing, subset: Subset) -> Listing:
    if listing.paths_listed is not None:
        kept = [p for p in listing.paths_listed if os.path.abspath(p) in subset.paths]
        named = len(subset.paths)
        result = replace(listing, paths_listed=kept)
    else:
        inside = os.path.join(os.path.abspath(listing.root), "")
        named = sum(p.startswith(inside) for p in subset.paths)
        if not named:  # the subset is about another folder (e.g. train/, and this is val/)
            return listing
        folders = [Folder(f.path, f.mtime_ns, f.label, [name for name in f.images
                                                        if os.path.abspath(os.path.join(f.path, name)) in subset.paths])
                   for f in listing.folders]
        result = replace(listing, folders=folders)
    if not len(result):
        raise UserError(f"none of the {named} images of --subset {subset.file} is in {listing.root}: its paths are "
                        f"relative to the subset file's folder")
    result = _with_removed(result, len(listing))
    if named > len(result):
        result.skipped.counts["--subset paths not found"] += named - len(result)
    return result


def _with_removed(listing: Listing, before: int) -> Listing:
    skipped = Skipped(listing.skipped.counts.copy(), list(listing.skipped.repeated), list(listing.skipped.unreadable))
    skipped.counts["not in --subset"] += before - len(listing)
    return replace(listing, skipped=skipped)
