"""Fine-tuning (main_finetune.py, w2ssl.eval.finetune) and the protocols it shares with the probe: the labelled
subset (--label-fraction / --label-file) in both entry points, transfer to another folder, resume, the ViT
recipe's groups; end to end from a main_moco.py checkpoint and under torchrun (slow)."""
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import main_finetune
import main_lincls
from tests.conftest import write_folder
from tests.helpers import SMALL, TINY, register_small_resnet, run_script, small_resnet
from w2ssl import cli
from w2ssl.checkpoint import save_atomic
from w2ssl.data.datasets import eval_transform
from w2ssl.data.label_subset import KEPT
from w2ssl.dist.distributed import Context
from w2ssl.eval.finetune import FineTune
from w2ssl.eval.probe_model import Probe, changed_weights
from w2ssl.trunks import build_trunk, registry
from w2ssl.trunks.vit import VIT, build_vit

COMMON = ["--input-size", "32", "-b", "16", "--workers", "0", "--seed", "0", "--print-freq", "100"]


def stripes(root: Path, per_class: int, seed: int) -> None:
    """``root/class0`` horizontal, ``root/class1`` vertical stripes (32 px, random period, phase and colours):
    what a random trunk's pooled features do not tell apart and a trained one does."""
    rng = np.random.default_rng(seed)
    t = np.arange(32)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            wave = (np.sin(t * rng.uniform(0.3, 0.9) + rng.uniform(0, 6.3)) > 0).astype(float)
            mask = (wave[:, None] * np.ones((1, 32)) if c == 0 else np.ones((32, 1)) * wave[None, :])[..., None]
            rgb = mask * rng.integers(0, 256, 3) + (1 - mask) * rng.integers(0, 256, 3)
            Image.fromarray(rgb.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def stripe_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stripes")
    stripes(root / "train", 32, seed=0)
    stripes(root / "val", 16, seed=1)
    return root


def trunk_checkpoint(path: Path, trunk: torch.nn.Module) -> Path:
    """A pre-training checkpoint (our layout) holding ``trunk``'s weights."""
    save_atomic({"epoch": 1, "state_dict": {f"base_encoder.{k}": v for k, v in trunk.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def random_init(tmp_path_factory) -> Path:
    """A small_resnet at its random initialisation, as a pre-training checkpoint."""
    torch.manual_seed(0)
    return trunk_checkpoint(tmp_path_factory.mktemp("random") / "random.pth.tar", small_resnet())


@pytest.fixture
def small(monkeypatch):
    register_small_resnet(monkeypatch)


def run(capsys, module, *argv) -> tuple[int, str, str]:
    """``module.main`` in this process: exit code, stdout, stderr."""
    try:
        code = cli.run_main(module.main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------- fine-tuning vs the frozen probe
def test_finetuning_moves_the_trunk_and_beats_the_frozen_probe(small, stripe_data, random_init, tmp_path, capsys):
    base = [stripe_data, "-a", SMALL, *COMMON, "--pretrained", random_init]
    # random features stay at chance however long the probe trains: 56-59 % after 5 epochs (seeds 0-3), 59 after 20
    code, out, err = run(capsys, main_lincls, *base, "--epochs", "5", "--lr", "10", "--save-dir", tmp_path / "probe")
    assert code == 0, err
    code, out, err = run(capsys, main_finetune, *base, "--epochs", "20", "--lr", "0.2", "--save-dir", tmp_path / "ft")
    assert code == 0, err
    assert "=> fine-tuning: small_resnet, 2 classes, 1 process(es) on cpu, fp32, batch 16, sgd lr 0.0125" in out
    assert "erasing 0, head init N(0, 0.01), input" in out  # SimCLR's head for a ResNet
    probe, tuned = load(tmp_path / "probe" / "checkpoint.pth.tar"), load(tmp_path / "ft" / "checkpoint.pth.tar")
    reference = {k.removeprefix("base_encoder."): v for k, v in load(random_init)["state_dict"].items()}
    assert changed_weights(probe["state_dict"], reference) == []
    weights = {k for k in reference if not k.endswith("num_batches_tracked")}
    assert set(changed_weights(tuned["state_dict"], reference)) >= weights  # every trunk tensor trained
    assert (probe["protocol"], tuned["protocol"], probe["epoch"], tuned["epoch"]) == ("probe", "finetune", 5, 20)
    # random features: chance; trained: the stripes' orientation (measured 56 % vs 91 %; fewer than 20
    # fine-tuning epochs fall short: 72-87 % after 10)
    assert probe["best_acc1"] < 65 and tuned["best_acc1"] > probe["best_acc1"] + 20
    group = tuned["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.0)
    # the per-iteration cosine at the last of 20 x 4 iterations: 0.0125 x (1 + cos(pi 79/80)) / 2
    assert group["lr"] == pytest.approx(0.2 * 16 / 256 * 0.5 * (1 + math.cos(math.pi * 79 / 80)))
    assert (tmp_path / "ft" / "model_best.pth.tar").is_file()


def test_resume_continues_weights_optimizer_and_position(small, stripe_data, random_init, tmp_path, capsys):
    base = [stripe_data, "-a", SMALL, *COMMON, "--pretrained", random_init, "--save-dir", tmp_path]
    code, _, err = run(capsys, main_finetune, *base, "--epochs", "2", "--lr", "0.2")
    assert code == 0, err
    saved = load(tmp_path / "checkpoint.pth.tar")
    args = cli.parse(main_finetune.build_parser(), [str(a) for a in [*base, "--epochs", "3", "--lr", "0.2"]])
    main_finetune.check(args, 1)
    tune = FineTune(Context(torch.device("cpu")), args)
    tune.resume()
    assert (tune.epoch, tune.iteration, tune.best_acc1) == (2, 0, saved["best_acc1"])
    assert changed_weights(tune.model.state_dict(), saved["state_dict"]) == []
    momentum = [s["momentum_buffer"] for s in tune.optimizer.state_dict()["state"].values()]
    assert momentum and all(torch.equal(a, b["momentum_buffer"])
                            for a, b in zip(momentum, saved["optimizer"]["state"].values()))
    tune.logger.close()
    code, out, err = run(capsys, main_finetune, *base, "--epochs", "3", "--lr", "0.2")
    assert code == 0, err
    assert "resumed from" in out and "at epoch 2" in out and "Epoch: [2][0/4]" in out and "Epoch: [1]" not in out
    assert load(tmp_path / "checkpoint.pth.tar")["epoch"] == 3
    # -e on it alone (no --pretrained): the last epoch's accuracy, nothing trained
    last = [line for line in out.splitlines() if line.startswith(" * Acc@1")][-1]
    code, evaluated, err = run(capsys, main_finetune, stripe_data, *COMMON, "-e", "--resume",
                               tmp_path / "checkpoint.pth.tar", "--save-dir", tmp_path / "eval")
    assert code == 0, err
    assert [line for line in evaluated.splitlines() if line.startswith(" * Acc@1")] == [last]
    assert "Epoch:" not in evaluated
    # which is the accuracy of the checkpoint in eval mode (BatchNorm's running statistics), computed here
    model = Probe(small_resnet(), 2)
    model.load_state_dict(load(tmp_path / "checkpoint.pth.tar")["state_dict"])
    val = ImageFolder(str(stripe_data / "val"), eval_transform(32))
    with torch.no_grad():
        hits = sum(int(model.eval()(x[None]).argmax()) == y for x, y in val)
    assert last.startswith(f" * Acc@1 {100 * hits / len(val):.3f} ")


def test_a_signal_stops_finetuning_after_its_step_and_resume_goes_on_from_there(small, stripe_data, random_init,
                                                                                tmp_path, capsys, monkeypatch):
    # 32 images, batch 16: 2 steps an epoch; the signal comes in step 1 of epoch 0, the run saves after it
    import os
    import signal

    base = [stripe_data, "-a", SMALL, *COMMON, "--epochs", "2", "--pretrained", random_init, "--mixup", "0.8",
            "--save-dir", tmp_path]
    outputs = FineTune._train_outputs

    def signalled_in_step_1(self, x, target):
        if (self.epoch, self.iteration) == (0, 1):
            os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler only notes it
        return outputs(self, x, target)

    with monkeypatch.context() as patch:
        patch.setattr(FineTune, "_train_outputs", signalled_in_step_1)
        code, _, err = run(capsys, main_finetune, *base)
    assert code == 128 + signal.SIGTERM and "epoch 0 iteration 2" in err and "--resume auto" in err, err
    saved = load(tmp_path / "checkpoint.pth.tar")
    assert (saved["protocol"], saved["epoch"], saved["iteration"]) == ("finetune", 0, 2)
    code, out, err = run(capsys, main_finetune, *base)
    assert code == 0 and "at epoch 0 iteration 2" in out, err  # epoch 0's steps are done: validated, then epoch 1
    assert "=> epoch 0: Acc@1" in out and "=> epoch 1: Acc@1" in out
    assert load(tmp_path / "checkpoint.pth.tar")["epoch"] == 2


def test_a_probe_and_a_finetuning_run_do_not_resume_each_other(small, stripe_data, random_init, tmp_path, capsys):
    base = [stripe_data, "-a", SMALL, *COMMON, "--epochs", "1", "--pretrained", random_init]
    assert run(capsys, main_lincls, *base, "--save-dir", tmp_path / "probe")[0] == 0
    assert run(capsys, main_finetune, *base, "--save-dir", tmp_path / "ft")[0] == 0
    code, _, err = run(capsys, main_finetune, *base, "--epochs", "2", "--save-dir", tmp_path / "probe")
    assert code == 2 and "is a probe checkpoint, not a finetune one: resume it with main_lincls.py" in err, err
    code, _, err = run(capsys, main_lincls, *base, "--epochs", "2", "--save-dir", tmp_path / "ft")
    assert code == 2 and "is a finetune checkpoint, not a probe one: resume it with main_finetune.py" in err, err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_its_scaler(precision, small, stripe_data, random_init, tmp_path,
                                                           capsys):
    code, out, err = run(capsys, main_finetune, stripe_data, *COMMON, "--epochs", "1", "--precision", precision,
                         "--lr", "0.2", "--pretrained", random_init, "--save-dir", tmp_path)
    assert code == 0, err
    assert f"1 process(es) on cpu, {precision}, batch 16" in out
    ckpt = load(tmp_path / "checkpoint.pth.tar")
    assert ckpt["args"]["precision"] == precision and ckpt["state_dict"]["fc.weight"].dtype == torch.float32
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # fp16 scales the loss; bf16's scaler is disabled
    reference = {k.removeprefix("base_encoder."): v for k, v in load(random_init)["state_dict"].items()}
    assert "conv1.weight" in changed_weights(ckpt["state_dict"], reference)


@pytest.mark.parametrize("tolerated, code", [(20, 0), (1, 3)])
def test_fp16_tolerates_max_nonfinite_losses_in_a_row(tolerated, code, small, stripe_data, random_init, tmp_path,
                                                      capsys, monkeypatch):
    calls, train_outputs = [], FineTune._train_outputs

    def overflowing(self, x, target):  # the first two steps' losses overflow
        out = train_outputs(self, x, target)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("inf")} if len(calls) <= 2 else out
    monkeypatch.setattr(FineTune, "_train_outputs", overflowing)
    got, out, err = run(capsys, main_finetune, stripe_data, "-a", SMALL, *COMMON, "--epochs", "1", "--precision",
                        "fp16", "--max-nonfinite", tolerated, "--pretrained", random_init, "--save-dir", tmp_path)
    assert got == code, err
    if code:
        assert "non-finite loss at epoch 0 iteration 1" in err and "2 in a row" in err, err
    else:  # the scaler skipped both steps and halved its scale twice
        assert load(tmp_path / "checkpoint.pth.tar")["scaler"]["scale"] == 2.0 ** 16 / 4


# ----------------------------------------------------------------- labelled subset, transfer
@pytest.mark.parametrize("module", [main_lincls, main_finetune])
def test_label_fraction_trains_on_the_written_balanced_subset(module, small, stripe_data, random_init, tmp_path,
                                                              capsys):
    base = [stripe_data, "-a", SMALL, *COMMON, "--epochs", "1", "--pretrained", random_init, "--label-fraction", "0.25"]
    code, out, err = run(capsys, module, *base, "--save-dir", tmp_path / "a")
    assert code == 0, err
    kept = (tmp_path / "a" / KEPT).read_text().splitlines()
    assert kept[0] == (f"# 16 of the 64 images of {stripe_data / 'train'} (--label-fraction 0.25, --label-seed 0; "
                       f"8 to 8 per class over 2 classes)")
    assert [line.split("/")[0] for line in kept[1:]] == ["class0"] * 8 + ["class1"] * 8
    assert "Epoch: [0][0/1]" in out and "training labels: 16 of the 64 images" in out  # 16 images: one batch
    # the list as --label-file: the same subset; another --label-seed in that folder: refused
    code, out, err = run(capsys, module, *base[:-2], "--label-file", tmp_path / "a" / KEPT,
                         "--save-dir", tmp_path / "b")
    assert code == 0, err
    assert (tmp_path / "b" / KEPT).read_text().splitlines()[1:] == kept[1:]
    code, _, err = run(capsys, module, *base, "--epochs", "2", "--label-seed", "1", "--save-dir", tmp_path / "a")
    assert code == 2 and "holds a run trained on other labels" in err, err


def test_the_cached_probe_caches_only_the_labelled_subset(small, stripe_data, random_init, tmp_path, capsys):
    code, out, err = run(capsys, main_lincls, stripe_data, "-a", SMALL, *COMMON, "--epochs", "1", "--cached",
                         "--label-fraction", "0.25", "--pretrained", random_init, "--save-dir", tmp_path)
    assert code == 0, err
    assert "training labels: 16 of the 64 images" in out and "Epoch: [0][0/1]" in out
    assert "64-d features of 16 training images x 1 view(s) and 32 val images" in out


@pytest.mark.parametrize("flags, message", [
    (["--label-fraction", "0"], "must be in (0, 1]"),
    (["--label-fraction", "1.5"], "must be in (0, 1]"),
    (["--label-file", "/nowhere.txt"], "--label-file /nowhere.txt does not exist"),
    (["-e", "--label-fraction", "0.1"], "-e/--evaluate trains nothing"),
])
@pytest.mark.parametrize("module", [main_lincls, main_finetune])
def test_bad_label_subset_exits_2_with_one_line(module, flags, message, small, stripe_data, random_init, tmp_path,
                                                capsys):
    code, _, err = run(capsys, module, stripe_data, *COMMON, "--pretrained", random_init, "--save-dir", tmp_path,
                       *flags)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_knn_refuses_a_label_subset(stripe_data, random_init, tmp_path, capsys):
    code, _, err = run(capsys, main_lincls, stripe_data, *COMMON, "--knn", "--label-fraction", "0.1",
                       "--pretrained", random_init, "--save-dir", tmp_path)
    assert code == 2 and "--knn scores val against every training image: drop --label-fraction" in err, err


@pytest.mark.parametrize("preset, fraction, epochs", [("finetune_semi1", 0.01, 60), ("finetune_semi10", 0.1, 30)])
def test_semi_supervised_presets_are_simclrs_protocol(preset, fraction, epochs, small, stripe_data, random_init,
                                                      tmp_path, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / f"{preset}.yaml"
    args = cli.parse(main_finetune.build_parser(), ["--config", str(config), "DATA"])
    assert (args.label_fraction, args.label_seed, args.epochs, args.optimizer, args.lr, args.weight_decay,
            args.warmup_epochs, args.batch_size) == (fraction, 0, epochs, "sgd", 0.05, 0.0, 0, 1024)
    # its fraction and a --label-file from the command line: refused, not silently one of them
    kept = tmp_path / "kept.txt"
    kept.write_text("class0/0.png\n")
    code, _, err = run(capsys, main_finetune, "--config", config, stripe_data, "--pretrained", random_init,
                       "--label-file", kept, "--save-dir", tmp_path / "out")
    assert code == 2 and f"--label-fraction {fraction:g} and --label-file {kept} both given" in err, err


def test_bad_recipe_flags_exit_2(small, stripe_data, random_init, tmp_path, capsys):
    base = [stripe_data, *COMMON, "--pretrained", random_init, "--save-dir", tmp_path]
    code, _, err = run(capsys, main_finetune, *base, "--layer-decay", "0.65")
    assert code == 2 and "--layer-decay 0.65 is layer-wise lr decay over a ViT's blocks" in err, err
    code, _, err = run(capsys, main_finetune, *base, "--epochs", "2", "--warmup-epochs", "2")
    assert code == 2 and "--warmup-epochs 2 must be below --epochs 2" in err, err
    code, _, err = run(capsys, main_finetune, *base, "--mixup", "-1")
    assert code == 2 and "--mixup and --cutmix must be >= 0" in err, err
    code, _, err = run(capsys, main_finetune, *base, "--head-init-std", "0")
    assert code == 2 and "--head-init-std > 0" in err and err.count("\n") == 1, err
    code, _, err = run(capsys, main_finetune, *base, "--aa", "foo")
    assert code == 2 and "--aa foo is not a timm augmentation policy" in err and err.count("\n") == 1, err


def test_mixup_trains_on_mixed_images_and_soft_targets_the_same_way_on_every_run(small, stripe_data, random_init,
                                                                                 tmp_path, capsys):
    # the ResNet recipe with mixup/CutMix turned on: the loss is the soft-target one of a mixed batch, and the
    # draws follow (seed, epoch, step, rank), so two runs end with the same weights
    base = [stripe_data, "-a", SMALL, *COMMON, "--epochs", "1", "--pretrained", random_init, "--mixup", "0.8",
            "--cutmix", "1.0", "--smoothing", "0.1"]
    for name in ("a", "b"):
        code, out, err = run(capsys, main_finetune, *base, "--save-dir", tmp_path / name)
        assert code == 0, err
        assert "mixup 0.8, cutmix 1, RandAugment none, erasing 0" in out
    a, b = load(tmp_path / "a" / "checkpoint.pth.tar"), load(tmp_path / "b" / "checkpoint.pth.tar")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    args = cli.parse(main_finetune.build_parser(), [str(v) for v in [*base, "--save-dir", tmp_path / "c"]])
    main_finetune.check(args, 1)
    tune = FineTune(Context(torch.device("cpu")), args)
    x, target = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    plain = torch.nn.functional.cross_entropy(tune.model(x), target, label_smoothing=0.1)
    assert not torch.allclose(tune._train_outputs(x, target)["loss"], plain)
    tune.logger.close()


@pytest.mark.parametrize("module", [main_lincls, main_finetune])
def test_transfer_takes_the_class_count_from_the_folder(module, small, random_init, tmp_path, capsys):
    data = tmp_path / "flowers"
    write_folder(data / "train", classes=5, per_class=2, size=(32, 32), seed=5)
    write_folder(data / "val", classes=5, per_class=1, size=(32, 32), seed=6)
    code, out, err = run(capsys, module, data, *COMMON, "--epochs", "1", "--pretrained", random_init,
                         "--save-dir", tmp_path / "out")
    assert code == 0, err
    assert "small_resnet, 5 classes" in out
    assert load(tmp_path / "out" / "checkpoint.pth.tar")["state_dict"]["fc.weight"].shape == (5, 64)


# ----------------------------------------------------------------- the ViT recipe
def test_a_vit_finetunes_with_maes_recipe(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(registry._TRUNKS, "tiny_vit", registry.TrunkSpec(
        "tiny_vit", VIT, lambda **kw: build_vit("vit_small", depth=2, embed_dim=32, num_heads=2, **kw)))
    torch.manual_seed(0)
    ckpt = trunk_checkpoint(tmp_path / "vit.pth.tar", build_trunk("tiny_vit"))
    data = tmp_path / "data"
    write_folder(data / "train", classes=2, per_class=4, size=(16, 16), seed=7)
    write_folder(data / "val", classes=2, per_class=2, size=(16, 16), seed=8)
    argv = [data, "--input-size", "16", "-b", "4", "--workers", "0", "--seed", "0", "--epochs", "2",
            "--warmup-epochs", "1", "--pretrained", ckpt, "--save-dir", tmp_path / "out"]
    args = cli.parse(main_finetune.build_parser(), [str(a) for a in argv])
    main_finetune.check(args, 1)  # the arch from the weights, the family's recipe
    assert (args.arch, args.optimizer, args.lr, args.weight_decay, args.layer_decay, args.drop_path,
            args.smoothing) == ("tiny_vit", "adamw", 5e-4, 0.05, 0.65, 0.1, 0.1)
    assert (args.mixup, args.cutmix, args.aa, args.reprob) == (0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.25)
    assert args.head_init_std == 2e-5
    tune = FineTune(Context(torch.device("cpu")), args)
    head = tune.model.fc.weight.detach()  # MAE's head: N(0, 2e-5) (64 draws: within a factor 1.5 of it)
    assert 2e-5 / 1.5 < head.std().item() < 2e-5 * 1.5 and not tune.model.fc.bias.any()
    assert tune.mixer.active and "RandAugment" in [type(op).__name__ for op in tune.train_transform(16).transforms]
    # stochastic depth rising linearly over the blocks to --drop-path, as timm and MAE build it
    assert not hasattr(tune.model.trunk.blocks[0].drop_path1, "drop_prob")
    assert tune.model.trunk.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    lr = tune.learning_rate(1, 2)  # half-way through the warm-up epoch: half of 5e-4 x 4/256
    assert lr == pytest.approx(5e-4 * 4 / 256 / 2)
    tune.train_step(lambda: tune._train_outputs(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])), lr)
    lrs = {name: g["lr"] for g in tune.optimizer.param_groups for name in g["names"]}
    for name, layer in [("trunk.cls_token", 0), ("trunk.blocks.0.attn.qkv.weight", 1), ("trunk.blocks.1.norm2.bias", 2),
                        ("trunk.norm.weight", 3), ("fc.weight", 3)]:
        assert lrs[name] == pytest.approx(lr * 0.65 ** (3 - layer)), name
    assert isinstance(tune.optimizer, torch.optim.AdamW)
    tune.logger.close()
    code, out, err = run(capsys, main_finetune, *argv)
    assert code == 0, err
    assert "adamw lr 7.813e-06 (base 0.0005 x 4/256), layer decay 0.65, weight decay 0.05, warm-up 1 of 2" in out


# ----------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_cli_finetunes_a_main_moco_checkpoint_on_a_tenth_of_the_labels(image_root, tmp_path):
    res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--epochs", "1", "--workers", "0",
                     "--save-dir", tmp_path / "pretrain")
    assert res.returncode == 0, res.stderr
    res = run_script("main_finetune.py", image_root, "--pretrained", tmp_path / "pretrain" / "checkpoint_0000.pth.tar",
                     "--label-fraction", "0.1", "--input-size", "32", "-b", "3", "--epochs", "2", "--workers", "0",
                     "--seed", "0", "--save-dir", tmp_path / "ft", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "fine-tuning: resnet18, 3 classes" in res.stdout and "training labels: 3 of the 24 images" in res.stdout
    assert "Epoch: [1][0/1]" in res.stdout and " * Acc@1 " in res.stdout
    assert len((tmp_path / "ft" / KEPT).read_text().splitlines()) == 1 + 3
    ckpt = load(tmp_path / "ft" / "checkpoint.pth.tar")
    assert (ckpt["epoch"], ckpt["arch"], ckpt["args"]["label_fraction"]) == (2, "resnet18", 0.1)
    # the same checkpoint, every label of another folder (transfer): 4 classes, read from the folder
    other = tmp_path / "other"
    write_folder(other / "train", classes=4, per_class=3, size=(32, 32), seed=9)
    write_folder(other / "val", classes=4, per_class=2, size=(32, 32), seed=10)
    res = run_script("main_finetune.py", other, "--pretrained", tmp_path / "pretrain" / "checkpoint_0000.pth.tar",
                     "--input-size", "32", "-b", "4", "--epochs", "1", "--workers", "0", "--seed", "0",
                     "--print-freq", "1", "--save-dir", tmp_path / "transfer", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "fine-tuning: resnet18, 4 classes" in res.stdout and "Epoch: [0][2/3]" in res.stdout
    assert load(tmp_path / "transfer" / "model_best.pth.tar")["state_dict"]["fc.weight"].shape == (4, 512)


@pytest.mark.slow
def test_two_processes_train_on_the_subset_of_one(stripe_data, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = trunk_checkpoint(tmp_path / "r18.pth.tar", build_trunk("resnet18"))
    argv = [stripe_data, *COMMON, "--epochs", "1", "--pretrained", ckpt, "--label-fraction", "0.3", "--label-seed", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = run_script("main_finetune.py", *argv, "--save-dir", tmp_path / "two", launcher=torchrun, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 process(es) on cpu" in res.stdout and "training labels: 20 of the 64 images" in res.stdout
    code, _, err = run(capsys, main_finetune, *argv, "--save-dir", tmp_path / "one")
    assert code == 0, err
    assert (tmp_path / "two" / KEPT).read_text() == (tmp_path / "one" / KEPT).read_text()
    shutil.rmtree(tmp_path / "two")
