"""The W2SSL model: base and momentum encoders, montages, heads and one step's losses (SPEC §2–§5)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as D
from .encoder import GridTrunk
from .exchange import montage_tiles
from .heads import predictor, projector, where_head
from .losses import supcon_loss
from .momentum import MomentumPairs
from .montage import arrange, random_permutation, split_grid, tile_labels
from .viewnorm import normalise_per_view, per_view


class W2SSL(nn.Module):
    """Learning what (which image a tile comes from) and where (left or right crop).

    ``forward(view1, view2, m)`` takes each view as ``[left, right]`` tile batches of this process,
    each ``[b, 3, t, t]``; it returns ``loss`` (the total) and ``loss_what``, ``loss_where``,
    ``where_acc`` (detached) for logging. Every process computes the same global loss.

    With ``fused_views`` each encoder and head runs once on both views, every BatchNorm still taking
    each view's statistics on their own (:mod:`w2ssl.viewnorm`): the same math in half the calls.
    """

    def __init__(self, arch: str = "resnet50", dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.3, base_temperature: float = 0.07,
                 loss_where_weight: float = 1.0, loss_what_weight: float = 1.0,
                 norm_layer: Callable[[int], nn.Module] | None = None, fused_views: bool = False):
        super().__init__()
        self.fused_views = fused_views
        self.temperature, self.base_temperature = temperature, base_temperature
        self.loss_where_weight, self.loss_what_weight = loss_where_weight, loss_what_weight
        self.base_encoder = GridTrunk(arch, norm_layer)
        width = self.base_encoder.num_features
        self.projector = projector(width, mlp_dim, dim)
        self.predictor = predictor(dim, mlp_dim)
        self.where_head = where_head(width)
        self.momentum_encoder = GridTrunk(arch, norm_layer)
        self.momentum_projector = projector(width, mlp_dim, dim)
        self.momentum_pairs = MomentumPairs([self.base_encoder, self.projector],
                                            [self.momentum_encoder, self.momentum_projector])
        self._normalise_views()

    def _normalise_views(self) -> None:
        if self.fused_views:
            normalise_per_view(self, 2)

    def convert_sync_batchnorm(self) -> None:
        """SyncBatchNorm in the trunks: only they see per-process batches (the heads see the gathered one)."""
        for trunk in (self.base_encoder, self.momentum_encoder):
            nn.SyncBatchNorm.convert_sync_batchnorm(trunk)
        self._normalise_views()

    def update_momentum(self, m: float) -> None:
        """EMA ``θ_m ← m·θ_m + (1−m)·θ_b`` over trunk and projector parameters."""
        self.momentum_pairs.update(m)

    def _per_view(self, fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor]) -> list[Tensor]:
        return per_view(fn, xs, self.fused_views)

    def _grid_features(self, trunk: nn.Module, montages: Sequence[Tensor], with_grad: bool) -> list[Tensor]:
        """Local montages ``[m, 3, 2t, 2t]`` per view -> global tile features ``[2N, C]`` in ``S`` order."""
        gather = D.gather_with_grad if with_grad else D.gather
        return [split_grid(gather(grid)) for grid in self._per_view(trunk, montages)]

    def forward(self, view1: Sequence[Tensor], view2: Sequence[Tensor], m: float,
                perm: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``perm [2N]`` fixes the tile permutation and must be the same on every process (pass it on the
        CPU: with several processes its values are read on the host); otherwise rank 0 draws it (from
        ``generator`` if given) and broadcasts it."""
        tiles, n = self._local_tiles(view1, view2)
        if perm is None:
            perm = D.broadcast(random_permutation(2 * n, tiles.device, generator))
        mine = montage_tiles(tiles, perm)  # [2b, 2 views, 3, t, t]
        montages = [arrange(mine[:, 0]), arrange(mine[:, 1])]

        q1, q2 = self._grid_features(self.base_encoder, montages, with_grad=True)
        source, where = tile_labels(perm.to(tiles.device, non_blocking=True), n)

        where_logits = self.where_head(q1)
        loss_where = F.cross_entropy(where_logits.float(), where)
        p1, p2 = self._per_view(lambda q: self.predictor(self.projector(q)), [q1, q2])

        with torch.no_grad():
            self.update_momentum(m)
            k1, k2 = self._per_view(self.momentum_projector,
                                    self._grid_features(self.momentum_encoder, montages, with_grad=False))

        labels = torch.cat([source, source])
        loss_what = (self._what(p1, k2, labels) + self._what(p2, k1, labels))
        loss = self.loss_where_weight * loss_where + self.loss_what_weight * loss_what
        where_acc = (where_logits.argmax(dim=1) == where).float().mean()
        return {"loss": loss, "loss_what": loss_what.detach(), "loss_where": loss_where.detach(),
                "where_acc": where_acc.detach()}

    def _what(self, pred: Tensor, key: Tensor, labels: Tensor) -> Tensor:
        z = F.normalize(torch.cat([pred, key]).float(), dim=1)
        return supcon_loss(z, labels, self.temperature, self.base_temperature)

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
