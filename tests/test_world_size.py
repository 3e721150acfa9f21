"""A whole pre-training run is world-size invariant: one process and two (torchrun, gloo, BatchNorm
synchronised) end with the same weights, with the PIL pipeline and with ``--gpu-aug`` on the CPU.

This needs every ingredient to be independent of the number of processes: the sampler's global batch, the
augmentation seeds, the tile permutation, the synchronised BatchNorm statistics and the per-process heads
and losses (METHOD §9).
"""
import sys

import pytest
import torch

from tests.helpers import TINY, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def _train(image_root, out, launcher, extra):
    res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--workers", "0", "--epochs", "2",
                     "--save-dir", out, *extra, launcher=launcher, env=CPU_ONLY)
    assert res.returncode == 0, res.stderr
    return torch.load(out / "checkpoint_last.pth.tar", weights_only=True)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [[], ["--gpu-aug"]], ids=["pil", "gpu-aug"])
def test_one_and_two_processes_end_with_the_same_weights(image_root, tmp_path, pipeline):
    one = _train(image_root, tmp_path / "one", None, pipeline)
    two = _train(image_root, tmp_path / "two", TORCHRUN, pipeline)
    assert one["global_step"] == two["global_step"] == 6  # 24 images / 8, two epochs
    assert one["state_dict"].keys() == two["state_dict"].keys()
    statistics = 0
    for key, value in one["state_dict"].items():
        if not value.is_floating_point():
            assert torch.equal(value, two["state_dict"][key]), key
            continue
        assert _relative_difference(two["state_dict"][key], value) <= 1e-4, key
        statistics += "running_var" in key
    assert statistics > 0  # BatchNorm trunks and heads: their statistics were compared too
