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
