"""The W2SSL model: base and momentum encoders, montages, heads and one step's losses (METHOD §2–§5)."""
from __future__ import annotations

from argparse import Namespace, _ArgumentGroup
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from w2ssl.argtypes import Ranged, nonneg_float, positive_float, positive_int, unit_interval
from w2ssl.data.augment import FourCrop
from w2ssl.data.datasets import stream_seed
from w2ssl.data.fast_augment import FastViews, fast_four_crop
from w2ssl.data.gpu_augment import GpuFourCrop
from w2ssl.dist import distributed as D
from w2ssl.errors import UserError
from w2ssl.losses.supcon import supcon_loss
from w2ssl.methods import heads
from w2ssl.methods.base import EMA_ARGUMENTS, MomentumModel, momentum_schedules
from w2ssl.methods.exchange import montage_tiles
from w2ssl.methods.gridpool import grid_pool
from w2ssl.methods.montage import arrange, assemble, local_indices, split_grid, tile_labels
from w2ssl.methods.registry import NEW, REFUSE, Arguments, Method, StepKey, TrunkBuilder, register_method
from w2ssl.trunks import Family
from w2ssl.trunks.resnet import RESNET


class W2SSL(MomentumModel):
    """Learning what (which image a tile comes from) and where (left or right crop).

    ``base_encoder()`` builds a trunk (``[B, 3, H, W] -> [B, C, h, w]`` feature map, ``num_features`` C),
    called twice as MoCo v3 does: base and momentum encoder. Each montage's map is read out as a 2x2 grid
    (:func:`~w2ssl.methods.gridpool.grid_pool`, METHOD §3). ``family`` (the trunk's
    :class:`~w2ssl.trunks.registry.Family`) gives the depths of MoCo v3's projector and predictor for it
    (:mod:`~w2ssl.methods.heads`).

    ``forward(view1, view2, m, perm)`` takes each view as ``[left, right]`` tile batches of this process,
    each ``[b, 3, t, t]``; it returns ``loss`` (the total) and ``loss_what``, ``loss_where``,
    ``where_acc`` (detached) for logging, the global values on every process (see :meth:`forward`).
    With several processes, call :meth:`convert_sync_batchnorm` first: each process's BatchNorms see
    only its own montages and tiles.

    With ``fused_views`` each encoder and head runs once on both views, every BatchNorm still taking
    each view's statistics on their own (:mod:`w2ssl.dist.viewnorm`): the same math in half the calls.
    """

    def __init__(self, base_encoder: Callable[[], nn.Module], dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.3, base_temperature: float = 0.07,
                 loss_where_weight: float = 1.0, loss_what_weight: float = 1.0,
                 family: Family = RESNET, fused_views: bool = False):
        super().__init__(base_encoder, partial(heads.projector, hidden_dim=mlp_dim, out_dim=dim, depths=family.heads),
                         lambda width: {"predictor": heads.predictor(dim, mlp_dim, family.heads),
                                        "where_head": heads.where_head(width)}, fused_views)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.loss_where_weight, self.loss_what_weight = loss_where_weight, loss_what_weight

    def _grids(self, encoder: nn.Module, montages: list[Tensor]) -> list[Tensor]:
        """Per view: montages ``[b, 3, 2t, 2t]`` -> tile features ``[2b, C]`` in ``split_grid`` order."""
        return [split_grid(g) for g in self.per_view(lambda x: grid_pool(encoder(x)), montages)]

    def forward(self, view1: Sequence[Tensor], view2: Sequence[Tensor], m: float, perm: Tensor) -> dict[str, Tensor]:
        """``perm [2N]`` is the step's tile permutation, the same on every process (pass it on the CPU:
        with several processes its values are read on the host).

        Each process runs trunks and heads on its own montages only, and takes its own rows as the
        anchors of the losses (against the gathered rows for "what"). Its loss is its anchors' share of
        the global loss times ``W``, so that DDP's average of the gradients is the one-process gradient;
        the returned values are the global ones (identical on every process).
        """
        tiles, n = self._local_tiles(view1, view2)
        mine = montage_tiles(tiles, perm)  # [2b, 2 views, 3, t, t]
        montages = [arrange(mine[:, 0]), arrange(mine[:, 1])]
        q1, q2 = self._grids(self.base_encoder, montages)
        with torch.no_grad():
            self.update_momentum(m)
            f1, f2 = self._grids(self.momentum_encoder, montages)
        return self.heads(q1, q2, f1, f2, perm, n)

    def heads(self, q1: Tensor, q2: Tensor, f1: Tensor, f2: Tensor, perm: Tensor, n: int) -> dict[str, Tensor]:
        """Heads and losses on this process's tiles: base features ``q1, q2`` and momentum features
        ``f1, f2`` (no gradient) of views 1 and 2, each ``[2b, C]`` in ``split_grid`` order of the local
        montages; ``perm [2N]`` the step's permutation, ``n`` = N. Returns :meth:`forward`'s dict."""
        world = D.world_size()
        # Global tile ids of the rows of every process, in rank order (local_indices is split_grid's order).
        ids = torch.cat([local_indices(perm, r, world) for r in range(world)]).to(q1.device, non_blocking=True)
        _, where = tile_labels(ids.view(world, -1)[D.rank()], n)
        where_logits = self.where_head(q1)
        loss_where = F.cross_entropy(_at_least_float32(where_logits), where)  # local mean = global share x W
        where_acc = (where_logits.argmax(dim=1) == where).float().mean()
        p1, p2 = self.per_view(lambda q: self.predictor(self.projector(q)), [q1, q2])
        with torch.no_grad():
            k1, k2 = self.per_view(self.momentum_projector, [f1, f2])

        source, _ = tile_labels(ids, n)
        loss_what = self._what(p1, p2, k1, k2, torch.cat([source, source])) * world
        loss = self.loss_where_weight * loss_where + self.loss_what_weight * loss_what
        logged = D.all_reduce_mean(torch.stack([loss, loss_what, loss_where, where_acc]).detach())
        # The local loss's gradient with the global loss's value: logs, the fp16 scaler and the
        # non-finite guard see the same number on every process.
        return {"loss": loss + (logged[0] - loss).detach(), "loss_what": logged[1], "loss_where": logged[2],
                "where_acc": logged[3]}

    def _what(self, p1: Tensor, p2: Tensor, k1: Tensor, k2: Tensor, labels: Tensor) -> Tensor:
        """This process's share of ``SupCon(A) + SupCon(B)``, ``A = [p1; k2]``, ``B = [p2; k1]`` over all
        processes' rows (METHOD §5): local ``[r, d]`` inputs, ``labels [4N]`` of the gathered rows
        ``[p of every process; k of every process]``. Predictions are gathered with gradient, keys without."""
        p = D.gather_with_grad(torch.cat([_unit_rows(p1), _unit_rows(p2)]))
        k = D.gather(torch.cat([_unit_rows(k2), _unit_rows(k1)]))
        r, world = len(p1), D.world_size()
        # Rows in the gathered tensors: process by process, each [view-1 rows; view-2 rows].
        p, k = p.view(world, 2, r, -1), k.view(world, 2, r, -1)
        mine = D.rank() * r + torch.arange(r, device=p.device)
        total = p.new_zeros(())
        for v in range(2):
            z = torch.cat([p[:, v].reshape(world * r, -1), k[:, v].reshape(world * r, -1)])
            anchors = torch.cat([mine, world * r + mine])
            total = total + supcon_loss(z, labels, self.temperature, self.base_temperature, anchors=anchors)
        return total

    @staticmethod
    def _local_tiles(view1: Sequence[Tensor], view2: Sequence[Tensor]) -> tuple[Tensor, int]:
        """Check the inputs and stack them: ``[2b, 2, 3, t, t]`` (left tiles first; view 1, view 2), N."""
        if len(view1) != 2 or len(view2) != 2:
            raise ValueError("each view must be a pair [left, right] of tile batches")
        shapes = {tuple(t.shape) for t in (*view1, *view2)}
        if len(shapes) != 1:
            raise ValueError(f"all four tile batches must have the same shape; got {sorted(shapes)}")
        b = view1[0].shape[0]
        world = D.world_size()
        if b % 2:
            raise ValueError(f"the global batch ({b * world} source images) must be divisible by "
                             f"2 x world size ({2 * world}): got {b} images on this process, an odd number")
        return torch.stack([torch.cat(list(view1)), torch.cat(list(view2))], dim=1), b * world


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision (autocast) outputs in float32 for the losses; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _unit_rows(x: Tensor) -> Tensor:
    return F.normalize(_at_least_float32(x), dim=1)


# ----------------------------------------------------------------- the method, for the trainer
def build(args: Namespace, trunk: TrunkBuilder, family: Family) -> W2SSL:
    return W2SSL(trunk, args.crop_proj_dim, args.moco_mlp_dim, args.loss_t, loss_where_weight=args.loss_loc,
                 loss_what_weight=args.loss_crop, family=family, fused_views=args.fused_views)


def inputs(tiles: list[Tensor], key: StepKey) -> dict[str, object]:
    """The four tile batches ``[b, 3, t, t]`` (v1 left, v1 right, v2 left, v2 right) -> ``forward``'s inputs,
    with the step's tile permutation of the global ``2N`` tiles. It comes from the named stream
    ``"tile_perm"`` at ``(epoch, iteration)``: every process draws the same one on the host, where the
    all-to-all plan needs it (no broadcast, no device read)."""
    n = tiles[0].shape[0] * key.world
    gen = torch.Generator().manual_seed(stream_seed(key.seed, "tile_perm", key.epoch, key.iteration))
    return {"view1": tiles[:2], "view2": tiles[2:], "perm": torch.randperm(2 * n, generator=gen)}


def check_batch(batch_size: int, world: int) -> None:
    if batch_size <= 0 or batch_size % (2 * world):
        raise UserError(f"--batch-size {batch_size} must be a positive multiple of 2 x {world} "
                        f"processes (each montage takes 2 images per process)")
    if batch_size < 4 * world:
        raise UserError(f"--batch-size {batch_size} leaves each of the {world} process(es) "
                        f"{batch_size // world // 2} montage per view, and BatchNorm needs at least 2: "
                        f"pass --batch-size {4 * world} or more")


def console(cur: dict[str, float], avg: dict[str, float]) -> str:
    """The authors' fields (where-accuracy in percent)."""
    return (f"Loss {cur['loss']:.4e} ({avg['loss']:.4e})\t"
            f"Loss_loc {cur['loss_where']:.4e} ({avg['loss_where']:.4e})\t"
            f"Loss_crop {cur['loss_what']:.4e} ({avg['loss_what']:.4e})\t"
            f"Where_acc {cur['where_acc']:.1f} ({avg['where_acc']:.1f})")


def preview(tiles: list[Tensor], epoch: int) -> dict[str, Tensor]:
    """Up to 4 montages per view of the batch's first images (normalised), arranged as in training."""
    n = min(8, tiles[0].shape[0] // 2 * 2)
    if n < 2:
        return {}
    perm = torch.randperm(2 * n, generator=torch.Generator().manual_seed(epoch)).to(tiles[0].device)
    return {f"montages/{name}": assemble(torch.cat([left[:n], right[:n]]), perm)
            for name, (left, right) in (("view1", tiles[:2]), ("view2", tiles[2:]))}


def transform(args: Namespace) -> FourCrop:
    """The PIL four-crop (``--cpu-aug pil``); ``--cross`` and ``--flip-p`` are the published 0.3 and 0.5 by
    default, other values are diagnostics (METHOD §5, notes)."""
    return FourCrop(args.tile_size, args.crop_min, args.cross, args.flip_p)


def fast_transform(args: Namespace) -> FastViews:
    """The same four-crop batched in the loader workers (``--cpu-aug fast``)."""
    return fast_four_crop(args.tile_size, args.crop_min, args.cross, args.flip_p)


def gpu_transform(args: Namespace) -> GpuFourCrop:
    """The same four-crop on the device (``--gpu-aug``)."""
    return GpuFourCrop(args.tile_size, args.crop_min, cross=args.cross, flip_p=args.flip_p)


below_half = Ranged(float, "float", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")


def add_arguments(group: _ArgumentGroup) -> None:
    """W2SSL's own flags, with the authors' names and the published values as defaults."""
    group.add_argument("--cross", default=0.3, type=below_half,
                       help="overlap of the left and right crops, a fraction of the width (0.3 as published; 0: none)")
    group.add_argument("--flip-p", default=0.5, type=unit_interval,
                       help="horizontal flip probability of each tile (0.5 as published; for diagnostics)")
    group.add_argument("--crop_proj_dim", default=256, type=positive_int, help="projector/predictor output dimension")
    group.add_argument("--loss_t", default=0.3, type=positive_float, help="temperature of the 'what' (SupCon) loss")
    group.add_argument("--loss_loc", default=1.0, type=nonneg_float, help="weight of the 'where' loss")
    group.add_argument("--loss_crop", default=1.0, type=nonneg_float, help="weight of the 'what' loss")
    group.add_argument("--loss_clu", default=1.0, type=float, help="authors' flag, unused by their released model")


register_method(Method("w2ssl", build, transform, inputs, check_batch,
                       input_size=lambda tile: 2 * tile, min_map=2, console=console, preview=preview,
                       fast_transform=fast_transform, gpu_transform=gpu_transform, schedules=momentum_schedules,
                       arguments=(EMA_ARGUMENTS, Arguments("--method w2ssl", add_arguments, on_resume={
                           "crop_proj_dim": REFUSE, "loss_t": NEW, "loss_loc": NEW, "loss_crop": NEW, "cross": NEW,
                           "flip_p": NEW}))))
