"""Backbones: dilated torchvision ResNets and MobileNetV2, returning three feature levels.

Every backbone returns `{"low": stride-4, "mid": layer3-level, "out": final}` and states its
channel counts, so heads never need to know which backbone they sit on. Dilation replaces the
last strides to reach output stride 8 or 16; inputs need not be multiples of 32 (feature maps are
`ceil(H / stride)` on a side).

Parameter names follow torchvision (`conv1`, `layer1.0.conv1`, `features.3.conv.0.0`, ...), so
torchvision checkpoints and our own saved models load by name. The deep stem is named as in
U2PL's ResNet (`conv1.0/.3/.6` convolutions, `bn1` after the third), so U2PL's ImageNet
`resnet101.pth` loads as well.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from semiseg_cli.errors import UserError

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v2")

# Prefixes that checkpoints put in front of backbone keys (DDP, a whole segmentation model,
# torchvision's MobileNetV2). They are stripped from both sides before matching names.
_PREFIXES = ("module.", "backbone.", "features.")


class Backbone(nn.Module):
    """Base class: `forward(x) -> {"low", "mid", "out"}` plus the channel count of each."""

    low_channels: int
    mid_channels: int
    out_channels: int
    output_stride: int
    # (matched, total) tensors after loading pretrained weights; None for random init.
    pretrained_report: tuple[int, int] | None = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- ResNet


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    """Dilate a 3x3 conv in place, keeping the output size ('same' padding)."""
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a BasicBlock stage's stride 2 into dilation (torchvision refuses this for BasicBlock).

    Mirrors torchvision's Bottleneck convention: the first block's strided conv keeps the
    previous stage's rate, everything after it uses the new rate.
    """
    for i, block in enumerate(layer):
        assert isinstance(block, BasicBlock)
        if i == 0:
            block.conv1.stride = (1, 1)
            _set_dilation(block.conv1, previous)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
            block.stride = 1
        else:
            _set_dilation(block.conv1, dilation)
        _set_dilation(block.conv2, dilation)


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming fan_out normal for every conv (zero bias), weight 1 / bias 0 for every BatchNorm.

    For freshly built layers that are followed by BN + ReLU: the deep stem here, the DeepLab
    heads in `deeplab.py`. Not for a final classifier conv (see `deeplab._init_classifier`).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBackbone(Backbone):
    """A torchvision ResNet without `avgpool`/`fc`; layer1 = low, layer3 = mid, layer4 = out."""

    def __init__(
        self,
        name: str,
        output_stride: int = 16,
        deep_stem: bool = False,
        multi_grid: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise UserError(f"model.output_stride must be 8 or 16 (got {output_stride})")
        # Which of layer2/3/4 trade their stride for dilation.
        dilate = [False, output_stride == 8, True]
        if name == "resnet18":
            net: ResNet = tvm.resnet18(weights=None)
        elif name == "resnet50":
            net = tvm.resnet50(weights=None, replace_stride_with_dilation=dilate)
        elif name == "resnet101":
            net = tvm.resnet101(weights=None, replace_stride_with_dilation=dilate)
        else:  # pragma: no cover - guarded by build_backbone
            raise ValueError(name)
        if name == "resnet18":
            rate = 1
            for layer, d in zip((net.layer2, net.layer3, net.layer4), dilate):
                if d:
                    _dilate_basic_layer(layer, rate, rate * 2)
                    rate *= 2

        if deep_stem:
            # ResNetV1c-style stem (3x3 convs 3→64→64→128), laid out as U2PL's ResNet.
            net.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, 3, padding=1, bias=False),
            )
            net.bn1 = nn.BatchNorm2d(128)
            # Rebuild layer1 for 128 input channels with torchvision's own layer factory.
            block = type(net.layer1[0])
            net.inplanes, net.dilation = 128, 1
            net.layer1 = net._make_layer(block, 64, len(net.layer1))
            init_conv_bn(net.conv1)
            init_conv_bn(net.bn1)
            init_conv_bn(net.layer1)

        if multi_grid is not None:
            blocks = list(net.layer4)
            if len(multi_grid) != len(blocks):
                raise UserError(
                    f"model.multi_grid has {len(multi_grid)} entries but {name}'s layer4 has "
                    f"{len(blocks)} blocks; use resnet50/resnet101 or set multi_grid to none"
                )
            # Multiply each block's existing rate: with torchvision's layout (the first block
            # keeps the previous stage's rate) this reproduces U2PL's code, e.g. (2, 2, 4) at
            # output stride 8 gives rates 4, 8, 16.
            for block, mult in zip(blocks, multi_grid):
                for m in block.modules():
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                        _set_dilation(m, m.dilation[0] * int(mult))

        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if name != "resnet18" else 1
        self.low_channels = 64 * expansion
        self.mid_channels = 256 * expansion
        self.out_channels = 512 * expansion
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        mid = self.layer3(self.layer2(low))
        out = self.layer4(mid)
        return {"low": low, "mid": mid, "out": out}


# ----------------------------------------------------------------------------- MobileNetV2


class MobileNetV2Backbone(Backbone):
    """torchvision `mobilenet_v2().features`: low = block 3 (24 ch, stride 4), mid = block 13
    (96 ch, stride 16), out = block 18 (the final 1x1 conv, 1280 ch, so ImageNet checkpoints of
    the whole feature extractor load completely)."""

    _LOW_END, _MID_END = 4, 14  # features[:4] -> low, features[4:14] -> mid, rest -> out

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise UserError(f"model.output_stride must be 8 or 16 (got {output_stride})")
        self.features = tvm.mobilenet_v2(weights=None).features
        # Walk the 3x3 convs in order: strides beyond `output_stride` become dilation. As for
        # ResNets, the conv that loses its stride keeps the previous rate.
        stride, rate = 1, 1
        for m in self.features.modules():
            if not (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
                continue
            if m.stride == (2, 2):
                if stride * 2 > output_stride:
                    m.stride = (1, 1)
                    _set_dilation(m, rate)
                    rate *= 2
                    continue
                stride *= 2
            _set_dilation(m, rate)
        self.low_channels, self.mid_channels, self.out_channels = 24, 96, 1280
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low = self.features[: self._LOW_END](x)
        mid = self.features[self._LOW_END : self._MID_END](low)
        out = self.features[self._MID_END :](mid)
        return {"low": low, "mid": mid, "out": out}


# ----------------------------------------------------------------------------- weights


def _canonical(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _unwrap(obj: Any) -> Any:
    """A training checkpoint keeps its weights under "state_dict" or "model" (possibly nested)."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            for k in ("state_dict", "model"):
                if isinstance(obj.get(k), Mapping):
                    obj = obj[k]
                    break
            else:
                return obj
    return obj


def load_backbone_weights(backbone: Backbone, state: Mapping[str, Any], source: str) -> int:
    """Load the tensors of `state` whose name (prefixes stripped) and shape match; return how many.

    Loading is non-strict because checkpoints carry heads and classifiers the backbone lacks,
    but a file that matches fewer than half of the backbone's tensors is almost certainly for
    another network, so that is a UserError rather than a silently random backbone.
    """
    own = backbone.state_dict()
    by_canon = {_canonical(k): k for k in own}
    picked: dict[str, Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            continue
        target = by_canon.get(_canonical(str(k)))
        if target is not None and own[target].shape == v.shape:
            picked[target] = v
    total = len(own)
    if len(picked) * 2 < total:
        raise UserError(
            f"pretrained weights {source} match only {len(picked)} of {total} tensors of the "
            f"{type(backbone).__name__} by name and shape; is it a checkpoint for this backbone "
            "(and deep_stem setting)?"
        )
    backbone.load_state_dict(picked, strict=False)
    backbone.pretrained_report = (len(picked), total)
    log.info("loaded %d of %d backbone tensors from %s", len(picked), total, source)
    return len(picked)


def _read_state_file(path: str) -> Mapping[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"model.pretrained file {path} does not exist; give a local state dict, \"imagenet\" or none"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all mean "not a state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot read model.pretrained file {path} as a PyTorch state dict ({first[:120]}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise UserError(f"model.pretrained file {path} holds a {type(obj).__name__}, not a state dict")
    return obj


_IMAGENET_WEIGHTS = {
    "resnet18": lambda: tvm.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": lambda: tvm.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": lambda: tvm.ResNet101_Weights.IMAGENET1K_V1,
    "mobilenet_v2": lambda: tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
}


def _imagenet_state(name: str) -> Mapping[str, Any]:
    """torchvision's ImageNet weights (downloaded once into the torch hub cache)."""
    weights = _IMAGENET_WEIGHTS[name]()
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # no network, proxy, disk full...
        raise UserError(
            f"could not download ImageNet weights for {name} ({type(e).__name__}: {str(e)[:100]}); "
            "download them elsewhere and pass model.pretrained=PATH"
        ) from None


def build_backbone(
    name: str,
    output_stride: int = 16,
    pretrained: str | None = None,
    deep_stem: bool = False,
    multi_grid: tuple[int, ...] | None = None,
) -> Backbone:
    """Build a backbone and optionally load weights: None, "imagenet" or a path to a state dict."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "mobilenet_v2":
        if deep_stem:
            raise UserError("model.deep_stem applies to ResNets only; set it to false for mobilenet_v2")
        if multi_grid is not None:
            raise UserError("model.multi_grid applies to ResNets only; set it to none for mobilenet_v2")
    if pretrained == "imagenet" and deep_stem:
        raise UserError(
            "torchvision has no ImageNet weights for the deep stem; set model.deep_stem=false or "
            "give model.pretrained a local deep-stem checkpoint (e.g. U2PL's resnet101.pth)"
        )
    backbone: Backbone
    if name == "mobilenet_v2":
        backbone = MobileNetV2Backbone(output_stride)
    else:
        backbone = ResNetBackbone(name, output_stride, deep_stem, multi_grid)
    if pretrained == "imagenet":
        load_backbone_weights(backbone, _imagenet_state(name), f"torchvision ImageNet {name}")
    elif pretrained:
        load_backbone_weights(backbone, _read_state_file(pretrained), pretrained)
    return backbone
