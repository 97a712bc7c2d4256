"""Encoding one image's outputs (PNG, NPZ, JPEG overlay, record) and writing them in threads.

What can go wrong, and what this module does about it:
- A kill mid-write must not leave half a file under a final name: every file goes through
  `atomic_path` (a temporary name, then a rename), and the record is written last, so its
  presence means every file of the image is complete.
- Disk work would serialise with inference: PNG/zlib encoding releases the GIL, so two threads
  write while the next batch runs; at most `depth` images wait, which bounds memory.
- A writer thread's error would be lost in its future: `drain` re-raises the first one, and
  `close` drains before shutting the pool down.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from semiseg_cli.io import atomic_path, write_json
from semiseg_cli.pseudo_label.folder import IGNORE, UNRELIABLE_COLOUR, record_path

if TYPE_CHECKING:  # numpy loads lazily: `semiseg --help` should not import it
    import numpy as np


def _save_png(path: Path, arr: "np.ndarray", palette: list[int] | None = None, compress_level: int = 1) -> None:
    from PIL import Image

    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(palette)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", compress_level=compress_level)


def _save_npz(path: Path, key: str, arr: "np.ndarray") -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{key: arr})


def palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    """The 768-byte PNG palette: the dataset's colours by class id, 255 = UNRELIABLE_COLOUR."""
    flat = [0] * 768
    for cid, rgb in enumerate(palette[:255]):
        flat[3 * cid : 3 * cid + 3] = [int(v) for v in rgb]
    flat[3 * IGNORE : 3 * IGNORE + 3] = list(UNRELIABLE_COLOUR)
    return flat


def overlay_colours(palette: Sequence[Sequence[int]]) -> "np.ndarray":
    """(256, 3) float32 colour per label value for overlays (unused rows, 255 included, are 0):
    the display palette (`viz.display_palette`), so overlays stay legible where the dataset has
    only the VOC index scheme (black and dark red for two classes); the label PNGs keep
    `palette_bytes`, the dataset's own colours."""
    import numpy as np

    from semiseg_cli.viz import display_palette

    colours = np.zeros((256, 3), np.float32)
    colours[: len(palette)] = display_palette(len(palette), palette).astype(np.float32)
    return colours


def overlay(rgb: "np.ndarray", label: "np.ndarray", colours: "np.ndarray", alpha: float = 0.5) -> "np.ndarray":
    """The image with the label colours blended in; unreliable pixels (255) left as they are."""
    import numpy as np

    coloured = colours[label]  # 255 -> the image itself (colours[255] is never blended)
    out = rgb.astype(np.float32)
    keep = label != IGNORE
    out[keep] = (1 - alpha) * out[keep] + alpha * coloured[keep]
    return out.clip(0, 255).astype(np.uint8)


@dataclass
class ImageOutputs:
    """One image's arrays and record, handed to a writer thread."""

    stem: str
    label: "np.ndarray"
    confidence: "np.ndarray"
    entropy: "np.ndarray"
    record: dict[str, Any]
    rgb: "np.ndarray | None" = None


class Writer:
    """Writes outputs in a small thread pool (PNG/zlib encoding releases the GIL) so disk work
    overlaps the next batch's inference; at most `depth` images wait, bounding memory.

    `fmt` is png or npz (confidence and entropy), `palette` the dataset's colours, `encoding`
    the class id -> stored mask value table for `train_labels/` (None: not written)."""

    def __init__(self, out: Path, fmt: str, palette: Sequence[Sequence[int]], encoding: "np.ndarray | None",
                 threads: int = 2, depth: int = 32) -> None:
        self.out, self.fmt, self.encoding = out, fmt, encoding
        self.palette, self.colours = palette_bytes(palette), overlay_colours(palette)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pl-writer")
        self.pending: list[Future[None]] = []
        self.depth = depth

    def submit(self, item: ImageOutputs) -> None:
        self.pending.append(self.pool.submit(self._write, item))
        while len(self.pending) > self.depth:
            self.pending.pop(0).result()

    def drain(self) -> None:
        """Wait for everything submitted; re-raise the first writer error."""
        errors = []
        for f in self.pending:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected, the first is re-raised
                errors.append(e)
        self.pending = []
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)

    def _write(self, item: ImageOutputs) -> None:
        files = item.record["files"]
        out = self.out
        _save_png(out / files["label"], item.label, self.palette)
        if "train_label" in files and self.encoding is not None:
            _save_png(out / files["train_label"], self.encoding[item.label], self.palette)
        if self.fmt == "png":
            _save_png(out / files["confidence"], item.confidence)
            _save_png(out / files["entropy"], item.entropy)
        else:
            _save_npz(out / files["confidence"], "confidence", item.confidence)
            _save_npz(out / files["entropy"], "entropy", item.entropy)
        if "overlay" in files and item.rgb is not None:
            from PIL import Image

            with atomic_path(out / files["overlay"]) as tmp:
                Image.fromarray(overlay(item.rgb, item.label, self.colours)).save(tmp, format="JPEG", quality=85)
        write_json(record_path(out, item.stem), item.record)  # last: marks the image done
