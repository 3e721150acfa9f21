"""The walker: ImageFolder's order and classes, each directory once, hidden entries and non-images skipped."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from w2ssl.data.datasets import image_folder
from w2ssl.data.listing import detect_layout, read_path_list, walk
from w2ssl.errors import UserError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def nested_tree(root: Path) -> Path:
    """Class folders with sub-folders whose names sort differently as paths and as names ('b' < 'b-c' < 'b/x')."""
    for rel in ["cat/b/1.jpg", "cat/b-c/2.JPEG", "cat/b/x/3.png", "cat/0.Jpg", "cat/a.webp", "dog/z.tiff",
                "dog/deep/er/y.bmp", "dog/readme.txt", "eel/notes.md"]:
        touch(root / rel)
    os.symlink(root / "missing.jpg", root / "dog" / "broken.jpg")  # a broken link: kept, as ImageFolder does
    return root


def test_class_folders_list_what_imagefolder_lists(tmp_path):
    root = nested_tree(tmp_path / "train")
    reference = ImageFolder(str(root), loader=str, allow_empty=True)
    listing = walk(root, "class folders")
    assert listing.classes == reference.classes == ["cat", "dog", "eel"]
    assert listing.samples == reference.samples
    assert listing.skipped.counts["not an image"] == 2
    folder = image_folder(root, warn=lambda line: None)
    assert folder.samples == reference.samples and folder.class_to_idx == reference.class_to_idx


def test_a_symlink_loop_is_followed_once_and_reported(tmp_path):
    root = tmp_path / "train"
    for i in range(3):
        touch(root / "cat" / f"{i}.jpg")
    touch(root / "dog" / "sub" / "0.jpg")
    os.symlink(".", root / "cat" / "loop")  # cat/loop/loop/... for ever, with os.walk(followlinks=True)
    os.symlink("..", root / "dog" / "sub" / "up")  # back to dog
    os.symlink(root / "cat", root / "dog" / "cats")  # a second way into cat
    listing = walk(root, "class folders")
    assert [p for p, _ in listing.samples] == [str(root / p) for p in ["cat/0.jpg", "cat/1.jpg", "cat/2.jpg",
                                                                       "dog/sub/0.jpg"]]
    assert sorted(listing.skipped.repeated) == sorted(str(root / p) for p in ["cat/loop", "dog/cats", "dog/sub/up"])
    said = []
    folder = image_folder(root, warn=said.append)
    assert len(folder.samples) == 4
    assert len(said) == 1 and "3 folder(s) reached a second time" in said[0] and "cat/loop" in said[0]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = tmp_path / "imgs"
    touch(root / "a.jpg")
    touch(root / ".b.jpg")
    touch(root / "._a.jpg")  # macOS resource fork
    touch(root / ".cache" / "c.jpg")
    touch(root / "sub" / ".d.png")
    listing = walk(root, "folder tree")
    assert [p for p, _ in listing.samples] == [str(root / "a.jpg")]
    assert listing.skipped.counts["hidden"] == 4


def test_folder_tree_takes_images_at_any_depth(tmp_path):
    root = tmp_path / "photos"
    names = ["x.jpg", "2020/01/a.PNG", "2020/02/b.jpeg", "misc/c.JPG"]
    for name in names:
        touch(root / name)
    assert detect_layout(root) == ("folder tree", root)
    listing = walk(root, "folder tree")
    assert sorted(p for p, _ in listing.samples) == sorted(str(root / n) for n in names)
    assert listing.classes == ["2020", "misc"] and "4 images" in listing.describe()
    assert detect_layout(tmp_path / "photos" / "x.jpg")[0] == "path list"
    touch(tmp_path / "inet" / "train" / "c" / "0.jpg")
    assert detect_layout(tmp_path / "inet") == ("class folders", tmp_path / "inet" / "train")
    with pytest.raises(UserError, match="does not exist: pass a folder of images"):
        detect_layout(tmp_path / "nowhere")


def test_path_list_lines_are_relative_to_the_file(tmp_path):
    touch(tmp_path / "data" / "a.jpg")
    listing_file = tmp_path / "data" / "lists" / "train.txt"
    listing_file.parent.mkdir()
    listing_file.write_text(f"# my images\n\n../a.jpg\n  ../b.PNG  \n{tmp_path}/abs.jpg\nnotes.txt\n")
    listing = read_path_list(listing_file)
    base = listing_file.parent
    assert [p for p, _ in listing.samples] == [os.path.join(base, "../a.jpg"), os.path.join(base, "../b.PNG"),
                                               f"{tmp_path}/abs.jpg"]
    assert listing.skipped.counts["not an image"] == 1 and listing.layout == "path list"
