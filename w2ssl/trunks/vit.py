"""ViT trunks as MoCo v3 builds them on timm (METHOD §11), with a feature-map forward for the grid read-out.

``vit_small``, ``vit_base`` (patch 16, 12 blocks) and ``vit_conv_small``, ``vit_conv_base`` (MoCo v3's conv
stem in place of the patch projection, 11 blocks) keep timm's parameter names. The 2-D sin-cos position
embedding is fixed, so it is not a weight: it is computed for the grid of each input (any side that is a
multiple of 16: 64-px montages on the CPU, 224-px montages on GPUs) and added to the patch tokens.
"""
from __future__ import annotations

import math
from functools import cache, partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from w2ssl.trunks.registry import Export, Family, HeadDepths, register_trunk

PATCH = 16
VIT_CONFIGS = {  # MoCo v3's vits.py: 12 heads for the small model too (timm's vit_small has 6)
    "vit_small": dict(embed_dim=384, depth=12, num_heads=12),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_conv_small": dict(embed_dim=384, depth=11, num_heads=12, conv_stem=True),
    "vit_conv_base": dict(embed_dim=768, depth=11, num_heads=12, conv_stem=True),
}
VIT_ARCHS = tuple(VIT_CONFIGS)
TIMM_MODELS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}  # same weight shapes
FEATURES = ("avg", "cls")


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """MoCo v3's fixed position embedding of an ``h x w`` token grid: ``[h*w, dim]`` float32, row-major.

    With ``ω_d = temperature^(−d/(dim/4))``, ``d < dim/4``, token ``(y, x)`` gets
    ``[sin(y·ω), cos(y·ω), sin(x·ω), cos(x·ω)]``. MoCo v3 names the first coordinate ``w``, but its
    ``meshgrid`` puts the row index there; on square grids (the only ones it builds) this is its formula.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4; got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    out_y, out_x = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)


@torch.compiler.disable
@cache
def _sincos_on(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`sincos_2d` cached per grid, device and dtype (built once, not copied to the device every step)."""
    return sincos_2d(h, w, dim).to(device=device, dtype=dtype)


class ConvStem(nn.Module):
    """MoCo v3's conv stem (Xiao et al., *Early Convolutions Help Transformers See Better*), as a timm
    ``embed_layer``: four ``conv3x3(stride 2, no bias) → BN → ReLU`` stages from ``dim/8`` channels doubling
    to ``dim/2``, then a ``1x1`` conv to ``dim``: ``[B, 3, H, W] -> [B, H/16 · W/16, dim]`` (or NHWC).
    The ``proj.<i>`` names are MoCo v3's, so its ``vit_conv_*`` checkpoints load."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = PATCH, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True, output_fmt: str | None = None, **_timm_args):
        super().__init__()
        if patch_size != PATCH or embed_dim % 8:
            raise ValueError(f"the conv stem needs patch size 16 and a width divisible by 8; "
                             f"got {patch_size} and {embed_dim}")
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.patch_size = img, (PATCH, PATCH)
        self.grid_size = (img[0] // PATCH, img[1] // PATCH)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt = output_fmt
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(4):
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return PATCH if as_scalar else self.patch_size

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, dim, H/16, W/16]
        if self.output_fmt == "NHWC":
            return x.permute(0, 2, 3, 1)
        return x if self.output_fmt == "NCHW" else x.flatten(2).transpose(1, 2)


class ViTTrunk(VisionTransformer):
    """timm ``VisionTransformer`` with MoCo v3's choices and no classifier (``num_classes=0``).

    ``forward``: ``[B, 3, H, W] -> [B, C, H/16, W/16]``, the patch tokens after the final norm as a map
    (the class token is left out). :meth:`forward_tokens` gives all ``1 + h·w`` tokens, :meth:`vit_feature`
    one vector per image. ``num_features`` is the width ``C``. There is no ``pos_embed`` weight:
    :func:`sincos_2d` of the input's grid is added in :meth:`_pos_embed` (the class token's is zero).
    """

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 12, conv_stem: bool = False,
                 stop_grad_conv1: bool = False, **kwargs):
        if stop_grad_conv1 and conv_stem:
            raise ValueError("stop_grad_conv1 freezes the linear patch projection; the conv-stem ViTs train "
                             "their stem: drop stop_grad_conv1 for vit_conv_*")
        super().__init__(patch_size=PATCH, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
                         qkv_bias=True, num_classes=0, pos_embed="none", dynamic_img_size=True,
                         weight_init="moco", embed_layer=ConvStem if conv_stem else PatchEmbed, **kwargs)
        # timm's "moco" init is MoCo v3's for the Linear layers and the class token; the patch projection
        # is xavier-uniform over its 3·16·16 inputs (the conv stem keeps PyTorch's default, as in MoCo v3).
        if isinstance(self.patch_embed, PatchEmbed):
            proj = self.patch_embed.proj
            bound = math.sqrt(6.0 / (3 * PATCH * PATCH + embed_dim))
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
            # --stop-grad-conv1: a random, frozen patch projection (MoCo v3's fix for training instability)
            proj.requires_grad_(not stop_grad_conv1)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """``[B, h, w, C]`` patch embeddings -> ``[B, 1 + h·w, C]`` tokens with the class token first."""
        b, h, w, c = x.shape
        cls = self.cls_token.expand(b, -1, -1)
        # in the parameters' dtype, as timm adds its pos_embed weight (float32 under autocast)
        x = x.reshape(b, h * w, c) + _sincos_on(h, w, c, x.device, cls.dtype)
        return self.pos_drop(torch.cat([cls, x], dim=1))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W] -> [B, 1 + H/16 · W/16, C]``: class token, then patch tokens row by row (final norm)."""
        if x.ndim != 4 or x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise ValueError(f"ViT trunks take [B, 3, H, W] images with H and W multiples of {PATCH}; "
                             f"got {tuple(x.shape)}")
        return self.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        return token_map(self.forward_tokens(x), x.shape[-2] // PATCH, x.shape[-1] // PATCH)

    def vit_feature(self, x: Tensor, mode: str = "avg") -> Tensor:
        """One vector per image for the probe and kNN: ``[B, 3, H, W] -> [B, C]`` (see :func:`pool_tokens`)."""
        return pool_tokens(self.forward_tokens(x), mode)


def token_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """``[B, 1 + h·w, C]`` tokens -> ``[B, C, h, w]`` map of the patch tokens (a view, channels-last strides)."""
    b, n, c = tokens.shape
    if n != 1 + h * w:
        raise ValueError(f"expected 1 + {h}·{w} tokens, got {n}")
    return tokens[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def pool_tokens(tokens: Tensor, mode: str = "avg") -> Tensor:
    """``[B, 1 + N, C] -> [B, C]``: ``avg``, the mean of the patch tokens (the probe's default: the tokens
    the W2SSL losses train), or ``cls``, the class token (what MoCo v3's head and probe read)."""
    if mode == "avg":
        return tokens[:, 1:].mean(dim=1)
    if mode == "cls":
        return tokens[:, 0]
    raise ValueError(f"unknown ViT feature {mode!r}; choose one of {', '.join(FEATURES)}")


def build_vit(arch: str, stop_grad_conv1: bool = False, **overrides) -> ViTTrunk:
    """The trunk named ``arch`` (:data:`VIT_ARCHS`); ``overrides`` (e.g. ``depth``) make small test models."""
    if arch not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT arch {arch!r}; choose one of {', '.join(VIT_ARCHS)}")
    return ViTTrunk(stop_grad_conv1=stop_grad_conv1, **{**VIT_CONFIGS[arch], **overrides})




def vit_small(**kwargs) -> ViTTrunk:
    return build_vit("vit_small", **kwargs)


def vit_base(**kwargs) -> ViTTrunk:
    return build_vit("vit_base", **kwargs)


def vit_conv_small(**kwargs) -> ViTTrunk:
    return build_vit("vit_conv_small", **kwargs)


def vit_conv_base(**kwargs) -> ViTTrunk:
    return build_vit("vit_conv_base", **kwargs)


def to_timm_state_dict(trunk_state: dict[str, Tensor], img_size: int = 224) -> dict[str, Tensor]:
    """A trunk state dict (no prefix) for timm's ``VisionTransformer`` at ``img_size``: the same keys plus
    ``pos_embed`` ``[1, 1 + (img_size/16)², C]`` (zeros for the class token, then :func:`sincos_2d`).

    ``vit_base`` loads into ``timm.create_model("vit_base_patch16_224")`` with only ``head.*`` missing and
    computes the same function. ``vit_small`` loads into ``vit_small_patch16_224`` likewise, but computes
    MoCo v3's function only with ``num_heads=12`` passed to ``create_model`` (timm's default is 6 heads;
    the weights' shapes do not depend on it). Conv-stem trunks need ``embed_layer=ConvStem`` and ``depth=11``.
    """
    if img_size % PATCH:
        raise ValueError(f"img_size must be a multiple of {PATCH}; got {img_size}")
    if "pos_embed" in trunk_state or "cls_token" not in trunk_state:
        raise ValueError("expected a w2ssl ViT trunk state dict (cls_token, no pos_embed, no prefix)")
    cls = trunk_state["cls_token"]
    grid = img_size // PATCH
    pos = torch.cat([torch.zeros(1, cls.shape[-1]), sincos_2d(grid, grid, cls.shape[-1])]).unsqueeze(0)
    return {**trunk_state, "pos_embed": pos.to(cls.dtype)}


def timm_loading(arch: str) -> str:
    """How to build the timm model that loads :func:`to_timm_state_dict` of ``arch`` and computes its function."""
    config = VIT_CONFIGS[arch]
    if config.get("conv_stem"):
        return (f"timm.models.VisionTransformer(embed_dim={config['embed_dim']}, depth={config['depth']}, "
                f"num_heads={config['num_heads']}, embed_layer=ConvStem) with w2ssl.trunks.vit.ConvStem "
                f"(the proj.* names are its layers)")
    return f"timm.create_model(\"{TIMM_MODELS[arch]}\", num_heads={config['num_heads']})"


def _timm_hint(arch: str) -> str:
    return f"load into {timm_loading(arch)} with strict=False: only head.weight and head.bias are missing"


VIT = Family(
    "vit", readouts={"avg": lambda trunk, x: trunk.vit_feature(x, "avg"),
                     "cls": lambda trunk, x: trunk.vit_feature(x, "cls")},
    exports={"timm": Export(lambda trunk, arch: to_timm_state_dict(trunk), _timm_hint)},
    heads=HeadDepths(projector_layers=3, predictor_last_bn=True),
    # MoCo v3's ViT recipe (--lr is scaled by batch / 256 as for ResNets)
    pretrain_recipe=dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.1, warmup_epochs=40, epochs=300,
                         moco_m_cos=True, moco_m=0.99),
    # MAE's fine-tuning (appendix A.2): DeiT's recipe with BEiT's layer-wise decay
    finetune_recipe=dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, epochs=100, warmup_epochs=5.0,
                         layer_decay=0.65, drop_path=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0,
                         aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                         head_init_std=2e-5),  # MAE's trunc_normal_(head.weight, std=2e-5): its cut at +-2 never bites
    layer_depth=lambda trunk: len(trunk.blocks), drop_path=True)

for _arch in VIT_ARCHS:  # a random frozen patch projection (--stop-grad-conv1) needs the linear one
    register_trunk(_arch, VIT, switches=() if VIT_CONFIGS[_arch].get("conv_stem") else ("stop_grad_conv1",))(
        partial(build_vit, _arch))
