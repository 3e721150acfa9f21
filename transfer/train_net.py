#!/usr/bin/env python
"""detectron2 launcher for the configs in ``transfer/configs`` (see ``transfer/README.md``).

``python transfer/train_net.py --config-file transfer/configs/voc_R_50_C4_24k.yaml --num-gpus 8
[--resume] [--eval-only] [KEY VALUE ...]`` takes detectron2's standard arguments and config overrides.
Without detectron2 it prints one line saying so and exits with code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as `python transfer/train_net.py`: the repo root must be importable for `transfer`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        print(f"error: transfer/train_net.py needs detectron2, which could not be imported ({e}): install it "
              "as in transfer/README.md, or fine-tune without it using transfer/finetune_torchvision.py",
              file=sys.stderr)
        return 2
    from transfer.d2_launch import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
