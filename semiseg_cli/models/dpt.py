"""DPT: a plain ViT encoder (DINOv2, patch 14, built by timm) under a DPT head (Ranftl et al.,
ICCV 2021), the network of UniMatch V2 (arXiv 2410.10777; ../shared/docs/METHODS.md).

One forward, input (B, 3, H, W):
1. **Sides to multiples of 14.** A side that is not a multiple of the patch is *resized*
   (bilinear, `align_corners` as the model) to the nearest multiple (at least one patch), as
   UniMatch V2's official evaluation does; the logits are resized back to (H, W) at the end.
   Training crops (518 = 37 x 14) are multiples already, so nothing moves there. Resizing, not
   padding: padding would change what the border patches see and need a crop of the logits.
2. **Encoder.** The tokens after four blocks (ViT-S/B: the 3rd, 6th, 9th, 12th; ViT-L: 5th,
   12th, 18th, 24th), each through the encoder's final LayerNorm, class token dropped, as maps
   (B, D, H/14, W/14). `channel_scale` (B, D), when given, multiplies all four maps per sample
   and channel: the hook UniMatch V2's complementary channel dropout uses (the masks are drawn by
   the method, `methods/unimatch_v2.py`).
3. **Reassemble.** Per level a 1x1 conv to its width, then to 4x, 2x, 1x and 1/2x the patch grid
   (transposed convs up, a stride-2 3x3 conv down), then a 3x3 conv to `features` channels.
4. **Fuse.** Refine blocks from the coarsest level up: each adds a residual-conv-refined skip,
   refines again, upsamples bilinearly to the next level's size (the last one by 2, to 8x the
   grid) and mixes with a 1x1 conv.
5. **Classify.** 3x3 conv + ReLU + 1x1 conv to the classes; bilinear to (H, W).

There is no BatchNorm and no dropout anywhere (LayerNorm in the encoder), so a sample's output
does not depend on the rest of its batch: a method may put several streams in one forward.
Head layers keep PyTorch's default initialisation, as the official DPT head.

timm is an optional extra (`pip install 'semiseg[timm]'`); it is imported only when a DPT is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg_cli.errors import UserError
from semiseg_cli.models.deeplab import SegModel

if TYPE_CHECKING:
    from semiseg_cli.config import ModelConfig

log = logging.getLogger(__name__)

PATCH = 14


@dataclass(frozen=True)
class EncoderSpec:
    """A ViT encoder and the DPT head widths that go with it (UniMatch V2's official table)."""

    embed_dim: int
    depth: int
    heads: int
    layers: tuple[int, int, int, int]  # blocks (0-based) whose outputs feed the head; the last is the last block
    features: int  # the fused width
    widths: tuple[int, int, int, int]  # reassembled width per level, finest first
    timm_name: str | None  # the pretrained tag timm downloads for `pretrained = <backbone name>`
    init_values: float | None = 1e-5  # LayerScale init as timm's DINOv2 (loaded weights replace it)
    img_size: int = 518  # the position table's grid: 37 x 37 patches, as DINOv2's released weights


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_vits14": EncoderSpec(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384), "vit_small_patch14_dinov2.lvd142m"),
    "dinov2_vitb14": EncoderSpec(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768), "vit_base_patch14_dinov2.lvd142m"),
    "dinov2_vitl14": EncoderSpec(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024), "vit_large_patch14_dinov2.lvd142m"),
    # Not a released model: a 4-block, 64-wide ViT with patch 14 for the CPU demo and the tests,
    # always randomly initialised (no LayerScale, which would start every block near identity).
    "vit_tiny14": EncoderSpec(64, 4, 2, (0, 1, 2, 3), 16, (16, 32, 64, 64), None, init_values=None, img_size=98),
}


def require_timm() -> Any:
    """The timm module, or a one-line error naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise UserError(
            "model.arch = \"dpt\" builds its ViT encoder with timm, which is not installed: pip install 'semiseg[timm]'"
        ) from None
    return timm


def patch_multiple(side: int, patch: int = PATCH) -> int:
    """The multiple of `patch` nearest to `side` (halves round up), at least one patch. Integer
    arithmetic only, so an ONNX export keeps it a function of the input's (dynamic) size."""
    return max(patch, (side + patch // 2) // patch * patch)


# ----------------------------------------------------------------------------- the head


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convs with bias (no normalisation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: `x` is also the residual.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """One refine step: (coarser path + refined skip), refined, upsampled to `size`, 1x1 conv.
    The coarsest block has no skip (and no skip unit, so every parameter gets a gradient and DDP
    needs no `find_unused_parameters`; the official head builds one it never uses)."""

    def __init__(self, channels: int, align_corners: bool, skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels) if skip else None
        self.unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1)
        self.align_corners = align_corners

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        if skip is not None:
            assert self.skip_unit is not None, "the coarsest fusion block takes no skip"
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), size=size, mode="bilinear", align_corners=self.align_corners)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Four (B, D, h, w) token maps (finest first in the list order of the encoder's blocks) ->
    class scores at 8x the patch grid."""

    def __init__(self, in_dim: int, num_classes: int, features: int, widths: tuple[int, ...], align_corners: bool) -> None:
        super().__init__()
        self.project = nn.ModuleList([nn.Conv2d(in_dim, w, 1) for w in widths])
        self.resample = nn.ModuleList([
            nn.ConvTranspose2d(widths[0], widths[0], 4, stride=4),  # 4x the patch grid
            nn.ConvTranspose2d(widths[1], widths[1], 2, stride=2),  # 2x
            nn.Identity(),  # 1x
            nn.Conv2d(widths[3], widths[3], 3, stride=2, padding=1),  # 1/2x (ceil)
        ])
        self.to_features = nn.ModuleList([nn.Conv2d(w, features, 3, padding=1, bias=False) for w in widths])
        self.refine = nn.ModuleList([FusionBlock(features, align_corners, skip=i < 3) for i in range(4)])
        self.classifier = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(features, num_classes, 1)
        )

    def forward(self, maps: list[Tensor]) -> Tensor:
        levels = [f(r(p(m))) for m, p, r, f in zip(maps, self.project, self.resample, self.to_features)]
        sizes = [tuple(lv.shape[-2:]) for lv in levels]
        x = self.refine[3](levels[3], None, sizes[2])
        x = self.refine[2](x, levels[2], sizes[1])
        x = self.refine[1](x, levels[1], sizes[0])
        x = self.refine[0](x, levels[0], (2 * sizes[0][0], 2 * sizes[0][1]))
        return self.classifier(x)


# ----------------------------------------------------------------------------- the network


class DPT(SegModel):
    """A timm VisionTransformer (`backbone`, base LR) under a `DPTHead` (`head`, LR x
    `head_lr_mult`). Returns `logits` at the input size and `feat`, the last token map."""

    def __init__(
        self, vit: nn.Module, layers: tuple[int, ...], num_classes: int, features: int, widths: tuple[int, ...],
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"DPT takes four encoder blocks and four widths (got {layers}, {widths})")
        self.backbone = vit
        self.layers = tuple(int(i) for i in layers)
        self.embed_dim = int(vit.embed_dim)
        self.align_corners = align_corners
        self.head = DPTHead(self.embed_dim, num_classes, features, widths, align_corners)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The four normalised token maps (B, D, H/14, W/14); sides must be multiples of 14."""
        return self.backbone.forward_intermediates(
            x, indices=list(self.layers), norm=True, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )

    def forward(self, x: Tensor, channel_scale: Tensor | None = None) -> dict[str, Tensor]:
        """`channel_scale` (B, D) multiplies every encoder map per sample and channel before the
        head (1 everywhere is the plain forward)."""
        h, w = x.shape[-2:]
        # Always resized, also to its own size (an exact copy): a branch on the size would be
        # frozen into an exported graph at the example's side lengths.
        x = F.interpolate(x, size=(patch_multiple(h), patch_multiple(w)), mode="bilinear", align_corners=self.align_corners)
        maps = self.encode(x)
        if channel_scale is not None:
            if channel_scale.shape != (x.shape[0], self.embed_dim):
                raise ValueError(
                    f"channel_scale must be (batch, embed_dim) = ({x.shape[0]}, {self.embed_dim}), got {tuple(channel_scale.shape)}"
                )
            scale = channel_scale[:, :, None, None]
            maps = [m * scale.to(m.dtype) for m in maps]
        logits = F.interpolate(self.head(maps), size=(h, w), mode="bilinear", align_corners=self.align_corners)
        return {"logits": logits, "feat": maps[-1]}


# ----------------------------------------------------------------------------- building, weights


def build_vit(spec: EncoderSpec) -> nn.Module:
    """A randomly initialised timm VisionTransformer for `spec`, any input of whole patches."""
    require_timm()
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=spec.img_size, patch_size=PATCH, embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.heads,
        mlp_ratio=4.0, init_values=spec.init_values, num_classes=0, dynamic_img_size=True,
    )


def build_dpt(model_cfg: ModelConfig, num_classes: int) -> DPT:
    """The DPT described by `model_cfg` (`backbone` one of `ENCODERS`, `pretrained` None, the
    backbone's own name for timm's DINOv2 download, or a local state dict)."""
    spec = ENCODERS.get(model_cfg.backbone)
    if spec is None:
        raise UserError(
            f'model.arch = "dpt" needs a ViT encoder as model.backbone (got {model_cfg.backbone!r}); '
            f"choose one of {', '.join(ENCODERS)}"
        )
    unused = [k for k, bad in (("rep_head", model_cfg.rep_head), ("aux_head", model_cfg.aux_head),
                               ("freeze_bn", model_cfg.freeze_bn != "none")) if bad]
    if unused:
        raise UserError(
            f'model.{unused[0]} applies to DeepLab only, not arch = "dpt" (no BatchNorm, no such head); remove it'
        )
    vit = build_vit(spec)
    if model_cfg.pretrained:
        load_encoder_weights(vit, model_cfg.pretrained, model_cfg.backbone)
    return DPT(vit, spec.layers, num_classes, spec.features, spec.widths, model_cfg.align_corners)


def _download(spec: EncoderSpec) -> Mapping[str, Any]:
    """timm's pretrained DINOv2 weights (needs a network; cached by timm/huggingface_hub)."""
    timm = require_timm()
    try:
        return timm.create_model(spec.timm_name, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # no network, proxy, missing huggingface_hub, disk full...
        raise UserError(
            f"could not download {spec.timm_name} through timm ({type(e).__name__}); download it where there is "
            "a network and pass model.pretrained=PATH to its .safetensors or .pth"
        ) from None


def _read_file(source: str) -> Mapping[str, Any]:
    p = Path(source).expanduser()
    if not p.is_file():
        names = ", ".join(n for n, s in ENCODERS.items() if s.timm_name)
        raise UserError(
            f"model.pretrained file {source} does not exist; give a local .pth/.safetensors state dict, "
            f"or the backbone's own name ({names}) to download DINOv2 through timm"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file  # installed with timm

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read model.pretrained file {source} as a state dict ({type(e).__name__})") from None
    for key in ("model", "state_dict"):  # training checkpoints keep the weights under one of these
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise UserError(f"model.pretrained file {source} holds a {type(obj).__name__}, not a state dict")
    return obj


def encoder_state(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The encoder's tensors of a state dict: DDP's `module.` dropped and, when the file is a
    whole segmentation model (ours, or UniMatch V2's official DPT), only its `backbone.` part."""
    out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items() if isinstance(v, Tensor)}
    if any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def load_encoder_weights(vit: nn.Module, source: str, backbone: str) -> None:
    """Load `source` into a timm ViT built for `backbone`: the backbone's own name (or its timm
    tag) downloads DINOv2 through timm; anything else is a local file in timm's naming or in
    DINOv2's original one (converted by timm). Every encoder tensor must be found with its shape;
    a position table of another grid is resampled."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    spec = ENCODERS[backbone]
    named = {n for n, s in ENCODERS.items() if s.timm_name} | {s.timm_name for s in ENCODERS.values() if s.timm_name}
    if source in (backbone, spec.timm_name) and spec.timm_name:
        state: Mapping[str, Any] = _download(spec)
    elif source in named:
        raise UserError(
            f"model.pretrained = {source!r} names another encoder than model.backbone = {backbone!r}; "
            f"set model.pretrained = {backbone!r} (or a path)"
        )
    else:
        state = _read_file(source)
    own = vit.state_dict()
    filtered = checkpoint_filter_fn(encoder_state(state), vit)
    picked = {k: v for k, v in filtered.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in picked]
    if missing:
        k = missing[0]
        found = f", found with shape {tuple(filtered[k].shape)} instead of {tuple(own[k].shape)}" if k in filtered else ""
        raise UserError(
            f"model.pretrained {source} lacks {len(missing)} of {len(own)} tensors of the {backbone} encoder "
            f"(first: {k}{found}); is it a {backbone} state dict?"
        )
    vit.load_state_dict(picked)
    log.info("loaded %s encoder weights from %s", backbone, source)
