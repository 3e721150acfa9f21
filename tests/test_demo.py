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


def test_rerun_on_a_demo_folder_says_what_it_reuses(tmp_path):
    from argparse import Namespace

    from w2ssl.checkpoint import LAST, save_all

    args = Namespace(save_dir=str(tmp_path), resume="auto", epochs=12, trust_checkpoint=False)
    assert demo.previous_run(args) is None  # a fresh folder: nothing to say
    save_all({"epoch": 12, "iteration": 0}, [tmp_path / LAST])
    assert demo.previous_run(args) == (f"=> demo already trained in {tmp_path} (epoch 12/12): re-using it without "
                                       f"training; delete the folder to train again")
    save_all({"epoch": 5, "iteration": 3}, [tmp_path / LAST])
    assert demo.previous_run(args) == (f"=> demo partly trained in {tmp_path} (epoch 5/12, iteration 3): continuing "
                                       f"it; delete the folder to start again")
    args.resume = "none"
    assert demo.previous_run(args) is None
