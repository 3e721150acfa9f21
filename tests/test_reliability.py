"""What survives what: SIGKILL, interrupted checkpoint writes, bad images, NaN losses, SIGTERM."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from tests.conftest import write_folder
from tests.helpers import ROOT, TINY, cpu_env, logged_losses, run_script

pytestmark = pytest.mark.slow  # every test here runs main_moco.py in a subprocess


def common(data, out, workers, epochs=2):
    # 24 images, batch 4: 6 iterations per epoch
    return [data, *TINY, "-b", "4", "--workers", workers, "--epochs", epochs, "--save-dir", out]


def state_dict(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_equals_uninterrupted(image_root, tmp_path, workers):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script("main_moco.py", *common(image_root, a, workers)).returncode == 0
    # Run B dies hard as global step 9 starts (epoch 1, iteration 3); its newest checkpoint is from step 8.
    killed = run_script("tests.fault_run", "kill", "9", *common(image_root, b, workers), "--save-freq-iters", "2")
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(b / "checkpoint_last.pth.tar", weights_only=True)["iteration"] == 2
    resumed = run_script("main_moco.py", *common(image_root, b, workers), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1 iteration 2" in resumed.stdout
    sa, sb = state_dict(a / "checkpoint_last.pth.tar"), state_dict(b / "checkpoint_last.pth.tar")
    assert sa.keys() == sb.keys()
    assert max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa) <= 1e-6
    la, lb = logged_losses(a / "log.txt"), logged_losses(b / "log.txt")
    after = [(1, i) for i in range(3, 7)]  # the iterations run again after the resume point
    assert [la[k] for k in after] == [lb[k] for k in after]


def test_truncated_newest_checkpoint_falls_back(image_root, tmp_path):
    out = tmp_path / "run"
    assert run_script("main_moco.py", *common(image_root, out, 0, epochs=1)).returncode == 0
    last = out / "checkpoint_last.pth.tar"
    good = out / "checkpoint_0000.pth.tar"
    data = last.read_bytes()
    last.unlink()  # a hard link to the epoch file: the cut-off write is a file of its own
    last.write_bytes(data[: len(data) // 2])  # a write cut off midway
    os.utime(good, (time.time() - 100, time.time() - 100))
    res = run_script("main_moco.py", *common(image_root, out, 0, epochs=2), "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "skipping" in res.stdout and "checkpoint_last.pth.tar" in res.stdout
    assert f"resumed from {good}" in res.stdout


@pytest.fixture
def dirty_root(tmp_path):
    root = tmp_path / "dirty"
    write_folder(root / "train", per_class=6)  # 18 good + 2 bad: every file is in some batch of 4
    (root / "train" / "class0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    (root / "train" / "class1" / "empty.jpg").write_bytes(b"")
    return root


def test_bad_images_are_skipped_and_counted(dirty_root, tmp_path):
    out = tmp_path / "run"
    res = run_script("main_moco.py", dirty_root, *TINY, "-b", "4", "--workers", "2", "--epochs", "1",
                     "--save-dir", out)
    assert res.returncode == 0, res.stderr
    assert "bad image files so far: 2" in (out / "log.txt").read_text()
    assert torch.load(out / "checkpoint_last.pth.tar", weights_only=True)["bad_files"] == sorted(
        [str(dirty_root / "train" / "class0" / "corrupt.jpg"), str(dirty_root / "train" / "class1" / "empty.jpg")])


@pytest.mark.parametrize("gpu_aug", [False, True])
def test_one_pixel_wide_image_is_skipped_and_counted(tmp_path, gpu_aug):
    # issue 26 item 1: --gpu-aug raised ValueError on a 1x1 JPEG, and with loader workers never exited
    root = tmp_path / "tiny"
    write_folder(root / "train", per_class=6)
    Image.new("RGB", (1, 1), (3, 4, 5)).save(root / "train" / "class0" / "tiny.jpg")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(root / "train" / "class1" / "extra.jpg")  # 20 images: one batch
    out = tmp_path / "run"
    res = run_script("main_moco.py", root, *TINY, "-b", "20", "--workers", "2", "--epochs", "1", "--save-dir", out,
                     *(["--gpu-aug"] if gpu_aug else []), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "bad image files so far: 1" in (out / "log.txt").read_text()
    assert torch.load(out / "checkpoint_last.pth.tar", weights_only=True)["bad_files"] == [
        str(root / "train" / "class0" / "tiny.jpg")]


def test_an_unexpected_error_with_loader_workers_exits(image_root, tmp_path):
    # workers ignore SIGTERM, which multiprocessing's exit hook sends them: the error's traceback kept their
    # loader alive and the process waited for them for ever
    res = run_script("tests.fault_run", "raise", "2", *common(image_root, tmp_path / "run", 2, epochs=1),
                     timeout=120)
    assert res.returncode == 1 and "injected failure at global step 2" in res.stderr


def test_strict_data_stops_naming_the_file(dirty_root, tmp_path):
    res = run_script("main_moco.py", dirty_root, *TINY, "-b", "4", "--workers", "0", "--epochs", "1",
                     "--save-dir", tmp_path / "run", "--strict-data")
    assert res.returncode == 2
    line = res.stderr.strip()
    assert line.startswith("error: unreadable image file") and ("corrupt.jpg" in line or "empty.jpg" in line)
    assert "Traceback" not in res.stderr


def test_no_readable_image_fails_at_start(tmp_path):
    bad = tmp_path / "bad" / "train" / "c"
    bad.mkdir(parents=True)
    for i in range(4):
        (bad / f"{i}.jpg").write_bytes(b"junk")
    res = run_script("main_moco.py", tmp_path / "bad", *TINY, "-b", "4", "--workers", "0",
                     "--save-dir", tmp_path / "run")  # a batch the 4 files fill: only their content is wrong
    assert res.returncode == 2 and "none of the 4 image files" in res.stderr


def test_nan_loss_stops_without_touching_checkpoints(image_root, tmp_path):
    out = tmp_path / "run"
    assert run_script("main_moco.py", *common(image_root, out, 0, epochs=1)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.pth.tar")}
    res = run_script("tests.fault_run", "nan", "8", *common(image_root, out, 0, epochs=2), "--save-freq-iters", "1")
    assert res.returncode == 3
    assert "non-finite loss at epoch 1 iteration 2 (global step 8)" in res.stderr
    assert "loss=nan" in res.stderr and "Traceback" not in res.stderr
    after = {p.name: p.read_bytes() for p in out.glob("*.pth.tar")}
    # Steps 6 and 7 were finite and checkpointed; the poisoned step 8 was never saved.
    assert torch.load(out / "checkpoint_last.pth.tar", weights_only=True)["global_step"] == 8
    assert after["checkpoint_0000.pth.tar"] == before["checkpoint_0000.pth.tar"]


def test_sigterm_saves_and_resume_continues(image_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_moco.py"), *map(str, common(image_root, out, 0, epochs=3))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cpu_env())
    log = out / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "Epoch: [0][2/6]" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "--resume auto" in err
    ckpt = torch.load(out / "checkpoint_last.pth.tar", weights_only=True)
    stopped_at = (ckpt["epoch"], ckpt["iteration"])
    assert stopped_at < (3, 0)
    res = run_script("main_moco.py", *common(image_root, out, 0, epochs=3))
    assert res.returncode == 0, res.stderr
    assert f"at epoch {stopped_at[0]} iteration {stopped_at[1]}" in res.stdout
    assert (out / "checkpoint_0002.pth.tar").is_file()
    shutil.rmtree(out)


def test_another_seed_on_resume_is_ignored_with_a_warning(image_root, tmp_path):
    # issue 26 item 4: --seed 1 on resume was applied silently (final weights 0.53 away from the run resumed)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script("main_moco.py", *common(image_root, a, 0, epochs=2)).returncode == 0
    assert run_script("main_moco.py", *common(image_root, b, 0, epochs=1)).returncode == 0
    resumed = run_script("main_moco.py", *common(image_root, b, 0, epochs=2), "--seed", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "WARNING: resuming" in resumed.stdout and "--seed 1 ignored, the run goes on with its 0" in resumed.stdout
    sa, sb = state_dict(a / "checkpoint_last.pth.tar"), state_dict(b / "checkpoint_last.pth.tar")
    assert max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa) <= 1e-6


def test_sigterm_stops_after_the_step_it_came_in(image_root, tmp_path):
    # issue 26 item 6: the stop came 2-3 steps after the signal. Steps are made 1.5 s long so that the signal
    # surely lands in the step after the last one logged.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tests.fault_run", "slow", "1500",
           *map(str, common(image_root, out, 0, epochs=1))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env())
    log, deadline = out / "log.txt", time.time() + 300
    while time.time() < deadline and not (log.is_file() and "Epoch: [0][1/6]" in log.read_text()):
        time.sleep(0.05)
    logged = len(logged_losses(log))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    delay = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert torch.load(out / "checkpoint_last.pth.tar", weights_only=True)["iteration"] == logged + 1
    assert len(logged_losses(log)) == logged + 1 and delay < 1.5 + 10, delay  # one step, a save, the exit


def test_unseeded_run_keeps_its_seed_across_a_resume(image_root, tmp_path):
    unseeded = [a for a in TINY if a not in ("--seed", "0")]
    args = [image_root, *unseeded, "-b", "8", "--workers", "0", "--save-dir", tmp_path]
    first = run_script("main_moco.py", *args, "--epochs", "1")
    second = run_script("main_moco.py", *args, "--epochs", "2")
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    seeds = [re.search(r"seed (\d+)", r.stdout)[1] for r in (first, second)]
    assert seeds[0] == seeds[1]
    assert torch.load(tmp_path / "checkpoint_last.pth.tar", weights_only=True)["seed"] == int(seeds[0])
