"""argparse ``type=`` values with a range: the flag types of every entry point and of the methods' own flags."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class Ranged:
    """An argparse ``type=`` that converts like ``convert`` (argparse's own message when that fails) and
    whose range :func:`check_values` checks after parsing: one ``error:`` line, exit 2, and values from
    ``--config`` (which argparse does not pass through ``type=``) are checked too."""

    def __init__(self, convert: Callable[[str], Any], name: str, ok: Callable[[Any], bool], rule: str):
        self.convert, self.__name__, self.ok, self.rule = convert, name, ok, rule

    def __call__(self, text: str) -> Any:
        return self.convert(text)

    def accepts(self, value: object) -> bool:
        try:
            return bool(self.ok(self.convert(value) if isinstance(value, str) else value))
        except (TypeError, ValueError):
            return False


def _finite(ok: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and ok(v)


positive_int = Ranged(int, "int", lambda v: v >= 1, "must be a whole number >= 1")
nonneg_int = Ranged(int, "int", lambda v: v >= 0, "must be a whole number >= 0")
positive_float = Ranged(float, "float", _finite(lambda v: v > 0), "must be a finite number > 0")
nonneg_float = Ranged(float, "float", _finite(lambda v: v >= 0), "must be a finite number >= 0")
fraction = Ranged(float, "float", _finite(lambda v: 0 < v <= 1), "must be in (0, 1]")
unit_interval = Ranged(float, "float", _finite(lambda v: 0 <= v <= 1), "must be in [0, 1]")
below_one = Ranged(float, "float", _finite(lambda v: 0 <= v < 1), "must be in [0, 1)")
