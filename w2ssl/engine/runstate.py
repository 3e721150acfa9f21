"""What a run needs to continue identically: the shared seed, RNG states and plain-value arguments."""
from __future__ import annotations

import os
import random
from argparse import Namespace

import numpy as np
import torch

from w2ssl.dist import distributed as D


def shared_seed(seed: int | None, device: torch.device) -> int:
    """``seed``, or a fresh random one chosen by rank 0 and shared with every process."""
    if seed is not None:
        return seed
    value = torch.tensor(int.from_bytes(os.urandom(4), "little"), device=device)
    return int(D.broadcast(value).item())


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def plain_args(args: Namespace) -> dict:
    """The parsed arguments as plain values, loadable with ``weights_only=True``."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool))}


def _tuples(x: object) -> object:
    """``random.setstate`` wants tuples where a round trip through a checkpoint may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
