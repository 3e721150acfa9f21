"""Checkpoint files, one job a module: :mod:`.write` (atomic saves), :mod:`.read` (safe loads),
:mod:`.kinds` (what a loaded file is), :mod:`.fit` (weights into a module), :mod:`.run_folder`
(a pre-training run's files: names, pruning), :mod:`.resume` (the checkpoint a run continues from).

The trunk inside a checkpoint (extraction, architecture, checks) is :mod:`w2ssl.trunk_weights`.
"""
from w2ssl.checkpoint.fit import load_into
from w2ssl.checkpoint.kinds import Kind, describe, kind
from w2ssl.checkpoint.read import file_sha256, first_line, load
from w2ssl.checkpoint.resume import check_resume_path, find_resumable, load_pretraining
from w2ssl.checkpoint.run_folder import LAST, candidates, epoch_name, prune
from w2ssl.checkpoint.write import link_atomic, save_all, save_atomic

__all__ = ["LAST", "Kind", "candidates", "check_resume_path", "describe", "epoch_name", "file_sha256", "find_resumable",
           "first_line", "kind", "link_atomic", "load", "load_into", "load_pretraining", "prune", "save_all",
           "save_atomic"]
