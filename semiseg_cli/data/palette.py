"""Colour-coded masks: a palette file that maps RGB colours to class ids, and the mapping itself.

A palette file has one line per class, in class-id order: `R G B name` (or `R,G,B name`), with
R, G and B in 0..255; names may contain spaces. A line whose name is `ignore` or `void` (any
case) names a colour of pixels to ignore (255): it takes no class id, so it may stand anywhere.
Blank lines and lines starting with `#` are skipped. Every colour may appear once.

Masks are then read by their colour, whatever their PNG mode: RGB(A) pixels directly, greyscale
values v as the colour (v, v, v) (so 0/255 binary masks work with `0 0 0 background` and
`255 255 255 foreground`), palette (P) PNGs by the colour of each index, except index 255, which
is always ignore: that is how this tool writes unreliable pixels of pseudo-labels, whose other
indices carry the dataset's palette colours. A colour the file does not define is an error that
names the file, the colour, where it first occurs and on how many pixels.

The mapping is vectorised: RGB is packed into one integer per pixel and looked up in the sorted
palette with `np.searchsorted`; single-channel masks go through a 256-entry table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semiseg_cli.data.reading import _Unreadable
from semiseg_cli.errors import UserError
from semiseg_cli.io import read_text

IGNORE = 255
IGNORE_NAMES = ("ignore", "void")
_LINE = re.compile(r"^\s*(\d{1,3})\s*[,\s]\s*(\d{1,3})\s*[,\s]\s*(\d{1,3})[\s,]+(\S.*?)\s*$")
# Unknown colours beyond this many usually mean smoothed edges or lossy compression.
_MANY_UNKNOWN = 10


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32 0xRRGGBB."""
    rgb = rgb.astype(np.uint32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass(frozen=True)
class ColourPalette:
    """Class colours (in class-id order) and ignore colours read from one palette file."""

    path: Path
    names: list[str]
    colours: list[tuple[int, int, int]]
    ignore_colours: list[tuple[int, int, int]]

    def __post_init__(self) -> None:
        keys = [(r << 16) | (g << 8) | b for r, g, b in self.colours] + [(r << 16) | (g << 8) | b for r, g, b in self.ignore_colours]
        vals = list(range(len(self.colours))) + [IGNORE] * len(self.ignore_colours)
        order = np.argsort(np.array(keys, np.uint32), kind="stable")
        object.__setattr__(self, "_keys", np.array(keys, np.uint32)[order])
        object.__setattr__(self, "_vals", np.array(vals, np.uint8)[order])

    # ------------------------------------------------------------------------- mapping

    def lookup(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class ids, known) for packed 0xRRGGBB colours of any shape."""
        keys: np.ndarray = self._keys  # type: ignore[attr-defined]
        vals: np.ndarray = self._vals  # type: ignore[attr-defined]
        idx = np.searchsorted(keys, packed)
        np.minimum(idx, len(keys) - 1, out=idx)
        known = keys[idx] == packed
        return vals[idx], known

    def read_ids(self, path: Path) -> np.ndarray:
        """Class ids (uint8 HxW, 255 = ignore) of the colour mask at `path`; `_Unreadable` with
        the reason for a file that cannot be decoded or holds a colour the palette lacks."""
        if not path.is_file():
            raise _Unreadable("file does not exist")
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode == "P":
                    values = np.array(im)
                    flat = (im.getpalette() or []) + [0] * 768
                    table = np.array(flat[:768], np.uint8).reshape(256, 3)
                    return self._map_values(values, table, index_255_ignored=True)
                if mode in ("1", "L", "LA"):
                    values = np.array(im.convert("L") if mode == "1" else im)
                    values = values[..., 0] if values.ndim == 3 else values
                    table = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
                    return self._map_values(values, table, index_255_ignored=False)
                if mode in ("RGB", "RGBA", "PA"):
                    rgb = np.array(im if mode != "PA" else im.convert("RGBA"))[..., :3]
                    return self._map_rgb(rgb)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _Unreadable(str(e) or type(e).__name__) from None
        raise _Unreadable(
            f"it is a {mode} image, which cannot hold colours; with a palette file ({self.path}) "
            "masks are RGB, greyscale or palette PNGs"
        )

    def _map_rgb(self, rgb: np.ndarray) -> np.ndarray:
        packed = _pack(rgb)
        ids, known = self.lookup(packed)
        if not known.all():
            raise self._unknown(packed, ~known)
        return ids

    def _map_values(self, values: np.ndarray, table: np.ndarray, index_255_ignored: bool) -> np.ndarray:
        """Single-channel masks: each of the 256 values has one colour (`table`)."""
        ids, known = self.lookup(_pack(table))
        if index_255_ignored:
            ids[IGNORE], known[IGNORE] = IGNORE, True
        present = np.bincount(values.ravel(), minlength=256).astype(bool)
        if (present & ~known).any():
            raise self._unknown(_pack(table)[values], ~known[values])
        return ids[values]

    def _unknown(self, packed: np.ndarray, unknown: np.ndarray) -> _Unreadable:
        first = int(np.flatnonzero(unknown.ravel())[0])
        y, x = divmod(first, packed.shape[1])
        colour = int(packed.ravel()[first])
        count = int(np.count_nonzero(packed == colour))
        others = len(np.unique(packed[unknown])) - 1
        r, g, b = colour >> 16, (colour >> 8) & 255, colour & 255
        more = f"; {others} other colour{'s are' if others != 1 else ' is'} unknown too" if others else ""
        hint = (
            " (that many usually means smoothed edges or lossy compression: export the masks without anti-aliasing)"
            if others >= _MANY_UNKNOWN else ""
        )
        return _Unreadable(
            f"colour ({r}, {g}, {b}) at x={x}, y={y} ({count} pixel{'s' if count != 1 else ''}) is not in the palette "
            f"{self.path}{more}{hint}; add it to the palette as a class or as `{r} {g} {b} ignore`"
        )


# --------------------------------------------------------------------------------- file


def read_palette(path: str | Path) -> ColourPalette:
    """The palette file at `path`; every problem is a one-line `UserError` naming the line."""
    path = Path(path)
    text = read_text(path, "palette file", "save it as UTF-8 text with lines `R G B name`")
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    ignore: list[tuple[int, int, int]] = []
    first_line: dict[tuple[int, int, int], int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        rgb = tuple(int(v) for v in m.groups()[:3]) if m else ()
        if not m or max(rgb) > 255:
            raise UserError(
                f"{path} line {n}: expected `R G B name` or `R,G,B name` with R, G and B in 0..255, got {line.strip()!r}"
            )
        colour = (rgb[0], rgb[1], rgb[2])
        if colour in first_line:
            raise UserError(
                f"{path} lines {first_line[colour]} and {n} both use the colour {colour}; each colour may mean one class only"
            )
        first_line[colour] = n
        name = m.group(4)
        if name.lower() in IGNORE_NAMES:
            ignore.append(colour)
        else:
            names.append(name)
            colours.append(colour)
    if not 1 <= len(names) <= 255:
        raise UserError(
            f"palette file {path} defines {len(names)} classes; give between 1 and 255 lines `R G B name`, one per class "
            f"in class-id order (names {' and '.join(IGNORE_NAMES)} mark colours to ignore)"
        )
    return ColourPalette(path, names, colours, ignore)
