"""Colours for looking at label maps: a display palette that stays legible on any image, and the
functions that paint masks with it.

Label *files* keep their dataset's palette (VOC's bit-spread scheme for datasets without one of
their own, so they open as expected in other tools). For *pictures* that scheme fails: class 0 is
black and class 1 dark red, invisible on dark images and indistinguishable in two-class data. Where
a dataset brings its own colours (CamVid, Cityscapes, a palette.txt) those are shown; otherwise the
display palette below: background a neutral dark grey, then saturated colours of well-separated hue
and lightness, in an order where the first few (the classes two- and three-class data use) contrast
most. Ignored pixels (255) are drawn white.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

IGNORE = 255
IGNORE_COLOUR = (255, 255, 255)
# Background, then bright colours ordered for contrast with each other and with the grey.
_FIXED = [
    (64, 64, 64), (255, 200, 0), (0, 170, 255), (255, 60, 140), (40, 220, 90), (170, 90, 255),
    (255, 120, 30), (0, 230, 220), (210, 255, 60), (255, 150, 210), (30, 90, 220), (150, 60, 20),
    (0, 130, 80), (255, 255, 150), (120, 0, 160), (180, 180, 255), (220, 0, 40), (120, 150, 0),
    (0, 90, 120), (250, 210, 170),
]


def _index_palette(n: int) -> list[tuple[int, int, int]]:
    from semiseg_cli.data.layouts import index_palette

    return index_palette(n)


def display_palette(n: int, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(n, 3) uint8 colours to draw `n` classes with: the dataset's own palette when it has one
    (not the default VOC index scheme) and its colours are distinct, else the legible one."""
    if palette is not None and len(palette) == n:
        own = [tuple(int(v) for v in c) for c in palette]
        if own != _index_palette(n) and len(set(own)) == n:
            return np.asarray(own, np.uint8)
    colours = list(_FIXED[:n])
    k = 0
    while len(colours) < n:  # beyond the fixed list: golden-ratio hues, alternating lightness
        h = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hls_to_rgb(h, 0.45 if k % 2 else 0.65, 0.9)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
        k += 1
    return np.asarray(colours, np.uint8)


def lookup_table(colours: np.ndarray) -> np.ndarray:
    """(256, 3) uint8: a colour per label value; 255 (ignore) white, unused values black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(colours)] = colours
    table[IGNORE] = IGNORE_COLOUR
    return table


def colorize(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """HxW label map -> HxWx3 uint8 picture."""
    return lookup_table(colours)[np.asarray(mask, np.uint8)]


def blend(rgb: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the colour labels laid over it (ignored pixels left as the image)."""
    paint = colorize(mask, colours).astype(np.float32)
    out = rgb.astype(np.float32) * (1 - alpha) + paint * alpha
    keep = np.asarray(mask) == IGNORE
    out[keep] = rgb[keep]
    return out.round().clip(0, 255).astype(np.uint8)
