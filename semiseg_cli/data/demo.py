"""A small synthetic segmentation dataset, so every command can be tried without downloads.

Five classes: background, disc, box, triangle and stripes. Every object gets a random colour
drawn like the background's, so colour says nothing about the class: a model has to use shape
(round, square, three corners, elongated) and texture (radial shading, checkerboard, linear
gradient, stripes in the complementary colour); 10% of the objects are drawn flat, without their
texture, so texture alone is not enough either. Backgrounds are smooth two-colour noise with
grain, thin lines and small blobs; later objects occlude earlier ones and objects may run off
the image edge. A small CNN learns it in minutes on a CPU without solving it outright, which
leaves room for unlabeled data to help.

Output is byte-identical for a seed: one `SeedSequence` feeds one generator per split (so the
val images do not change with `n_train`), and PNGs are written without timestamps.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from semiseg_cli.data.layouts import index_palette
from semiseg_cli.errors import UserError
from semiseg_cli.io import TMP_MARK, check_output_dir, clean_stale_temps

CLASS_NAMES = ["background", "disc", "box", "triangle", "stripes"]
MARKER = "semiseg_demo.json"
VERSION = 2
# What generate_demo owns inside its output folder; only these are ever replaced.
OWNED = ("images", "masks", "classes.txt", MARKER)
# Objects drawn in flat colour, without their class texture: only their shape tells them apart.
PLAIN_FRACTION = 0.1

Coords = tuple[np.ndarray, np.ndarray]  # (x, y) pixel-centre grids, float32 HxW


# --------------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in 0..1 that varies over about size/cells pixels (a random grid, upsampled)."""
    grid = rng.random((cells, cells), dtype=np.float32)
    up = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(up), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int, xy: Coords) -> np.ndarray:
    x, y = xy
    c1, c2 = rng.uniform(0.05, 0.95, (2, 3)).astype(np.float32)
    blend = _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    img = c1 * (1 - blend) + c2 * blend
    grain = _smooth_noise(rng, size, max(4, size // 4))[..., None]
    img += (grain - 0.5) * 0.2
    for _ in range(int(rng.integers(2, 7))):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        px, py = rng.uniform(0, size, 2)
        if rng.random() < 0.5:  # a thin line
            t = rng.uniform(0, np.pi)
            region = np.abs((x - px) * np.sin(t) - (y - py) * np.cos(t)) < rng.uniform(0.5, 1.5)
        else:  # a small blob, well below the smallest object
            region = (x - px) ** 2 + (y - py) ** 2 < (rng.uniform(0.02, 0.06) * size) ** 2
        img[region] = colour
    return img


def _frame(rng: np.random.Generator, size: int, xy: Coords) -> tuple[np.ndarray, np.ndarray, float]:
    """Object-local coordinates (u along a random direction, v across) and a radius."""
    x, y = xy
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    r = float(rng.uniform(0.16, 0.30) * size)
    t = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    return u, v, r


def _period(rng: np.random.Generator, size: int) -> float:
    return max(3.0, float(size / rng.uniform(10, 16)))


def _disc(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy)
    d2 = (u * u + v * v) / (r * r)
    return d2 < 1, c * (1.15 - 0.55 * d2)[..., None]


def _box(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy)
    a, b = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 1.0)
    p = _period(rng, size)
    check = ((np.floor(u / p) + np.floor(v / p)) % 2)[..., None]
    return (np.abs(u) < a) & (np.abs(v) < b), c * (1 - 0.55 * check)


def _triangle(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy)
    # Equilateral: inside when on the inner side of all three edges (apothem r/2).
    inside = np.ones(u.shape, bool)
    for k in range(3):
        ang = 2 * np.pi * k / 3
        inside &= u * np.cos(ang) + v * np.sin(ang) < r / 2
    t = np.clip((u / r + 1) / 2, 0, 1)[..., None]
    return inside, c * (0.45 + 0.7 * t)


def _stripes(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy)
    b = r * rng.uniform(0.45, 0.8)
    p = _period(rng, size)
    on = (np.sin(2 * np.pi * u / p) > 0)[..., None]
    return (u / r) ** 2 + (v / b) ** 2 < 1, np.where(on, c, 1 - c)


SHAPES: dict[int, Callable[..., tuple[np.ndarray, np.ndarray]]] = {1: _disc, 2: _box, 3: _triangle, 4: _stripes}


def render_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 image, HxW uint8 class-id mask)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = _background(rng, size, (x, y))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        region, pixels = SHAPES[cls](rng, size, (x, y), colour)
        if rng.random() < PLAIN_FRACTION:
            pixels = np.broadcast_to(colour, pixels.shape)
        img[region] = pixels[region]
        mask[region] = cls
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


# --------------------------------------------------------------------------------- writing


def _check_args(n_train: int, n_val: int, size: int) -> None:
    if n_train < 1 or n_val < 1:
        raise UserError(f"the demo set needs at least 1 train and 1 val image (got {n_train} and {n_val})")
    if not 32 <= size <= 1024:
        raise UserError(f"demo image size {size} must be between 32 and 1024 pixels")


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not an earlier demo set, unless told to overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise UserError(
            f"{out} is not empty and holds no demo set ({MARKER} missing); "
            "choose an empty folder or pass --overwrite to replace its images/, masks/ and classes.txt"
        )


def _write_split(tmp: Path, split: str, n: int, size: int, rng: np.random.Generator, palette: list[int]) -> None:
    (tmp / "images" / split).mkdir(parents=True)
    (tmp / "masks" / split).mkdir(parents=True)
    for i in range(n):
        image, mask = render_sample(rng, size)
        name = f"{split}_{i:04d}.png"
        Image.fromarray(image).save(tmp / "images" / split / name, format="PNG")
        m = Image.frombytes("P", (size, size), mask.tobytes())  # palette PNG: viewable, still class ids
        m.putpalette(palette)
        m.save(tmp / "masks" / split / name, format="PNG")


def _install(tmp: Path, out: Path) -> None:
    """Swap the freshly generated entries into `out`, replacing only what the demo owns."""
    from semiseg_cli.io import remove_entries

    out.mkdir(parents=True, exist_ok=True)
    remove_entries(out, OWNED)
    for name in OWNED:
        (tmp / name).rename(out / name)


def generate_demo(
    out: str | Path, n_train: int = 300, n_val: int = 60, size: int = 128, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the demo set (folder layout) into `out` and return it.

    Generated into a hidden sibling folder first, so an interrupted run leaves `out` untouched.
    """
    out = Path(out)
    _check_args(n_train, n_val, size)
    check_output_dir(out, "demo data folder")
    _check_target(out, overwrite)
    created_parent = _nearest_missing(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e.strerror}; choose another --out") from None
    clean_stale_temps(out.parent)  # a generation killed earlier
    palette = [c for rgb in index_palette(len(CLASS_NAMES)) for c in rgb]
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    ok = False
    try:
        train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
        _write_split(tmp, "train", n_train, size, np.random.default_rng(train_seq), palette)
        _write_split(tmp, "val", n_val, size, np.random.default_rng(val_seq), palette)
        (tmp / "classes.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))
        info = {"generator": "semiseg demo", "version": VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "size": size}
        (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        _install(tmp, out)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created_parent is not None:  # a failed command leaves no folders behind
            shutil.rmtree(created_parent, ignore_errors=True)
    return out


def _nearest_missing(folder: Path) -> Path | None:
    """The top-most folder of `folder`'s chain that does not exist yet (None: it exists)."""
    missing = None
    p = folder
    while not p.exists():
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing
