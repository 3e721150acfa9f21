"""bench/quality.py: budgets, evaluation points, measured FLOPs, the summary over seeds, and a tiny run."""
import json
import subprocess
import sys

import pytest

import main_moco
from bench import quality, quality_kinds, quality_report, quality_sweep
from bench.quality_flops import method_gflops, supervised_gflops
from tests.helpers import cpu_env, root_env
from w2ssl.errors import UserError


def test_budget_becomes_whole_epochs():
    assert quality.epochs_for(1000.0, 300.0) == 3  # 3.33 -> 3
    assert quality.epochs_for(1000.0, 400.0) == 2  # 2.5 -> 2 (round half to even)
    assert quality.epochs_for(10.0, 300.0) == 1  # never zero


def test_eval_epochs_are_spread_and_end_at_the_last():
    assert quality.eval_epochs(12, 4) == [3, 6, 8, 11]
    assert quality.eval_epochs(3, 6) == [0, 1, 2]
    assert quality.eval_epochs(1, 2) == [0]


def test_budget_flags():
    assert quality.budget(quality.parse_args([])) == {"kind": "s", "value": 300.0}
    assert quality.budget(quality.parse_args(["--budget-gflops", "5"])) == {"kind": "gflops", "value": 5.0}
    quick = quality.parse_args(["--quick", "--seeds", "3"])
    assert quick.seeds == 3 and quick.budget_gflops == quality.QUICK["budget_gflops"] and quick.jobs == 2
    assert quality.parse_args(["--quick", "--budget-s", "9"]).budget_gflops is None
    with pytest.raises(UserError, match="--budget-images must be positive"):
        quality.budget(quality.parse_args(["--budget-images", "0"]))
    with pytest.raises(SystemExit):  # argparse: one budget at a time
        quality.parse_args(["--budget-s", "1", "--budget-images", "2"])


def test_mocov3_costs_twice_w2ssl_per_image_in_trunk_flops():
    """W2SSL runs one (2t)^2 montage per source image through each encoder, MoCo v3 two (2t)^2 views."""
    args = quality.parse_args(["--tile-size", "16", "--mlp-dim", "64"])
    parser = main_moco.build_parser()
    w2, moco = (method_gflops(parser.parse_args(quality.moco_args(args, m, "DATA"))) for m in args.methods)
    assert moco["trunk"] == pytest.approx(2 * w2["trunk"], rel=1e-9)
    assert w2["model"] > w2["trunk"] and moco["model"] > moco["trunk"]  # heads add some
    # resnet18 at 32 px: 2 x 2.3e7 multiply-adds forward ~ 0.074 GFLOPs; x3 forward+backward, +1 momentum.
    assert 3.5 * 0.074 < w2["trunk"] < 4.1 * 0.074
    sup = supervised_gflops("resnet18", 32, 20)
    assert 2.7 * 0.074 < sup["trunk"] < 3.1 * 0.074  # no momentum encoder


def run(kind, epochs, knn, probe, wall):
    return {"kind": kind, "seed": 0, "epochs": epochs, "knn": knn, "probe": probe, "wall_s": wall}


def test_summary_means_stds_and_curves():
    runs = [run("w2ssl", 2, {0: 10.0, 1: 20.0}, 30.0, [5.0, 9.0]),
            run("w2ssl", 2, {0: 14.0, 1: 24.0}, 34.0, [7.0, 11.0]),
            run("random", 0, {0: 5.0}, 6.0, [])]
    s = quality_report.summarise(runs, per_epoch=100, gflops={"w2ssl": {"trunk": 0.5}})
    w2 = s["w2ssl"]
    assert (w2["seeds"], w2["images"], w2["gflops"], w2["wall_s"]) == (2, 200, 100.0, 10.0)
    assert w2["knn_mean"] == 22.0 and w2["knn_std"] == pytest.approx(2 ** 0.5 * 2)
    assert w2["probe_mean"] == 32.0
    assert [p["images"] for p in w2["curve"]] == [100, 200] and w2["curve"][0]["knn_mean"] == 12.0
    assert s["random"]["images"] == 0 and s["random"]["knn_std"] == 0.0
    table = quality_report.table(s)
    assert "| W2SSL | 2 | 2 | 200 | 100 | 10 | 22.0 ± 2.8 | 32.0 ± 2.8 | 20.0, 24.0 | - |" in table
    assert w2["knn_seeds"] == [20.0, 24.0] and w2["where_acc"] is None


@pytest.mark.slow
def test_quality_runs_end_to_end_at_a_tiny_size(tmp_path):
    cmd = [sys.executable, "-m", "bench.quality", "--out", str(tmp_path), "--per-class", "4",
           "--val-per-class", "2", "--batch-size", "8", "--seeds", "1", "--budget-images", "80", "--points", "2",
           "--probe-epochs", "1", "--mlp-dim", "32", "--no-supervised", "--dataset", "glyphs",
           "--methods", "w2ssl,w2ssl-nowhere,mocov3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(root_env()), cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["seeds"] == 1 and last["budget"] == {"kind": "images", "value": 80.0}
    for key in ("w2ssl_knn", "mocov3_knn", "random_knn"):
        assert 0.0 <= last[key] <= 100.0
    assert 0.0 <= last["w2ssl-nowhere_knn"] <= 100.0 and 0.0 <= last["where_acc"] <= 100.0
    record = json.loads((tmp_path / "quality.json").read_text())
    assert record["epochs"] == {"w2ssl": 1, "w2ssl-nowhere": 1, "mocov3": 1}  # 80 images / 80 per epoch
    nowhere = (tmp_path / "runs" / "w2ssl-nowhere-0" / "log.txt").read_text()
    assert "Loss_loc" in nowhere and "W2SSL without where" in out.stdout and "too few seeds to tell" in out.stdout
    assert (tmp_path / "quality.png").stat().st_size > 1000
    assert not list(tmp_path.glob("runs/**/*.pth.tar"))  # evaluated, then removed (the probe's too)


def test_a_tile_whose_montage_leaves_a_1x1_map_is_refused():
    quality.check_tile("resnet18", 32)  # 64 px montage -> 2x2 layer4 map
    with pytest.raises(UserError, match="--tile-size 16 leaves resnet18 a 1x1 map"):
        quality.check_tile("resnet18", 16)


def test_methods_and_variants():
    assert quality_kinds.parse_kinds("w2ssl, w2ssl-nowhere,mocov3,w2ssl") == ["w2ssl", "w2ssl-nowhere", "mocov3"]
    assert quality_kinds.resolve("w2ssl-nowhere") == ("w2ssl", ["--loss_loc", "0"])
    for bad, message in [("w2ssl,byol2", "unknown method 'byol2'"), ("random", "added by bench/quality.py"),
                         (" , ", "empty")]:
        with pytest.raises(UserError, match=message):
            quality_kinds.parse_kinds(bad)
    args = quality.parse_args(["--methods", "w2ssl-nowhere"])
    flags = quality.moco_args(args, "w2ssl-nowhere", "DATA")
    assert flags[flags.index("--method") + 1] == "w2ssl" and flags[-2:] == ["--loss_loc", "0"]
    parsed = main_moco.build_parser().parse_args(flags)
    assert parsed.loss_loc == 0.0 and parsed.method == "w2ssl"
    args.lrs = {"w2ssl-nowhere": 2.0}
    assert quality.moco_args(args, "w2ssl-nowhere", "DATA")[quality.moco_args(args, "w2ssl", "D").index("--lr") + 1] \
        == "2.0"
    assert quality.parse_args([]).seeds == 5 and quality.parse_args(["--quick"]).seeds == 3


def test_where_accuracy_is_the_last_epochs_running_mean(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("=> start\n"
                   "Epoch: [0][ 5/10]\tTime 1.0 (1.0)\tWhere_acc 40.0 (45.0)\n"
                   "Epoch: [1][10/10]\tTime 1.0 (1.0)\tWhere_acc 60.0 (57.5)\timg/s 3.0\n=> epoch 1 done\n")
    assert quality_kinds.last_epoch_where_acc(log) == 57.5
    log.write_text("Epoch: [0][10/10]\tloss_ctr 8.0 (8.0)\tctr_acc 25.0 (15.6)\n")  # MoCo v3: no where task
    assert quality_kinds.last_epoch_where_acc(log) is None
    assert quality_kinds.last_epoch_where_acc(tmp_path / "missing.txt") is None


def test_verdicts_use_welchs_t_test():
    # a = 1, 2, 3 and b = 4, 5, 6: t = -3 / sqrt(1/3 + 1/3) = -3.674 with 4 degrees of freedom, p = 0.0213
    delta, p = quality_report.difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert delta == -3.0 and p == pytest.approx(0.0213, abs=1e-4)
    # t = -0.5 / sqrt(0.25 + 0.25) = -0.707, 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2) = 0.5528
    assert quality_report.difference([1.0, 2.0], [1.5, 2.5])[1] == pytest.approx(0.5528, abs=1e-4)
    summary = {"w2ssl": {"knn_mean": 2.0, "knn_seeds": [1.0, 2.0, 3.0]},
               "mocov3": {"knn_mean": 5.0, "knn_seeds": [4.0, 5.0, 6.0]},
               "random": {"knn_mean": 2.5, "knn_seeds": [2.0, 2.5, 3.0]}}
    lines = quality_report.verdicts(summary, ["w2ssl", "mocov3"]).splitlines()
    assert lines[0] == "kNN W2SSL − MoCo v3: -3.0 points, larger than the seed spread (p = 0.021)"
    assert lines[1].startswith("kNN W2SSL − random init (floor): -0.5 points, within the seed spread")
    assert len(lines) == 3


def test_lr_sweep_carves_a_validation_split_from_the_training_images(tmp_path):
    from PIL import Image
    for c in ("a", "b"):
        for i in range(10):
            (tmp_path / "data" / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "data" / "train" / c / f"{i}.png")
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "val" / "a" / "reported.png")
    split = quality_sweep.carve_validation(tmp_path / "data", tmp_path / "split")
    for c in ("a", "b"):
        held, kept = sorted((split / "val" / c).iterdir()), sorted((split / "train" / c).iterdir())
        assert len(held) == 2 and len(kept) == 8 and not {p.name for p in held} & {p.name for p in kept}
        assert all(p.resolve().parent == (tmp_path / "data" / "train" / c).resolve() for p in held + kept)
    again = quality_sweep.carve_validation(tmp_path / "data", tmp_path / "split2")
    names = [sorted(p.name for p in (root / "val" / "a").iterdir()) for root in (split, again)]
    assert names[0] == names[1]  # seeded
    assert quality_sweep.choose({"w2ssl": {2.0: 50.0, 8.0: 61.0, 32.0: 61.0}}) == {"w2ssl": 8.0}  # ties: smaller
    assert quality_sweep.parse_lrs("8,2,32") == [2.0, 8.0, 32.0]
    for bad in ("2,8", "2,8,x", "0,1,2"):
        with pytest.raises(UserError, match="--lr-sweep"):
            quality_sweep.parse_lrs(bad)
    scores = quality_sweep.sweep(["w2ssl"], [2.0, 8.0, 32.0], lambda kind, lr: -abs(lr - 8))
    assert quality_sweep.choose(scores) == {"w2ssl": 8.0}
