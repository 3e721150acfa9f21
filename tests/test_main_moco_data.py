"""main_moco.py on collections without class folders: a flat folder, a nested tree, a list of paths."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import main_lincls
import main_moco
from tests.conftest import write_folder
from tests.helpers import TINY
from tests.test_main_moco import run_inprocess
from w2ssl import cli

RUN = [*TINY, "-b", "4", "--epochs", "1", "--workers", "0"]


def images(tmp_path: Path) -> list[Path]:
    return sorted(write_folder(tmp_path / "src", classes=2, per_class=5).rglob("*.jpg"))


@pytest.mark.slow
def test_a_flat_folder_pre_trains(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(images(tmp_path)):
        shutil.copy(path, flat / f"{i}.{'JPG' if i % 2 else 'jpeg'}")
    (flat / ".DS_Store").write_bytes(b"\0")
    (flat / "sub").mkdir()
    shutil.copy(path, flat / "sub" / "deep.jpg")
    os.symlink("..", flat / "sub" / "loop")
    assert run_inprocess(main_moco.main, [flat, *RUN, "--save-dir", tmp_path / "out"]) == 0
    out = capsys.readouterr().out
    assert f"=> data: 11 images in {flat} (folder tree, 2 folders); skipped: 1 hidden; 1 folder(s) reached a " \
           f"second time" in out and "sub/loop" in out and "labels unused" in out
    assert (tmp_path / "out" / "checkpoint_0000.pth.tar").is_file()


@pytest.mark.slow
def test_a_path_list_pre_trains(tmp_path, capsys):
    paths = images(tmp_path)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("# seven images\n\n" + "\n".join(os.path.relpath(p, listing.parent) for p in paths[:7]) + "\n")
    assert run_inprocess(main_moco.main, [listing, *RUN, "--save-dir", tmp_path / "out"]) == 0
    out = capsys.readouterr().out
    assert f"=> data: 7 images in {listing} (path list); skipped: nothing; read from the list" in out
    assert "1 iterations per epoch" in out  # 7 images, batches of 4
    assert (tmp_path / "out" / "checkpoint_0000.pth.tar").is_file()


@pytest.mark.slow
def test_a_small_image_trunk_pre_trains_at_tile_16_without_the_small_map_warning(tmp_path, capsys):
    small = write_folder(tmp_path / "cifar" / "train", classes=2, per_class=4, size=(32, 32))
    argv = [small.parent, *RUN, "-a", "resnet18_cifar", "--save-dir", tmp_path / "out"]
    assert run_inprocess(main_moco.main, argv) == 0
    out = capsys.readouterr().out
    assert "feature map per input" not in out and "=> w2ssl on resnet18_cifar" in out
    assert (tmp_path / "out" / "checkpoint_0000.pth.tar").is_file()


@pytest.mark.parametrize("preset, arch, tile", [("imagenet100_pretrain", "resnet50", 112),
                                                ("cifar_pretrain", "resnet18_cifar", 16)])
def test_imagenet100_and_cifar_presets(preset, arch, tile):
    configs = Path(__file__).resolve().parents[1] / "configs"
    args = main_moco.parse(main_moco.build_parser(), ["--config", str(configs / f"{preset}.yaml"), "DATA"])
    assert (args.arch, args.tile_size, args.method) == (arch, tile, "w2ssl")
    assert args.subset is None or (Path(__file__).resolve().parents[1] / args.subset).is_file()
    lincls = configs / f"{preset.split('_')[0]}_lincls.yaml"
    probe = cli.parse(main_lincls.build_parser(), ["--config", str(lincls), "DATA"])
    assert probe.subset == args.subset and probe.input_size == (32 if "cifar" in preset else 224)
