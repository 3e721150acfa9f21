"""detectron2 launcher for the configs in ``transfer/configs`` (see ``transfer/README.md``).

``python -m transfer.train_net --config-file transfer/configs/voc_R_50_C4_24k.yaml --num-gpus 8
[--resume] [--eval-only] [KEY VALUE ...]`` takes detectron2's standard arguments and config overrides.
Without detectron2 it prints one line saying so and exits with code 2.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        print(f"error: python -m transfer.train_net needs detectron2, which could not be imported ({e}): install it "
              "as in transfer/README.md, or fine-tune without it using python -m transfer.finetune_torchvision",
              file=sys.stderr)
        return 2
    from transfer.d2_launch import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
