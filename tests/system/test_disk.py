"""Disk space: checkpoint size estimates, the plan logged at start, and the refusal when two do not fit."""
import collections
import functools
import os
import shutil

import pytest
import torch

import main_moco
from tests.helpers import SMALL, TINY, register_small_resnet
from w2ssl import cli
from w2ssl.checkpoint import LAST, epoch_name
from w2ssl.engine.optim import build_optimizer
from w2ssl.errors import UserError
from w2ssl.methods.w2ssl import W2SSL
from w2ssl.system.disk import DiskPlan, checkpoint_bytes, format_bytes, free_bytes, refuse_if_too_small
from w2ssl.trunks import build_trunk

Usage = collections.namedtuple("Usage", "total used free")


def fake_free(monkeypatch, free: int) -> list:
    """Make every disk report ``free`` bytes free; returns the folders asked about."""
    asked = []

    def usage(path):
        asked.append(path)
        return Usage(10**15, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


def tiny_checkpoint_bytes(arch: str = "resnet18") -> int:
    """The estimate for the model that ``TINY`` pre-trains (on ``arch``)."""
    with torch.device("meta"):
        return checkpoint_bytes(W2SSL(functools.partial(build_trunk, arch), 32, 64), "lars")


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1234, 36e9, 2.5e12, 4e15)] == [
        "512 B", "1.2 kB", "36.0 GB", "2.5 TB", "4000.0 TB"]


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_estimate_from_the_meta_device_matches_a_saved_checkpoint(tmp_path, optimizer):
    model = W2SSL(functools.partial(build_trunk, "resnet18"), 32, 64)
    opt = build_optimizer(optimizer, model, 0.1, 1e-6, 0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the optimiser's per-parameter state, as after the first training step
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pth")
    with torch.device("meta"):
        estimate = checkpoint_bytes(W2SSL(functools.partial(build_trunk, "resnet18"), 32, 64), optimizer)
    assert 0.98 < estimate / os.path.getsize(tmp_path / "c.pth") < 1.02


def test_free_space_of_a_folder_not_made_yet_is_its_parents(tmp_path, monkeypatch):
    asked = fake_free(monkeypatch, 123)
    assert free_bytes(tmp_path / "a" / "b") == 123 and asked == [tmp_path]


def test_refused_when_not_even_two_checkpoints_fit(tmp_path, monkeypatch):
    fake_free(monkeypatch, 1_500_000)
    with pytest.raises(UserError, match=rf"^{tmp_path} has 1.5 MB free, less than two checkpoints of 1.0 MB .*: "
                                        r"free space there or pass a --save-dir on a larger disk$"):
        refuse_if_too_small(tmp_path, 1_000_000)
    refuse_if_too_small(tmp_path, 750_000)


def test_plan_counts_kept_epoch_checkpoints_and_suggests_a_keep_that_fits(tmp_path, monkeypatch):
    fake_free(monkeypatch, 36 * 10**9)
    forgot_epochs = DiskPlan.of(tmp_path, 10**9, epochs_left=200, keep=0)
    assert not forgot_epochs.fits and forgot_epochs.needed == 201 * 10**9
    assert forgot_epochs.message() == (
        f"this run may run out of disk space: 200 epoch checkpoint(s) of 1.0 GB kept, and one more being written or "
        f"as a mid-epoch checkpoint_last: up to 201.0 GB, with 36.0 GB free in {tmp_path}; pass --keep 35 (or "
        f"fewer --epochs) or free space")
    kept = DiskPlan.of(tmp_path, 10**9, epochs_left=200, keep=5)
    assert kept.fits and kept.message().startswith("=> disk: 5 epoch checkpoint(s) of 1.0 GB kept")
    assert DiskPlan.of(tmp_path, 10**9, epochs_left=2, keep=5).needed == 3 * 10**9


def pretrain(*argv) -> int:
    """``main_moco.main`` in this process; its exit code (a worker's error exits through SystemExit)."""
    try:
        return cli.run_main(main_moco.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_too_small_a_disk_is_refused_before_anything_is_written(image_root, tmp_path, monkeypatch, capsys):
    fake_free(monkeypatch, tiny_checkpoint_bytes())
    out = tmp_path / "out"
    assert pretrain(image_root, *TINY, "-b", "8", "--workers", "0", "--save-dir", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "less than two checkpoints" in err
    assert not out.exists()


def test_run_warns_when_its_checkpoints_may_not_fit_and_links_the_last(image_root, tmp_path, monkeypatch):
    register_small_resnet(monkeypatch)
    fake_free(monkeypatch, int(2.5 * tiny_checkpoint_bytes(SMALL)))  # two epoch checkpoints + last need 3
    out = tmp_path / "out"
    argv = [*TINY, "-a", SMALL, "-b", "24", "--epochs", "2", "--workers", "0", "--save-dir", out]
    assert pretrain(image_root, *argv) == 0
    log = (out / "log.txt").read_text()
    assert "WARNING: this run may run out of disk space: 2 epoch checkpoint(s) of" in log
    assert "pass --keep 1 (or fewer --epochs) or free space" in log
    assert os.stat(out / LAST).st_ino == os.stat(out / epoch_name(1)).st_ino
    assert torch.load(out / LAST, weights_only=True)["epoch"] == 2
