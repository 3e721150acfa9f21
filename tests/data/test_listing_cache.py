"""The cached listing: used while no walked folder changed, walked again when one did."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from w2ssl.data import listing_cache
from w2ssl.data.listing_cache import cache_path, cached_walk


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def age(root: Path, seconds: int = 60) -> None:
    """Set every folder's mtime into the past, out of the racy window of a fresh listing."""
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        st = os.stat(d)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "train"
    for rel in ["a/0.jpg", "a/1.jpg", "b/x/2.jpg", "b/3.jpg"]:
        touch(root / rel)
    age(root)
    return root


def no_walk(*_, **__):
    raise AssertionError("walked although the cache is valid")


def test_second_listing_comes_from_the_cache(tree, tmp_path, monkeypatch):
    first, how = cached_walk(tree, "class folders", tmp_path / "run")
    assert "cached in" in how and cache_path(tmp_path / "run", tree, "class folders").is_file()
    monkeypatch.setattr(listing_cache, "walk", no_walk)
    again, how = cached_walk(tree, "class folders", tmp_path / "run")
    assert how.startswith("from the cached list")
    assert again.samples == first.samples and again.classes == first.classes


@pytest.mark.parametrize("change", ["add in a nested folder", "remove", "rename a class", "new class"])
def test_a_changed_folder_is_walked_again(tree, tmp_path, change):
    cached_walk(tree, "class folders", tmp_path / "run")
    if change == "add in a nested folder":
        touch(tree / "b" / "x" / "new.jpg")
    elif change == "remove":
        (tree / "a" / "1.jpg").unlink()
    elif change == "rename a class":
        (tree / "a").rename(tree / "c")
    else:
        touch(tree / "d" / "5.jpg")
    listing, how = cached_walk(tree, "class folders", tmp_path / "run")
    assert how.startswith("listed in")
    assert sorted(p for p, _ in listing.samples) == sorted(str(p) for p in tree.rglob("*.jpg"))


def test_a_folder_changed_just_before_listing_is_not_trusted(tmp_path, monkeypatch):
    touch(tmp_path / "train" / "a" / "0.jpg")  # mtimes of now: a change in the same tick would keep them
    cached_walk(tmp_path / "train", "class folders", tmp_path / "run")
    _, how = cached_walk(tmp_path / "train", "class folders", tmp_path / "run")
    assert how.startswith("listed in")


def test_unreadable_folders_are_not_cached(tree, tmp_path, monkeypatch):
    scandir, denied = os.scandir, str(tree / "b" / "x")

    def scandir_denying(path):  # chmod 0 would not stop root, who runs these tests in containers
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)
    monkeypatch.setattr(os, "scandir", scandir_denying)
    listing, how = cached_walk(tree, "class folders", tmp_path / "run")
    assert listing.skipped.unreadable == [denied] and "cached" not in how
    assert "1 unreadable folder(s)" in listing.describe()


def test_a_corrupt_cache_is_ignored(tree, tmp_path):
    path = cache_path(tmp_path / "run", tree, "class folders")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    listing, how = cached_walk(tree, "class folders", tmp_path / "run")
    assert len(listing) == 4 and "cached in" in how
