"""Resuming pre-training with other arguments than the checkpoint's: one rule per argument that changes the
run's trajectory, applied in one place (:func:`reconcile`).

* ``REFUSE``: the checkpoint cannot go on under the new value (another model, optimiser state or input):
  one line naming both values and the fix, exit 2.
* ``KEEP``: the value is what makes a resumed run the *same* run: a WARNING, and the run goes on with the
  checkpoint's value.
* ``NEW``: a deliberate change of schedule or loss is allowed: a WARNING, and the run goes on with the new
  value from the resume point (``--batch-size``: from the same number of images seen, see
  :meth:`w2ssl.train.pretrain.Pretrainer.resume`).

:data:`RULES` holds the trainer's flags; each method's flags bring their own rules (``Arguments.on_resume``).
Arguments that leave the trajectory unchanged (workers, logging, ``--fused-views``, ``--channels-last``,
``--compile``, the number of processes, which the run is invariant to) are not listed and never checked.
"""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

from w2ssl.errors import UserError
from w2ssl.methods.registry import KEEP, NEW, REFUSE, method_arguments

RULES: dict[str, str] = {
    # the model and the optimiser state
    "method": REFUSE, "arch": REFUSE, "optimizer": REFUSE, "stop_grad_conv1": REFUSE,
    # the input (a ViT's positional embedding is sized by it)
    "tile_size": REFUSE,
    # the batches, augmentations and tile permutations of every epoch
    "seed": KEEP,
    # schedule, optimiser settings and augmentation: a deliberate change
    "epochs": NEW, "batch_size": NEW, "lr": NEW, "weight_decay": NEW, "momentum": NEW, "warmup_epochs": NEW,
    "clip_grad": NEW, "crop_min": NEW, "gpu_aug": NEW, "precision": NEW,
}


def rules() -> dict[str, str]:
    """:data:`RULES` and every registered method's rules for its own flags."""
    return {**RULES, **{name: rule for group in method_arguments() for name, rule in group.on_resume.items()}}


def flag(name: str) -> str:
    """The option of ``args.<name>``: ``--tile-size``; the authors' underscore flags keep theirs (``--loss_t``)."""
    return "--" + (name if name.startswith(("loss_", "crop_proj")) else name.replace("_", "-"))


def shown(name: str, value: object) -> str:
    """``--lr 0.3``; a switch as ``--gpu-aug`` / ``without --gpu-aug``."""
    if isinstance(value, bool):
        return flag(name) if value else f"without {flag(name)}"
    return f"{flag(name)} {value}"


def differences(saved: dict, args: Namespace) -> dict[str, tuple[object, object]]:
    """``name -> (checkpoint's value, this run's)`` of the listed arguments that differ. ``saved`` is the
    checkpoint: its ``args``, its ``method`` and ``arch`` (checkpoints before ``args`` was saved: method
    ``w2ssl``) and the run's actual ``seed`` (an unseeded run's ``args.seed`` is None);
    an argument unknown to the checkpoint (older versions) or given as None here is not compared."""
    old = {"method": saved.get("method", "w2ssl"), **({"arch": saved["arch"]} if "arch" in saved else {}),
           **saved.get("args", {}), **({"seed": saved["seed"]} if "seed" in saved else {})}
    return {name: (old[name], getattr(args, name)) for name in rules()
            if name in old and getattr(args, name, None) is not None and old[name] != getattr(args, name)}


def reconcile(saved: dict, args: Namespace, path: str | Path, warn: Callable[[str], None]) -> None:
    """Apply :func:`rules` to the checkpoint ``saved`` (read from ``path``) and ``args``: raise
    :class:`UserError` for a refused difference; set ``args`` to the checkpoint's value where it is kept;
    ``warn`` once for the kept values and once for the new ones."""
    diff, rule = differences(saved, args), rules()
    refused = {n: d for n, d in diff.items() if rule[n] == REFUSE}
    if refused:
        given = ", ".join(f"{shown(n, new)} (the checkpoint: {shown(n, old)})" for n, (old, new) in refused.items())
        passed = " ".join(shown(n, old) for n, (old, _) in refused.items())
        raise UserError(f"{path} cannot go on with {given}: pass {passed}, or another --save-dir (or --resume "
                        f"none) to start a new run")
    kept = {n: d for n, d in diff.items() if rule[n] == KEEP}
    for name, (old, _) in kept.items():
        setattr(args, name, old)
    if kept:
        warn(f"resuming {path}: " + ", ".join(f"{flag(n)} {new} ignored, the run goes on with its {old}"
                                              for n, (old, new) in kept.items())
             + " (a resumed run is the same run: pass another --save-dir or --resume none for a new one)")
    changed = {n: d for n, d in diff.items() if rule[n] == NEW}
    if changed:
        warn(f"resuming {path} with other values than its own: "
             + ", ".join(f"{flag(n)} {old} -> {new}" for n, (old, new) in changed.items())
             + ": the run goes on with the new values from here")
