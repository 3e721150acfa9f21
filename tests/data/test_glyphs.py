"""The rendered glyph set: layout, determinism, caching, colour carrying no class information."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from w2ssl.data import glyphs
from w2ssl.errors import UserError


def test_build_writes_an_image_folder_of_letters(tmp_path):
    root = glyphs.build(tmp_path / "g", {"train": 2, "val": 1}, size=24)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(glyphs.CLASSES)
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(glyphs.CLASSES)
    files = sorted((root / "train" / "A").iterdir())
    assert [f.name for f in files] == ["0.png", "1.png"]
    img = Image.open(files[0])
    assert img.size == (24, 24) and img.mode == "RGB"
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then renamed into place


def test_same_arguments_same_pixels_and_a_finished_tree_is_reused(tmp_path):
    a = glyphs.build(tmp_path / "a", {"val": 1}, size=20, seed=3)
    b = glyphs.build(tmp_path / "b", {"val": 1}, size=20, seed=3)
    assert (a / "val/K/0.png").read_bytes() == (b / "val/K/0.png").read_bytes()
    stamp = (a / glyphs.DONE).stat().st_mtime_ns
    glyphs.build(a, {"val": 1}, size=20, seed=3)
    assert (a / glyphs.DONE).stat().st_mtime_ns == stamp
    other = glyphs.build(tmp_path / "a", {"val": 1}, size=20, seed=4)  # other arguments: rebuilt
    assert (other / "val/K/0.png").read_bytes() != (b / "val/K/0.png").read_bytes()


def test_a_half_written_tree_is_rebuilt(tmp_path):
    root = tmp_path / "g"
    (root / "train" / "A").mkdir(parents=True)  # no .complete stamp
    glyphs.build(root, {"train": 1}, size=16)
    assert len(list((root / "train").iterdir())) == len(glyphs.CLASSES)


def test_mean_colour_does_not_tell_the_classes_apart():
    """Nearest class-mean colour, fitted on 12 samples per class and tested on 6 others, stays near chance."""
    faces = [glyphs.font_dir() / f"{name}.ttf" for name in glyphs.FACES]

    def mean_rgb(label: int, i: int) -> np.ndarray:
        rng = np.random.default_rng(glyphs._seed(0, "t", label, i))
        img = glyphs.render(glyphs.CLASSES[label], faces[int(rng.integers(len(faces)))], 24, rng)
        return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)

    n = len(glyphs.CLASSES)
    centroids = np.stack([np.mean([mean_rgb(c, i) for i in range(12)], axis=0) for c in range(n)])
    hits = sum(int(np.argmin(((centroids - mean_rgb(c, i)) ** 2).sum(1)) == c) for c in range(n) for i in range(12, 18))
    assert hits / (6 * n) < 0.15  # chance is 1/20


def test_without_matplotlib_a_user_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        glyphs.font_dir()
