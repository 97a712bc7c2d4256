"""DeepLab-v3+ (U2PL's network) and DeepLab-v2 (AdvSemiSeg's), over any backbone.

Both return a dict: `logits` at the input size, `feat` (the backbone's final map), and when asked
`rep` (U2PL representation, stride 4) and `aux` (layer3 classifier, input size). Every resize
takes its size from a tensor's shape, so odd input sizes work and the graph exports to ONNX.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from semiseg_cli.errors import UserError
from semiseg_cli.models.backbones import Backbone, init_conv_bn

# "none": BN trains as usual. "affine": the backbone's BN scale/shift stay as loaded (no gradient,
# so the optimiser never sees them) while batch statistics are still used and tracked, as in
# AdvSemiSeg's official DeepLab-v2 (requires_grad False, network in train mode). "all": also the
# running statistics, used in training too (BN in eval mode), caffe's `use_global_stats`.
FreezeBN = Literal["none", "affine", "all"]


def _resize(x: Tensor, like: Tensor, align_corners: bool = False) -> Tensor:
    return _resize_to(x, like.shape[-2:], align_corners)


def _resize_to(x: Tensor, size: Any, align_corners: bool = False) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _init_classifier(conv: nn.Conv2d) -> None:
    """Small init for a final 1x1 conv that outputs class scores (no BN after it).

    Kaiming fan_out suits convs followed by BN + ReLU. On a classifier it gives std
    sqrt(2 / num_classes) (0.43 for 11 classes), so the first logits are large and the loss
    starts near 5 instead of ln(C). The large gradients that follow reach the pretrained
    backbone at its full LR and wipe out its features in the first few dozen steps: on
    CamVid (MobileNetV2, 46 labels) it cost about 8 val mIoU after 60 iterations and the
    500-iteration baseline ended at 23 mIoU, below a linear probe on the frozen features.
    Normal(0, 0.01) with zero bias is what DeepLab-v2 and mmseg's `conv_seg` use.
    """
    nn.init.normal_(conv.weight, 0.0, 0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class SegModel(nn.Module):
    """Base of every segmentation network: a `backbone` attribute, a dict-returning forward.

    The optimiser gives `backbone` the base LR and every other parameter `head_lr_mult` times it
    (parameters that do not require grad, such as frozen BN, are left out).

    `align_corners` is used by every bilinear resize inside the network, the last one being the
    logits' to the input size: False (PyTorch's default) or True (U2PL's, UniMatch's and
    AdvSemiSeg's official code). It changes the function the network computes, so a checkpoint
    should be evaluated with the value it was trained with (its config carries it).
    """

    backbone: Backbone
    align_corners: bool = False
    freeze_bn: FreezeBN = "none"

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _freeze_backbone_bn(self, mode: FreezeBN) -> None:
        """Freeze the backbone's BatchNorm (see `FreezeBN`); heads' BN is freshly initialised and
        always trains. Call once the backbone exists; `train()` then keeps the choice."""
        if mode not in ("none", "affine", "all"):
            raise ValueError(f"freeze_bn must be none, affine or all (got {mode!r})")
        self.freeze_bn = mode
        if mode != "none":
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegModel":
        """As `nn.Module.train`, except that with `freeze_bn = "all"` the backbone's BN stays in
        eval mode, so the loop's `method.train()` never starts updating its statistics."""
        super().train(mode)
        if self.freeze_bn == "all":
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class indices (B, H, W) from eval-mode logits; restores the previous train/eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self(x)["logits"].argmax(1)
        finally:
            self.train(was_training)


class AuxHead(nn.Sequential):
    """Auxiliary classifier on layer3 features (U2PL's Cityscapes recipe, weight 0.4 in the loss)."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1, channels: int = 256) -> None:
        super().__init__(conv_bn_relu(cin, channels), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class ASPP(nn.Module):
    """1x1 branch, one 3x3 atrous branch per rate, image pooling; concatenated and projected by a
    1x1 conv (DeepLab-v3+ paper; `project_kernel=3` for U2PL's 3x3 projection).

    The pooling branch has BatchNorm on a 1x1 map, so training needs at least two images per
    BN group (per GPU without SyncBN), as in every DeepLab-v3 implementation.
    """

    def __init__(self, cin: int, channels: int, dilations: tuple[int, ...], dropout: float, project_kernel: int = 1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, channels, 1)] + [conv_bn_relu(cin, channels, 3, d) for d in dilations]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, channels, 1))
        self.project = nn.Sequential(
            conv_bn_relu(channels * (len(dilations) + 2), channels, project_kernel), nn.Dropout2d(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(_resize(self.pool(x), x))  # a 1x1 map: align_corners makes no difference
        return self.project(torch.cat(outs, dim=1))


def _fused_head(cin: int, channels: int, cout: int, dropout: float) -> nn.Sequential:
    """3x3 → channels, 3x3 → channels, 1x1 → cout: U2PL's classifier and representation heads."""
    return nn.Sequential(
        conv_bn_relu(cin, channels),
        nn.Dropout2d(dropout),
        conv_bn_relu(channels, channels),
        nn.Dropout2d(dropout),
        nn.Conv2d(channels, cout, 1),
    )


class DeepLabV3Plus(SegModel):
    """ASPP on the final features, fused at stride 4 with the projected layer1 features.

    `low_proj_channels` is the width of the layer1 projection: 48 as in the DeepLab-v3+ paper
    (default); U2PL uses 256 (its heads then start from 512 channels). `aspp_project_kernel`: 1
    (paper) or 3 (U2PL).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aspp_dilations: tuple[int, ...],
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        dropout: float = 0.1,
        rep_head: bool = False,
        rep_dim: int = 256,
        aux_head: bool = False,
        low_proj_channels: int = 48,
        aspp_project_kernel: int = 1,
        align_corners: bool = False,
        freeze_bn: FreezeBN = "none",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.align_corners = align_corners
        self.aspp = ASPP(backbone.out_channels, aspp_channels, tuple(aspp_dilations), dropout, aspp_project_kernel)
        self.low_proj = conv_bn_relu(backbone.low_channels, low_proj_channels, 1)
        fused = aspp_channels + low_proj_channels
        self.classifier = _fused_head(fused, decoder_channels, num_classes, dropout)
        self.aux = AuxHead(backbone.mid_channels, num_classes, dropout) if aux_head else None
        for m in (self.aspp, self.low_proj, self.classifier, self.aux):
            if m is not None:
                init_conv_bn(m)
        # The layers that output class scores get a small init (see `_init_classifier`).
        _init_classifier(self.classifier[-1])
        if self.aux is not None:
            _init_classifier(self.aux[-1])
        # The representation head is built last, so with the same seed every other weight starts
        # the same with or without it: a U2PL run and its supervised baseline share their init.
        self.rep = _fused_head(fused, decoder_channels, rep_dim, dropout) if rep_head else None
        if self.rep is not None:
            init_conv_bn(self.rep)
        self._freeze_backbone_bn(freeze_bn)

    def forward(self, x: Tensor, feature_dropout: float = 0.0) -> dict[str, Tensor]:
        """Logits (and `rep`/`aux`); with `feature_dropout` > 0 also `logits_fp`: the same encoder
        features decoded again after Dropout2d on the low- and high-level ones (UniMatch's
        feature perturbation, in the same call so DDP sees one forward)."""
        f = self.encode(x)
        if not feature_dropout:
            return self.decode(f, x.shape[-2:])
        n = x.shape[0]
        both = {k: torch.cat([v, F.dropout2d(v, feature_dropout, self.training)]) if k in ("low", "out") else torch.cat([v, v])
                for k, v in f.items()}
        out = self.decode(both, x.shape[-2:])
        res = {k: v[:n] for k, v in out.items()}
        res["logits_fp"] = out["logits"][n:]
        return res

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """The encoder's features: `low` (stride 4), `mid` (stride 16) and `out` (the last stage).
        With `decode`, the split a feature-perturbation stream needs (UniMatch decodes the same
        features again after dropout)."""
        return self.backbone(x)

    def decode(self, f: dict[str, Tensor], size: tuple[int, int] | torch.Size) -> dict[str, Tensor]:
        """Logits at `size` (and `rep`/`aux` when those heads exist) from `encode`'s features."""
        ac = self.align_corners
        low = self.low_proj(f["low"])
        fused = torch.cat([low, _resize(self.aspp(f["out"]), low, ac)], dim=1)
        out = {"logits": _resize_to(self.classifier(fused), size, ac), "feat": f["out"]}
        if self.rep is not None:
            out["rep"] = self.rep(fused)
        if self.aux is not None and "mid" in f:
            out["aux"] = _resize_to(self.aux(f["mid"]), size, ac)
        return out


class DeepLabV2(SegModel):
    """DeepLab-v2: the ASPP classifier is a sum of 3x3 dilated convs from the backbone's final
    features straight to class scores (no BN, no decoder).

    The paper sums four branches (rates 6, 12, 18, 24). AdvSemiSeg's official `Classifier_Module`
    returns inside its loop after adding the second branch, so its network sums only two: pass
    `branches=2` to reproduce that code.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        dilations: tuple[int, ...] = (6, 12, 18, 24),
        branches: int = 4,
        aux_head: bool = False,
        dropout: float = 0.1,
        align_corners: bool = False,
        freeze_bn: FreezeBN = "none",
    ) -> None:
        super().__init__()
        if branches > len(dilations):
            raise UserError(
                f"model.v2_branches={branches} needs at least {branches} model.aspp_dilations "
                f"(got {tuple(dilations)})"
            )
        self.backbone = backbone
        self.align_corners = align_corners
        self.classifier = nn.ModuleList(
            [nn.Conv2d(backbone.out_channels, num_classes, 3, padding=d, dilation=d) for d in dilations[:branches]]
        )
        for conv in self.classifier:
            nn.init.normal_(conv.weight, 0.0, 0.01)  # as the official code
            nn.init.zeros_(conv.bias)
        self.aux = AuxHead(backbone.mid_channels, num_classes, dropout) if aux_head else None
        if self.aux is not None:
            init_conv_bn(self.aux)
            _init_classifier(self.aux[-1])
        self._freeze_backbone_bn(freeze_bn)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.backbone(x)
        logits = self.classifier[0](f["out"])
        for conv in self.classifier[1:]:
            logits = logits + conv(f["out"])
        out = {"logits": _resize(logits, x, self.align_corners), "feat": f["out"]}
        if self.aux is not None:
            out["aux"] = _resize(self.aux(f["mid"]), x, self.align_corners)
        return out
