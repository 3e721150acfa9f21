"""python -m w2ssl.submit: sbatch parameters of the published runs, the requeue decision, and local-executor
jobs (same weights as main_moco.py; interrupted at the time-limit signal, requeued, same weights)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TINY, run_script
from w2ssl import cli, requeue, submit

submitit = pytest.importorskip("submitit")

PUBLISHED = ["--moco-m-cos", "--crop-min=.2", "--print-freq", "1000", "--epochs", "200", "--loss_crop", "1.0"]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``srun`` and ``sbatch`` on PATH; sbatch answers job 4242 and records that it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$1\" >> {tmp_path / 'sbatch_calls'}\n"
                                    f"echo 'Submitted batch job 4242'\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "sbatch_calls"


def sbatch_lines(text):
    return {line.split("=", 1)[0][len("#SBATCH --"):]: line.split("=", 1)[1]
            for line in text.splitlines() if line.startswith("#SBATCH --") and "=" in line}


@pytest.mark.parametrize("nodes,gpus,batch", [(1, 4, 512), (1, 8, 2048), (2, 8, 2048)])
def test_published_runs_sbatch_parameters(image_root, tmp_path, fake_slurm, capsys, nodes, gpus, batch):
    out = tmp_path / "run"
    rc = cli.run_main(submit.main, ["pretrain", "--nodes", str(nodes), "--ngpus-per-node", str(gpus),
                                    "--partition", "learnfair", "--account", "vision", "--qos", "high",
                                    "--comment", "w2ssl r50", "--timeout", "4320", "--",
                                    *PUBLISHED, "--batch-size", str(batch), "--save-dir", str(out), str(image_root)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "submitted pretrain job 4242" in printed and str(out / "4242_0_log.out") in printed
    script = (out / "4242_submission.sh").read_text()
    assert sbatch_lines(script) == {
        "nodes": str(nodes), "ntasks-per-node": str(gpus), "gpus-per-node": str(gpus), "cpus-per-task": "10",
        "signal": "USR1@120", "time": "4320", "partition": "learnfair", "account": "vision", "qos": "high",
        "comment": "'w2ssl r50'", "job-name": "w2ssl-pretrain", "wckey": "submitit", "open-mode": "append",
        "output": str(out / "%j_0_log.out"), "error": str(out / "%j_0_log.err")}
    assert "#SBATCH --requeue\n" in script  # scontrol requeue works where JobRequeue=0
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in script and "srun" in script
    job = submitit.helpers.DelayedSubmission.load(out / "4242_submitted.pkl").function
    assert job.script == "main_moco"
    # Each task gets 9 loader workers (10 CPUs); a requeued run continues where this one stopped.
    assert job.argv[-4:] == ["--resume", "auto", "--workers", str(gpus * 9)]


def test_local_executor_sends_the_trainers_signal(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    opts = submit.build_parser().parse_args(["pretrain", "--local", "--ngpus-per-node", "2", "--timeout", "5",
                                             "--signal-delay", "40"])
    params = submit.make_executor(opts, tmp_path, 1)._executor.parameters
    assert (params["timeout_min"], params["signal_delay_s"], params["tasks_per_node"]) == (5, 40, 2)
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in params["setup"]  # what the local controller sends at timeout


@pytest.fixture
def trunk_checkpoint(tmp_path):
    """A pre-training checkpoint holding a random resnet18 trunk (what main_lincls.py --pretrained reads)."""
    import torchvision

    trunk = {f"base_encoder.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.startswith("fc.")}
    path = tmp_path / "pretrained.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": trunk}, path)
    return path


@pytest.mark.parametrize("flags,resume", [([], ["--resume", "auto"]), (["-e"], []),
                                          (["--resume", "none"], [])])
def test_probe_job_resumes_unless_told_otherwise(image_root, tmp_path, fake_slurm, trunk_checkpoint, flags, resume):
    out = tmp_path / "probe"
    main = ["-a", "resnet18", "--pretrained", str(trunk_checkpoint), *flags, "--save-dir", str(out), str(image_root)]
    assert cli.run_main(submit.main, ["lincls", "--nodes", "1", "--ngpus-per-node", "8", "--", *main]) == 0
    job = submitit.helpers.DelayedSubmission.load(out / "4242_submitted.pkl").function
    assert job.script == "main_lincls" and job.argv == [*main, *resume, "--workers", "72"]
    assert "job-name=w2ssl-lincls" in (out / "4242_submission.sh").read_text()


def test_finetuning_job_resumes_and_gets_its_recipe_checked_before_submitting(image_root, tmp_path, fake_slurm,
                                                                              trunk_checkpoint, capsys):
    out = tmp_path / "ft"
    main = ["--pretrained", str(trunk_checkpoint), "--label-fraction", "0.1", "--save-dir", str(out), str(image_root)]
    assert cli.run_main(submit.main, ["finetune", "--nodes", "1", "--ngpus-per-node", "8", "--", *main]) == 0
    job = submitit.helpers.DelayedSubmission.load(out / "4242_submitted.pkl").function
    assert job.script == "main_finetune" and job.argv == [*main, "--resume", "auto", "--workers", "72"]
    bad = ["finetune", "--nodes", "1", "--ngpus-per-node", "8", "--", *main, "--layer-decay", "0.7"]
    assert cli.run_main(submit.main, bad) == 2
    assert "--layer-decay 0.7 is layer-wise lr decay over a ViT's blocks" in capsys.readouterr().err


def test_user_errors_submit_nothing(image_root, tmp_path, fake_slurm, capsys):
    cases = [
        (["pretrain", "--nodes", "2", "--ngpus-per-node", "8", str(image_root)], "put the main script's own flags"),
        (["pretrain", "--nodes", "2", "--ngpus-per-node", "8", "--", "-b", "24", str(image_root)],
         "multiple of 2 x 16 processes"),
        (["pretrain", "--local", "--nodes", "2", "--ngpus-per-node", "1", "--", str(image_root)], "--nodes 1"),
        (["lincls", "--nodes", "1", "--ngpus-per-node", "8", "--", str(image_root)], "no weights given"),
    ]
    for argv, message in cases:
        assert cli.run_main(submit.main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not fake_slurm.exists()


def test_without_submitit_says_how_to_install(image_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    argv = ["pretrain", "--nodes", "1", "--ngpus-per-node", "4", "--", "--save-dir", str(tmp_path), str(image_root)]
    assert cli.run_main(submit.main, argv) == 2
    assert capsys.readouterr().err == f"error: submitit is not installed: {submit.INSTALL}\n"
    with pytest.raises(SystemExit) as e:
        submit.main(["--help"])
    assert e.value.code == 0 and "--ngpus-per-node" in capsys.readouterr().out


@pytest.mark.parametrize("exit_code,requeued", [(128 + signal.SIGUSR1, True), (128 + signal.SIGTERM, False),
                                                (2, False), (None, False)])
def test_requeue_only_after_the_time_limit_save(monkeypatch, exit_code, requeued):
    """The job requeues (submitit's handler) only when the trainer saved after the time-limit signal."""
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # restored after the test: MainJob sets them for its task

    class FakeMain:
        argv = None

        @staticmethod
        def main(argv):
            FakeMain.argv = (argv, os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"])
            if exit_code is not None:
                sys.exit(exit_code)

    monkeypatch.setitem(sys.modules, "fake_main", FakeMain)
    calls = []
    usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    previous = signal.signal(usr_sig, lambda signum, frame: calls.append(signum))  # stands in for submitit's
    try:
        if exit_code is None:
            assert requeue.MainJob("fake_main", ["DATA"])() == 0
        else:
            with pytest.raises(SystemExit) as e:
                requeue.MainJob("fake_main", ["DATA"])()
            assert e.value.code == exit_code
    finally:
        signal.signal(usr_sig, previous)
    assert FakeMain.argv == (["DATA"], "1", "2", "2")
    assert calls == ([signal.SIGUSR1] if requeued else [])


def test_checkpoint_resubmits_with_resume_auto_once():
    job = requeue.MainJob("main_moco", ["DATA", "--resume", "none"])
    again = job.checkpoint().function.checkpoint().function
    assert again.argv == ["DATA", "--resume", "none", "--resume", "auto"]


# ----------------------------------------------------------------- local executor (subprocesses)

def local_args(data, out, ngpus, epochs, batch):
    return ["-m", "w2ssl.submit", "pretrain", "--local", "--nodes", "1", "--ngpus-per-node", str(ngpus), "--",
            data, *TINY, "-b", str(batch), "--workers", "0", "--epochs", str(epochs), "--save-dir", out]


def run_local(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def weights(path):
    return torch.load(path / "checkpoint_last.pth.tar", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    sa, sb = weights(a), weights(b)
    assert sa.keys() == sb.keys()
    assert max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa) <= 1e-6


@pytest.mark.slow
def test_local_jobs_run_the_mains_code_path(image_root, tmp_path):
    job, plain = tmp_path / "job", tmp_path / "plain"
    res = run_local(*local_args(image_root, job, 1, 1, 4))
    assert res.returncode == 0, res.stderr
    assert "submitted pretrain job" in res.stdout and "finished" in res.stdout
    assert run_script("main_moco.py", image_root, *TINY, "-b", "4", "--workers", "0", "--epochs", "1",
                      "--save-dir", plain, env={"CUDA_VISIBLE_DEVICES": ""}).returncode == 0
    assert_same_weights(job, plain)
    [log] = job.glob("*_0_log.out")  # submitit's logs next to ours; one run, not requeued
    assert (job / "log.txt").is_file() and log.read_text().count("Starting with JobEnvironment") == 1
    probe = tmp_path / "probe"  # and the linear probe of that checkpoint, through the same launcher
    res = run_local("-m", "w2ssl.submit", "lincls", "--local", "--nodes", "1", "--ngpus-per-node", "1", "--",
                    image_root, "-a", "resnet18", "--pretrained", job / "checkpoint_last.pth.tar", "--input-size", "32",
                    "--epochs", "1", "-b", "8", "--workers", "0", "--save-dir", probe)
    assert res.returncode == 0, res.stderr
    assert (probe / "model_best.pth.tar").is_file() and "Acc@1" in (probe / "log.txt").read_text()


def descendants(pid):
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            children += [int(child), *descendants(int(child))]
    return children


@pytest.mark.slow
def test_local_job_saves_requeues_and_ends_like_an_uninterrupted_one(image_root, tmp_path):
    """Two CPU processes; both get the time-limit signal as submitit's local controller sends it."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_local(*local_args(image_root, ref, 2, 3, 8)).returncode == 0  # 24 images: 3 steps per epoch
    proc = subprocess.Popen([sys.executable, *map(str, local_args(image_root, cut, 2, 3, 8))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.time() + 300
    while time.time() < deadline and not ((cut / "log.txt").is_file() and "[1][1/3]" in (cut / "log.txt").read_text()):
        time.sleep(0.1)
    tasks = [p for p in descendants(proc.pid) if b"submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    [stdout] = cut.glob("*_0_log.out")
    [stderr] = cut.glob("*_0_log.err")
    assert "SIGUSR1 received: saved" in stderr.read_text()
    assert "Requeued job" in stdout.read_text() and stdout.read_text().count("Starting with JobEnvironment") == 2
    assert "=> resumed from" in stdout.read_text() and (cut / "checkpoint_0000.pth.tar").is_file()
    assert_same_weights(ref, cut)
