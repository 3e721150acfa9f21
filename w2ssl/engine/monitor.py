"""Meters, the console/``log.txt`` logger with ETA, a progress bar on terminals, and TensorBoard."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor


class AverageMeter:
    """Latest value and running mean, printed as ``Name val (avg)`` like the authors' logs."""

    def __init__(self, name: str, fmt: str = ":.4e"):
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self) -> None:
        self.val, self.sum, self.count = 0.0, 0.0, 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)

    def __str__(self) -> str:
        template = "{name} {val" + self.fmt + "} ({avg" + self.fmt + "})"
        return template.format(name=self.name, val=self.val, avg=self.avg)


def format_duration(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class ETA:
    """Remaining time of the whole run from the mean time of the iterations seen in this process."""

    def __init__(self, total_iters: int, done_iters: int):
        self.total, self.start_done, self.done = total_iters, done_iters, done_iters
        self.start = time.perf_counter()

    def step(self, done_iters: int) -> str:
        self.done = done_iters
        seen = self.done - self.start_done
        if seen <= 0:
            return "?"
        per_iter = (time.perf_counter() - self.start) / seen
        return format_duration(per_iter * (self.total - self.done))


class Logger:
    """Rank-0 output: console (through tqdm when stdout is a terminal), ``log.txt``, TensorBoard.

    ``log.txt`` and ``tb/`` are created at the first line or scalar logged, so a run that fails its
    checks before that leaves nothing behind. On other ranks every method does nothing.
    """

    def __init__(self, save_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled, self.tensorboard = enabled, tensorboard
        self.save_dir = Path(save_dir)
        self.tty = sys.stdout.isatty()
        self._file: TextIO | None = None
        self._tb = None
        self._bar = None

    def _log_file(self) -> TextIO:
        if self._file is None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.save_dir / "log.txt", "a", buffering=1)
        return self._file

    def _writer(self):  # -> SummaryWriter | None, imported at its first use
        if self._tb is None and self.enabled and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.save_dir / "tb"))
        return self._tb

    def info(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        self._log_file().write(line + "\n")

    def warn(self, line: str) -> None:
        self.info(f"WARNING: {line}")

    def start_bar(self, total: int, desc: str) -> None:
        if self.enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def advance_bar(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train/") -> None:
        tb = self._writer()
        if tb is not None:
            for key, value in values.items():
                tb.add_scalar(prefix + key, value, step)

    def images(self, step: int, tag: str, batch: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Log a grid of normalised images ``[n, 3, h, w]`` (un-normalised for display)."""
        tb = self._writer()
        if tb is None:
            return
        from torchvision.utils import make_grid
        m = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
        shown = (batch.float() * s + m).clamp(0, 1)
        tb.add_image(tag, make_grid(shown, nrow=4, padding=2), step)

    def text(self, tag: str, text: str) -> None:
        """A text entry in TensorBoard (e.g. which checkpoint a run evaluates)."""
        tb = self._writer()
        if tb is not None:
            tb.add_text(tag, text, 0)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.close_bar()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def report_throughput(logger: Logger, step_seconds: Sequence[float], device: torch.device,
                      info: dict[str, object]) -> None:
    """With ``--max-iters`` (benchmarks): log source images/s over the newest steps (``step_seconds``, a
    window that leaves out checkpoint writes and epoch ends) as one JSON line with ``info``
    (which holds ``batch_size``)."""
    if not step_seconds:
        return
    seconds = list(step_seconds)
    if device.type == "cuda":
        start = time.perf_counter()
        torch.cuda.synchronize()
        seconds[-1] += time.perf_counter() - start  # the last step's queued GPU work
    img_s = len(seconds) * int(info["batch_size"]) / sum(seconds)
    logger.info(json.dumps({"e2e_img_s": round(img_s, 1), "window_iters": len(seconds), **info}))


def as_logged(values: dict[str, float]) -> dict[str, float]:
    """Scalars as they are shown (console and TensorBoard): accuracies (names ending in ``_acc``) in percent,
    as the kNN accuracies."""
    return {k: 100 * v if k.endswith("_acc") else v for k, v in values.items()}


def scalar_fields(cur: dict[str, float], avg: dict[str, float]) -> str:
    """The console fields of any method: ``Loss cur (avg)`` first, then every other scalar by its name."""
    def field(k: str) -> str:
        fmt = ".1f" if k.endswith("_acc") else ".4e"
        return f"{'Loss' if k == 'loss' else k} {cur[k]:{fmt}} ({avg[k]:{fmt}})"
    return "\t".join(field(k) for k in sorted(cur, key=lambda k: k != "loss"))


Fields = Callable[[dict[str, float], dict[str, float]], str]


class EpochProgress:
    """One epoch's meters of pre-training, for whatever scalars the model returns. They stay on the device
    and are read in one sync per printed line; TensorBoard still gets every iteration's values. ``fields``
    formats the method's part of the console line from the current and average values (in percent for
    accuracies); the default shows every scalar."""

    def __init__(self, logger: Logger, device: torch.device, batch_size: int, iters_per_epoch: int, epoch: int,
                 fields: Fields | None = None):
        self.logger, self.batch_size, self.iters, self.epoch = logger, batch_size, iters_per_epoch, epoch
        self.device, self.fields = device, fields or scalar_fields
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.pending: list[tuple[dict[str, Tensor], dict[str, float]]] = []  # since the last line
        self.batch_time, self.data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")

    def record(self, parts: dict[str, Tensor], scheduled: dict[str, float], data_s: float, batch_s: float) -> None:
        """One step: the model's scalars ``parts`` (on the device), the scheduled values it ran with (``lr``
        first, then e.g. ``momentum``), the seconds waiting for data and of the whole step."""
        self.data_time.update(data_s)
        self.batch_time.update(batch_s)
        values = {k: v.detach() for k, v in parts.items()}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, torch.zeros((), device=self.device)) + v
        self.count += 1
        self.pending.append((values, {**scheduled, "data_time": data_s,
                                      "img_per_s": self.batch_size / max(batch_s, 1e-9)}))

    def line(self, step: int, iteration: int, eta: str, extra: dict[str, float]) -> None:
        """Log the console line for the newest step (``step`` steps done, ``iteration`` in this
        epoch) and TensorBoard scalars, plus ``extra``, for every pending step."""
        if not self.logger.enabled or not self.pending:
            self.pending = []
            return
        keys = list(self.sums)
        rows = torch.stack([torch.stack([p[k] for k in keys]) for p, _ in self.pending]).float().tolist()
        avg = as_logged(dict(zip(keys, (torch.stack([self.sums[k] for k in keys]) / self.count).tolist())))
        first = step - len(rows)
        for i, (row, (_, host)) in enumerate(zip(rows, self.pending)):
            self.logger.scalars(first + i, {**as_logged(dict(zip(keys, row))), **host, **extra})
        cur, lr = as_logged(dict(zip(keys, rows[-1]))), self.pending[-1][1]["lr"]
        self.pending = []
        img_s = self.batch_size / max(self.batch_time.avg, 1e-9)
        width = len(str(self.iters))
        wait = 100 * self.data_time.sum / max(self.batch_time.sum, 1e-9)  # of the step time, this epoch
        self.logger.info(
            f"Epoch: [{self.epoch}][{iteration:>{width}}/{self.iters}]\t{self.batch_time}\t{self.data_time}\t"
            f"Wait {wait:.0f}%\t"
            f"LR {lr:.4e}\t{self.fields(cur, avg)}\timg/s {img_s:.1f}\tETA {eta}")


class LoaderCheck:
    """Warns once when the input pipeline is slower than the training step.

    Over the run's first ``steps`` steps after the first (which starts the workers), the share of step
    time spent waiting for a batch; above ``share``, one warning with both rates: the loader's (source
    images per second of step time, ``batch / (wait + compute)``) and the step's alone (``batch / compute``).
    """

    def __init__(self, warn: Callable[[str], None], batch_size: int, workers: int, steps: int = 20,
                 share: float = 0.1):
        self.warn, self.batch_size, self.workers, self.steps, self.share = warn, batch_size, workers, steps, share
        self.seen, self.data_s, self.batch_s = 0, 0.0, 0.0

    def record(self, data_s: float, batch_s: float) -> None:
        self.seen += 1
        if self.seen == 1 or self.seen > self.steps + 1:
            return
        self.data_s, self.batch_s = self.data_s + data_s, self.batch_s + batch_s
        if self.seen == self.steps + 1 and self.data_s > self.share * self.batch_s:
            images = self.steps * self.batch_size
            loader, step = images / self.batch_s, images / max(self.batch_s - self.data_s, 1e-9)
            self.warn(f"the input pipeline delivers {loader:.0f} img/s and the step alone runs at {step:.0f} img/s: "
                      f"{100 * self.data_s / self.batch_s:.0f}% of the step time waits for data. Raise --workers "
                      f"({self.workers} now; README: workers per GPU), or use --gpu-aug")
