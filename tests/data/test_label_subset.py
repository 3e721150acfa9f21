"""The labelled subset of the semi-supervised protocol: class-balanced, seeded, stable; file lists; the record."""
from pathlib import Path

import pytest

from w2ssl.data.label_subset import KEPT, LabelSubset, balanced_fraction, listed
from w2ssl.errors import UserError

ROOT = Path("/data/train")
CLASSES = ["cat", "dog", "eel"]
SIZES = {0: 10, 1: 25, 2: 3}


def samples(sizes: dict[int, int] = SIZES, classes: list[str] = CLASSES) -> list[tuple[str, int]]:
    """An ImageFolder's sorted ``(path, class)`` list with ``sizes[c]`` images in class ``c``."""
    return [(f"{ROOT}/{classes[c]}/{i:03d}.jpg", c) for c in sorted(sizes) for i in range(sizes[c])]


def per_class(kept: list[tuple[str, int]]) -> dict[int, int]:
    return {c: sum(1 for _, t in kept if t == c) for c in SIZES}


def test_fraction_keeps_max_1_round_f_n_per_class_in_folder_order():
    all_samples = samples()
    # 10 % of 10, 25, 3: round(1.0) = 1, round(2.5) = 2 (half to even), max(1, round(0.3)) = 1
    kept = balanced_fraction(all_samples, CLASSES, 0.1, seed=0)
    assert per_class(kept) == {0: 1, 1: 2, 2: 1}
    assert per_class(balanced_fraction(all_samples, CLASSES, 0.5, seed=0)) == {0: 5, 1: 12, 2: 2}
    assert balanced_fraction(all_samples, CLASSES, 1.0, seed=0) == all_samples
    assert kept == sorted(kept) and set(kept) <= set(all_samples)


def test_fraction_is_seeded_and_each_class_keeps_its_draw():
    all_samples = samples()
    half = balanced_fraction(all_samples, CLASSES, 0.5, seed=0)
    assert balanced_fraction(list(all_samples), CLASSES, 0.5, seed=0) == half  # the same on every process and run
    assert balanced_fraction(all_samples, CLASSES, 0.5, seed=1) != half
    # A class added in front renumbers the others: their draws stay (seeded by the class's name).
    grown = samples({0: 4, 1: 10, 2: 25, 3: 3}, ["ant", *CLASSES])
    again = balanced_fraction(grown, ["ant", *CLASSES], 0.5, seed=0)
    assert [p for p, t in again if t > 0] == [p for p, _ in half]


def test_listed_takes_relative_paths_or_bare_names():
    all_samples = samples()
    lines = ["# SimCLR-style list", "", "cat/003.jpg", "  000.jpg  ", "eel/002.jpg"]
    with pytest.raises(UserError, match=r"000.jpg.* belong to several classes: write them as class/name"):
        listed(all_samples, ROOT, lines, "--label-file L")
    kept = listed(all_samples, ROOT, ["cat/003.jpg", "dog/000.jpg", "eel/002.jpg"], "--label-file L")
    assert kept == [all_samples[3], all_samples[10], all_samples[37]]
    unique = samples({0: 2}, ["n01440764_1"])  # names unique over the folder: bare names are enough
    assert listed(unique, ROOT, ["001.jpg"], "--label-file L") == [unique[1]]
    with pytest.raises(UserError, match=r"--label-file L: 1 line\(s\) name no image of /data/train \('cat/999.jpg'\)"):
        listed(all_samples, ROOT, ["cat/000.jpg", "cat/999.jpg"], "--label-file L")
    with pytest.raises(UserError, match="lists no image"):
        listed(all_samples, ROOT, ["# nothing"], "--label-file L")


def test_kept_list_is_written_once_reads_back_and_refuses_other_labels(tmp_path):
    subset = LabelSubset(ROOT, fraction=0.5, seed=0)
    kept = subset(samples(), CLASSES)
    path = subset.write(tmp_path)
    assert path == tmp_path / KEPT
    text = path.read_text().splitlines()
    assert text[0] == "# 19 of the 38 images of /data/train (--label-fraction 0.5, --label-seed 0; 2 to 12 per class " \
                      "over 3 classes)"
    assert text[1:] == [str(Path(p).relative_to(ROOT)) for p, _ in kept]
    # the file is a --label-file: the same subset
    from_file = LabelSubset(ROOT, file=path)
    assert from_file(samples(), CLASSES) == kept
    from_file.write(tmp_path)  # the same labels: left as it is
    other = LabelSubset(ROOT, fraction=0.5, seed=1)
    other(samples(), CLASSES)
    with pytest.raises(UserError, match=f"--save-dir {tmp_path} holds a run trained on other labels"):
        other.write(tmp_path)
    assert path.read_text().splitlines()[1:] == text[1:]
