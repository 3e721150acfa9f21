"""What a linear-probe or fine-tuning folder (``--save-dir``) holds: the checkpoint to continue (and whether
this run may continue it), and which pre-trained file it trains on (path and SHA-256), so that a second
run on another file is refused rather than overwriting the first."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from w2ssl import checkpoint as ckpt_io
from w2ssl.errors import UserError

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
PROBE_KEYS = ("state_dict", "optimizer", "epoch", "best_acc1")
NOUNS = {"probe": "a probe", "finetune": "a fine-tuning run"}
# what a run reads, and the defaults of checkpoints saved before it was recorded (the labelled subset is
# checked against the list the run wrote: w2ssl.data.label_subset)
SAME_ON_RESUME: dict[str, object] = {"vit_feature": "avg", "subset": None}


def resume_path(args: Namespace) -> Path | None:
    """The probe checkpoint to continue: ``--resume PATH``, or with ``auto`` the one in ``--save-dir`` if any."""
    if args.resume in ("", "none"):
        return None
    if args.resume == "auto":
        path = Path(args.save_dir) / CHECKPOINT
        return path if path.is_file() else None
    return Path(args.resume)


def check_resumable(state: dict, args: Namespace, path: Path, protocol: str) -> None:
    """Raise :class:`UserError` unless the checkpoint ``state`` (read from ``path``) is a ``protocol`` run
    (``probe`` or ``finetune``) of ``args.arch`` on the data of :data:`SAME_ON_RESUME`."""
    saved = state.get("protocol", "probe")  # probes saved before this field are probes
    if saved != protocol:
        raise UserError(f"--resume {path} is a {saved} checkpoint, not a {protocol} one: resume it with "
                        f"{'main_finetune.py' if saved == 'finetune' else 'main_lincls.py'}, or pass another "
                        f"--save-dir")
    if state.get("arch", args.arch) != args.arch:
        raise UserError(f"--resume {path} is {NOUNS[protocol]} of a {state['arch']} but --arch {args.arch} was "
                        f"given: drop --arch (it defaults to the checkpoint's own) or pass --arch {state['arch']}")
    for name, default in SAME_ON_RESUME.items():
        old, new = (state.get("args") or {}).get(name, default), getattr(args, name)
        if old != new:
            raise UserError(f"--resume {path} is {NOUNS[protocol]} of {_shown(name, old)} but {_shown(name, new)} "
                            f"was given: pass {_shown(name, old)} or another --save-dir")


def _shown(name: str, value: object) -> str:
    flag = "--" + name.replace("_", "-")
    return f"no {flag}" if value in (None, "") else f"{flag} {value}"


def no_weights_message(args: Namespace) -> str:
    return (f"no weights given: pass --pretrained CKPT to start a probe (--resume {args.resume or 'none'} found no "
            f"{CHECKPOINT} in --save-dir {args.save_dir} to continue)")


def load_probe(path: str | Path, trust: bool) -> dict:
    """A linear-probe checkpoint of main_lincls.py, or a :class:`UserError` saying what the file is instead."""
    state = ckpt_io.load(path, trust)
    missing = [k for k in PROBE_KEYS if k not in state]
    if missing:
        raise UserError(f"--resume {path} is {ckpt_io.describe(state)}, not a linear-probe checkpoint (no "
                        f"{', '.join(missing)}): pass main_lincls.py's {CHECKPOINT}; pre-training checkpoints go to "
                        f"--pretrained")
    return state


def pretrained_record(args: Namespace) -> dict[str, str] | None:
    """Which pre-trained file this probe is of: its absolute path and content hash (hashed once per run)."""
    if not args.pretrained:
        return None
    sha = getattr(args, "pretrained_sha256", None) or ckpt_io.file_sha256(args.pretrained)
    return {"path": str(Path(args.pretrained).resolve()), "sha256": sha}


def describe_record(record: dict[str, str] | None) -> str:
    if not record:
        return "a checkpoint that does not record its pre-trained file (written before probes recorded it)"
    return f"{record['path']} (sha256 {record['sha256']})"


def check_probe_folder(args: Namespace) -> None:
    """Refuse ``--pretrained`` other than the file the probe already in ``--save-dir`` was trained on."""
    found = next((p for p in (Path(args.save_dir) / CHECKPOINT, Path(args.save_dir) / BEST) if p.is_file()), None)
    if found is None or not args.pretrained:
        return
    theirs, ours = ckpt_io.load(found, args.trust_checkpoint).get("pretrained"), pretrained_record(args)
    if isinstance(theirs, dict) and theirs.get("sha256") != ours["sha256"]:
        raise UserError(f"--save-dir {args.save_dir} holds a probe of {describe_record(theirs)}, not of --pretrained "
                        f"{describe_record(ours)}: pass another --save-dir (or delete {found.name} there to replace "
                        f"that probe)")
