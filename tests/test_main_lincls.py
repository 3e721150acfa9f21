"""Linear probe (main_lincls.py): the published command line, checkpoint layouts, pure helpers, and
end-to-end runs on a tiny JPEG folder (full, resumed, evaluate-only, cached, kNN, torchrun) on the CPU."""
import hashlib
import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from main_lincls import build_parser, main, split_joined_dist_url
from tests.conftest import write_folder
from tests.helpers import TINY, run_script
from w2ssl import cli
from w2ssl.checkpoint import save_atomic
from w2ssl.dist.distributed import Context
from w2ssl.eval.lincls import LinearProbe
from w2ssl.eval.metrics import stats_text, topk_hits
from w2ssl.eval.probe_model import build_model, changed_weights
from w2ssl.trunk_weights import load_trunk
from w2ssl.trunks import build_trunk

SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seed" / "README-W2SSL.txt"
PUBLISHED = ("-a resnet50 --batch-size 256 --epochs 100  --dist-url 'tcp://localhost:10016'--multiprocessing-"
             "distributed --world-size 1 --rank 0 --print-freq 100 --pretrained checkpoint_0199.pth.tar DATA")
# 32 px: the real resnet18 at a quarter of the 64-px cost; no check here depends on the size
PROBE = ["-a", "resnet18", "--input-size", "32", "-b", "8", "--workers", "0", "--seed", "0", "--print-freq", "1"]
ACC = re.compile(r"^ \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+) over \d+ val images$", re.M)


def published_command() -> str:
    """The linear-classification command of the published README, data path replaced (falls back to a copy)."""
    if not SEED_README.is_file():
        return PUBLISHED
    line = next(line for line in SEED_README.read_text().splitlines() if "main_lincls.py" in line)
    return line.split("main_lincls.py", 1)[1].replace("[your imagenet-folder with train and val folders]", "DATA")


def run_inprocess(capsys, *argv) -> tuple[int, str, str]:
    """``main_lincls.main`` in this process: exit code, stdout, stderr (errors in the worker exit via SystemExit)."""
    try:
        code = cli.run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pretrained(image_root, tmp_path_factory) -> Path:
    """A one-epoch W2SSL pre-training checkpoint of the tiny folder (main_moco.py)."""
    out = tmp_path_factory.mktemp("pretrain")
    res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--epochs", "1", "--workers", "0",
                     "--save-dir", out)
    assert res.returncode == 0, res.stderr
    return out / "checkpoint_0000.pth.tar"


@pytest.fixture(scope="module")
def probe_run(image_root, pretrained, tmp_path_factory):
    """The full protocol for 2 epochs through the command line."""
    out = tmp_path_factory.mktemp("probe")
    res = run_script("main_lincls.py", image_root, *PROBE, "--epochs", "2", "--pretrained", pretrained,
                     "--save-dir", out)
    assert res.returncode == 0, res.stderr
    return out, res.stdout


# ----------------------------------------------------------------- command line
def test_published_command_parses_unchanged():
    args = cli.parse(build_parser(), shlex.split(published_command()))
    # What a shell passes: the URL and the flag are one token, so the flag itself is not set.
    assert args.dist_url == "tcp://localhost:10016--multiprocessing-distributed"
    assert not args.multiprocessing_distributed
    warning = split_joined_dist_url(args)
    assert warning and "missing space" in warning
    assert (args.dist_url, args.multiprocessing_distributed) == ("tcp://localhost:10016", True)
    assert (args.arch, args.batch_size, args.epochs, args.world_size, args.rank, args.print_freq) == \
        ("resnet50", 256, 100, 1, 0, 100)
    assert (args.pretrained, args.data) == ("checkpoint_0199.pth.tar", "DATA")
    # MoCo v3's defaults for the rest.
    assert (args.lr, args.momentum, args.weight_decay, args.start_epoch, args.resume, args.evaluate) == \
        (0.1, 0.9, 0.0, 0, "auto", False)
    assert (args.input_size, args.cached, args.knn, args.seed, args.gpu) == (224, False, False, None, None)


@pytest.mark.parametrize("url_args", [["--dist-url", "tcp://localhost:10016", "--multiprocessing-distributed"],
                                      ["--dist-url", "env://"], []])
def test_well_formed_dist_url_is_left_alone(url_args):
    args = cli.parse(build_parser(), [*url_args, "DATA"])
    before = (args.dist_url, args.multiprocessing_distributed)
    assert split_joined_dist_url(args) is None
    assert (args.dist_url, args.multiprocessing_distributed) == before


def test_config_preset_is_the_published_protocol():
    preset = Path(__file__).resolve().parents[1] / "configs" / "lincls.yaml"
    args = cli.parse(build_parser(), ["--config", str(preset), "DATA"])
    assert (args.arch, args.batch_size, args.lr, args.momentum, args.weight_decay, args.epochs) == \
        (None, 256, 0.1, 0.9, 0.0, 100)  # arch: the checkpoint's own
    assert (args.input_size, args.precision, args.print_freq) == (224, "fp32", 100)


# ----------------------------------------------------------------- pure helpers
def test_topk_hits_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],    # ranks: 1, 5, 4, 3, 0, 2
                           [0.9, 0.1, 0.0, 0.2, 0.3, 0.4],    # ranks: 0, 5, 4, 3, 1, 2
                           [0.0, 0.1, 0.9, 0.2, 0.3, 0.4]])   # ranks: 2, 5, 4, 3, 1, 0
    target = torch.tensor([1, 1, 0])
    # row 0: top-1 hit; row 1: class 1 is 5th -> top-5 hit only; row 2: class 0 is last -> miss.
    assert topk_hits(logits, target).tolist() == [1, 2]
    # Three classes: "top-5" is top-3.
    assert topk_hits(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([2])).tolist() == [0, 1]


def test_stats_text():
    # last batch: 4 rows, loss sum 2, 1 top-1 / 3 top-5 hits; epoch so far: 8 rows, loss 6, 4 / 8 hits.
    assert stats_text([2.0, 1.0, 3.0, 4.0], [6.0, 4.0, 8.0, 8.0]) == \
        "Loss 5.0000e-01 (7.5000e-01)\tAcc@1  25.00 ( 50.00)\tAcc@5  75.00 (100.00)"


# ----------------------------------------------------------------- checkpoint layouts
def random_trunk(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    """A torchvision trunk with its initial weights and BatchNorm statistics perturbed at random (so loading is
    visible) yet small enough that features and probe losses stay finite."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        sd = torchvision.models.__dict__[arch]().state_dict()
        noise = {k: torch.rand(v.shape) if k.endswith("running_var") else torch.randn(v.shape) for k, v in sd.items()}
        return {k: v + 0.01 * noise[k] if v.is_floating_point() else v
                for k, v in sd.items() if not k.startswith("fc.")}


def layout(name: str, trunk: dict[str, torch.Tensor]) -> dict:
    """Synthetic checkpoints in the key layouts of our pre-training, the authors' W2SSL and MoCo v3."""
    if name == "ours":
        return {"epoch": 1, "state_dict": {**{f"base_encoder.{k}": v for k, v in trunk.items()},
                                           "momentum_encoder.conv1.weight": torch.zeros(1),
                                           "where_head.weight": torch.zeros(2, 512)}}
    heads = ({"module.base_encoder.fc_crop.0.weight": torch.zeros(64, 512),
              "module.base_encoder.fc_loc.weight": torch.zeros(2, 512)} if name == "authors"
             else {"module.base_encoder.fc.0.weight": torch.zeros(64, 512),
                   "module.predictor.0.weight": torch.zeros(64, 32)})
    return {"epoch": 200, "arch": "resnet18", "optimizer": {},
            "state_dict": {**{f"module.base_encoder.{k}": v for k, v in trunk.items()},
                           **{f"module.momentum_encoder.{k}": v for k, v in trunk.items()}, **heads}}


@pytest.mark.parametrize("name", ["ours", "authors", "mocov3"])
def test_pretrained_layouts_load_into_a_frozen_torchvision_model(name, tmp_path):
    trunk = random_trunk()
    path = tmp_path / f"{name}.pth.tar"
    save_atomic(layout(name, trunk), path)
    torch.manual_seed(0)
    model, reference = build_model("resnet18", 7, path)
    assert not changed_weights(model.state_dict(), trunk) and not changed_weights(reference, trunk)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert not model.training and model.fc.out_features == 7
    assert torch.equal(model.fc.bias, torch.zeros(7))
    assert abs(model.fc.weight.std().item() - 0.01) < 0.001  # N(0, 0.01) over 7 x 512 draws


def bad_pretrained(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """The flags of one bad ``--pretrained`` (or related) input and the message expected."""
    if case == "linear-probe checkpoint":
        probe = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
        save_atomic({"epoch": 100, "state_dict": probe, "best_acc1": 1.0}, tmp_path / "lin.pth.tar")
        return ["--pretrained", tmp_path / "lin.pth.tar"], r"linear-probe .*module\.bn1"
    if case == "random file":
        (tmp_path / "random.pth.tar").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
        return ["--pretrained", tmp_path / "random.pth.tar"], "not a PyTorch checkpoint"
    if case == "missing path":
        return ["--pretrained", tmp_path / "nowhere.pth.tar"], "nowhere.pth.tar does not exist"
    if case == "mismatched arch":
        save_atomic(layout("authors", random_trunk()), tmp_path / "r18.pth.tar")
        return ["--pretrained", tmp_path / "r18.pth.tar", "-a", "resnet34"], "trunk is a resnet18 but --arch resnet34"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["linear-probe checkpoint", "random file", "missing path", "mismatched arch"])
def test_bad_pretrained_exits_2_with_one_line(image_root, tmp_path, capsys, case):
    flags, message = bad_pretrained(tmp_path, case)
    code, out, err = run_inprocess(capsys, image_root, *PROBE, "--save-dir", tmp_path / "out", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --pretrained"), err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("case, flags, message", [
    ("no weights", [], "--pretrained CKPT"),
    ("aug without cached", ["--cached-aug", "2"], "needs --cached"),
    ("evaluate cached", ["-e", "--cached"], "drop --cached"),
    ("missing val", ["--data-root-without-val"], "val does not exist"),
    ("resume missing", ["--resume", "/nonexistent.pth.tar"], "does not exist"),
    ("resume auto with nothing", ["--resume", "auto"], "found no checkpoint.pth.tar"),
])
def test_other_bad_input_exits_2_with_one_line(image_root, tmp_path, capsys, case, flags, message):
    data = image_root
    if flags == ["--data-root-without-val"]:
        data, flags = tmp_path / "data", []
        (data / "train").mkdir(parents=True)
    code, out, err = run_inprocess(capsys, data, *PROBE, "--save-dir", tmp_path / "out", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["random file", "pre-training checkpoint as --resume"])
def test_bad_input_from_the_shell_has_no_traceback(image_root, pretrained, tmp_path, case):
    if case == "random file":
        flags, message = bad_pretrained(tmp_path, case)
    else:  # found in the worker process, after the launch
        flags, message = ["--resume", pretrained], "not a linear-probe checkpoint"
    res = run_script("main_lincls.py", image_root, *PROBE, "--save-dir", tmp_path / "out", *flags, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0] and "Traceback" not in res.stderr


# ----------------------------------------------------------------- end to end
@pytest.mark.slow
def test_full_probe_two_epochs(probe_run, pretrained):
    out, stdout = probe_run
    assert re.search(r"^Epoch: \[0\]\[0/3\]\tTime .*\tData .*\tLoss .*\tAcc@1 .*\tAcc@5 ", stdout, re.M)
    assert "Epoch: [1][2/3]" in stdout and re.search(r"^Test: \[1/2\]", stdout, re.M)
    accs = [float(a1) for a1, _ in ACC.findall(stdout)]
    assert len(accs) == 2 and all(0 <= a <= 100 for a in accs)
    # The sanity check runs after the first epoch, and again at the end.
    assert stdout.index("sanity check passed") < stdout.index("Epoch: [1]")
    assert stdout.count("sanity check passed") == 2
    assert {"checkpoint.pth.tar", "model_best.pth.tar", "log.txt", "tb"} <= {p.name for p in out.iterdir()}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "Epoch: [1][2/3]" in (out / "log.txt").read_text()

    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert (ckpt["epoch"], ckpt["arch"]) == (2, "resnet18") and ckpt["best_acc1"] == pytest.approx(max(accs), abs=1e-3)
    assert ckpt["args"]["input_size"] == 32 and ckpt["args"]["pretrained"] == str(pretrained)
    sd = ckpt["state_dict"]
    assert "conv1.weight" in sd and sd["fc.weight"].shape == (3, 512) and not any(k.startswith("module.") for k in sd)
    # Trunk (weights and BatchNorm statistics) untouched; fc trained.
    assert changed_weights(sd, load_trunk(pretrained, "resnet18")) == []
    assert sd["fc.bias"].abs().sum() > 0
    # lr = 0.1 x 8/256 on a half-cosine per epoch: epoch 1 of 2 runs at half of it.
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.1 * 8 / 256 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0.0)


@pytest.mark.slow
def test_resume_then_evaluate_only(probe_run, image_root, pretrained, tmp_path, capsys):
    out, _ = probe_run
    code, stdout, err = run_inprocess(capsys, image_root, *PROBE, "--epochs", "3", "--pretrained", pretrained,
                                      "--resume", out / "checkpoint.pth.tar", "--save-dir", tmp_path)
    assert code == 0, err
    assert "at epoch 2" in stdout and "Epoch: [2][0/3]" in stdout and "Epoch: [1]" not in stdout
    resumed = ACC.findall(stdout)
    assert len(resumed) == 1
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["epoch"] == 3

    # -e on the resumed checkpoint alone (no --pretrained): same numbers, no training.
    code, stdout, err = run_inprocess(capsys, image_root, *PROBE, "-e", "--resume", tmp_path / "checkpoint.pth.tar",
                                      "--save-dir", tmp_path / "eval")
    assert code == 0, err
    assert ACC.findall(stdout) == resumed and "Epoch:" not in stdout


@pytest.mark.slow
def test_resume_with_another_trunk_is_refused(probe_run, image_root, tmp_path, capsys):
    out, _ = probe_run
    other = tmp_path / "other.pth.tar"
    save_atomic(layout("ours", random_trunk()), other)
    code, _, err = run_inprocess(capsys, image_root, *PROBE, "--epochs", "3", "--pretrained", other,
                                 "--resume", out / "checkpoint.pth.tar", "--save-dir", tmp_path)
    assert code == 2 and "another trunk than --pretrained" in err


@pytest.mark.slow
def test_cached_probe_extracts_features_once(image_root, pretrained, tmp_path, capsys):
    argv = [image_root, *PROBE, "--epochs", "2", "--cached", "--cached-aug", "1", "--pretrained", pretrained,
            "--save-dir", tmp_path]
    probe = LinearProbe(Context(torch.device("cpu")), cli.parse(build_parser(), [str(a) for a in argv]))
    forwards = []
    probe.model.trunk.layer4.register_forward_hook(lambda *_: forwards.append(1))
    probe.run()
    stdout = capsys.readouterr().out
    # 24 train images / 8 = 3 batches for each of 2 views (center + 1 augmented), 12 val / 8 = 2 batches,
    # once, whatever the number of epochs (the full probe would run 2 x (3 + 2)).
    assert len(forwards) == 3 * 2 + 2
    assert tuple(probe.cache.train.shape) == (2, 24, 512) and tuple(probe.cache.val.shape) == (12, 512)
    assert "cached features" in stdout and len(ACC.findall(stdout)) == 2 and "Epoch: [1][2/3]" in stdout
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and changed_weights(ckpt["state_dict"], load_trunk(pretrained, "resnet18")) == []
    # The cached center-crop features are the trunk's (float16-rounded).
    images, *_ = next(iter(probe.val_loader))
    assert torch.allclose(probe.cache.val[:8].float(), probe.trunk_features(images), rtol=2e-3, atol=1e-3)


@pytest.mark.slow
def test_sanity_check_catches_a_moved_statistic(image_root, pretrained, tmp_path, capsys):
    argv = [image_root, *PROBE, "--pretrained", pretrained, "--save-dir", tmp_path]
    probe = LinearProbe(Context(torch.device("cpu")), cli.parse(build_parser(), [str(a) for a in argv]))
    probe.sanity_check()
    probe.model.trunk.layer2[0].bn1.running_mean += 1e-3
    with pytest.raises(RuntimeError, match=r"layer2\.0\.bn1\.running_mean"):
        probe.sanity_check()


@pytest.mark.slow
def test_knn(image_root, pretrained, tmp_path, capsys):
    code, stdout, err = run_inprocess(capsys, image_root, *PROBE, "--knn",
                                      "--pretrained", pretrained, "--save-dir", tmp_path)
    assert code == 0, err
    # 3 classes: no top-5 (always 100 %); k=200 is more than the 24 training images: clamped, and said so.
    m = re.search(r"kNN k=20 acc1 (\d+\.\d+) \| k=200 \(clamped to the 24 training images\) acc1 (\d+\.\d+) "
                  r"\(24 train, 12 val images\) of ", stdout)
    assert m and all(0 <= float(v) <= 100 for v in m.groups()), stdout


@pytest.mark.slow
def test_torchrun_two_processes_count_every_val_image_once(image_root, pretrained, tmp_path, capsys):
    """9 val images on 2 processes: DistributedSampler pads rank 1 with a repeat, which must not count."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(image_root / "train")
    write_folder(data / "val", per_class=3, seed=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = run_script("main_lincls.py", data, *PROBE, "--epochs", "1", "--pretrained", pretrained,
                     "--save-dir", tmp_path / "ddp", launcher=torchrun, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 process(es) on cpu" in res.stdout and "sanity check passed" in res.stdout
    distributed = ACC.findall(res.stdout)
    assert len(distributed) == 1
    assert any(abs(float(distributed[0][0]) - 100 * k / 9) < 1e-3 for k in range(10))  # k of 9, not of 10
    code, stdout, err = run_inprocess(capsys, data, *PROBE, "-e", "--resume", tmp_path / "ddp" / "checkpoint.pth.tar",
                                      "--save-dir", tmp_path / "eval")
    assert code == 0, err
    assert ACC.findall(stdout) == distributed


# ----------------------------------------------------------------- unreadable images, probe folders, arch
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A pre-training checkpoint of a random resnet18 trunk (no pre-training run needed); read-only."""
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.pth.tar"
    save_atomic(layout("ours", random_trunk()), path)
    return path


@pytest.fixture
def bad_data(tmp_path) -> Path:
    """12 train / 9 val images of 3 classes, one unreadable file in each split."""
    data = tmp_path / "bad_data"
    write_folder(data / "train", per_class=4, seed=3)
    write_folder(data / "val", per_class=3, seed=4)
    (data / "train" / "class0" / "1.jpg").write_bytes(b"not a jpeg")
    (data / "val" / "class2" / "0.jpg").write_bytes(b"")
    return data


@pytest.mark.parametrize("mode", [[], ["--cached"], ["--knn"]])
def test_unreadable_images_are_skipped_counted_and_warned_once(bad_data, synthetic, tmp_path, capsys, mode):
    code, out, err = run_inprocess(capsys, bad_data, *PROBE, "--epochs", "2", *mode, "--pretrained", synthetic,
                                   "--save-dir", tmp_path / "out")
    assert code == 0, err
    bad_val, bad_train = bad_data / "val" / "class2" / "0.jpg", bad_data / "train" / "class0" / "1.jpg"
    assert out.count(f"WARNING: unreadable image file {bad_val} skipped") == 1  # once, though read every epoch
    if mode == ["--knn"]:
        assert "(11 train, 8 val images; 2 unreadable skipped)" in out
        return
    assert out.count(f"WARNING: unreadable image file {bad_train} skipped") == 1
    assert out.count(" over 8 of 9 val images (1 unreadable skipped)") == 2


@pytest.mark.parametrize("mode", [[], ["--knn"]])
def test_strict_data_stops_at_the_first_unreadable_image(bad_data, synthetic, tmp_path, capsys, mode):
    code, _, err = run_inprocess(capsys, bad_data, *PROBE, *mode, "--strict-data", "--pretrained", synthetic,
                                 "--save-dir", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: unreadable image file "), err
    assert "drop --strict-data" in lines[0]


def test_knn_refuses_different_classes(image_root, synthetic, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(image_root / "train")
    write_folder(data / "val", classes=1, per_class=2)
    (data / "val" / "class0").rename(data / "val" / "cat")
    code, _, err = run_inprocess(capsys, data, *PROBE, "--knn", "--pretrained", synthetic, "--save-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "only in val 'cat' (1 classes)" in err, err


def test_probe_folder_records_its_pretrained_file_and_refuses_another(image_root, synthetic, tmp_path, capsys):
    out = tmp_path / "probe"
    no_arch = [a for a in PROBE if a not in ("-a", "resnet18")]  # the checkpoint's own arch
    code, stdout, err = run_inprocess(capsys, image_root, *no_arch, "--epochs", "1", "--pretrained", synthetic,
                                      "--save-dir", out)
    assert code == 0, err
    sha = hashlib.sha256(synthetic.read_bytes()).hexdigest()
    assert f"=> probing {synthetic.resolve()} (sha256 {sha})" in (out / "log.txt").read_text()
    assert sha.encode() in b"".join(p.read_bytes() for p in (out / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["pretrained"] == {"path": str(synthetic.resolve()), "sha256": sha} and ckpt["arch"] == "resnet18"
    # Run again: --resume auto continues the probe.
    code, stdout, err = run_inprocess(capsys, image_root, *no_arch, "--epochs", "2", "--pretrained", synthetic,
                                      "--save-dir", out)
    assert code == 0 and "resumed from" in stdout and "Epoch: [0]" not in stdout, err
    # Another pre-trained file in the same folder: refused, naming both, nothing written.
    other = tmp_path / "other.pth.tar"
    save_atomic(layout("ours", {k: v + 1 for k, v in random_trunk().items()}), other)
    before = (out / "checkpoint.pth.tar").read_bytes()
    code, _, err = run_inprocess(capsys, image_root, *no_arch, "--pretrained", other, "--save-dir", out)
    assert code == 2 and err.count("\n") == 1, err
    assert f"holds a probe of {synthetic.resolve()} (sha256 {sha}), not of --pretrained {other.resolve()}" in err
    assert (out / "checkpoint.pth.tar").read_bytes() == before


@pytest.mark.parametrize("case", ["export", "directory", "pre-training"])
def test_resume_of_another_kind_of_file_is_one_line(image_root, synthetic, tmp_path, capsys, case):
    export = tmp_path / "r18.pth"
    save_atomic(load_trunk(synthetic), export)
    resume, message = {"export": (export, "is an exported trunk"),
                       "directory": (tmp_path, "is a directory: pass a checkpoint file in it"),
                       "pre-training": (synthetic, "is a pre-training checkpoint, not a linear-probe")}[case]
    code, _, err = run_inprocess(capsys, image_root, *PROBE, "--resume", resume, "--save-dir", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_flag_without_a_gpu_exits_2(image_root, synthetic, tmp_path, capsys):
    code, _, err = run_inprocess(capsys, image_root, *PROBE, "--gpu", "0", "--knn", "--pretrained", synthetic,
                                 "--save-dir", tmp_path)
    assert code == 2 and err == "error: --gpu 0 but no GPU is visible: drop --gpu to run on the CPU\n"


# ----------------------------------------------------------------- ViT trunks
@pytest.fixture(scope="module")
def vit_pretrained(tmp_path_factory) -> Path:
    """A fake pre-training checkpoint of a real vit_small trunk (its arch is read from the weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        trunk = build_trunk("vit_small").state_dict()
    path = tmp_path_factory.mktemp("vit") / "vit_small.pth.tar"
    save_atomic({"epoch": 1, "state_dict": {f"base_encoder.{k}": v for k, v in trunk.items()}}, path)
    return path


VIT_PROBE = ["--input-size", "32", "-b", "8", "--workers", "0", "--seed", "0", "--print-freq", "1"]


@pytest.mark.slow  # two vit_small probes in this process: several seconds
def test_a_vit_probe_trains_fc_on_the_patch_token_average(image_root, vit_pretrained, tmp_path, capsys):
    code, out, err = run_inprocess(capsys, image_root, *VIT_PROBE, "--epochs", "1", "--pretrained", vit_pretrained,
                                   "--save-dir", tmp_path)
    assert code == 0, err
    assert "linear probe (full protocol): vit_small, 3 classes" in out and len(ACC.findall(out)) == 1
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["arch"] == "vit_small" and ckpt["args"]["vit_feature"] == "avg"
    sd = ckpt["state_dict"]
    assert sd["fc.weight"].shape == (3, 384) and "cls_token" in sd and "pos_embed" not in sd
    assert changed_weights(sd, load_trunk(vit_pretrained)) == [] and sd["fc.bias"].abs().sum() > 0
    # the same folder with the class token: refused, a probe reads one feature
    code, _, err = run_inprocess(capsys, image_root, *VIT_PROBE, "--epochs", "2", "--vit-feature", "cls",
                                 "--pretrained", vit_pretrained, "--save-dir", tmp_path)
    assert code == 2 and "is a probe of --vit-feature avg but --vit-feature cls was given" in err, err


def test_knn_of_a_vit_reads_the_class_token_when_asked(image_root, vit_pretrained, tmp_path, capsys):
    code, out, err = run_inprocess(capsys, image_root, *VIT_PROBE, "--knn", "--vit-feature", "cls",
                                   "--pretrained", vit_pretrained, "--save-dir", tmp_path)
    assert code == 0, err
    assert re.search(r"kNN k=20 acc1 \d+\.\d+ .*\(24 train, 12 val images\) of ", out), out


def test_vit_feature_cls_on_a_resnet_is_refused(image_root, synthetic, tmp_path, capsys):
    code, _, err = run_inprocess(capsys, image_root, *PROBE, "--knn", "--vit-feature", "cls",
                                 "--pretrained", synthetic, "--save-dir", tmp_path)
    assert code == 2 and err == ("error: --vit-feature cls reads a ViT's class token; --arch resnet18 has none: "
                                 "drop --vit-feature\n"), err


@pytest.mark.parametrize("mode", [[], ["--cached"]])
def test_a_signal_stops_the_probe_after_the_step_it_came_in(image_root, synthetic, tmp_path, capsys, monkeypatch,
                                                            mode):
    # issue 26 item 6: the probe went on one or two steps after the signal
    import os
    import signal

    fc_outputs = LinearProbe._train_outputs

    def signalled_in_step_1(self, x, target):
        if self.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler only notes it
        return fc_outputs(self, x, target)

    monkeypatch.setattr(LinearProbe, "_train_outputs", signalled_in_step_1)
    out = tmp_path / "out"
    code, _, err = run_inprocess(capsys, image_root, *PROBE, "-b", "4", "--epochs", "2", *mode, "--pretrained",
                                 synthetic, "--save-dir", out)  # 24 train images: 6 steps per epoch
    assert code == 128 + signal.SIGTERM and "saved" in err and "epoch 0 iteration 2" in err, err
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["iteration"] == 2
