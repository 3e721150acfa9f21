"""One run per folder (issue 26 item 3): the lock, its holder's record, and stale locks of dead runs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY, cpu_env
from w2ssl import cli
from w2ssl.errors import UserError
from w2ssl.system.runlock import LOCK_NAME, RunLock

HOLD = ("import sys, time; from w2ssl.system.runlock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


def test_the_holder_is_recorded_and_a_clean_end_leaves_nothing_stale(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] and record["started"]
        assert lock.stale_message() is None
        (tmp_path / "run" / "log.txt").write_text("a line\n")
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""
    with RunLock(tmp_path / "run") as again:
        assert again.stale is None


def test_a_run_that_wrote_nothing_leaves_no_lock_nor_the_folders_it_made(tmp_path):
    (tmp_path / "keep").mkdir()
    with RunLock(tmp_path / "keep" / "a" / "b"):
        assert (tmp_path / "keep" / "a" / "b" / LOCK_NAME).is_file()
    assert list((tmp_path / "keep").iterdir()) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("")  # an earlier run's lock file is not this holder's to remove
    with RunLock(tmp_path / "run"):
        pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""


def test_a_dead_runs_record_is_reported_as_stale(tmp_path):
    # what SIGKILL leaves: the record of a process whose lock died with it
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "node7", "started": "2026-01-01 00:00:00"}))
    with RunLock(tmp_path) as lock:
        message = lock.stale_message()
        assert "pid 4242 on host node7, started 2026-01-01 00:00:00" in message and "takes the folder over" in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def hold(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=cpu_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_holder_is_refused_naming_the_first_until_it_dies(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(UserError, match=f"is in use by another run \\(pid {holder.pid} on host .*, started "):
            with RunLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path) as lock:  # SIGKILL released it; the record it left is stale
        assert lock.stale is not None and lock.stale["pid"] == holder.pid


def run_while_held(folder, main, argv) -> tuple[int, int]:
    """Run entry point ``main`` on ``argv`` in this process while another process holds ``folder``; its exit
    code and the holder's pid (the holder is killed after)."""
    holder = hold(folder)
    try:
        code = cli.run_main(main, [str(a) for a in argv])
    except SystemExit as e:  # the worker's error boundary
        code = e.code
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    return code, holder.pid


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_exits_2_with_one_line(image_root, tmp_path, capsys):
    import main_moco

    out = tmp_path / "run"
    start = time.time()
    code, pid = run_while_held(out, main_moco.main, [image_root, *TINY, "-b", "8", "--workers", "0", "--epochs", "1",
                                                      "--save-dir", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"is in use by another run (pid {pid}" in err, err
    assert time.time() - start < 120 and not (out / "checkpoint_last.pth.tar").exists()
    assert not (out / "log.txt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main_lincls", "main_finetune"])
def test_a_probe_or_finetuning_on_a_folder_in_use_exits_2_with_one_line(script, image_root, tmp_path, capsys):
    import importlib

    from w2ssl.checkpoint import save_atomic
    from w2ssl.trunks import build_trunk

    trunk = {f"base_encoder.{k}": v for k, v in build_trunk("resnet18").state_dict().items()}
    ckpt = tmp_path / "pre.pth.tar"
    save_atomic({"epoch": 1, "state_dict": trunk}, ckpt)
    out = tmp_path / "run"
    code, pid = run_while_held(out, importlib.import_module(script).main,
                               [image_root, "--pretrained", ckpt, "--input-size", "32", "-b", "4", "--workers", "0",
                                "--epochs", "1", "--save-dir", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"is in use by another run (pid {pid}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the holder's folder, untouched
