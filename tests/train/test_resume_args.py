"""Resuming with other arguments (issue 26 item 4): each rule of w2ssl.train.resume_args on its own."""
from argparse import Namespace

import pytest

from w2ssl.errors import UserError
from w2ssl.train.resume_args import KEEP, NEW, REFUSE, RULES, differences, flag, reconcile, rules

SAVED = {"method": "w2ssl", "arch": "resnet50", "seed": 7,
         "args": {"arch": "resnet50", "seed": None, "lr": 0.6, "epochs": 200, "tile_size": 112, "batch_size": 512,
                  "crop_min": 0.2, "stop_grad_conv1": False}}


def args(**changes) -> Namespace:
    return Namespace(**{**SAVED["args"], "method": "w2ssl", "optimizer": "lars", **changes})


def test_the_same_arguments_pass_silently():
    warnings = []
    reconcile(SAVED, args(), "ckpt", warnings.append)
    assert warnings == [] and differences(SAVED, args(seed=7)) == {}


@pytest.mark.parametrize("change, message", [
    ({"arch": "resnet18"}, "ckpt cannot go on with --arch resnet18 \\(the checkpoint: --arch resnet50\\): pass "
                           "--arch resnet50, or another --save-dir \\(or --resume none\\) to start a new run"),
    ({"tile_size": 64}, "--tile-size 64 \\(the checkpoint: --tile-size 112\\): pass --tile-size 112"),
    ({"method": "mocov3"}, "--method mocov3 \\(the checkpoint: --method w2ssl\\)"),
    ({"stop_grad_conv1": True}, "--stop-grad-conv1 \\(the checkpoint: without --stop-grad-conv1\\)"),
])
def test_refused_differences_raise_one_line(change, message):
    warnings = []
    with pytest.raises(UserError, match=message):
        reconcile(SAVED, args(**change, lr=0.3), "ckpt", warnings.append)
    assert warnings == []  # refused before anything is warned about


def test_a_kept_value_is_the_checkpoints_with_a_warning():
    warnings, given = [], args(seed=1)
    reconcile(SAVED, given, "ckpt", warnings.append)
    assert given.seed == 7  # the run's actual seed (its args.seed was None: an unseeded run)
    assert warnings == ["resuming ckpt: --seed 1 ignored, the run goes on with its 7 (a resumed run is the same "
                        "run: pass another --save-dir or --resume none for a new one)"]


def test_new_values_are_used_with_one_warning():
    warnings, given = [], args(lr=0.3, epochs=300, batch_size=256)
    reconcile(SAVED, given, "ckpt", warnings.append)
    assert (given.lr, given.epochs, given.batch_size) == (0.3, 300, 256)
    assert warnings == ["resuming ckpt with other values than its own: --epochs 200 -> 300, --batch-size 512 -> 256, "
                        "--lr 0.6 -> 0.3: the run goes on with the new values from here"]


def test_arguments_unknown_to_an_old_checkpoint_are_not_compared():
    old = {"epoch": 3, "state_dict": {}}  # no args, method or seed: method w2ssl
    assert differences(old, args(lr=9.0, arch="resnet18")) == {}
    assert differences({"args": {}}, args(method="mocov3")) == {"method": ("w2ssl", "mocov3")}


def test_every_rule_names_a_main_moco_flag():
    import main_moco

    options = {o for a in main_moco.build_parser()._actions for o in a.option_strings}
    dests = {a.dest for a in main_moco.build_parser()._actions}
    assert set(rules()) <= dests and all(flag(n) in options for n in rules())
    assert set(rules().values()) == {REFUSE, KEEP, NEW} and set(RULES) < set(rules())


def test_each_method_brings_the_rules_of_its_own_flags():
    """A method's flags are checked on resume by the rules its module declares (Arguments.on_resume)."""
    rule = rules()
    assert (rule["crop_proj_dim"], rule["cross"], rule["moco_t"], rule["moco_dim"], rule["moco_m"]) == (
        REFUSE, NEW, NEW, REFUSE, NEW)
    assert "cross" not in RULES and "moco_m" not in RULES  # declared in methods/w2ssl.py and methods/base.py
