"""Loaded weights into a module, a mismatch said in one line naming a few of the keys concerned."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from w2ssl.checkpoint.read import first_line
from w2ssl.errors import UserError, key_list


def load_into(module: torch.nn.Module, weights: dict[str, Tensor], path: str | Path, fits: str) -> None:
    """``module.load_state_dict(weights)``; a mismatch says that checkpoint ``path`` does not fit ``fits``,
    naming a few of the keys concerned (never all of them)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and isinstance(weights[k], Tensor)
             and weights[k].shape != expected[k].shape]
    problems = ([f"missing {key_list(missing)}"] if missing else []) \
        + ([f"unexpected {key_list(unexpected)}"] if unexpected else []) \
        + ([f"shape of {wrong[0]} is {tuple(weights[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}"]
           if wrong else [])
    if problems:
        raise UserError(f"checkpoint {path} does not fit {fits}: {'; '.join(problems)}")
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {fits}: {first_line(e)[:200]}") from None
