"""Reading one image or mask file, and checking many of them quickly.

Images are decoded completely when checked (a truncated JPEG has a valid header and fails only
when its pixels are read); masks are read as their stored values (palette index, grey value or
16-bit) and colour masks are refused here, because mapping colours to classes needs a palette
file (`palette.py`, used by the folder layout).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

class Scan(NamedTuple):
    problems: list[str]
    present: dict[str, list[int]]  # class ids (no ignore) per image with a readable mask
    with_ignore: set[str]  # images whose mask has ignored pixels


class _Unreadable(Exception):
    """A file that is missing or cannot be decoded; the reason becomes part of a message."""


class _ColourImage(_Unreadable):
    """A mask that is a colour image where class values were expected (a layout that can read
    colours through a palette file says so in its message)."""


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image that decodes completely.

    The whole file is decoded, not just the header: a truncated JPEG has a valid header and
    fails only when its pixels are read, which would otherwise happen mid-training."""
    if not path.is_file():
        raise _Unreadable("file does not exist" if not path.is_symlink() else "broken or looping symlink")
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()
        return size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _Unreadable(str(e) or type(e).__name__) from None


def _load_mask(path: Path) -> np.ndarray:
    """The stored values of a mask as a 2-D integer array (palette index, grey value or 16-bit).

    Colour-coded RGB masks are refused: mapping colours to classes is ambiguous (JPEG-like
    artefacts, anti-aliased edges) and belongs in a conversion step, not in the reader.
    """
    if not path.is_file():
        raise _Unreadable("file does not exist")
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _Unreadable(str(e) or type(e).__name__) from None
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise _ColourImage("it is a colour image; store class ids as a palette or greyscale PNG")
        arr = arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def _present_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a bincount for uint8 since it avoids np.unique's sort."""
    if arr.dtype == np.uint8:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    return np.unique(arr).astype(np.int64)


def _thread_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Map in threads: PIL decoding releases the GIL, so big pools validate several times faster."""
    if len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        return list(ex.map(fn, items, chunksize=16))


# ----------------------------------------------------------------------------- training reads


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """(width, height) of an image of `size` scaled by `factor` (data.resize), at least 1x1."""
    w, h = size
    return max(1, round(w * factor)), max(1, round(h * factor))


JPEG_SUFFIXES = (".jpg", ".jpeg")


def read_rgb_scaled(path: Path, factor: float) -> tuple[Image.Image, tuple[int, int], bool]:
    """The image at `path` as RGB at `scaled_size(stored size, factor)`, a JPEG decoded at reduced
    size first (Pillow's draft mode: libjpeg's DCT scaling to 1/2, 1/4 or 1/8) when that size is
    still at least the target; returns (image, stored size, whether the draft reduced the decode).

    Only for `factor < 1` (a downscale the caller makes anyway): the target size is the one a full
    decode followed by the same bilinear resize gives, and the pixels differ from it by resampling
    noise only (the DCT-domain reduction averages 2x2 to 8x8 blocks before the bilinear step).
    Errors are one-line `UserError`s naming the file, as `Layout.read_image`'s."""
    from semiseg_cli.errors import UserError

    if not 0 < factor < 1:
        raise ValueError(f"read_rgb_scaled is for downscaling (factor {factor} must be in (0, 1))")
    if not path.is_file():
        raise UserError(f"image {path} does not exist; check the dataset root and split file")
    try:
        with Image.open(path) as im:
            stored = im.size
            target = scaled_size(stored, factor)
            box = None
            if im.format == "JPEG":
                # Never below `target`: the scale s <= side // target keeps ceil(side / s) >= target.
                drafted = im.draft("RGB", target)
                if drafted is not None and im.size != stored:
                    box = drafted[1]  # the stored extent in reduced pixels (side / s, not rounded up)
            image = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return image.resize(target, Image.BILINEAR, box=box), stored, box is not None
