"""DuPL's dual network: two sub-networks of identical structure with independent weights.

Each sub-network: a backbone returning `{"mid", "out"}` feature maps, a bias-free 1x1 classifier
on global-max-pooled `out` features (its weights also give the CAMs), an auxiliary classifier of
the same kind on `mid` (the 3rd-last ViT block, or the CNN's layer3-level features), and a
LargeFOV segmentation head on `out`.

Backbones:
- `"vit_b_16"`: torchvision's `vit_b_16` (same layout as DeiT-B/16; DeiT/timm checkpoints are
  renamed on load). Patch tokens become a stride-16 feature map; position embeddings are
  interpolated (bicubic) to the input's patch grid, so any input of at least 16x16 works.
- `"cnn"`: the project's backbones (`semiseg_cli.models.backbones`), so DuPL runs on a CPU.

`DualNet.forward(x)` is the inference interface (`{"logits"}` at the input size, from sub-net 1
or the mean of both); `forward(x, strong, train_outputs=True)` returns everything training needs
in one call, so DDP sees exactly one forward per step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.errors import UserError

log = logging.getLogger(__name__)


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: two 3x3 convs (dilation 5, `channels` wide, ReLU), then 1x1."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5) -> None:
        super().__init__()
        self.conv6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv7 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv8 = nn.Conv2d(channels, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv8(self.relu(self.conv7(self.relu(self.conv6(x)))))


# ----------------------------------------------------------------------------- ViT


class ViTBackbone(nn.Module):
    """A torchvision `VisionTransformer` as a feature-map backbone (its classification head dropped).

    `out`: final (layer-normed) patch tokens as (B, D, H/p, W/p); `mid`: the raw output of block
    `aux_layer` (as the official code: no final norm, except when it is the last block).
    Inputs need not be multiples of the patch size (the patch conv floors); the position grid is
    interpolated whenever the patch grid differs from the one the model was built for.
    """

    def __init__(self, vit: nn.Module, aux_layer: int = -3) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.encoder = vit.encoder  # pos_embedding, dropout, layers, ln
        self.patch_size = int(vit.patch_size)
        self.grid = int(vit.image_size) // self.patch_size
        n = len(self.encoder.layers)
        if not -n <= aux_layer < n:
            raise UserError(f"dupl.aux_layer {aux_layer} is outside the ViT's {n} blocks; use -{n}..{n - 1} (paper: -3)")
        self.aux_index = aux_layer % n
        dim = int(vit.hidden_dim)
        self.mid_channels = self.out_channels = dim
        self.output_stride = self.patch_size

    def _pos_embedding(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        if (gh, gw) == (self.grid, self.grid):
            return pos
        cls_pos, patch = pos[:, :1], pos[:, 1:]
        d = patch.shape[-1]
        patch = patch.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([cls_pos, patch.flatten(2).transpose(1, 2)], 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh < 1 or gw < 1:
            raise ValueError(f"input {h}x{w} is smaller than one {self.patch_size}x{self.patch_size} patch")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.class_token.expand(b, -1, -1), tokens], 1) + self._pos_embedding(gh, gw)
        z = self.encoder.dropout(z)
        aux = z
        last = len(self.encoder.layers) - 1
        for i, layer in enumerate(self.encoder.layers):
            z = layer(z)
            if i == self.aux_index and i != last:
                aux = z
        z = self.encoder.ln(z)
        if self.aux_index == last:
            aux = z

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)

        return {"mid": to_map(aux), "out": to_map(z)}


def timm_vit_to_torchvision(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a timm/DeiT ViT state dict (`blocks.0.attn.qkv.weight`, ...) to torchvision's names.

    Keys already in torchvision form pass through; heads, distillation tokens and anything
    unknown are dropped. The fused qkv projection has the same [q; k; v] layout in both.
    """
    out: dict[str, torch.Tensor] = {}
    sub = {
        "norm1.": "ln_1.",
        "norm2.": "ln_2.",
        "attn.qkv.weight": "self_attention.in_proj_weight",
        "attn.qkv.bias": "self_attention.in_proj_bias",
        "attn.proj.": "self_attention.out_proj.",
        "mlp.fc1.": "mlp.0.",
        "mlp.fc2.": "mlp.3.",
    }
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k[len("module.") :] if k.startswith("module.") else k
        if k.startswith(("conv_proj.", "encoder.", "class_token")):
            out[k] = v
        elif k == "cls_token":
            out["class_token"] = v
        elif k == "pos_embed":
            out["encoder.pos_embedding"] = v
        elif k.startswith("patch_embed.proj."):
            out["conv_proj." + k[len("patch_embed.proj.") :]] = v
        elif k.startswith("norm."):
            out["encoder.ln." + k[len("norm.") :]] = v
        elif k.startswith("blocks."):
            _, idx, rest = k.split(".", 2)
            for a, b in sub.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            else:
                continue
            out[f"encoder.layers.encoder_layer_{idx}.{rest}"] = v
    return out


def _resize_pos_embedding(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """Bicubic resize of a (1, 1 + g*g, D) position table to `tokens` entries (a square grid)."""
    if pos.shape[1] == tokens:
        return pos
    g_old, g_new = int(round((pos.shape[1] - 1) ** 0.5)), int(round((tokens - 1) ** 0.5))
    patch = pos[:, 1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=(g_new, g_new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2).to(pos.dtype)], 1)


def load_vit_weights(vit: nn.Module, source: str) -> None:
    """Load "imagenet" (torchvision's ViT-B/16 weights, downloaded once) or a local state dict
    (torchvision or timm/DeiT naming). Fails loudly when the file does not fit this ViT."""
    if source == "imagenet":
        from torchvision.models import ViT_B_16_Weights

        try:
            state: Mapping[str, Any] = ViT_B_16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # no network, proxy, disk full...
            raise UserError(
                f"could not download ImageNet ViT-B/16 weights ({type(e).__name__}); download DeiT-B or "
                "ViT-B/16 weights elsewhere and pass dupl.vit_pretrained=PATH"
            ) from None
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise UserError(f"dupl.vit_pretrained file {source} does not exist; give a DeiT-B/ViT-B state dict, \"imagenet\" or none")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read dupl.vit_pretrained file {source} as a state dict ({type(e).__name__})") from None
        for key in ("model", "state_dict"):  # DeiT releases keep the weights under "model"
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
        if not isinstance(obj, Mapping):
            raise UserError(f"dupl.vit_pretrained file {source} holds a {type(obj).__name__}, not a state dict")
        state = obj
    renamed = timm_vit_to_torchvision(state)
    own = vit.state_dict()
    if "encoder.pos_embedding" in renamed:
        renamed["encoder.pos_embedding"] = _resize_pos_embedding(renamed["encoder.pos_embedding"], own["encoder.pos_embedding"].shape[1])
    picked = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    needed = [k for k in own if not k.startswith("heads.")]
    missing = [k for k in needed if k not in picked]
    if missing:
        raise UserError(
            f"dupl.vit_pretrained {source} lacks {len(missing)} of {len(needed)} ViT-B/16 tensors "
            f"(first: {missing[0]}); is it a DeiT-B/16 or ViT-B/16 checkpoint?"
        )
    vit.load_state_dict(picked, strict=False)
    log.info("loaded ViT-B/16 weights from %s", source)


# ----------------------------------------------------------------------------- sub-nets


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
    """The two sub-networks. See the module docstring for the two forward modes.

    `net2=None` is the single-network baseline (`dupl.single_net`): no second sub-net is built,
    the training forward returns only `"net1"`, and `inference="mean"` is refused.
    """

    def __init__(self, net1: DuPLSubNet, net2: DuPLSubNet | None, inference: str = "net1") -> None:
        super().__init__()
        if net2 is None and inference == "mean":
            raise ValueError('inference="mean" needs two sub-nets')
        self.net1, self.net2 = net1, net2
        self.inference = inference

    @property
    def subnets(self) -> list[DuPLSubNet]:
        return [self.net1] if self.net2 is None else [self.net1, self.net2]

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
            if self.inference == "mean" and self.net2 is not None:
                seg = 0.5 * (seg + self.net2.segment(x))
            return {"logits": F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)}
        out: dict[str, Any] = {}
        for key, sub in zip(("net1", "net2"), self.subnets):
            out[key] = sub(x)
            if strong is not None:
                out[key]["seg_strong"] = sub.segment(strong)
        return out


def _one_backbone(cfg: Any, vit_state_source: str | None) -> nn.Module:
    p = cfg.dupl
    if p.backbone == "cnn":
        from semiseg_cli.models.backbones import build_backbone

        m = cfg.model
        return build_backbone(m.backbone, m.output_stride, m.pretrained, m.deep_stem, m.multi_grid)
    from torchvision.models import vit_b_16

    vit = vit_b_16(weights=None)
    if vit_state_source:
        load_vit_weights(vit, vit_state_source)
    return ViTBackbone(vit, p.aux_layer)


def build_dual_net(cfg: Any, num_classes: int) -> DualNet:
    """Two sub-networks (one with `dupl.single_net`) from `cfg.dupl` (backbone kind, head sizes)
    and `cfg.model` (CNN kind). Training and `build_inference_model` both come through here, so
    a checkpoint always matches the rebuilt structure."""
    p = cfg.dupl
    nets = [
        DuPLSubNet(_one_backbone(cfg, p.vit_pretrained), num_classes, p.seg_channels, p.seg_dilation)
        for _ in range(1 if p.single_net else 2)
    ]
    return DualNet(nets[0], None if p.single_net else nets[1], p.inference)
