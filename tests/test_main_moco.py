"""End-to-end pre-training runs of main_moco.py on a tiny JPEG folder (CPU)."""
import re
import shlex
import sys
from pathlib import Path

import pytest
import timm
import torch

import main_lincls
import main_moco
from main_moco import build_parser, parse
from tests.helpers import TINY, logged_losses, run_script
from w2ssl import cli, export

SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seed" / "README-W2SSL.txt"
PUBLISHED_4GPU = ("--moco-m-cos --crop-min=.2 --dist-url 'tcp://localhost:10109' --multiprocessing-distributed "
                  "--world-size 1 --rank 0 --print-freq 1000 --batch-size 512 --epochs 200 --loss_crop 1.0 DATA")


def published_commands() -> list[str]:
    """The pre-training commands of the published README (falls back to the copy above)."""
    if not SEED_README.is_file():
        return [PUBLISHED_4GPU]
    lines = [line for line in SEED_README.read_text().splitlines()
             if line.startswith("CUDA_VISIBLE_DEVICES") and "main_moco.py" in line]
    return [line.split("main_moco.py", 1)[1].replace("[your imagenet-folder with train and val folders]", "DATA")
            for line in lines]


@pytest.mark.parametrize("command", published_commands())
def test_published_command_parses_unchanged(command):
    args = parse(build_parser(), shlex.split(command))  # with the method's and the trunk family's defaults
    assert args.moco_m_cos and args.multiprocessing_distributed
    assert (args.crop_min, args.dist_url, args.world_size, args.rank) == (0.2, "tcp://localhost:10109", 1, 0)
    assert (args.print_freq, args.epochs, args.loss_crop, args.data) == (1000, 200, 1.0, "DATA")
    assert args.batch_size in (512, 2048)
    # The authors' defaults for everything else.
    assert (args.arch, args.lr, args.weight_decay) == ("resnet50", 0.6, 1e-6)
    assert (args.momentum, args.optimizer, args.fused_views) == (0.9, "lars", False)
    assert (args.tile_size, args.loss_t, args.loss_loc, args.moco_m, args.warmup_epochs) == (112, 0.3, 1.0, 0.99, 10)
    assert (args.method, args.crop_proj_dim, args.moco_mlp_dim, args.moco_dim) == ("w2ssl", 256, 4096, 256)
    assert args.moco_t == 1.0
    assert (args.cross, args.flip_p, args.clip_grad, args.loss_clu) == (0.3, 0.5, 0.0, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_two_epochs_then_resume_auto(image_root, tmp_path, workers):
    out = tmp_path / "run"
    common = [image_root, *TINY, "-b", "8", "--workers", workers, "--save-dir", out]
    res = run_script("main_moco.py", *common, "--epochs", "2")
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert {"checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar", "checkpoint_last.pth.tar"} <= set(names)
    assert {"log.txt", "tb"} <= set(names)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    losses = logged_losses(out / "log.txt")
    assert len(losses) == 6  # 24 images / 8 = 3 iterations x 2 epochs
    assert all("nan" not in v and "inf" not in v for v in losses.values())
    ckpt = torch.load(out / "checkpoint_last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18" and ckpt["args"]["batch_size"] == 8
    assert "base_encoder.conv1.weight" in ckpt["state_dict"]
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert {"optimizer", "scaler", "rng", "global_step"} <= set(ckpt)

    res = run_script("main_moco.py", *common, "--epochs", "3", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "at epoch 2 iteration 0" in res.stdout
    assert (out / "checkpoint_0002.pth.tar").is_file()
    assert len(logged_losses(out / "log.txt")) == 9


@pytest.mark.slow
@pytest.mark.parametrize("fused", [[], ["--fused-views"]])
def test_torchrun_two_cpu_processes(image_root, tmp_path, fused):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--workers", "1", "--epochs", "1",
                     "--save-dir", tmp_path, *fused, launcher=torchrun)
    assert res.returncode == 0, res.stderr
    assert "2 process(es) on cpu" in res.stdout
    assert len(logged_losses(tmp_path / "log.txt")) == 3  # 3 iterations of 4 images per process
    assert (tmp_path / "checkpoint_0000.pth.tar").is_file()


@pytest.mark.slow
def test_fused_views_train_the_same(image_root, tmp_path):
    losses = []
    for flag in ("--no-fused-views", "--fused-views"):
        out = tmp_path / flag
        res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--workers", "0", "--epochs", "1",
                         "--save-dir", out, flag)
        assert res.returncode == 0, res.stderr
        losses.append({k: float(v) for k, v in logged_losses(out / "log.txt").items()})
    assert len(losses[0]) == 3 and losses[0].keys() == losses[1].keys()
    for key, loss in losses[0].items():
        assert losses[1][key] == pytest.approx(loss, rel=1e-3), key


def test_config_file_and_command_line_override(image_root, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch-size: 12\nloss_crop: 0.5\narch: resnet18\nepochs: 7\n")
    args = cli.parse(build_parser(), ["--config", str(config), "--epochs", "3", str(image_root)])
    assert (args.batch_size, args.loss_crop, args.arch, args.epochs) == (12, 0.5, "resnet18", 3)


@pytest.fixture
def empty_root(tmp_path):
    (tmp_path / "empty" / "train" / "class0").mkdir(parents=True)
    return tmp_path / "empty"


@pytest.mark.parametrize("case, args, message", [
    ("missing data", lambda r, e: [r.parent / "nowhere"], "nowhere does not exist: pass a folder of images"),
    ("empty dataset", lambda r, e: [e], "has no images"),
    ("batch does not divide", lambda r, e: [r, "-b", "7"], "multiple of 2"),
    ("resume path missing", lambda r, e: [r, "--resume", "/nonexistent.pth.tar"], "does not exist"),
    ("multiprocessing without GPU", lambda r, e: [r, "--multiprocessing-distributed"], "no GPU"),
    ("bad config key", lambda r, e: [r, "--config", Path(__file__)], "not valid YAML|unknown keys|mapping"),
    ("batch larger than dataset", lambda r, e: [r, "-b", "64"], "fewer than one batch"),
    ("demo with max-iters", lambda r, e: ["--demo", "--max-iters", "2"], "drop --max-iters"),
])
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(image_root, empty_root, tmp_path, case, args, message):
    res = run_script("main_moco.py", *args(image_root, empty_root), *TINY, "--workers", "0",
                     "--save-dir", tmp_path / "out", timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in res.stderr


def test_config_presets_parse():
    configs = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(configs.glob("pretrain_*.yaml"))
    assert len(presets) == 4
    for preset in presets:
        args = parse(build_parser(), ["--config", str(preset), "DATA"])
        assert args.moco_m_cos and args.method == "w2ssl"
        if args.arch.startswith("vit_"):  # MoCo v3's ViT recipe
            assert (args.optimizer, args.lr, args.weight_decay, args.epochs) == ("adamw", 1.5e-4, 0.1, 300)
            assert args.stop_grad_conv1 and args.batch_size in (1024, 4096)
        else:
            assert args.batch_size in (512, 2048) and args.epochs == 200 and args.optimizer == "lars"


def test_vit_arch_defaults_to_the_vit_recipe_for_flags_not_given(tmp_path):
    args = parse(build_parser(), ["-a", "vit_small", "DATA"])
    assert (args.optimizer, args.lr, args.weight_decay, args.warmup_epochs, args.epochs) == ("adamw", 1.5e-4, 0.1,
                                                                                              40, 300)
    assert args.moco_m_cos and args.moco_m == 0.99
    args = parse(build_parser(), ["-a", "vit_small", "--lr", "0.5", "--no-moco-m-cos", "--epochs", "3", "DATA"])
    assert (args.lr, args.moco_m_cos, args.epochs, args.optimizer) == (0.5, False, 3, "adamw")
    config = tmp_path / "c.yaml"
    config.write_text("arch: vit_base\nwd: 0.05\n")
    args = parse(build_parser(), ["--config", str(config), "DATA"])
    assert (args.weight_decay, args.optimizer) == (0.05, "adamw")
    args = parse(build_parser(), ["DATA"])  # ResNets: the authors' defaults
    assert (args.optimizer, args.lr, args.weight_decay, args.epochs, args.moco_m_cos) == ("lars", 0.6, 1e-6, 200, False)
    assert ("the trunk family's (-a vit_small, vit_base, vit_conv_small, vit_conv_base: --optimizer adamw --lr "
            "0.00015 --wd 0.1 --warmup-epochs 40 --epochs 300 --moco-m-cos --moco-m 0.99)"
            in " ".join(build_parser().format_help().split()))


def test_a_method_declares_its_own_flags_and_defaults():
    """BYOL's recipe is its default, under the trunk family's and the command line's; each method's flags
    show in a group of their own, the shared EMA flags once."""
    args = parse(build_parser(), ["--method", "byol", "DATA"])
    assert (args.moco_m, args.moco_m_cos, args.lr, args.weight_decay, args.optimizer) == (0.996, True, 0.2, 1.5e-6,
                                                                                         "lars")
    args = parse(build_parser(), ["--method", "byol", "-a", "vit_small", "--lr", "0.1", "DATA"])
    assert (args.moco_m, args.lr, args.weight_decay, args.optimizer) == (0.99, 0.1, 0.1, "adamw")
    assert parse(build_parser(), ["--method", "mocov3", "DATA"]).moco_m == 0.99  # the parser's (published) default
    text = build_parser().format_help()
    groups = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert {"--method w2ssl:", "--method mocov3:", "EMA encoder and heads (w2ssl, mocov3, byol):"} <= set(groups)
    assert sum(line.startswith("  --moco-m MOCO_M") for line in text.splitlines()) == 1
    assert "--method byol: --moco-m 0.996 --moco-m-cos --lr 0.2" in " ".join(text.split())


def run_inprocess(main, argv) -> int:
    """An entry point's ``main`` in this process: its exit code (a worker's error exits through SystemExit)."""
    try:
        return cli.run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["--method", "mocov3", "--gpu-aug"], "--gpu-aug has no device augmentation for --method mocov3: drop --gpu-aug"),
    (["--method", "mocov3", "-b", "0"], "--batch-size 0 must be a whole number >= 1"),
    (["--method", "mocov3", "-b", "1"], "fewer than 2 images"),
    (["--stop-grad-conv1"], "which resnet18 does not have: drop --stop-grad-conv1"),
    (["-a", "vit_conv_small", "--stop-grad-conv1"], "which vit_conv_small does not have"),
    (["-a", "vit_small", "--tile-size", "20"],
     r"--tile-size 20 does not fit vit_small \(an input of 40 px .*pass --tile-size 24 "),
])
def test_method_checks_exit_2_with_one_line(image_root, tmp_path, capsys, argv, message):
    code = run_inprocess(main_moco.main, [image_root, *TINY, "--workers", "0", "--save-dir", tmp_path, *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "log.txt").exists()


@pytest.mark.parametrize("method, tile, warned", [("w2ssl", 16, True), ("w2ssl", 32, False), ("mocov3", 16, False)])
def test_a_map_too_small_for_the_method_is_warned(image_root, tmp_path, capsys, method, tile, warned):
    """A 32-px montage leaves resnet18 a 1x1 map: W2SSL's four tiles would share one feature."""
    args = parse(build_parser(), [str(image_root), "-a", "resnet18", "--method", method, "--tile-size", str(tile),
                                  "-b", "8", "--save-dir", str(tmp_path)])
    main_moco.check(args, world_size=1)
    out = capsys.readouterr().out
    message = ("WARNING: --tile-size 16 leaves resnet18 a 1x1 feature map per input, and w2ssl needs 2x2 (one cell "
               "per tile) to learn: pass --tile-size 32 or more (112 as published)\n")
    assert out == (message if warned else "")


@pytest.mark.slow
def test_mocov3_checkpoint_goes_through_probe_knn_and_exports(image_root, tmp_path, capsys):
    """MoCo v3 through main_moco.py (in this process, kNN every epoch), then the linear probe and both exports."""
    out = tmp_path / "pretrain"
    code = run_inprocess(main_moco.main, [image_root, *TINY, "--method", "mocov3", "--moco-dim", "16",
                                          "-b", "8", "--workers", "0", "--epochs", "2", "--save-dir", out,
                                          "--knn-every", "1", "--knn-data", image_root, "--knn-size", "32"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "=> mocov3 on resnet18" in stdout and re.search(r"epoch 1 kNN k=20 acc1 [\d.]+", stdout)
    assert re.search(r"\tLoss \S+ \(\S+\)\tloss_ctr \S+ \(\S+\)\tctr_acc [\d.]+ \([\d.]+\)\timg/s", stdout)
    assert len(logged_losses(out / "log.txt")) == 6
    ckpt = torch.load(out / "checkpoint_last.pth.tar", weights_only=True)
    assert (ckpt["method"], ckpt["arch"], ckpt["epoch"]) == ("mocov3", "resnet18", 2)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"base_encoder", "projector", "predictor",
                                                             "momentum_encoder", "momentum_projector"}

    probe = ["-a", "resnet18", "--input-size", "64", "-b", "8", "--workers", "0", "--seed", "0", "--epochs", "1"]
    assert run_inprocess(main_lincls.main, [image_root, *probe, "--pretrained", out / "checkpoint_last.pth.tar",
                                            "--save-dir", tmp_path / "probe"]) == 0
    assert re.search(r"\* Acc@1 \d+\.\d+", capsys.readouterr().out)
    for target in ("torchvision", "timm"):
        assert export.main([str(out / "checkpoint_last.pth.tar"), str(tmp_path / f"{target}.pth"), "--to", target]) == 0
        weights = torch.load(tmp_path / f"{target}.pth", weights_only=True)
        assert torch.equal(weights["conv1.weight"], ckpt["state_dict"]["base_encoder.conv1.weight"])
    resumed = run_inprocess(main_moco.main, [image_root, *TINY, "-b", "8", "--workers", "0", "--epochs", "3",
                                             "--save-dir", out])
    err = capsys.readouterr().err  # every refused difference is named, then the flags that go on
    assert resumed == 2 and "cannot go on with --method w2ssl (the checkpoint: --method mocov3)" in err
    assert ": pass --method mocov3 --moco-dim 16, or another --save-dir" in err



@pytest.mark.slow
def test_knn_every_epoch_and_tensorboard_scalars(image_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--workers", "0", "--epochs", "1",
                     "--print-freq", "2", "--knn-every", "1", "--knn-data", image_root, "--knn-size", "32",
                     "--save-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    # 3 classes: no top-5 (always 100 %); k=200 is more than the 24 training images, and says so
    assert re.search(r"epoch 0 kNN k=20 acc1 [\d.]+ \| k=200 \(clamped to the 24 training images\) acc1", res.stdout)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for name in ("loss", "loss_what", "loss_where", "where_acc", "lr", "momentum", "img_per_s", "data_time"):
        steps = [e.step for e in events.Scalars(f"train/{name}")]
        assert steps == [0, 1, 2], name  # every iteration, though printed every 2
    assert "eval/knn_top1_k20" in tags["scalars"]
    assert {"montages/view1", "montages/view2"} <= set(tags["images"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["w2ssl", "mocov3"])
def test_vit_small_trains_with_either_method(image_root, tmp_path, capsys, method):
    """-a vit_small through main_moco.py (in this process) with the ViT recipe's defaults and --stop-grad-conv1."""
    argv = [image_root, *TINY, "-a", "vit_small", "--tile-size", "32", "--method", method, "--stop-grad-conv1",
            "-b", "8", "--workers", "0", "--epochs", "1", "--lr", "1e-2", "--save-dir", tmp_path]
    assert run_inprocess(main_moco.main, argv) == 0
    assert f"=> {method} on vit_small" in capsys.readouterr().out
    assert len(logged_losses(tmp_path / "log.txt")) == 3
    ckpt = torch.load(tmp_path / "checkpoint_0000.pth.tar", weights_only=True)
    state = ckpt["state_dict"]
    assert (ckpt["arch"], ckpt["method"], ckpt["args"]["optimizer"], ckpt["args"]["moco_m_cos"]) == (
        "vit_small", method, "adamw", True)
    assert "base_encoder.blocks.11.mlp.fc2.weight" in state and "base_encoder.pos_embed" not in state
    # the frozen patch projection stays the momentum encoder's copy; the blocks trained
    def same(key: str) -> bool:
        return torch.equal(state[f"base_encoder.{key}"], state[f"momentum_encoder.{key}"])
    assert same("patch_embed.proj.weight") and not same("blocks.0.attn.qkv.weight")
    if method != "w2ssl":
        return
    # the pre-trained ViT through the probe (class token), kNN and the timm export
    last = str(tmp_path / "checkpoint_last.pth.tar")
    probe = [image_root, "--input-size", "32", "-b", "8", "--workers", "0", "--seed", "0", "--epochs", "1",
             "--pretrained", last, "--vit-feature", "cls"]
    assert run_inprocess(main_lincls.main, [*probe, "--save-dir", tmp_path / "probe"]) == 0
    assert run_inprocess(main_lincls.main, [*probe, "--knn", "--save-dir", tmp_path / "knn"]) == 0
    out = capsys.readouterr().out
    assert "linear probe (full protocol): vit_small, 3 classes" in out and re.search(r"\* Acc@1 \d+\.\d+", out)
    assert re.search(r"kNN k=20 acc1 [\d.]+", out)
    assert export.main([last, str(tmp_path / "timm.pth"), "--to", "timm"]) == 0
    timm_model = timm.create_model("vit_small_patch16_224", pretrained=False, num_heads=12)
    missing, unexpected = timm_model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True),
                                                     strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
