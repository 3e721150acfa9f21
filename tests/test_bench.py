"""The step benchmark and the speed options: every optimisation keeps the math."""
import argparse
import functools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import main_moco
import w2ssl.methods.w2ssl
from bench import common, e2e, step
from tests.helpers import SMALL, TINY, cpu_env, register_small_resnet
from w2ssl import cli
from w2ssl.engine.speed import prepare_model
from w2ssl.errors import UserError
from w2ssl.methods.base import MomentumModel
from w2ssl.methods.registry import build_model, method_names
from w2ssl.train import pretrain
from w2ssl.trunks import registry
from w2ssl.trunks.vit import VIT, build_vit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def bench_args(**kw) -> argparse.Namespace:
    base = dict(arch=SMALL, batch_size=4, tile_size=32, channels_last=False, compile=False, precision="fp32",
                fused_views=False)
    return argparse.Namespace(**{**base, **kw})


def register_tiny_vit(monkeypatch) -> None:  # noqa: ANN001 - pytest's MonkeyPatch
    """``-a tiny_vit``: vit_small's code paths with one block of width 32, for this test only."""
    monkeypatch.setitem(registry._TRUNKS, "tiny_vit", registry.TrunkSpec(
        "tiny_vit", VIT, lambda **kw: build_vit("vit_small", depth=1, embed_dim=32, num_heads=2, **kw)))


@functools.cache  # the plain run is the reference of two tests: made once
def w2ssl_losses(steps: int = 2, **kw) -> list[torch.Tensor]:
    """Losses of ``steps`` benchmark training steps (LARS) from seed 0 on small_resnet (registered by the
    caller); tile 32 -> 2x2 layer4 maps."""
    torch.manual_seed(0)
    train = step.build("w2ssl", bench_args(**kw), CPU).run
    return [train() for _ in range(steps)]


def test_w2ssl_step_same_with_channels_last(monkeypatch):
    register_small_resnet(monkeypatch)
    plain = w2ssl_losses()
    layouts = []
    separable = w2ssl.methods.w2ssl.grid_pool

    def recording_pool(fmap):
        layouts.append(fmap.is_contiguous(memory_format=torch.channels_last))
        return separable(fmap)

    monkeypatch.setattr(w2ssl.methods.w2ssl, "grid_pool", recording_pool)
    nhwc = w2ssl_losses(channels_last=True)
    assert layouts and all(layouts), "channels_last must reach the trunk's layer4 output"
    assert not torch.equal(plain[0], plain[-1]), "the steps must change the weights"
    torch.testing.assert_close(nhwc, plain, rtol=1e-5, atol=1e-5)


def test_w2ssl_step_same_with_fused_views(monkeypatch):
    register_small_resnet(monkeypatch)
    torch.testing.assert_close(w2ssl_losses(fused_views=True), w2ssl_losses(), rtol=1e-5, atol=1e-5)


def test_rows_come_from_the_method_registry():
    """Every registered method is a row (BYOL the third), the baseline twice, then the supervised floor."""
    assert step.steps() == ("w2ssl", "mocov3", "mocov3_fused", "byol", "supervised")
    assert [step.method_of(row, True) for row in ("w2ssl", "mocov3", "mocov3_fused", "byol")] == [
        ("w2ssl", True), ("mocov3", False), ("mocov3", True), ("byol", True)]


def test_each_row_is_its_method_as_main_moco_builds_it(monkeypatch):
    """The model of each row is build_model's for main_moco.py's arguments (same seed, same weights), its
    inputs have the shapes of the method's own transform, and its optimiser is the recipe's at the scaled lr."""
    register_small_resnet(monkeypatch)
    optimizers = []
    monkeypatch.setattr(step, "TrainStep", lambda opt, device, precision: optimizers.append(opt))
    args = bench_args()
    for name in method_names():
        torch.manual_seed(0)
        built = step.build(name, args, CPU)
        torch.manual_seed(0)
        recipe = main_moco.parse(main_moco.build_parser(), ["--method", name, "-a", SMALL, "--tile-size", "32"])
        expected = build_model(recipe)
        opt = optimizers[-1]
        params = [p for group in opt.param_groups for p in group["params"]]
        trained = [p for p in expected.parameters() if p.requires_grad]  # not the momentum encoder
        assert len(params) == len(trained) and all(torch.equal(a, b) for a, b in zip(params, trained))
        assert type(opt).__name__ == built.info["optimizer"] == "LARS"
        assert opt.defaults["lr"] == pytest.approx(recipe.lr * 4 / 256)  # BYOL: its own 0.2, the others 0.6
        assert opt.defaults["weight_decay"] == recipe.weight_decay
    views = {name: step.build(name, args, CPU).info["views"] for name in step.steps()}
    assert views == {"w2ssl": [4, 32], "mocov3": [2, 64], "mocov3_fused": [2, 64], "byol": [2, 64],
                     "supervised": [1, 64]}


def test_byol_runs_in_the_step_benchmark(monkeypatch, capsys):
    """BYOL, registered as the third method, is built, stepped and timed like the others."""
    register_small_resnet(monkeypatch)
    torch.manual_seed(0)
    train = step.build("byol", bench_args(), CPU).run
    losses = [train() for _ in range(3)]
    assert all(torch.isfinite(loss) for loss in losses) and not torch.equal(losses[0], losses[-1])
    argv = ["--device", "cpu", "--arch", SMALL, "--batch-size", "4", "--tile-size", "16", "--iters", "1",
            "--warmup", "0", "--only", "byol", "--only", "w2ssl"]
    assert step.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["byol_img_s"] == pytest.approx(4 / (out["byol_step_ms"] / 1000))
    assert out["ratio_w2ssl_byol"] == pytest.approx(out["w2ssl_img_s"] / out["byol_img_s"])
    assert out["mocov3_img_s"] is None and (out["byol_optimizer"], out["byol_views"]) == ("LARS", [2, 32])
    assert any(line.startswith("| BYOL (2 x 32 px/img, LARS, a call per view) |") for line in lines)
    assert any(line.startswith("throughput ratio W2SSL / BYOL (a call per view): ") for line in lines)


def test_cli_runs_every_step_on_cpu(capsys, monkeypatch):
    register_small_resnet(monkeypatch)
    argv = ["--device", "cpu", "--arch", SMALL, "--batch-size", "4", "--tile-size", "16",
            "--iters", "1", "--warmup", "0"]
    assert step.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["device"].startswith("cpu") and out["torch"] == torch.__version__ and out["precision"] == "fp32"
    assert out["steps"] == list(step.steps())
    for name in step.steps():
        assert out[f"{name}_img_s"] == pytest.approx(4 / (out[f"{name}_step_ms"] / 1000))
        assert out[f"{name}_peak_gib"] is None
        if name != "w2ssl":
            assert out[f"ratio_w2ssl_{name}"] == pytest.approx(out["w2ssl_img_s"] / out[f"{name}_img_s"])
    assert out["fused_views"] is False  # the default, as in main_moco.py
    assert out["supervised_optimizer"] == "SGD"
    assert any(line.startswith("| W2SSL (4 x 16 px/img, LARS, a call per view) |") for line in lines)
    assert any(line.startswith("| MoCo v3 (2 x 32 px/img, LARS, views fused) |") for line in lines)
    assert any(line.startswith(f"| supervised {SMALL} (SGD) |") for line in lines)


def test_only_and_ratios(monkeypatch, capsys):
    speeds = {"w2ssl": 30.0, "mocov3": 15.0, "supervised": 60.0}
    monkeypatch.setattr(step, "measure", lambda names, args, device: {
        n: {"img_s": speeds[n], "step_ms": 1.0, "step_ms_range": [0.9, 1.2], "peak_gib": None, "optimizer": "LARS",
            "views": [2, 224]} for n in names})
    assert step.main(["--device", "cpu", "--only", "w2ssl", "--only", "supervised"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ratio_w2ssl_supervised"] == 0.5 and out["ratio_w2ssl_mocov3"] is None
    assert out["mocov3_img_s"] is None and out["batch_size"] == 256 and out["tile_size"] == 112


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "3"], "--batch-size 3 must be a positive multiple of 2"),  # W2SSL's own check
    (["--batch-size", "1", "--only", "mocov3"], "--batch-size 1 leaves each of the 1 process(es) fewer than 2"),
    (["--iters", "0"], "--iters >= 1"),
    (["--tile-size", "0"], "--tile-size must be positive"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "meta"], "unsupported device 'meta'"),
    (["-a", "vit_small", "--tile-size", "20"], "a multiple of 8"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert step.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_vit_token_counts():
    """A 224-px montage holds 2 of each source image's 112-px tiles: 2·7² = 98 patch tokens per image and
    view, against 14² = 196 in a MoCo v3 view; both sequences are 197 tokens long."""
    assert step.tokens(True, 112) == {"w2ssl_tokens_per_img_view": 98, "mocov3_tokens_per_img_view": 196,
                                      "seq_len": 197}
    assert step.tokens(True, 32) == {"w2ssl_tokens_per_img_view": 8, "mocov3_tokens_per_img_view": 16,
                                     "seq_len": 17}
    assert set(step.tokens(False, 112).values()) == {None}


def test_vit_steps_use_adamw_and_the_supervised_row_reads_the_class_token(monkeypatch):
    """A ViT trunk: MoCo v3's ViT recipe (AdamW, lr 1.5e-4·b/256, wd 0.1), from main_moco.py's defaults, for
    every step; the supervised row is a linear classifier on the class token."""
    register_tiny_vit(monkeypatch)
    optimizers = []
    monkeypatch.setattr(step, "TrainStep", lambda opt, device, precision: optimizers.append(opt))
    for name in step.steps():
        step.build(name, bench_args(arch="tiny_vit"), CPU)
    assert len(optimizers) == len(step.steps())
    for opt in optimizers:
        assert type(opt) is torch.optim.AdamW
        assert opt.defaults["lr"] == pytest.approx(1.5e-4 * 4 / 256) and opt.defaults["weight_decay"] == 0.1
    net = step.Classifier("tiny_vit", classes=5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), net.fc(net.trunk.forward_tokens(x)[:, 0]))


@pytest.mark.slow  # builds and steps five vit_small models (a few seconds): too slow for the fast suite
def test_cli_runs_every_vit_step_on_cpu(capsys):
    argv = ["--device", "cpu", "-a", "vit_small", "--batch-size", "4", "--tile-size", "32", "--iters", "1",
            "--warmup", "0"]
    assert step.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["arch"] == "vit_small" and out["timm"]
    assert (out["w2ssl_tokens_per_img_view"], out["mocov3_tokens_per_img_view"], out["seq_len"]) == (8, 16, 17)
    for name in step.steps():
        assert out[f"{name}_img_s"] == pytest.approx(4 / (out[f"{name}_step_ms"] / 1000))
        low, high = out[f"{name}_step_ms_range"]
        assert low <= out[f"{name}_step_ms"] <= high
    assert any(line.startswith("| W2SSL (4 x 32 px/img, AdamW") and line.endswith("| 8 |") for line in lines)
    assert any(line.startswith("| BYOL (2 x 64 px/img, AdamW") and line.endswith("| 16 |") for line in lines)
    assert "ViT sequences: 17 tokens" in "\n".join(lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        common.resolve_device("cuda")


def test_time_iterations_counts_calls():
    calls = []
    times = common.time_iterations(lambda: calls.append(1), iters=4, warmup=2, device=CPU)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)
    assert common.median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_time_interleaved_alternates():
    calls = []
    times = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]


def test_markdown_table():
    text = common.markdown_table(["a", "b"], [("x", 1234.56), ("y", None), ("z", 0.012345)])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 1234.6 |", "| y | - |", "| z | 0.0123 |"]


def test_prepare_model_compiles_named_children_in_place(monkeypatch):
    """The named children run as compiled graphs (seen by a recording backend), the rest stays eager;
    parameter names do not change and 4-D weights become NHWC."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(" ".join(str(node.target) for node in gm.graph.nodes))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": recording_backend}))
    model = torch.nn.Module()
    model.base_encoder, model.momentum_encoder = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 1)
    model.projector = torch.nn.Linear(4, 2)
    keys = list(model.state_dict())
    prepare_model(model, channels_last=True, compile=True, compile_children=MomentumModel.compiled)
    x = torch.randn(1, 3, 5, 5)
    model.projector(model.base_encoder(x).mean(dim=(2, 3)))
    assert len(graphs) == 1 and "conv2d" in graphs[0] and "linear" not in graphs[0]
    model.momentum_encoder(x)
    model.projector(torch.randn(1, 4))
    assert len(graphs) == 2 and "conv2d" in graphs[1] and "linear" not in graphs[1]
    assert list(model.state_dict()) == keys
    assert model.base_encoder.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # starts bash processes
def test_gpu_scripts_parse_and_refuse_unknown_parts():
    for script in ("run_gpu.sh", "gpu_check.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], check=True)
    bad = ((["bench/gpu_check.sh"], {}), (["bench/gpu_check.sh", "4"], {}), (["bench/run_gpu.sh"], {"PART": "4"}))
    for cmd, env in bad:
        res = subprocess.run(["bash", *cmd], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
        assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1


@pytest.mark.slow
def test_run_gpu_part_1_runs_only_the_step_table_on_cpu(tmp_path):
    env = {"OUT": str(tmp_path), "DEVICE": "cpu", "QUICK": "1", "PART": "1"}
    res = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=ROOT, capture_output=True, text=True, env=cpu_env(env),
                         timeout=600)
    assert res.returncode == 0, res.stderr
    (md,) = tmp_path.glob("bench_1_*.md")
    text = md.read_text()
    assert text.startswith("# Benchmarks, part 1") and "| step bf16 channels_last | " in text
    assert "| step vit_small bf16 | " in text and "W2SSL 8, MoCo v3 16; 17 tokens per sequence" in text
    assert "failed" not in text and "## e2e" not in text and "## data" not in text


class JumpingClock:
    """``time.perf_counter`` that jumps an hour forward at every checkpoint write (written instantly)."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset


def test_max_iters_throughput_leaves_out_checkpoints_and_epoch_ends(image_root, tmp_path, monkeypatch, capsys):
    register_small_resnet(monkeypatch)
    clock = JumpingClock()

    def slow_save(self, epoch_end):
        clock.offset += 3600.0

    monkeypatch.setattr(pretrain, "time", clock)
    monkeypatch.setattr(pretrain.Pretrainer, "save", slow_save)
    # 24 images, batch 4: 6 steps per epoch; the window (steps 4-7) spans a checkpoint at every step and an
    # epoch end. An hour per write counted as training would give < 0.01 img/s.
    argv = [image_root, *TINY, "-a", SMALL, "-b", "4", "--workers", "0", "--epochs", "5", "--max-iters", "8",
            "--save-freq-iters", "1", "--resume", "none", "--save-dir", tmp_path]
    assert cli.run_main(main_moco.main, [str(a) for a in argv]) == 0
    out = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert (out["iters"], out["window_iters"], out["batch_size"]) == (8, 4, 4)  # on the GPU if there is one
    assert 1.0 < out["e2e_img_s"] < 1e5
    assert len(out["epoch_start_data_s"]) == 1 and out["epoch_start_data_s"][0] < 3600


@pytest.mark.slow
def test_e2e_runs_main_moco_with_checkpoints_on_cpu(tmp_path, capsys):
    argv = ["--device", "cpu", "--root", str(tmp_path), "--images", "24", "--classes", "2", "--iters", "8",
            "--batch-size", "4", "--tile-size", "16", "--arch", "resnet18", "--workers", "0", "--save-freq-iters", "2"]
    assert e2e.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["iters"], out["window_iters"], out["device"], out["gpu_aug"]) == (8, 4, "cpu", False)
    assert out["e2e_img_s"] > 0 and len(out["epoch_start_data_s"]) == 1
