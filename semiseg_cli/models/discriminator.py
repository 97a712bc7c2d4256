"""AdvSemiSeg's fully convolutional discriminator."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FCDiscriminator(nn.Module):
    """Five 4x4 stride-2 convs C→ndf→2ndf→4ndf→8ndf→1, LeakyReLU(0.2) after the first four,
    no normalisation (as the paper). Input: a class-probability map (softmax or one-hot);
    output: one logit per pixel, upsampled bilinearly to the input size.

    Each conv halves the map, so inputs need at least 32 pixels on each side. `align_corners`
    is that last resize's (the official code upsamples D's map with the same `align_corners=True`
    resize as the logits; semiseg passes `model.align_corners`).
    """

    def __init__(self, num_classes: int, ndf: int = 64, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        widths = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1))
            if i < 4:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, prob_map: Tensor) -> Tensor:
        h, w = prob_map.shape[-2:]
        if min(int(h), int(w)) < 32:
            raise ValueError(f"FCDiscriminator needs inputs of at least 32x32, got {int(h)}x{int(w)}")
        return F.interpolate(self.net(prob_map), size=(h, w), mode="bilinear", align_corners=self.align_corners)
