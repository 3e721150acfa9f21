import argparse

import pytest

from w2ssl import cli
from w2ssl.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.add_common(p, batch_size=512, lr=0.6, wd=1e-6, epochs=200, print_freq=100, save_dir="outputs")
    return p


def test_config_keys_map_to_flags_and_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("weight-decay: 0.25\nbatch_size: 64\nlearning-rate: 0.3\nmultiprocessing-distributed: true\n")
    args = cli.parse(parser(), ["--config", str(config), "--batch-size", "32", "DATA"])
    assert args.weight_decay == 0.25 and args.batch_size == 32 and args.lr == 0.3
    assert args.multiprocessing_distributed and args.data == "DATA"


@pytest.mark.parametrize("text, message", [
    ("epochs: 3\nbogus: 1\n", "unknown keys \\['bogus'\\]"),
    ("- a\n- b\n", "must be a mapping"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_bad_configs(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(UserError, match=message):
        cli.parse(parser(), ["--config", str(config)])
    with pytest.raises(UserError, match="does not exist"):
        cli.parse(parser(), ["--config", str(tmp_path / "none.yaml")])


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def main(argv):
        raise UserError("the problem: the fix")

    assert cli.run_main(main, []) == 2
    assert capsys.readouterr().err == "error: the problem: the fix\n"
    assert cli.run_main(lambda argv: None, []) == 0


def test_expected_world_size(monkeypatch):
    args = cli.parse(parser(), [])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.expected_world_size(args) == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert cli.expected_world_size(args) == 8


def pretrain_args(image_root, *argv):
    import main_moco

    return cli.parse(main_moco.build_parser(), [str(image_root), "-a", "resnet18", "--save-dir", "unused", *argv])


@pytest.mark.parametrize("argv, world, message", [
    (["-b", "2"], 1, r"--batch-size 2 leaves each of the 1 process\(es\) 1 montage per view, and BatchNorm needs at "
                     "least 2: pass --batch-size 4 or more"),
    (["-b", "4"], 2, r"--batch-size 4 leaves each of the 2 process\(es\) 1 montage per view, .*: pass --batch-size 8"),
    (["--tile-size", "0"], 1, r"--tile-size 0 is too small for resnet18 \(.*\): pass --tile-size 1 or more"),
    (["--tile-size", "-4"], 1, "--tile-size -4 is too small"),
])
def test_pretraining_checks_batches_and_tiles_before_starting(image_root, argv, world, message):
    from main_moco import check

    with pytest.raises(UserError, match=message):
        check(pretrain_args(image_root, *argv), world)
    for fused in ("--no-fused-views", "--fused-views"):
        check(pretrain_args(image_root, "-b", str(4 * world), "--tile-size", "1", fused), world)


def test_a_failed_check_after_launch_leaves_no_outputs(image_root, tmp_path, capsys):
    import main_moco
    from tests.helpers import TINY

    out = tmp_path / "out"
    argv = [str(image_root), *TINY, "-b", "64", "--workers", "0", "--save-dir", str(out)]
    with pytest.raises(SystemExit) as stop:  # the worker's error boundary
        cli.run_main(main_moco.main, argv)
    assert stop.value.code == 2 and "fewer than one batch" in capsys.readouterr().err
    assert not out.exists()
