"""ViT-B/16 as a feature-map backbone, and loading DeiT/timm or torchvision weights into it.

torchvision's `vit_b_16` has the layout of DeiT-B/16 (the backbone DuPL uses), so DeiT/timm
checkpoints only need their tensors renamed. Patch tokens become a stride-16 feature map and the
position table is interpolated (bicubic) to the input's patch grid, so any input of at least
16x16 works; inputs need not be multiples of 16 (the patch convolution floors).

The backbone returns `{"mid", "out"}` with `mid_channels`, `out_channels` and `output_stride`,
like the CNN backbones in `backbones.py`, so heads need not know which one they sit on.
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


class ViTBackbone(nn.Module):
    """A torchvision `VisionTransformer` as a feature-map backbone (its classification head dropped).

    `out`: final (layer-normed) patch tokens as (B, D, H/p, W/p); `mid`: the raw output of block
    `aux_layer` (no final norm, as DuPL's official code, except when it is the last block).
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
            raise ValueError(f"aux_layer {aux_layer} is outside the ViT's {n} blocks (-{n}..{n - 1})")
        self.aux_index = aux_layer % n
        self.mid_channels = self.out_channels = int(vit.hidden_dim)
        self.output_stride = self.patch_size

    def _pos_embedding(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        if (gh, gw) == (self.grid, self.grid):
            return pos
        cls_pos, patch = pos[:, :1], pos[:, 1:]
        patch = patch.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
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


def _read_state(source: str, field: str) -> Mapping[str, Any]:
    if source == "imagenet":
        from torchvision.models import ViT_B_16_Weights

        try:
            return ViT_B_16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # no network, proxy, disk full...
            raise UserError(
                f"could not download ImageNet ViT-B/16 weights ({type(e).__name__}); download DeiT-B or "
                f"ViT-B/16 weights elsewhere and pass {field}=PATH"
            ) from None
    p = Path(source).expanduser()
    if not p.is_file():
        raise UserError(f"{field} file {source} does not exist; give a DeiT-B/ViT-B state dict, \"imagenet\" or none")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {field} file {source} as a state dict ({type(e).__name__})") from None
    for key in ("model", "state_dict"):  # DeiT releases keep the weights under "model"
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise UserError(f"{field} file {source} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_vit_weights(vit: nn.Module, source: str, field: str = "vit_pretrained") -> None:
    """Load "imagenet" (torchvision's ViT-B/16 weights, downloaded once) or a local state dict
    (torchvision or timm/DeiT naming) into a torchvision ViT. Fails loudly when the file does not
    fit this ViT; `field` names the config field in those messages."""
    renamed = timm_vit_to_torchvision(_read_state(source, field))
    own = vit.state_dict()
    if "encoder.pos_embedding" in renamed:
        renamed["encoder.pos_embedding"] = _resize_pos_embedding(renamed["encoder.pos_embedding"], own["encoder.pos_embedding"].shape[1])
    picked = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    needed = [k for k in own if not k.startswith("heads.")]
    missing = [k for k in needed if k not in picked]
    if missing:
        raise UserError(
            f"{field} {source} lacks {len(missing)} of {len(needed)} ViT-B/16 tensors "
            f"(first: {missing[0]}); is it a DeiT-B/16 or ViT-B/16 checkpoint?"
        )
    vit.load_state_dict(picked, strict=False)
    log.info("loaded ViT-B/16 weights from %s", source)


VIT_B16_BLOCKS = 12


def build_vit_b16(pretrained: str | None = None, aux_layer: int = -3, field: str = "vit_pretrained") -> ViTBackbone:
    """ViT-B/16 (DeiT-B layout) as a backbone; `pretrained`: None, "imagenet" or a state-dict path."""
    from torchvision.models import vit_b_16

    vit = vit_b_16(weights=None)
    if pretrained:
        load_vit_weights(vit, pretrained, field)
    return ViTBackbone(vit, aux_layer)
