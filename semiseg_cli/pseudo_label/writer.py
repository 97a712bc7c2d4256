"""Encoding and writing one image's files, in a pool of writer processes or in this one.

The arrays arrive quantised (`quantise`: uint8 labels, uint16 or float16 maps, the uint8
overlay), so a writer only encodes and writes: PNG (labels, maps), NPZ, JPEG and the record.

What can go wrong, and what this module does about it:
- A kill mid-write must not leave half a file under a final name: every file goes through
  `atomic_path` (a temporary name, then a rename), and the record is written last, so its
  presence means every file of the image is complete.
- Encoding on the host while the GPU waits: `Writer` hands each image to a `pool.WriterPool` of
  processes (`--writers`, default `default_writers()`) with at most `depth` images waiting per
  process, which bounds memory; `--writers 0` encodes here, in the calling thread (debugging).
  Every path runs the same `write_image`, so the bytes do not depend on the number of writers.
- Pillow's 16-bit PNG encoder tries every PNG filter on every row (~15 ms per 512x512 map, most
  of a writer's time): with `map_compression` 0 (the default) the confidence and entropy PNGs
  are written here as stored (uncompressed) zlib streams, 25x or more faster, at 2 bytes per
  pixel (deflate makes a trained network's maps 1.6-1.8x smaller, noisy ones ~8%); 1-9 use
  Pillow at that level (1 gives the files of earlier versions byte for byte). The pixels are
  the same either way.
- The manifest must not depend on which writer finished first: `Writer.records` holds the
  record of each finished image by split index and `folder.finish` lists them in split order.
- A worker that died leaves its temporary files: `close` removes them (temporaries of dead
  processes only, `io.clean_stale_temps`).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from semiseg_cli.io import atomic_path, clean_stale_temps, write_text
from semiseg_cli.pseudo_label.folder import IGNORE, UNRELIABLE_COLOUR, record_path
from semiseg_cli.pseudo_label.pool import WriterPool

if TYPE_CHECKING:  # numpy loads lazily: `semiseg --help` should not import it
    import numpy as np

JPEG_QUALITY = 85
LABEL_PNG_LEVEL = 1  # palette PNGs (labels, train_labels): compress well and fast at level 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def default_writers() -> int:
    """Half the cores this process may use, at least 1 and at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return min(8, max(1, cores // 2))


# ----------------------------------------------------------------------------- encoders


def _save_png(path: Path, arr: "np.ndarray", palette: list[int] | None = None, compress_level: int = LABEL_PNG_LEVEL) -> None:
    from PIL import Image

    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(palette)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", compress_level=compress_level)


def _chunk(tag: bytes, data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    crc = zlib.crc32(data, zlib.crc32(tag)) & 0xFFFFFFFF
    return [struct.pack(">I", len(data)) + tag, data, struct.pack(">I", crc)]


def png16_parts(arr: "np.ndarray", level: int = 0) -> list[bytes | bytearray | memoryview]:
    """A (H, W) uint16 array as the pieces of a 16-bit greyscale PNG (filter None, zlib `level`).

    Written in pieces (no concatenation: a 2048x1024 map is 4 MB). Decodes to the same values
    as Pillow's own 16-bit PNGs; the bytes differ from Pillow's (one IDAT, no filters)."""
    import numpy as np

    h, w = arr.shape
    rows = np.empty((h, 2 * w + 1), np.uint8)
    rows[:, 0] = 0  # filter type None on every row
    rows[:, 1:].view(">u2")[...] = arr  # big-endian samples, as PNG stores them
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)  # 16-bit, greyscale, deflate, no interlace
    return [PNG_SIGNATURE, *_chunk(b"IHDR", ihdr), *_chunk(b"IDAT", zlib.compress(rows, level)), *_chunk(b"IEND", b"")]


def _save_map_png(path: Path, arr: "np.ndarray", level: int) -> None:
    if level > 0:  # Pillow: level 1 is what earlier versions wrote
        _save_png(path, arr, compress_level=level)
        return
    parts = png16_parts(arr, 0)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p)


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
    """The image with the label colours blended in; unreliable pixels (255) left as they are.

    The reference of `quantise.blend`, which computes the same on the device for a batch."""
    import numpy as np

    coloured = colours[label]  # 255 -> the image itself (colours[255] is never blended)
    out = rgb.astype(np.float32)
    keep = label != IGNORE
    out[keep] = (1 - alpha) * out[keep] + alpha * coloured[keep]
    return out.clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class WriteContext:
    """What every image of a dump shares (sent to each writer process once)."""

    out: str
    fmt: str  # png | npz (confidence and entropy)
    palette: list[int]  # palette_bytes
    map_compression: int = 0


def write_image(ctx: WriteContext, meta: dict[str, Any], arrays: dict[str, "np.ndarray"]) -> None:
    """Write one image's files from its quantised arrays, the record last (it marks the image done).

    `meta`: files (the record's paths), record (the record's path); `arrays`: label,
    confidence, entropy, optionally train_label and overlay, and record (UTF-8 JSON bytes)."""
    out = Path(ctx.out)
    files = meta["files"]
    _save_png(out / files["label"], arrays["label"], ctx.palette)
    if "train_label" in files:
        _save_png(out / files["train_label"], arrays["train_label"], ctx.palette)
    if ctx.fmt == "png":
        _save_map_png(out / files["confidence"], arrays["confidence"], ctx.map_compression)
        _save_map_png(out / files["entropy"], arrays["entropy"], ctx.map_compression)
    else:
        _save_npz(out / files["confidence"], "confidence", arrays["confidence"])
        _save_npz(out / files["entropy"], "entropy", arrays["entropy"])
    if "overlay" in files:
        from PIL import Image

        with atomic_path(out / files["overlay"]) as tmp:
            Image.fromarray(arrays["overlay"]).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    write_text(out / meta["record"], arrays["record"].tobytes().decode("utf-8"))


def record_text(record: dict[str, Any]) -> str:
    """A record as `io.write_json` writes it."""
    return json.dumps(record, indent=2, sort_keys=False) + "\n"


class Writer:
    """Writes images in `writers` processes (0: in the calling thread), at most `depth` waiting
    per process. `records` maps the split index of every image written completely to its record."""

    def __init__(self, out: Path, fmt: str, palette: Sequence[Sequence[int]], writers: int,
                 map_compression: int = 0, depth: int = 2) -> None:
        self.out = Path(out)
        self.ctx = WriteContext(str(out), fmt, palette_bytes(palette), map_compression)
        self.pool = WriterPool(write_image, self.ctx, writers, depth) if writers > 0 else None
        self.records: dict[int, dict[str, Any]] = {}
        self._queued: dict[int, dict[str, Any]] = {}

    @property
    def wait_s(self) -> float:
        """Time the caller was blocked because every writer was busy."""
        return self.pool.wait_s if self.pool is not None else 0.0

    def submit(self, index: int, stem: str, record: dict[str, Any], arrays: dict[str, "np.ndarray"]) -> None:
        """Write image `index` (its record and host arrays); the arrays are copied before return."""
        import numpy as np

        text = np.frombuffer(record_text(record).encode("utf-8"), np.uint8)
        meta = {"files": record["files"], "record": record_path(Path(), stem).as_posix()}
        if self.pool is None:
            write_image(self.ctx, meta, {**arrays, "record": text})
            self.records[index] = record
        else:
            self._collect()
            src = {**arrays, "record": text}
            specs = [(k, a.dtype, a.shape) for k, a in src.items()]

            def fill(views: dict[str, np.ndarray]) -> None:
                for k, a in src.items():
                    np.copyto(views[k], a, casting="no")

            self._queued[index] = record
            try:
                self.pool.submit(index, meta, specs, fill, label=stem)
            except BaseException:
                self._queued.pop(index, None)
                raise

    def drain(self) -> None:
        """Wait until everything submitted is written; raise the first writer error."""
        if self.pool is not None:
            try:
                self.pool.drain()
            finally:
                self._collect()

    def close(self) -> None:
        """Drain, stop the writer processes and remove the temporary files of any that died."""
        if self.pool is None:
            return
        try:
            self.pool.close()
        finally:
            self._collect()
            if self.pool.dead_pids:
                clean_stale_temps(self.out, recursive=True)

    def terminate(self) -> None:
        """Stop the writer processes now (a run that fails before writing anything)."""
        if self.pool is not None:
            self.pool.terminate()

    def _collect(self) -> None:
        assert self.pool is not None
        for index in self.pool.completed:
            self.records[index] = self._queued.pop(index)  # type: ignore[index]
        self.pool.completed.clear()
