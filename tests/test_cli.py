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
