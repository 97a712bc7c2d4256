"""The pieces FixMatch and UniMatch share, as pure functions of tensors (each unit-tested by hand).

- `cutmix_box`: one random box per image, or none, with the official code's rule: probability
  0.5, area uniform in [0.02, 0.4] of the crop, aspect ratio uniform in [0.3, 1/0.3], the position
  drawn again until the box fits.
- `mix`: inside an image's box, everything comes from its partner (a second unlabeled batch):
  pixels of the partner's strong view, its pseudo-label, its confidence and its padding mask.
- `masked_ce`: cross-entropy on the pixels whose confidence reaches tau and that are not crop
  padding, *summed and divided by the number of non-padding pixels* (not by the confident ones):
  the official normalisation, which makes the loss shrink while few pixels are confident.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def cutmix_box(
    batch: int,
    height: int,
    width: int,
    prob: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, H, W) bool: True inside the box pasted from the partner; all False for an image whose
    coin (`prob`) says no CutMix. Drawn on the CPU generator (reproducible, no device sync)."""
    out = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(batch):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        size = (area[0] + float(torch.rand((), generator=generator)) * (area[1] - area[0])) * height * width
        for _ in range(1000):  # rejection sampling as the official code; 1000 tries never run out in practice
            r = ratio[0] + float(torch.rand((), generator=generator)) * (ratio[1] - ratio[0])
            w, h = int(math.sqrt(size / r)), int(math.sqrt(size * r))
            x = int(torch.randint(0, width, (), generator=generator))
            y = int(torch.randint(0, height, (), generator=generator))
            if x + w <= width and y + h <= height:
                out[i, y : y + h, x : x + w] = True
                break
    return out


def mix(box: Tensor, own: Tensor, partner: Tensor) -> Tensor:
    """`partner` inside each image's box, `own` elsewhere; `own` is (B, H, W) or (B, C, H, W)."""
    m = box.to(own.device)
    if own.dim() == 4:
        m = m.unsqueeze(1)
    return torch.where(m, partner, own)


def masked_ce(logits: Tensor, target: Tensor, conf: Tensor, valid: Tensor, tau: float) -> Tensor:
    """sum over pixels with conf >= tau and valid of CE(logits, target), / number of valid pixels.

    `target` holds class ids (no ignore value: pseudo-labels are argmaxes), `valid` is False on
    crop padding. Nothing valid gives a zero that still depends on `logits` (DDP needs the graph).
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    keep = (conf >= tau) & valid
    return (ce * keep).sum() / valid.sum().clamp(min=1)


def confident_fraction(conf: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Share of the non-padding unlabeled pixels whose pseudo-label is used (conf >= tau)."""
    return ((conf >= tau) & valid).sum() / valid.sum().clamp(min=1)
