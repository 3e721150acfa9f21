"""The labelled subset of the semi-supervised protocol (SimCLR, BYOL: 1 % / 10 % of ImageNet's labels).

``--label-fraction F`` keeps, of each class's ``n_c`` training images (in the folder's sorted order),
``max(1, round(F · n_c))`` chosen by a permutation drawn from ``--label-seed`` and the class's name
(:func:`balanced_fraction`): a pure function of the file list and the seed, so every process and every
run with that seed trains on the same images, whatever the world size, and a class keeps its subset
when other classes are added or removed. ``--label-file FILE`` keeps the images a file lists instead.
The kept list is written to ``labels_kept.txt`` in the run's folder, in the format ``--label-file`` reads.
"""
from __future__ import annotations

import hashlib
import os
from argparse import Namespace
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from w2ssl.data.datasets import stream_seed
from w2ssl.dist import distributed as D
from w2ssl.errors import UserError, key_list

KEPT = "labels_kept.txt"
Sample = tuple[str, int]


def balanced_fraction(samples: Sequence[Sample], classes: Sequence[str], fraction: float, seed: int) -> list[Sample]:
    """Of each class's samples, ``max(1, round(fraction · n_c))`` (Python's round: half to even), those first in
    a permutation seeded by ``seed`` and the class's name; the kept samples in their original order."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, (_, target) in enumerate(samples):
        by_class[target].append(i)
    kept = []
    for target, indices in by_class.items():
        g = torch.Generator().manual_seed(stream_seed(seed, f"label_fraction/{classes[target]}", 0, 0))
        order = torch.randperm(len(indices), generator=g)[:max(1, round(fraction * len(indices)))]
        kept += [indices[j] for j in order.tolist()]
    return [samples[i] for i in sorted(kept)]


def listed(samples: Sequence[Sample], root: str | Path, lines: Sequence[str], source: str) -> list[Sample]:
    """The samples whose path relative to ``root`` (``class/name.jpg``) or bare file name a line of ``lines``
    names (blank lines and ``#`` comments skipped); a line naming no image, or a name two images share, is a
    :class:`UserError` naming ``source``."""
    root = Path(root)
    relative = {relative_to(path, root): i for i, (path, _) in enumerate(samples)}
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, (path, _) in enumerate(samples):
        by_name[Path(path).name].append(i)
    wanted = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    keep, unknown, ambiguous = set(), [], []
    for entry in wanted:
        if entry in relative:
            keep.add(relative[entry])
        elif len(by_name.get(entry, ())) == 1:
            keep.add(by_name[entry][0])
        else:
            (ambiguous if entry in by_name else unknown).append(entry)
    if unknown or ambiguous:
        problem = (f"{len(unknown)} line(s) name no image of {root} ({key_list(unknown, 3)})" if unknown else
                   f"file name(s) {key_list(ambiguous, 3)} belong to several classes: write them as class/name")
        raise UserError(f"{source}: {problem}; list paths relative to {root}, one per line")
    if not keep:
        raise UserError(f"{source} lists no image: write paths relative to {root}, one per line")
    return [samples[i] for i in sorted(keep)]


def relative_to(path: str, root: str | Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators (``os.path.relpath``: either may be absolute)."""
    return Path(os.path.relpath(path, root)).as_posix()


def digest(samples: Sequence[Sample]) -> int:
    """A 56-bit hash of the kept paths and labels (processes compare it: they must train on one subset)."""
    text = "\n".join(f"{path}\t{target}" for path, target in samples).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=7).digest(), "little")


class LabelSubset:
    """A :data:`w2ssl.data.datasets.Select` for ``labelled_loader``: the labelled images a run trains on.

    Call it with a folder's ``(samples, classes)``; :attr:`kept` and :attr:`total` then describe the last
    choice, and :meth:`write` records it in the run's folder.
    """

    def __init__(self, root: str | Path, fraction: float | None = None, file: str | Path = "", seed: int = 0):
        if (fraction is None) == (not file):
            raise ValueError("pass exactly one of fraction and file")
        self.root, self.fraction, self.file, self.seed = Path(root), fraction, file, seed
        self.kept: list[Sample] = []
        self.total = 0

    @classmethod
    def from_args(cls, args: Namespace) -> LabelSubset | None:
        """The subset ``--label-fraction``/``--label-file`` ask for over DATA/train, or None (every label)."""
        if args.label_fraction is None and not args.label_file:
            return None
        return cls(Path(args.data) / "train", args.label_fraction, args.label_file, args.label_seed)

    def __call__(self, samples: list[Sample], classes: list[str]) -> list[Sample]:
        if self.fraction is not None:
            self.kept = balanced_fraction(samples, classes, self.fraction, self.seed)
        else:
            lines = Path(self.file).read_text().splitlines()
            self.kept = listed(samples, self.root, lines, f"--label-file {self.file}")
        self.total = len(samples)
        return self.kept

    def describe(self) -> str:
        how = (f"--label-fraction {self.fraction:g}, --label-seed {self.seed}" if self.fraction is not None
               else f"--label-file {self.file}")
        counts = defaultdict(int)
        for _, target in self.kept:
            counts[target] += 1
        return (f"{len(self.kept)} of the {self.total} images of {self.root} ({how}; {min(counts.values())} to "
                f"{max(counts.values())} per class over {len(counts)} classes)")

    def lines(self) -> list[str]:
        """:attr:`kept` as ``--label-file`` lines: paths relative to the training folder."""
        return [relative_to(path, self.root) for path, _ in self.kept]

    def check(self, save_dir: str | Path) -> None:
        """Refuse a ``labels_kept.txt`` in ``save_dir`` that lists other images: a resumed run must train on
        the labels it started with."""
        path = Path(save_dir) / KEPT
        if not path.is_file():
            return
        before = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
        if before != self.lines():
            raise UserError(f"--save-dir {save_dir} holds a run trained on other labels ({path}: {len(before)} "
                            f"images, this run: {len(self.kept)}): pass the same --label-fraction/--label-seed/"
                            f"--label-file, or another --save-dir")

    def record(self, save_dir: str | Path, device: torch.device, log: Callable[[str], None]) -> None:
        """In every process of a run, after :meth:`__call__`: check that all kept the same images (a folder
        that differs between nodes would not), and that ``save_dir`` holds no other subset; then the main
        process writes ``labels_kept.txt`` and logs the subset."""
        mine = torch.tensor([digest(self.kept)], device=device)
        if len(set(D.gather(mine).tolist())) > 1:
            raise UserError(f"the processes kept different labelled images of {self.root}: the folder differs "
                            f"between nodes; give every node the same DATA")
        self.check(save_dir)
        if D.is_main():
            log(f"=> training labels: {self.describe()}; listed in {self.write(save_dir)}")
        D.barrier()

    def write(self, save_dir: str | Path) -> Path:
        """``labels_kept.txt`` in ``save_dir`` (after :meth:`check`; one already there is left as it is)."""
        self.check(save_dir)
        path = Path(save_dir) / KEPT
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"# {self.describe()}\n" + "".join(f"{line}\n" for line in self.lines()))
        tmp.replace(path)
        return path
