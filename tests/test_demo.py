import pytest

from w2ssl import demo


def test_demo_dataset_is_built_from_bundled_photos(tmp_path):
    pytest.importorskip("skimage")
    root = demo.build_dataset(tmp_path / "photos")
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == len(demo.PHOTOS) == 20
    for split, count in demo.PER_CLASS.items():
        files = list((root / split).rglob("*.jpg"))
        assert len(files) == count * len(demo.PHOTOS)
    assert demo.build_dataset(root) == root   # the second call reuses it
