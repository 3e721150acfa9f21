"""bench/where_diagnostic.py: its settings, its positive control's texture, reading the logs, bad arguments."""
import numpy as np
from PIL import Image

import main_moco
from bench import where_diagnostic as W


def test_settings_remove_one_factor_at_a_time():
    parser = main_moco.build_parser()
    parsed = {name: parser.parse_args(["DATA", *flags]) for name, flags in W.settings(32).items()}
    published, no_flip, no_overlap, larger, everything = parsed.values()
    assert (published.flip_p, published.cross, published.tile_size) == (0.5, 0.3, 32)  # the published values
    assert (no_flip.flip_p, no_flip.cross, no_flip.tile_size) == (0.0, 0.3, 32)
    assert (no_overlap.flip_p, no_overlap.cross, no_overlap.tile_size) == (0.5, 0.0, 32)
    assert (larger.flip_p, larger.cross, larger.tile_size) == (0.5, 0.3, 64)
    assert (everything.flip_p, everything.cross, everything.tile_size) == (0.0, 0.0, 64)


def test_control_texture_runs_one_way_on_the_left_and_the_other_on_the_right(tmp_path):
    (tmp_path / "src" / "train" / "c").mkdir(parents=True)
    Image.new("RGB", (48, 36), (128, 128, 128)).save(tmp_path / "src" / "train" / "c" / "0.jpg", quality=100)
    out = W.control_dataset(tmp_path / "src", tmp_path / "control")
    img = np.asarray(Image.open(out / "train" / "c" / "0.jpg").convert("L"), dtype=np.float64) - 128
    left, right = img[:, 4:20], img[:, 28:44]
    # "/" stripes: constant along x + y = const, i.e. a pixel equals its up-right neighbour; "\" the up-left one
    slash = lambda a: np.abs(a[1:, :-1] - a[:-1, 1:]).mean()  # noqa: E731
    backslash = lambda a: np.abs(a[1:, 1:] - a[:-1, :-1]).mean()  # noqa: E731
    assert slash(left) < 0.3 * backslash(left) and backslash(right) < 0.3 * slash(right)
    assert np.fliplr(left).std() > 10  # a real texture, which a flip turns into the other side's


def test_last_epoch_where_loss_is_read_from_the_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Epoch: [0][5/5]\tLoss_loc 7.1e-01 (7.2e-01)\tWhere_acc 50.0 (49.0)\n"
                   "Epoch: [1][5/5]\tLoss_loc 6.5e-01 (6.6e-01)\tWhere_acc 70.0 (61.0)\n")
    assert W.last_epoch_loss_loc(log) == 0.66
    assert W.last_epoch_loss_loc(tmp_path / "none.txt") is None


def test_bad_arguments_exit_2(capsys):
    assert W.main(["--epochs", "0"]) == 2
    assert "--epochs >= 1" in capsys.readouterr().err
