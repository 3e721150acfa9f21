"""Submit pre-training, the linear probe or fine-tuning to SLURM through submitit, or run it the same way here.

    python -m w2ssl.submit pretrain --nodes 1 --ngpus-per-node 8 --partition P -- --batch-size 2048 DATA

One task per GPU runs the entry script's own ``main`` (see :mod:`w2ssl.requeue`), which saves and
requeues the job at the time limit. ``--local`` runs the same job through submitit's local executor
on this machine (its GPUs, or CPU processes) and waits for it. ``submitit`` is optional:
``pip install -r requirements-cluster.txt``.
"""
from __future__ import annotations

import argparse
import importlib
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2ssl import cli
from w2ssl.errors import UserError
from w2ssl.requeue import SIGNAL_ENV, TIME_LIMIT_SIGNAL, MainJob, with_resume_auto

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"pretrain": "main_moco", "lincls": "main_lincls", "finetune": "main_finetune"}
INSTALL = "pip install -r requirements-cluster.txt (submitit 1.5.4)"
DEFAULT_CPUS_PER_TASK = 10  # as in the DINO/DeiT launchers: one for the trainer, the rest for its loader workers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m w2ssl.submit",
        usage="%(prog)s {pretrain,lincls,finetune} --nodes N --ngpus-per-node G [options] -- <main script flags>",
        description="Submit main_moco.py (pretrain), main_lincls.py (lincls) or main_finetune.py (finetune) to "
                    "SLURM with submitit, one task per GPU; the job saves checkpoint_last and requeues itself at "
                    "the time limit.")
    parser.add_argument("kind", choices=tuple(SCRIPTS),
                        help="pretrain: main_moco.py; lincls: main_lincls.py; finetune: main_finetune.py")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    parser.add_argument("--ngpus-per-node", type=int, default=8, metavar="G",
                        help="GPUs (= tasks) per node (default 8)")
    parser.add_argument("--partition", metavar="P")
    parser.add_argument("--timeout", type=int, default=2880, metavar="MIN",
                        help="time limit of each run in minutes (default 2880)")
    parser.add_argument("--account", metavar="A")
    parser.add_argument("--qos", metavar="Q")
    parser.add_argument("--comment", metavar="C")
    parser.add_argument("--cpus-per-task", type=int, metavar="C",
                        help=f"CPUs per GPU task (default: {DEFAULT_CPUS_PER_TASK}, or 1 + the main script's "
                             f"--workers per task when it sets them)")
    parser.add_argument("--mem-gb", type=cli.positive_int, metavar="GB",
                        help="memory per node (default: the partition's)")
    parser.add_argument("--signal-delay", type=int, default=120, metavar="S",
                        help=f"send SIG{TIME_LIMIT_SIGNAL.name[3:]} S seconds before the time limit: save, requeue "
                             f"(default 120)")
    parser.add_argument("--max-timeouts", type=cli.nonneg_int, default=20, metavar="K",
                        help="requeue at most K times at the time limit (default 20; preemptions do not count)")
    parser.add_argument("--job-dir", metavar="DIR",
                        help="submitit's files and logs (default: the main script's --save-dir, next to log.txt)")
    parser.add_argument("--local", action="store_true",
                        help="run the job on this machine through submitit's local executor and wait for it")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our flags, and the entry script's flags after ``--``."""
    argv = list(argv)
    if "--" not in argv:
        if {"-h", "--help"} & set(argv):
            return argv, []
        raise UserError("put the main script's own flags after --, e.g. python -m w2ssl.submit pretrain "
                        "--nodes 1 --ngpus-per-node 8 -- --batch-size 2048 DATA")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def check_options(opts: argparse.Namespace) -> None:
    if opts.nodes < 1 or opts.ngpus_per_node < 1:
        raise UserError("--nodes and --ngpus-per-node must be at least 1")
    if opts.local and opts.nodes != 1:
        raise UserError(f"--local runs on this machine only: use --nodes 1 (not {opts.nodes})")
    if opts.timeout < 1 or not 0 <= opts.signal_delay < 60 * opts.timeout:
        raise UserError(f"--timeout {opts.timeout} must be at least 1 minute and --signal-delay {opts.signal_delay} "
                        f"seconds shorter than it")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise UserError("--cpus-per-task must be at least 1")


def main_argv(opts: argparse.Namespace, argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """The entry script's flags as the job runs them (checked here, before anything is queued)."""
    module = importlib.import_module(SCRIPTS[opts.kind])
    parser = module.build_parser()
    default_resume = parser.get_default("resume")
    parser.set_defaults(workers=None, resume=None)  # None: neither the command line nor --config set them
    args = cli.parse(parser, argv)
    if getattr(args, "demo", False):
        raise UserError("--demo runs on this machine: python main_moco.py --demo")
    resume_set, args.resume = args.resume is not None, default_resume if args.resume is None else args.resume
    module.check(args, opts.nodes * opts.ngpus_per_node)
    if not (resume_set or getattr(args, "evaluate", False)):
        argv = with_resume_auto(argv)  # a run that SLURM requeues itself (preemption, node failure) resumes too
    if args.workers is None and not opts.local:
        # main's default counts the CPUs of the submitting machine: give each task its own share instead.
        cpus = opts.cpus_per_task or DEFAULT_CPUS_PER_TASK
        argv = [*argv, "--workers", str(opts.ngpus_per_node * (cpus - 1))]  # per node, as the flag means
        args.workers = opts.ngpus_per_node * (cpus - 1)
    return argv, args


def cpus_per_task(opts: argparse.Namespace, workers: int) -> int:
    return opts.cpus_per_task or math.ceil(workers / opts.ngpus_per_node) + 1


def local_gpus(ngpus: int) -> int:
    """GPUs for a ``--local`` job: one per task, or none (CPU processes) on a machine without GPUs."""
    import torch

    have = torch.cuda.device_count()
    if 0 < have < ngpus:
        raise UserError(f"--local --ngpus-per-node {ngpus}: this machine has {have} GPU(s); ask for at most {have}")
    return ngpus if have else 0


def make_executor(opts: argparse.Namespace, job_dir: Path, cpus: int) -> Any:
    """A ``submitit.AutoExecutor`` for the job (SLURM, or the local executor with ``--local``)."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"submitit is not installed: {INSTALL}") from None
    cluster = "local" if opts.local else "slurm"
    executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster, slurm_max_num_timeout=opts.max_timeouts,
                                     local_max_num_timeout=opts.max_timeouts)
    signal_name = TIME_LIMIT_SIGNAL.name[3:]
    # The job's submitit must use the signal our trainer handles; the job imports w2ssl from this checkout.
    setup = [f"export {SIGNAL_ENV}={signal_name}",
             f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    gpus = local_gpus(opts.ngpus_per_node) if opts.local else opts.ngpus_per_node
    executor.update_parameters(
        name=f"w2ssl-{opts.kind}", nodes=opts.nodes, tasks_per_node=opts.ngpus_per_node, gpus_per_node=gpus,
        cpus_per_task=cpus, timeout_min=opts.timeout, mem_gb=opts.mem_gb,
        slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos, slurm_comment=opts.comment,
        slurm_setup=setup, local_setup=setup,
        # --requeue: scontrol requeue works also where the cluster's default is JobRequeue=0
        slurm_additional_parameters={"signal": f"{signal_name}@{opts.signal_delay}", "requeue": True})
    if opts.local:  # AutoExecutor has no name for the local executor's signal delay
        executor._executor.update_parameters(signal_delay_s=opts.signal_delay)
    return executor


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else "no output"


def main(argv: Sequence[str] | None = None) -> None:
    ours, theirs = split_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    opts = cli.check_values(parser, parser.parse_args(ours))
    check_options(opts)
    cli.check_folder(opts.job_dir, "--job-dir", output=True)
    job_argv, args = main_argv(opts, theirs)
    job_dir = Path(opts.job_dir or args.save_dir).resolve()
    executor = make_executor(opts, job_dir, cpus_per_task(opts, args.workers or 0))
    job = executor.submit(MainJob(SCRIPTS[opts.kind], job_argv))
    where = "on this machine" if opts.local else f"to SLURM ({opts.nodes} node(s) x {opts.ngpus_per_node} GPUs)"
    print(f"submitted {opts.kind} job {job.job_id} {where}\n"
          f"  submitit logs: {job.paths.stdout} and {job.paths.stderr.name} (rank 0; one pair per task)\n"
          f"  training log:  {Path(args.save_dir).resolve() / 'log.txt'}", flush=True)
    if not opts.local:
        return
    try:
        job.results()
    except KeyboardInterrupt:
        print(f"interrupted: job {job.job_id} stopped; the same command continues from its newest checkpoint",
              file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - submitit raises its own error types for a failed job
        print(f"error: job {job.job_id} did not finish: {last_line(job.paths.stderr)} (see {job.paths.stderr})",
              file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"job {job.job_id} finished", flush=True)


if __name__ == "__main__":
    cli.with_error_boundary(main)()
