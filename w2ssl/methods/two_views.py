"""What the two-view methods (MoCo v3, BYOL) share besides their model: MoCo v3's asymmetric pair of views
(METHOD §10) at ``2 x --tile-size`` px, how a batch of them becomes ``forward(x1, x2)``'s inputs, the batch
check, and the TensorBoard preview."""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from w2ssl.data.fast_augment import FastViews, fast_two_crop
from w2ssl.data.twocrop import two_crop
from w2ssl.errors import UserError
from w2ssl.methods.registry import Method, StepKey, TrunkBuilder
from w2ssl.trunks import Family


def transform(args: Namespace) -> Callable[[Any], list[Tensor]]:
    """The PIL pair of views (``--cpu-aug pil``)."""
    return two_crop(args.tile_size, args.crop_min)


def fast_transform(args: Namespace) -> FastViews:
    """The same pair batched in the loader workers (``--cpu-aug fast``)."""
    return fast_two_crop(2 * args.tile_size, args.crop_min)


def inputs(views: list[Tensor], key: StepKey) -> dict[str, Tensor]:
    return {"x1": views[0], "x2": views[1]}


def check_batch(batch_size: int, world: int) -> None:
    if batch_size <= 0 or batch_size % world:
        raise UserError(f"--batch-size {batch_size} must be a positive multiple of the {world} processes")
    if batch_size < 2 * world:
        raise UserError(f"--batch-size {batch_size} leaves each of the {world} process(es) fewer than 2 images, "
                        f"and BatchNorm needs at least 2: pass --batch-size {2 * world} or more")


def preview(views: list[Tensor], epoch: int) -> dict[str, Tensor]:
    return {f"views/view{i + 1}": v[:8] for i, v in enumerate(views)}


def two_view_method(name: str, build: Callable[[Namespace, TrunkBuilder, Family], nn.Module], **options) -> Method:
    """The :class:`Method` ``name`` with the shared data side above; ``options``: its other fields (schedules,
    arguments, defaults)."""
    return Method(name, build, transform, inputs, check_batch, input_size=lambda tile: 2 * tile, preview=preview,
                  fast_transform=fast_transform, **options)
