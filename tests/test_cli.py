import argparse
import importlib.util
import re

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


# ---- value ranges and path kinds (issue 26 items 5 and 8) -------------------------------------------

@pytest.mark.parametrize("rule, good, bad", [
    (cli.positive_int, [1, "7"], [0, -1, "0"]),
    (cli.nonneg_int, [0, 3], [-1]),
    (cli.positive_float, [1e-9, "0.6"], [0.0, -1.0, float("nan"), float("inf"), "-1"]),
    (cli.nonneg_float, [0.0, 2.5], [-1e-9, float("nan")]),
    (cli.fraction, [1.0, 0.2], [0.0, 1.5]),
    (cli.unit_interval, [0.0, 1.0], [-0.1, 1.01]),
    (cli.below_one, [0.0, 0.9], [1.0, -0.5]),
])
def test_ranged_types_accept_and_refuse(rule, good, bad):
    assert all(rule.accepts(v) for v in good) and not any(rule.accepts(v) for v in bad)
    assert not rule.accepts([1, 2])  # a YAML list where a number is expected


@pytest.mark.parametrize("argv, config, message", [
    (["--epochs", "0"], "", "--epochs 0 must be a whole number >= 1"),
    (["--lr", "-1"], "", "--lr -1.0 must be a finite number > 0"),
    (["--momentum", "1.5"], "", "--momentum 1.5 must be in \\[0, 1\\)"),
    ([], "epochs: 0\n", "--epochs 0 must be"),  # argparse passes config values around type=
    ([], "lr: .nan\n", "--lr nan must be"),
])
def test_out_of_range_values_are_one_user_error(tmp_path, argv, config, message):
    extra = []
    if config:
        (tmp_path / "c.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(UserError, match=message):
        cli.parse(parser(), [*extra, *argv])


def test_check_folder_and_check_file(tmp_path):
    a_file, a_dir = tmp_path / "f.txt", tmp_path / "d"
    a_file.write_text("x")
    a_dir.mkdir()
    cli.check_folder(a_dir, "--save-dir", output=True)
    cli.check_folder(tmp_path / "new" / "deeper", "--save-dir", output=True)
    cli.check_file(tmp_path / "missing.pth", "--resume")  # missing input: the caller's own message
    with pytest.raises(UserError, match="--save-dir .*f.txt is a file, not a folder"):
        cli.check_folder(a_file, "--save-dir", output=True)
    with pytest.raises(UserError, match="f.txt is a file, not a folder: pass a path under a folder"):
        cli.check_folder(a_file / "run", "--save-dir", output=True)
    with pytest.raises(UserError, match="--pretrained .*d is a folder, not a file"):
        cli.check_file(a_dir, "--pretrained")
    with pytest.raises(UserError, match="f.txt is a file, not a folder"):
        cli.check_file(a_file / "out.pth", "OUT", output=True)


def _entry(name: str):
    """``(argv) -> exit code`` of each entry point, in this process."""
    if name in ("main_moco", "main_lincls", "submit"):
        module = importlib.import_module("w2ssl.submit" if name == "submit" else name)
        return lambda argv: cli.run_main(module.main, argv)
    if name == "export":
        from w2ssl import export
        return export.main
    if name == "e2e":
        from bench import e2e
        return e2e.main
    return importlib.import_module(f"transfer.{name}").main


@pytest.mark.parametrize("name, argv, message", [
    ("main_moco", ["{data}", "--epochs", "0"], "--epochs 0 must be a whole number >= 1"),
    ("main_moco", ["{data}", "--lr", "-1"], "--lr -1.0 must be a finite number > 0"),
    ("main_moco", ["{data}", "--crop-min", "0"], "--crop-min 0.0 must be in \\(0, 1\\]"),
    ("main_moco", ["{data}", "--save-dir", "{file}"], "--save-dir .* is a file, not a folder"),
    ("main_moco", ["{file}"], "f.txt has no images \\(path list"),  # a file as DATA is a list of image paths
    ("main_lincls", ["{data}", "--epochs", "0"], "--epochs 0 must be"),
    ("main_lincls", ["{data}", "--input-size", "-3"], "--input-size -3 must be"),
    ("main_lincls", ["{data}", "--pretrained", "{dir}", "--save-dir", "{dir}/run"], "--pretrained .* is a folder"),
    ("main_lincls", ["{data}", "--save-dir", "{file}", "--pretrained", "x"], "--save-dir .* is a file"),
    ("export", ["{dir}", "{dir}/out.pth", "--to", "timm"], "CKPT .* is a folder, not a file"),
    ("export", ["{file}", "{file}/out.pth", "--to", "timm"], "OUT .*: .* is a file, not a folder"),
    ("convert_pretrain_to_detectron2", ["{dir}", "{dir}/out.pkl"], "CHECKPOINT .* is a folder"),
    ("finetune_torchvision", ["--checkpoint", "{file}", "--momentum", "1"], "--momentum 1.0 must be in \\[0, 1\\)"),
    ("finetune_torchvision", ["--checkpoint", "{file}", "--train-json", "{file}", "--train-images", "{file}"],
     "--train-images .* is a file, not a folder"),
    ("finetune_torchvision", ["--checkpoint", "{file}", "--eval-only", "--val-json", "{file}", "--val-images",
                              "{dir}", "--output-dir", "{file}"], "--output-dir .* is a file"),
    ("submit", ["pretrain", "--mem-gb", "0", "--", "{data}"], "--mem-gb 0 must be"),
    ("submit", ["pretrain", "--job-dir", "{file}", "--", "{data}"], "--job-dir .* is a file"),
    ("e2e", ["--iters", "0"], "--iters 0 must be"),
    ("e2e", ["--root", "{file}"], "--root .* is a file"),
])
def test_every_entry_point_refuses_bad_values_and_paths(image_root, tmp_path, capsys, name, argv, message):
    (tmp_path / "f.txt").write_text("not a folder")
    (tmp_path / "d").mkdir()
    argv = [a.format(data=image_root, file=tmp_path / "f.txt", dir=tmp_path / "d") for a in argv]
    try:
        code = _entry(name)(argv)
    except SystemExit as stop:  # refused in the launched worker (its error boundary exits), after the checks
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
