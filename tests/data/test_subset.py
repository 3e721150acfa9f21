"""--subset: class lists (the shipped ImageNet-100 included) and image-path lists, on every layout."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
from torchvision.datasets import ImageFolder

from w2ssl.data.datasets import image_folder
from w2ssl.data.listing import walk
from w2ssl.data.sources import pretrain_images
from w2ssl.data.subset import apply_subset, read_subset
from w2ssl.errors import UserError

IMAGENET100 = Path(__file__).resolve().parents[2] / "configs" / "subsets" / "imagenet100.txt"


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def data(tmp_path) -> Path:
    """``train/`` and ``val/`` with classes a-d, two images each."""
    for split in ("train", "val"):
        for c in "abcd":
            for i in range(2):
                touch(tmp_path / "data" / split / c / f"{split}{i}.jpg")
    return tmp_path / "data"


def test_a_class_subset_is_an_imagefolder_of_those_classes(data, tmp_path):
    subset_file = tmp_path / "two.txt"
    subset_file.write_text("# two classes\nd\n\nb\nb\n")
    subset = read_subset(subset_file)
    assert subset.classes == ("b", "d")
    folder = image_folder(data / "train", subset=subset)
    copy = tmp_path / "copy"  # what users did before: a folder holding only those classes
    for c in "bd":
        for i in range(2):
            touch(copy / c / f"train{i}.jpg")
    reference = ImageFolder(str(copy), loader=str)
    assert folder.classes == reference.classes and folder.targets == reference.targets == [0, 0, 1, 1]
    assert [Path(p).relative_to(data / "train") for p, _ in folder.samples] == \
           [Path(p).relative_to(copy) for p, _ in reference.samples]
    assert len(image_folder(data / "val", subset=subset).samples) == 4  # every split keeps the classes
    listing, _ = pretrain_images(data, subset)
    assert len(listing) == 4 and listing.skipped.counts["not in --subset"] == 4


def test_a_class_subset_naming_absent_classes_is_refused(data, tmp_path):
    subset_file = tmp_path / "s.txt"
    subset_file.write_text("a\nzebra\nyak\n")
    with pytest.raises(UserError, match=r"2 of its 3 classes have no folder in .*'yak', 'zebra'"):
        image_folder(data / "train", subset=read_subset(subset_file))


def test_a_path_subset_keeps_those_images_of_the_folder_it_names(data, tmp_path):
    subset_file = data / "few.txt"
    subset_file.write_text("train/a/train0.jpg\ntrain/c/train1.jpg\ntrain/c/gone.jpg\n")
    subset = read_subset(subset_file)
    train = image_folder(data / "train", subset=subset)
    assert [(Path(p).relative_to(data).as_posix(), t) for p, t in train.samples] == \
           [("train/a/train0.jpg", 0), ("train/c/train1.jpg", 2)]
    assert train.classes == ["a", "b", "c", "d"]  # labels keep their meaning
    assert len(image_folder(data / "val", subset=subset).samples) == 8  # a folder it names nothing in: whole
    listing, _ = pretrain_images(data, subset)
    assert len(listing) == 2 and listing.skipped.counts["--subset paths not found"] == 1


def test_a_path_subset_of_a_path_list(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        touch(tmp_path / name)
    (tmp_path / "all.txt").write_text("x.jpg\ny.jpg\nz.jpg\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "keep.txt").write_text("../z.jpg\n../x.jpg\n")
    listing, _ = pretrain_images(tmp_path / "all.txt", read_subset(tmp_path / "sub" / "keep.txt"))
    assert [Path(p).name for p, _ in listing.samples] == ["x.jpg", "z.jpg"]


def test_a_class_subset_of_a_folder_tree_keeps_its_top_level_folders(tmp_path):
    for rel in ("cats/1/a.jpg", "cats/b.jpg", "dogs/c.jpg", "d.jpg"):
        touch(tmp_path / "tree" / rel)
    (tmp_path / "s.txt").write_text("cats\n")
    listing = apply_subset(walk(tmp_path / "tree", "folder tree"), read_subset(tmp_path / "s.txt"))
    assert sorted(Path(p).name for p, _ in listing.samples) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("text, message", [
    ("a\nb/c.jpg\n", "mixes image paths"),
    ("# nothing\n\n", "names nothing"),
    ("a/b\n", "class names have no '/'"),
])
def test_bad_subset_files_are_one_line(tmp_path, text, message):
    (tmp_path / "s.txt").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        read_subset(tmp_path / "s.txt")
    with pytest.raises(UserError, match="does not exist"):
        read_subset(tmp_path / "none.txt")


def test_a_class_subset_of_a_path_list_is_refused(tmp_path):
    touch(tmp_path / "x.jpg")
    (tmp_path / "all.txt").write_text("x.jpg\n")
    (tmp_path / "s.txt").write_text("cats\n")
    with pytest.raises(UserError, match="names classes, and .* is a list of paths"):
        pretrain_images(tmp_path / "all.txt", read_subset(tmp_path / "s.txt"))


def test_the_shipped_imagenet100_list_is_100_imagenet_classes():
    lines = IMAGENET100.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert any("Contrastive Multiview Coding" in line for line in header)
    assert any("HobbitLong/CMC" in line for line in header)
    wnids = [line for line in lines if line and not line.startswith("#")]
    imagenet1k = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert len(imagenet1k) == 1000
    assert len(wnids) == len(set(wnids)) == 100 and set(wnids) <= set(imagenet1k)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # CMC's file order: its first and last entries
    assert (wnids[0], wnids[-1]) == ("n02869837", "n02090622")
    assert read_subset(IMAGENET100).classes == tuple(sorted(wnids))
