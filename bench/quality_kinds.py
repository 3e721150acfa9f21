"""What bench/quality.py can compare: registered methods and named variants, and W2SSL's where-accuracy.

A *kind* is a registered method (``main_moco.py --method NAME``) or a variant: a method with some flags
changed, everything else equal (:data:`VARIANTS`). ``w2ssl-nowhere`` is W2SSL without its "where" loss
(``--loss_loc 0``), the ablation of METHOD §5.
"""
from __future__ import annotations

import re
from pathlib import Path

from w2ssl.errors import UserError
from w2ssl.methods.registry import method_names

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "w2ssl-nowhere": ("w2ssl", ["--loss_loc", "0"]),
}
REFERENCE_ROWS = ("supervised", "random")  # bench/quality.py's ceiling and floor, never a method
WHERE_ACC = re.compile(r"Where_acc +[0-9.]+ \( *([0-9.]+)\)")
EPOCH = re.compile(r"^Epoch: \[(\d+)\]")


def resolve(kind: str) -> tuple[str, list[str]]:
    """``(method, extra main_moco.py flags)`` of ``kind``."""
    if kind in VARIANTS:
        return VARIANTS[kind]
    if kind in method_names():
        return kind, []
    raise UserError(f"unknown method {kind!r} in --methods: use registered methods ({', '.join(method_names())}) "
                    f"or variants ({', '.join(VARIANTS)})")


def parse_kinds(text: str) -> list[str]:
    """``--methods`` ("w2ssl,mocov3,...") -> the kinds, checked, in order, without repeats."""
    kinds = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not kinds:
        raise UserError("--methods is empty: name at least one method, e.g. --methods w2ssl,mocov3")
    for kind in kinds:
        if kind in REFERENCE_ROWS:
            raise UserError(f"--methods {kind}: the {kind} row is added by bench/quality.py itself; drop it")
        resolve(kind)
    return kinds


def last_epoch_where_acc(log: Path) -> float | None:
    """The running mean of ``Where_acc`` (%) at the last printed line of the last epoch in a ``log.txt``;
    None for a method without a where task (or no log)."""
    if not log.is_file():
        return None
    found = None
    for line in log.read_text().splitlines():
        acc, epoch = WHERE_ACC.search(line), EPOCH.match(line)
        if acc and epoch:
            found = float(acc.group(1))
    return found
