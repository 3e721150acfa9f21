"""Preemption and rank errors as real processes: a signal to the whole process group (as SLURM sends it),
torchrun on 2 CPU processes, the linear probe, and an error that only one rank meets."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_folder
from tests.helpers import ROOT, TINY, run_script
from w2ssl.data.datasets import image_folder
from w2ssl.data.sampler import ResumableSampler

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # 2 ranks must use gloo even where a GPU is
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RESUME_LINE = "received: saved"


def pretrain_args(data, out, batch=4, epochs=2):
    # 24 images, batch 4: 6 iterations per epoch (3 per epoch on 2 processes with batch 8)
    return [data, *TINY, "-b", batch, "--workers", "2", "--epochs", epochs, "--save-dir", out]


def killpg(group, sig):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:  # already gone
        pass


def children(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def signal_group_after(script, args, log, text, sig, launcher=None):
    """Start ``script`` in a new session (``setsid``), wait for ``text`` in ``log``, then signal its process
    group and, as SLURM does for every process of a job step, the groups of its children (torchrun starts
    each of its processes in a session of its own); return ``(returncode, stdout, stderr)``."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV}, start_new_session=True)
    groups = [proc.pid]
    try:
        deadline = time.time() + 300
        while not (log.is_file() and text in log.read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        if launcher:
            groups += children(proc.pid)
        for group in groups:
            killpg(group, sig)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    finally:
        for group in groups:  # nothing may outlive the test
            killpg(group, signal.SIGKILL)


def run(script, *args, launcher=None):
    res = run_script(script, *args, env=ENV, launcher=launcher, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    sa, sb = weights(a), weights(b)
    assert sa.keys() == sb.keys()
    assert max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa) <= 1e-6


def assert_stopped_once(code, err, sig):
    assert code == 128 + sig, err
    assert err.count(RESUME_LINE) == 1 and f"{signal.Signals(sig).name} received" in err, err
    assert "--resume auto" in err and "w2ssl/" not in err, err  # no traceback of ours


@pytest.fixture(scope="module")
def uninterrupted(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run("main_moco.py", *pretrain_args(image_root, out))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_group_signal_saves_the_step_and_resume_equals_uninterrupted(image_root, uninterrupted, tmp_path, sig):
    code, _, err = signal_group_after("main_moco.py", pretrain_args(image_root, tmp_path), tmp_path / "log.txt",
                                      "Epoch: [0][2/6]", sig)
    assert_stopped_once(code, err, sig)
    saved = torch.load(tmp_path / "checkpoint_last.pth.tar", weights_only=True)
    assert 3 <= saved["global_step"] < 12  # the step it was in, not an epoch end or the run's end
    res = run("main_moco.py", *pretrain_args(image_root, tmp_path))
    assert f"at epoch {saved['epoch']} iteration {saved['iteration']}" in res.stdout
    assert_same_weights(uninterrupted / "checkpoint_last.pth.tar", tmp_path / "checkpoint_last.pth.tar")


def test_torchrun_group_sigterm_saves_once_and_resume_equals_uninterrupted(image_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = lambda out: pretrain_args(image_root, out, batch=8, epochs=3)  # noqa: E731 - 9 steps
    run("main_moco.py", *args(a), launcher=TORCHRUN)
    code, _, err = signal_group_after("main_moco.py", args(b), b / "log.txt", "Epoch: [0][1/3]", signal.SIGTERM,
                                      launcher=TORCHRUN)
    # torchrun itself ends with its own SignalException (rc 1); each of our processes exits 143.
    assert code != 0 and err.count(RESUME_LINE) == 1 and "SIGTERM received" in err, err
    saved = torch.load(b / "checkpoint_last.pth.tar", weights_only=True)
    assert 2 <= saved["global_step"] < 9
    run("main_moco.py", *args(b), launcher=TORCHRUN)
    assert_same_weights(a / "checkpoint_last.pth.tar", b / "checkpoint_last.pth.tar")


def test_probe_group_sigterm_saves_and_resumes(image_root, uninterrupted, tmp_path):
    args = [image_root, "-a", "resnet18", "--input-size", "32", "-b", "4", "--workers", "2", "--epochs", "3",
            "--seed", "0", "--print-freq", "1", "--pretrained", uninterrupted / "checkpoint_0000.pth.tar",
            "--save-dir", tmp_path]
    code, _, err = signal_group_after("main_lincls.py", args, tmp_path / "log.txt", "Epoch: [0][2/6]",
                                      signal.SIGTERM)
    assert_stopped_once(code, err, signal.SIGTERM)
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["iteration"]) < (3, 0)
    res = run("main_lincls.py", *args, "--resume", "auto")
    assert f"at epoch {saved['epoch']} iteration {saved['iteration']}" in res.stdout
    finished = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert (finished["epoch"], finished["iteration"]) == (3, 0)
    assert "sanity check passed" in res.stdout


@pytest.fixture
def bad_for_rank1(tmp_path):
    """A training folder whose one corrupt file only rank 1 of 2 asks for (batch 8, seed 0), in epoch 0."""
    root = write_folder(tmp_path / "data" / "train", per_class=8)
    paths = [p for p, _ in image_folder(root).samples]
    ranks = [ResumableSampler(len(paths), 4, 2, r, seed=0).epoch_indices(0) for r in (0, 1)]
    index = next(i for i in ranks[1] if i not in ranks[0] and i != 0)
    with open(paths[index], "wb") as f:
        f.write(b"not a JPEG")
    return tmp_path / "data", paths[index]


def test_an_error_of_one_rank_stops_every_rank_at_once(bad_for_rank1, tmp_path):
    data, bad = bad_for_rank1
    start = time.time()
    res = run_script("main_moco.py", data, *TINY, "-b", "8", "--workers", "0", "--epochs", "50", "--strict-data",
                     "--save-dir", tmp_path / "run", env=ENV, launcher=TORCHRUN, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count(f"error: unreadable image file {bad}") == 1, res.stderr
    assert res.stderr.count("exitcode: 2") >= 1 and "w2ssl/" not in res.stderr, res.stderr
    assert len(res.stdout.split("Epoch: [")) <= 5  # stopped within two steps of the error, not at the end
    assert time.time() - start < 120


@pytest.mark.parametrize("batch, message", [("6", "multiple of 2 x 2 processes"), ("48", "fewer than one batch")])
def test_a_user_error_under_torchrun_is_printed_once(image_root, tmp_path, batch, message):
    res = run_script("main_moco.py", image_root, *TINY, "-b", batch, "--workers", "0", "--save-dir", tmp_path,
                     env=ENV, launcher=TORCHRUN, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count("error: ") == 1 and message in res.stderr, res.stderr


STUCK_RANK0 = """
import sys, time
from argparse import Namespace
from w2ssl.dist.distributed import launch
from w2ssl.errors import UserError

def worker(ctx, args):
    if ctx.rank == 1:
        raise UserError("only rank 1 fails, outside any step")
    time.sleep(300)  # as a collective waits for the failed process (NCCL: until its timeout)

launch(worker, Namespace(dist_backend="gloo", multiprocessing_distributed=False, world_size=-1, gpu=None))
"""


def test_a_failure_outside_a_step_ends_a_waiting_rank_within_seconds(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RANK0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _, err1 = procs[1].communicate(timeout=120)
        failed_at = time.time()
        _, err0 = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 2 and err1.count("error: only rank 1 fails") == 1, err1
    assert procs[0].returncode == 2 and "error" not in err0.lower(), err0
    assert time.time() - failed_at < 20
