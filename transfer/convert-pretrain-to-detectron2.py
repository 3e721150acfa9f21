"""MoCo's published converter command, kept: ``python transfer/convert-pretrain-to-detectron2.py CKPT OUT.pkl``.

The converter is the module ``transfer.convert_pretrain_to_detectron2`` (a hyphen cannot be in a module name).
This file replaces itself with ``python -m transfer.convert_pretrain_to_detectron2`` and the same arguments,
the repository root first on PYTHONPATH, in the caller's folder (relative paths keep their meaning), so the
command works from any folder, as MoCo's own ``python convert-pretrain-to-detectron2.py`` from ``transfer/``.
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    os.execve(sys.executable, [sys.executable, "-m", "transfer.convert_pretrain_to_detectron2", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})
