import argparse
import errno
import functools
import io
import os
import pickle
import re
import shutil
import stat
import warnings

import pytest
import torch
import torchvision

import main_moco
from tests.helpers import SMALL, TINY, register_small_resnet
from w2ssl import cli
from w2ssl.checkpoint import (
    LAST,
    Kind,
    check_resume_path,
    describe,
    epoch_name,
    find_resumable,
    kind,
    load,
    load_into,
    load_pretraining,
    prune,
    save_all,
    save_atomic,
)
from w2ssl.errors import UserError


class Exploit:
    """Unpickling this would run a command (it is never run: weights_only refuses it)."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/w2ssl_pwned",))


@functools.cache  # one random resnet18 for the session: the tests only read it
def resnet18_state() -> dict[str, torch.Tensor]:
    return torchvision.models.resnet18().state_dict()


def layouts():
    sd = resnet18_state()
    trunk = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    ours = {"state_dict": {**{f"base_encoder.{k}": v for k, v in trunk.items()},
                           "projector.0.weight": torch.zeros(4, 512),
                           "momentum_encoder.conv1.weight": trunk["conv1.weight"]},
            "epoch": 3}
    authors = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in trunk.items()},
                              "module.base_encoder.fc.weight": torch.zeros(256, 512),
                              "module.base_encoder.fc_crop.0.weight": torch.zeros(4096, 512),
                              "module.base_encoder.fc_loc.weight": torch.zeros(2, 512),
                              "module.momentum_encoder.conv1.weight": trunk["conv1.weight"]}}
    mocov3 = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in trunk.items()},
                             "module.base_encoder.fc.0.weight": torch.zeros(4096, 512),
                             "module.predictor.0.weight": torch.zeros(4096, 256)}}
    return trunk, {"ours": ours, "authors": authors, "mocov3": mocov3}


def test_unsafe_pickle_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": Exploit()}, path)
    if os.path.exists("/tmp/w2ssl_pwned"):
        os.remove("/tmp/w2ssl_pwned")
    with pytest.raises(UserError, match=r"needs --trust-checkpoint \(only for files you trust"):
        load(path)
    assert not os.path.exists("/tmp/w2ssl_pwned")
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pth.tar")
    with pytest.raises(UserError, match="needs --trust-checkpoint"):
        load(tmp_path / "args.pth.tar")
    assert load(tmp_path / "args.pth.tar", trust=True)["args"].lr == 0.1


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    save_atomic({"epoch": 1, "state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or corrupt|corrupt"):
        load(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        load(garbage)
    garbage.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                        .numpy().tobytes())
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        load(garbage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 4" must not leak
        (tmp_path / "pickle.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
        with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
            load(tmp_path / "pickle.pth")
        # Pickle protocol 4 is beyond torch's weights-only unpickler: a file to trust, not a corrupt one.
        torch.save({"w": torch.ones(3)}, tmp_path / "zip4.pth", pickle_protocol=4)
        torch.save({"w": torch.ones(3)}, tmp_path / "legacy4.pth", _use_new_zipfile_serialization=False,
                   pickle_protocol=4)
        for name in ("zip4.pth", "legacy4.pth"):
            with pytest.raises(UserError, match=r"needs --trust-checkpoint \(only for files you trust"):
                load(tmp_path / name)
            assert torch.equal(load(tmp_path / name, trust=True)["w"], torch.ones(3))
        torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
        assert torch.equal(load(tmp_path / "legacy.pth")["w"], torch.ones(3))
        (tmp_path / "legacy.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:40])
        with pytest.raises(UserError, match="truncated or corrupt"):
            load(tmp_path / "legacy.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        load(tmp_path / "empty.pth")
    with pytest.raises(UserError, match="is a directory: pass a checkpoint file in it"):
        load(tmp_path)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a dict"):
        load(tmp_path / "list.pth")


def test_kind_names_what_a_file_is():
    trunk, ckpts = layouts()
    probe = {"epoch": 9, "best_acc1": 50.0, "state_dict": {"conv1.weight": 0, "fc.weight": 0}}
    ddp_probe = {"state_dict": {"module.conv1.weight": 0, "module.fc.weight": 0}}
    assert [kind(c) for c in (ckpts["ours"], ckpts["authors"], ckpts["mocov3"], probe, ddp_probe, trunk,
                              {"model": {}, "iter": 3}, {"epoch": 1})] == [
        Kind.PRETRAINING, Kind.PRETRAINING, Kind.PRETRAINING, Kind.PROBE, Kind.PROBE, Kind.TRUNK, Kind.DETECTOR,
        Kind.OTHER]
    assert describe(ckpts["ours"]) == "a pre-training checkpoint"
    assert describe(probe) == "a linear-probe checkpoint (main_lincls.py)"
    assert describe(trunk) == "an exported trunk (a plain dict of tensors, no training state)"
    assert describe({"model": {}, "iter": 3}) == "a detector checkpoint (finetune_torchvision.py)"
    assert describe({f"k{i}": i for i in range(50)}) == "a dict with keys 'k0', 'k1', 'k10' and 47 more"


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth.tar"
    save_atomic({"epoch": 1}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth.tar"]  # no temp file left


def test_find_resumable_skips_corrupt_newest(tmp_path):
    save_atomic({"epoch": 1, "state_dict": {}}, tmp_path / "checkpoint_0000.pth.tar")
    newest = tmp_path / "checkpoint_last.pth.tar"
    newest.write_bytes(b"PK\x03\x04 truncated")
    os.utime(newest, (2e9, 2e9))
    said = []
    path, ckpt = find_resumable(tmp_path, warn=said.append)
    assert path.name == "checkpoint_0000.pth.tar" and ckpt["epoch"] == 1
    assert len(said) == 1 and "checkpoint_last" in said[0] and said[0].endswith("trying checkpoint_0000.pth.tar")
    assert find_resumable(tmp_path / "empty") is None
    (tmp_path / "checkpoint_0000.pth.tar").unlink()
    said = []
    assert find_resumable(tmp_path, warn=said.append) is None
    assert len(said) == 1 and said[0].endswith("no older checkpoint left")


def test_prune_keeps_newest_epochs(tmp_path):
    for e in range(5):
        save_atomic({"epoch": e}, tmp_path / f"checkpoint_{e:04d}.pth.tar")
    save_atomic({"epoch": 5}, tmp_path / "checkpoint_last.pth.tar")
    prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_0003.pth.tar", "checkpoint_0004.pth.tar", "checkpoint_last.pth.tar"]


def test_save_all_explains_a_failed_write(tmp_path):
    (tmp_path / "a_file").write_text("")
    target = tmp_path / "a_file" / "checkpoint_last.pth.tar"  # its folder cannot be made
    with pytest.raises(UserError, match="could not write checkpoint .*previous one is intact"):
        save_all({"epoch": 1}, [target])


def test_load_into_names_the_mismatch():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UserError, match=r"checkpoint c.pth does not fit --arch x: shape of weight is \(4, 3\), "
                                        r"expected \(2, 3\)"):
        load_into(model, {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, "c.pth", "--arch x")
    # A wholly different model: a few key names, never the whole list.
    big = torchvision.models.resnet50()
    with pytest.raises(UserError) as e:
        load_into(big, resnet18_state(), "c.pth", "resnet50")
    assert len(str(e.value)) < 300 and "and 195 more" in str(e.value)
    load_into(model, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "c.pth", "--arch x")
    assert torch.equal(model.weight, torch.ones(2, 3))


def test_resume_of_another_kind_of_file_says_what_it_is(tmp_path):
    trunk, ckpts = layouts()
    save_atomic(trunk, tmp_path / "export.pth")
    big_probe = {"epoch": 90, "best_acc1": 1.0, "optimizer": {}, "state_dict": resnet18_state()}  # 122 keys
    save_atomic(big_probe, tmp_path / "probe.pth.tar")
    save_atomic(ckpts["authors"], tmp_path / "authors.pth.tar")
    with pytest.raises(UserError, match=r"--resume .*export.pth is an exported trunk .* not a pre-training checkpoint"):
        load_pretraining(tmp_path / "export.pth")
    with pytest.raises(UserError) as e:
        load_pretraining(tmp_path / "probe.pth.tar")
    assert "is a linear-probe checkpoint (main_lincls.py), not a pre-training" in str(e.value)
    assert len(str(e.value)) < 300  # never the key list
    with pytest.raises(UserError, match="without epoch or optimizer"):
        load_pretraining(tmp_path / "authors.pth.tar")
    save_atomic({**ckpts["ours"], "optimizer": {}}, tmp_path / "ours.pth.tar")
    assert load_pretraining(tmp_path / "ours.pth.tar")["epoch"] == 3
    check_resume_path("auto")
    check_resume_path(str(tmp_path / "ours.pth.tar"))
    with pytest.raises(UserError, match="is a directory: pass a checkpoint file in it, or --resume auto"):
        check_resume_path(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        check_resume_path(str(tmp_path / "nope"))


@pytest.mark.parametrize("case", ["export", "probe", "directory"])
def test_main_moco_resume_of_another_kind_of_file_is_one_line(image_root, tmp_path, capsys, case):
    if case == "export":
        save_atomic(layouts()[0], tmp_path / "export.pth")
    if case == "probe":
        save_atomic({"epoch": 90, "best_acc1": 1.0, "optimizer": {}, "state_dict": resnet18_state()},
                    tmp_path / "probe.pth.tar")
    resume, message = {"export": (tmp_path / "export.pth", "is an exported trunk"),
                       "probe": (tmp_path / "probe.pth.tar", "is a linear-probe checkpoint"),
                       "directory": (tmp_path, "is a directory")}[case]
    argv = [str(image_root), *TINY, "-b", "8", "--epochs", "1", "--workers", "0", "--save-dir", str(tmp_path / "out"),
            "--resume", str(resume)]
    try:
        code = cli.run_main(main_moco.main, argv)
    except SystemExit as e:  # errors found in the worker exit through _run_worker
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --resume ") and message in err, err


class FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes beyond fail with ``code`` (ENOSPC, EDQUOT).
    torch's writer turns such a failure into a RuntimeError ("unexpected pos") caused by the OSError."""

    def __init__(self, fd: int, code: int, room: int = 1000):
        os.close(fd)
        self.code, self.room = code, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(b)
        return len(b)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_during_a_save_is_one_line_and_older_checkpoints_stay(tmp_path, monkeypatch, code):
    epoch0, last = tmp_path / epoch_name(0), tmp_path / LAST
    save_all({"epoch": 1}, [epoch0, last])
    with monkeypatch.context() as m:  # torch.save writes into a file whose writes fail, as on a full disk
        m.setattr(os, "fdopen", lambda fd, mode: FullDisk(fd, code))
        with pytest.raises(UserError) as err:
            save_all({"epoch": 2, "w": torch.zeros(100_000)}, [tmp_path / epoch_name(1), last])
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / epoch_name(1)) in message
    assert os.strerror(code) in message and re.search(r"\d+\.\d [kMGT]?B free in ", message)
    assert "--keep N" in message and "previous checkpoints are intact" in message
    assert load(epoch0)["epoch"] == 1 and load(last)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [epoch_name(0), LAST]  # no temp file left


def test_checkpoint_last_is_a_hard_link_that_outlives_pruning(tmp_path):
    save_dir = tmp_path
    for epoch in range(3):
        save_all({"epoch": epoch + 1, "w": torch.full((10,), float(epoch))}, [save_dir / epoch_name(epoch),
                                                                           save_dir / LAST])
        prune(save_dir, keep=1)
        assert os.stat(save_dir / LAST).st_ino == os.stat(save_dir / epoch_name(epoch)).st_ino
    assert sorted(p.name for p in save_dir.iterdir()) == [epoch_name(2), LAST]
    (save_dir / epoch_name(2)).unlink()  # the epoch file pruned (a later --keep): the link still holds the data
    assert load(save_dir / LAST)["epoch"] == 3
    # A mid-epoch save replaces the link, not the bytes the epoch file shares with it.
    save_all({"epoch": 4}, [save_dir / epoch_name(3), save_dir / LAST])
    save_all({"epoch": 4, "iteration": 2}, [save_dir / LAST])
    assert load(save_dir / epoch_name(3)) == {"epoch": 4} and load(save_dir / LAST)["iteration"] == 2


def test_checkpoint_last_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    save_all({"epoch": 1}, [tmp_path / epoch_name(0), tmp_path / LAST])
    assert os.stat(tmp_path / LAST).st_ino != os.stat(tmp_path / epoch_name(0)).st_ino
    assert load(tmp_path / LAST) == load(tmp_path / epoch_name(0)) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [epoch_name(0), LAST]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_are_as_readable_as_the_umask_says(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_all({"epoch": 1}, [tmp_path / epoch_name(0), tmp_path / LAST])
    finally:
        os.umask(old)
    for name in (epoch_name(0), LAST):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode


def pretrain(*argv) -> int:
    """``main_moco.main`` in this process on small_resnet (what these runs check does not depend on the trunk);
    its exit code (a worker's error exits through SystemExit)."""
    with pytest.MonkeyPatch.context() as mp:
        register_small_resnet(mp)
        try:
            return cli.run_main(main_moco.main, [str(a) for a in [*argv, "-a", SMALL]])
        except SystemExit as e:
            return e.code


@pytest.fixture(scope="module")
def one_epoch(image_root, tmp_path_factory):
    """A finished one-epoch run with -b 8 (24 images: 3 iterations)."""
    out = tmp_path_factory.mktemp("one_epoch")
    assert pretrain(image_root, *TINY, "-b", "8", "--epochs", "1", "--workers", "0", "--save-dir", out) == 0
    return out


def copy_run(src, dst) -> None:
    """``src``'s run folder at ``dst``, checkpoints as hard links: runs replace checkpoint files (write and
    rename) or unlink them, never write into one; the log, which a run appends to, is copied."""
    shutil.copytree(src, dst, copy_function=lambda a, b: (os.link if a.endswith(".pth.tar") else shutil.copy2)(a, b))


def interrupted_copy(one_epoch, tmp_path, iteration: int, batch_size: int):
    """``one_epoch`` as if stopped during epoch 0 after ``iteration`` steps of ``batch_size`` images."""
    out = tmp_path / "run"
    copy_run(one_epoch, out)
    (out / epoch_name(0)).unlink()
    state = load(out / LAST)
    state["epoch"], state["iteration"], state["global_step"] = 0, iteration, iteration
    state["args"]["batch_size"] = batch_size
    (out / LAST).unlink()  # a hard link to the epoch file: write a file of its own
    save_all(state, [out / LAST])
    (out / "log.txt").write_text("")
    return out


def test_resume_with_another_batch_size_finishes_the_epoch(image_root, one_epoch, tmp_path):
    # 5 steps of 4 images (20 seen) -> with -b 8 the epoch goes on at iteration 2 of 3, and is saved.
    out = interrupted_copy(one_epoch, tmp_path, iteration=5, batch_size=4)
    assert pretrain(image_root, *TINY, "-b", "8", "--epochs", "1", "--workers", "0", "--save-dir", out) == 0
    log = (out / "log.txt").read_text()
    assert ("WARNING: the checkpoint was written with --batch-size 4, this run has 8: epoch 0 goes on from image 20 "
            "at iteration 2 of 3 (global step 2) with the new batch") in log
    assert re.findall(r"Epoch: \[0\]\[(\d)/3\]", log) == ["3"]
    saved = load(out / epoch_name(0))
    assert (saved["epoch"], saved["iteration"], saved["global_step"], saved["args"]["batch_size"]) == (1, 0, 3, 8)


def test_resume_after_an_epochs_last_step_writes_that_epochs_checkpoint(image_root, one_epoch, tmp_path):
    out = interrupted_copy(one_epoch, tmp_path, iteration=3, batch_size=8)  # e.g. a signal after the last step
    assert pretrain(image_root, *TINY, "-b", "8", "--epochs", "1", "--workers", "0", "--save-dir", out) == 0
    log = (out / "log.txt").read_text()
    assert "Epoch: [0]" not in log and f"saved {epoch_name(0)}" in log
    assert load(out / epoch_name(0))["epoch"] == 1


def test_full_disk_in_a_run_stops_with_one_line_and_keeps_the_last_checkpoints(image_root, one_epoch, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    copy_run(one_epoch, out)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(fd, errno.ENOSPC))
    assert pretrain(image_root, *TINY, "-b", "8", "--epochs", "2", "--workers", "0", "--save-dir", out) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: could not write checkpoint {out / epoch_name(1)}: ")
    assert load(out / LAST)["epoch"] == load(out / epoch_name(0))["epoch"] == 1
    assert sorted(p.name for p in out.glob("*.pth.tar")) == [epoch_name(0), LAST]
