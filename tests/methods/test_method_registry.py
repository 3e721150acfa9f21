"""The method registry: the built-in methods, and a toy method that plugs into the trainer unchanged."""
from argparse import Namespace

import pytest
import torch
from torch import Tensor, nn
from torchvision import transforms

import main_moco
from tests.helpers import SMALL, TINY, register_small_resnet
from w2ssl import cli
from w2ssl.data.augment import MEAN, STD
from w2ssl.errors import UserError
from w2ssl.methods import registry
from w2ssl.methods.base import SSLModel
from w2ssl.methods.registry import Method, StepKey, build_model, method_names, method_spec, register_method
from w2ssl.schedules import Schedules, cosine


def test_builtin_methods_are_registered_in_order():
    assert method_names()[:2] == ("w2ssl", "mocov3")
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of w2ssl, mocov3, byol"):
        method_spec("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method(method_spec("w2ssl"))


def test_w2ssl_inputs_draw_the_same_permutation_for_any_split_of_the_batch():
    tiles = [torch.zeros(4, 3, 8, 8)] * 4
    one = method_spec("w2ssl").inputs(tiles, StepKey(seed=3, epoch=1, iteration=2, world=1))
    two = method_spec("w2ssl").inputs([t[:2] for t in tiles], StepKey(seed=3, epoch=1, iteration=2, world=2))
    assert torch.equal(one["perm"], two["perm"]) and sorted(one["perm"].tolist()) == list(range(8))
    other = method_spec("w2ssl").inputs(tiles, StepKey(seed=3, epoch=1, iteration=3, world=1))
    assert not torch.equal(one["perm"], other["perm"])
    assert one["view1"] == tiles[:2] and one["view2"] == tiles[2:] and one["perm"].device.type == "cpu"


@pytest.mark.parametrize("method", ["w2ssl", "mocov3"])
@pytest.mark.parametrize("arch, linears, predictor_bn", [("resnet18", 2, False), ("vit_small", 3, True)])
def test_models_pick_heads_by_trunk_family(method, arch, linears, predictor_bn):
    """MoCo v3's MLPs: ResNets a 2-layer projector and a predictor without a last BN; ViTs a 3-layer
    projector and a predictor that ends in BN."""
    args = Namespace(method=method, arch=arch, stop_grad_conv1=False, crop_proj_dim=8, moco_dim=8, moco_mlp_dim=16,
                     loss_t=0.3, loss_loc=1.0, loss_crop=1.0, moco_t=1.0, fused_views=False)
    with torch.device("meta"):
        model = build_model(args)
    assert sum(isinstance(m, nn.Linear) for m in model.projector) == linears
    assert isinstance(model.predictor[-1], nn.BatchNorm1d) == predictor_bn
    assert hasattr(model, "where_head") == (method == "w2ssl")


def test_mocov3_resnets_start_with_zero_residual_scales():
    args = Namespace(method="mocov3", arch="resnet18", stop_grad_conv1=False, moco_dim=8, moco_mlp_dim=16,
                     moco_t=1.0, fused_views=False)
    model = build_model(args)
    assert torch.equal(model.base_encoder.layer1[0].bn2.weight, torch.zeros(64))


class Toy(SSLModel):
    """A toy method without a momentum encoder: predict the mean colour of an image from the pooled trunk
    features, times a scheduled ``scale``; its head's weight frozen by the after-backward hook (as DINO freezes
    its last layer), its bias in a group of its own without weight decay."""

    def __init__(self, trunk):
        super().__init__()
        self.base_encoder = trunk()
        self.head = nn.Linear(self.base_encoder.num_features, 3)
        nn.init.constant_(self.head.weight, 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("last_scale", torch.zeros((), dtype=torch.float64))

    def param_groups(self) -> list[dict]:
        return [{"params": [*self.base_encoder.parameters(), self.head.weight]},
                {"params": [self.head.bias], "wd_scale": 0.0}]

    def after_backward(self, epoch: float) -> None:
        self.head.weight.grad = None

    def forward(self, x: Tensor, target: Tensor, scale: float) -> dict[str, Tensor]:
        self.last_scale.fill_(scale)
        loss = scale * (self.head(self.base_encoder(x).mean(dim=(2, 3))) - target).square().mean()
        return {"loss": loss, "toy_mse": loss.detach(), "toy_acc": (loss < 1).float().detach()}


WD = cosine(0.04, 0.4, 1)  # DINO's weight decay schedule over one epoch


def toy_schedules(args: Namespace, lr: float) -> Schedules:
    return Schedules(lr=lambda t: lr, weight_decay=WD, forward={"scale": lambda t: 1.0 + t})


def toy_transform(args: Namespace):
    to_tensor = transforms.Compose([transforms.Resize((2 * args.tile_size,) * 2), transforms.ToTensor()])
    return lambda img: [transforms.Normalize(MEAN, STD)(to_tensor(img)), to_tensor(img).mean(dim=(1, 2))]


@pytest.fixture
def toy():
    method = register_method(Method("toy", lambda args, trunk, family: Toy(trunk), toy_transform,
                                    inputs=lambda batch, key: {"x": batch[0], "target": batch[1]},
                                    check_batch=lambda batch, world: None, input_size=lambda tile: 2 * tile,
                                    schedules=toy_schedules))
    yield method
    registry._METHODS.pop("toy")


def test_a_toy_method_trains_through_main_moco(toy, image_root, tmp_path, capsys, monkeypatch):
    register_small_resnet(monkeypatch)
    argv = [image_root, *TINY, "-a", SMALL, "-b", "8", "--workers", "0", "--epochs", "1", "--method", "toy",
            "--save-dir", tmp_path]
    assert cli.run_main(main_moco.main, [str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert f"=> toy on {SMALL}" in out and "\tLoss " in out and "\ttoy_mse " in out and "\ttoy_acc " in out
    ckpt = torch.load(tmp_path / "checkpoint_0000.pth.tar", weights_only=True)
    state, steps = ckpt["state_dict"], ckpt["global_step"]
    assert ckpt["method"] == "toy" and not any(k.startswith("momentum") for k in state)
    # the method's schedules reached the model and the optimiser at the last step, t = (steps - 1) / steps
    t = (steps - 1) / steps
    assert steps >= 2 and state["last_scale"].item() == 1.0 + t
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert decay["weight_decay"] == pytest.approx(WD(t)) and WD(t) > 0.04 and no_decay["weight_decay"] == 0.0
    # the after-backward hook froze the head's weight; its bias trained
    assert torch.equal(state["head.weight"], torch.full_like(state["head.weight"], 0.5))
    assert state["head.bias"].abs().sum() > 0


@pytest.mark.parametrize("method, batch, world, message", [
    ("w2ssl", 6, 2, "multiple of 2 x 2 processes"), ("w2ssl", 4, 2, "at least 2: pass --batch-size 8"),
    ("mocov3", 3, 2, "multiple of the 2 processes"), ("mocov3", 2, 2, "fewer than 2 images.*pass --batch-size 4"),
])
def test_batch_checks_by_method(method, batch, world, message):
    with pytest.raises(UserError, match=message):
        method_spec(method).check_batch(batch, world)
    method_spec(method).check_batch(8, world)
