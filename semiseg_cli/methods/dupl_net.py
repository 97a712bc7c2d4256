"""DuPL's dual network: two sub-networks of identical structure with independent weights.

Each sub-network: a backbone returning `{"mid", "out"}` feature maps, a bias-free 1x1 classifier
on global-max-pooled `out` features (its weights also give the CAMs), an auxiliary classifier of
the same kind on `mid` (the 3rd-last ViT block, or the CNN's layer3-level features), and a
LargeFOV segmentation head on `out`.

Backbones: `"vit_b_16"` (`semiseg_cli.models.vit`, the paper's DeiT-B/16 layout) or `"cnn"`
(`semiseg_cli.models.backbones`, so DuPL runs on a CPU).

`DualNet.forward(x)` is the inference interface (`{"logits"}` at the input size, from sub-net 1
or the mean of both); `forward(x, strong, train_outputs=True)` returns everything training needs
in one call, so DDP sees exactly one forward per step. `SingleNet` is the same interface over one
sub-network: the single-network weak baseline (`methods/cam_baseline.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.errors import UserError


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: two 3x3 convs (dilation 5, `channels` wide, ReLU), then 1x1.

    No biases, as the official code (no normalisation layer follows them either).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5) -> None:
        super().__init__()
        self.conv6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(channels, num_classes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv8(self.relu(self.conv7(self.relu(self.conv6(x)))))


class DuPLSubNet(nn.Module):
    """Backbone + CAM classifier (global max pooling) + auxiliary classifier + LargeFOV head."""

    def __init__(self, backbone: nn.Module, num_classes: int, seg_channels: int = 512, seg_dilation: int = 5) -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(f"DuPL needs a background class 0 and at least one foreground class (got {num_classes} classes)")
        self.backbone = backbone
        out_ch, mid_ch = int(backbone.out_channels), int(backbone.mid_channels)
        self.classifier = nn.Conv2d(out_ch, num_classes - 1, 1, bias=False)
        self.aux_classifier = nn.Conv2d(mid_ch, num_classes - 1, 1, bias=False)
        self.seg_head = LargeFOV(out_ch, num_classes, seg_channels, seg_dilation)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        feat, mid = f["out"], f["mid"]
        cls = self.classifier(F.adaptive_max_pool2d(feat, 1)).flatten(1)
        cls_aux = self.aux_classifier(F.adaptive_max_pool2d(mid, 1)).flatten(1)
        return {"cls": cls, "cls_aux": cls_aux, "seg": self.seg_head(feat), "feat": feat}

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Raw CAMs (B, C-1, h, w): the classifier's weights applied to every feature vector."""
        return F.conv2d(self.backbone(x)["out"], self.classifier.weight)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits at the feature stride."""
        return self.seg_head(self.backbone(x)["out"])


class DualNet(nn.Module):
    """The two sub-networks. See the module docstring for the two forward modes."""

    def __init__(self, net1: DuPLSubNet, net2: DuPLSubNet, inference: str = "net1") -> None:
        super().__init__()
        self.net1, self.net2 = net1, net2
        self.inference = inference

    @property
    def subnets(self) -> list[DuPLSubNet]:
        return [self.net1, self.net2]

    @property
    def backbone(self) -> nn.ModuleList:
        """Both backbones (not registered twice), so `split_params` puts all of them in the
        backbone LR group. Use `net1.backbone` to run a backbone."""
        return nn.ModuleList([n.backbone for n in self.subnets])

    def forward(
        self, x: torch.Tensor, strong: torch.Tensor | None = None, train_outputs: bool = False
    ) -> dict[str, Any]:
        if not train_outputs:
            seg = self.net1.segment(x)
            if self.inference == "mean":
                seg = 0.5 * (seg + self.net2.segment(x))
            return {"logits": F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)}
        out: dict[str, Any] = {}
        for key, sub in zip(("net1", "net2"), self.subnets):
            out[key] = sub(x)
            if strong is not None:
                out[key]["seg_strong"] = sub.segment(strong)
        return out


class SingleNet(nn.Module):
    """One sub-network behind DualNet's interface: `forward(x)` gives its `{"logits"}` at the
    input size, `forward(x, train_outputs=True)` its training outputs (`DuPLSubNet.forward`)."""

    def __init__(self, net: DuPLSubNet) -> None:
        super().__init__()
        self.net = net

    @property
    def subnets(self) -> list[DuPLSubNet]:
        """As `DualNet.subnets`: code that reads every sub-net's CAMs works on either."""
        return [self.net]

    @property
    def backbone(self) -> nn.Module:
        """The sub-net's backbone (not registered twice), for the backbone LR group."""
        return self.net.backbone

    def forward(self, x: torch.Tensor, train_outputs: bool = False) -> dict[str, Any]:
        if train_outputs:
            return self.net(x)
        seg = self.net.segment(x)
        return {"logits": F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def _one_backbone(p: Any, model_cfg: Any, section: str) -> nn.Module:
    """The backbone `p.backbone` names: `model_cfg`'s CNN, or ViT-B/16 (`p.vit_pretrained`,
    `p.aux_layer`); `section` names the preset section in error messages."""
    if p.backbone == "cnn":
        from semiseg_cli.models.backbones import build_backbone

        m = model_cfg
        return build_backbone(m.backbone, m.output_stride, m.pretrained, m.deep_stem, m.multi_grid)
    from semiseg_cli.models.vit import build_vit_b16

    return build_vit_b16(p.vit_pretrained, p.aux_layer, field=f"{section}.vit_pretrained")


def _subnet(p: Any, model_cfg: Any, num_classes: int, section: str) -> DuPLSubNet:
    return DuPLSubNet(_one_backbone(p, model_cfg, section), num_classes, p.seg_channels, p.seg_dilation)


def build_dual_net(cfg: Any, num_classes: int) -> DualNet:
    """Two sub-networks from `cfg.dupl` (backbone kind, head sizes) and `cfg.model` (CNN kind).
    Training and `build_inference_model` both come through here, so a checkpoint always matches
    the rebuilt structure."""
    p = cfg.dupl
    net1, net2 = (_subnet(p, cfg.model, num_classes, "dupl") for _ in range(2))
    return DualNet(net1, net2, p.inference)


def build_single_net(cfg: Any, num_classes: int) -> SingleNet:
    """One sub-network from `cfg.cam_baseline` and `cfg.model`, as `build_dual_net` builds each of
    DuPL's two."""
    return SingleNet(_subnet(cfg.cam_baseline, cfg.model, num_classes, "cam_baseline"))
