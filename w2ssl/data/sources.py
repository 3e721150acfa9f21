"""What a run's data arguments name, listed: pre-training's ``DATA`` (any layout) and labelled folders.

Both go through one walker (:mod:`w2ssl.data.listing`), its cache in the run's folder
(:mod:`w2ssl.data.listing_cache`) and ``--subset`` (:mod:`w2ssl.data.subset`).
"""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from w2ssl.data.listing import Listing, detect_layout, read_path_list
from w2ssl.data.listing_cache import cached_walk
from w2ssl.data.subset import Subset, apply_subset, read_subset
from w2ssl.errors import UserError


def load_subset(file: str | Path | None) -> Subset | None:
    return read_subset(file) if file else None


def pretrain_images(data: str | Path, subset: Subset | None = None, cache_dir: str | Path | None = None,
                    write: bool = True, batch_size: int = 1) -> tuple[Listing, str]:
    """The images of pre-training's ``DATA`` (:func:`w2ssl.data.listing.detect_layout`; labels unused),
    restricted to ``subset``, and how they were listed (walked, or read from the cache). UserError when
    they are fewer than one batch of ``batch_size`` (before anything is cached)."""
    layout, root = detect_layout(data)

    def check(listing: Listing) -> None:
        chosen = apply_subset(listing, subset)
        if not len(chosen):
            raise UserError(f"{chosen.root} has no images ({layout}; skipped: {chosen.skipped.describe()}): image "
                            f"files end in {', '.join(IMG_EXTENSIONS)} (any case)")
        if len(chosen) < batch_size:
            raise UserError(f"the training folder has {len(chosen)} images, fewer than one batch of {batch_size}: "
                            f"lower --batch-size")

    if layout == "path list":
        listing, how = read_path_list(root), "read from the list"
    else:
        listing, how = cached_walk(root, layout, cache_dir, write, check)
    check(listing)
    return apply_subset(listing, subset), how


def labelled_listing(root: str | Path, subset: Subset | None = None, cache_dir: str | Path | None = None,
                     write: bool = True) -> Listing:
    """The class folders of ``root`` (ImageFolder's classes and order), restricted to ``subset``."""
    listing, _ = cached_walk(root, "class folders", cache_dir, write)
    return apply_subset(listing, subset)
