"""The linear probe and kNN (main_lincls.py) with --subset: a class list and a list of training images."""
from __future__ import annotations

import re

import pytest
import torch

from main_lincls import build_parser
from tests.test_main_lincls import run_inprocess, synthetic  # noqa: F401 - the fixture
from w2ssl import cli
from w2ssl.data.datasets import eval_transform
from w2ssl.dist.distributed import Context
from w2ssl.eval.lincls import LinearProbe

PROBE = ["-a", "resnet18", "--input-size", "32", "-b", "8", "--workers", "0", "--seed", "0"]


def probe(image_root, synthetic, tmp_path, subset) -> LinearProbe:  # noqa: F811
    argv = [image_root, *PROBE, "--pretrained", synthetic, "--subset", subset, "--save-dir", tmp_path / "probe"]
    return LinearProbe(Context(torch.device("cpu")), cli.parse(build_parser(), [str(a) for a in argv]))


def test_a_class_subset_probes_those_classes(image_root, synthetic, tmp_path):  # noqa: F811
    (tmp_path / "two.txt").write_text("class2\nclass0\n")
    p = probe(image_root, synthetic, tmp_path, tmp_path / "two.txt")
    assert p.model.fc.out_features == 2
    assert p.val_loader.dataset.classes == ["class0", "class2"] and len(p.val_loader.dataset) == 8
    train = p._loader("train", eval_transform(32), "training")[0].dataset
    assert len(train) == 16 and sorted(set(t for _, t in train.samples)) == [0, 1]


def test_a_path_subset_keeps_those_training_images_and_the_whole_val(image_root, synthetic, tmp_path):  # noqa: F811
    kept = sorted((image_root / "train").rglob("*.jpg"))[::4]
    (tmp_path / "few.txt").write_text("".join(f"{path}\n" for path in kept))
    p = probe(image_root, synthetic, tmp_path, tmp_path / "few.txt")
    assert p.model.fc.out_features == 3 and len(p.val_loader.dataset) == 12
    train = p._loader("train", eval_transform(32), "training")[0].dataset
    assert [path for path, _ in train.samples] == [str(path) for path in kept]


def test_a_probe_resumed_with_another_subset_is_refused(image_root, synthetic, tmp_path, capsys):  # noqa: F811
    (tmp_path / "two.txt").write_text("class0\nclass1\n")
    (tmp_path / "other.txt").write_text("class0\nclass2\n")
    base = [image_root, *PROBE, "--pretrained", synthetic, "--save-dir", tmp_path / "probe"]
    code, _, err = run_inprocess(capsys, *base, "--epochs", "1", "--subset", tmp_path / "two.txt")
    assert code == 0, err
    for subset in (["--subset", tmp_path / "other.txt"], []):
        code, _, err = run_inprocess(capsys, *base, "--epochs", "2", *subset)
        given = f"--subset {tmp_path / 'other.txt'}" if subset else "no --subset"
        assert code == 2 and err.count("\n") == 1, err
        assert f"is a probe of --subset {tmp_path / 'two.txt'} but {given} was given: pass --subset " in err, err


@pytest.mark.slow
def test_knn_with_a_class_subset(image_root, synthetic, tmp_path, capsys):  # noqa: F811
    (tmp_path / "two.txt").write_text("class0\nclass1\n")
    code, out, err = run_inprocess(capsys, image_root, *PROBE, "--knn", "--pretrained", synthetic,
                                   "--subset", tmp_path / "two.txt", "--save-dir", tmp_path / "knn")
    assert code == 0, err
    assert re.search(r"\(16 train, 8 val images\)", out), out
