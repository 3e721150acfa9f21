"""Timing, memory and environment helpers shared by the bench scripts."""
from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision

from w2ssl.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """``--device``: ``cuda`` when available and nothing is given; a clear error for a missing GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return device


def time_iterations(step: Callable[[], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Run ``step`` ``warmup`` times, then ``iters`` times; the seconds each timed call took.

    On CUDA each call is bracketed by events on the current stream and the host syncs once, after the
    loop, so timing adds no sync of its own; on CPU ``time.perf_counter`` brackets each call.
    """
    if iters < 1 or warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0; got {iters} and {warmup}")
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000.0 for start, end in events]


def time_interleaved(steps: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, list[float]]:
    """CPU timing of several steps in rounds (one call of each per round, ``time.perf_counter``).

    ``warmup`` untimed rounds first; returns each step's ``iters`` durations in seconds. Load from
    other processes then falls on all steps alike instead of on whichever runs during a burst.
    """
    if iters < 1 or warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0; got {iters} and {warmup}")
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def reset_memory(device: torch.device) -> None:
    """Free cached blocks and restart the peak counter (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since :func:`reset_memory`, in GiB; None on CPU (not tracked)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, Any]:
    """Versions that change the numbers: Python, torch, torchvision, CUDA and cuDNN."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits past the point where useful."""
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def json_line(result: dict[str, Any]) -> str:
    """The one-line JSON that every bench script prints last (machine-readable result)."""
    return json.dumps(result, sort_keys=False, separators=(",", ":"))
