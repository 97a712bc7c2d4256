"""A small synthetic segmentation dataset, so every command can be tried without downloads.

Five classes: background, disc, box, triangle and stripes. Every object gets a random colour drawn
like the background's, so colour says nothing about the class: a model has to use shape and
texture. Backgrounds are smooth two-colour noise with grain, thin lines and small blobs; later
objects occlude earlier ones and objects may run off the image edge.

Generator versions (`semiseg demo-data --version`); 4-6 are the variants of version 3 measured
in docs/benchmarks.md ("Demo data variants") while redesigning the demo, kept so those figures
can be reproduced:
- **4**: the box's checks in the object's colour and its complement (not two shades of one
  colour, which passed for background), two to five smaller objects per image.
- **5**: version 3's layout, version 4's box, the triangle's dots larger and sparser.
- **6**: version 4's layout, version 5's textures, wider capture conditions.
- **3** (the default, what `make demo` uses): each class has a texture of its own that a small CNN
  can pick up from few examples — a disc of speckle, a box of large checks, a triangle of dots,
  an ellipse of stripes — and each image has its own capture condition (exposure, contrast,
  colour cast, sensor noise, sometimes blur). With 18 labeled images a random-init network fits
  its labeled set but meets conditions and object layouts it has not seen; the unlabeled images
  cover them. That is the situation semi-supervised learning is for, and what the demo measures.
- **2** (earlier releases; the figures recorded with it in docs/benchmarks.md): subtler cues
  (radial shading, checkerboard, linear gradient, stripes; 10% of the objects flat, without their
  texture), more clutter, no capture condition. A random-init network is still learning it after
  the demo's budget, so unlabeled data had little to add there.

Output is byte-identical for a seed and version: one `SeedSequence` feeds one generator per split
(so the val images do not change with `n_train`), and PNGs are written without timestamps.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from semiseg_cli.data.layouts import index_palette
from semiseg_cli.errors import UserError
from semiseg_cli.io import TMP_MARK, check_output_dir, clean_stale_temps

CLASS_NAMES = ["background", "disc", "box", "triangle", "stripes"]
MARKER = "semiseg_demo.json"
VERSION = 3  # the default generator version
VERSIONS = (2, 3, 4, 5, 6)
# What generate_demo owns inside its output folder; only these are ever replaced.
OWNED = ("images", "masks", "classes.txt", MARKER)

Coords = tuple[np.ndarray, np.ndarray]  # (x, y) pixel-centre grids, float32 HxW
Shape = Callable[[np.random.Generator, int, Coords, np.ndarray, "Style"], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in 0..1 that varies over about size/cells pixels (a random grid, upsampled)."""
    grid = rng.random((cells, cells), dtype=np.float32)
    up = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(up), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int, xy: Coords, style: "Style") -> np.ndarray:
    x, y = xy
    c1, c2 = rng.uniform(0.05, 0.95, (2, 3)).astype(np.float32)
    blend = _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    img = c1 * (1 - blend) + c2 * blend
    grain = _smooth_noise(rng, size, max(4, size // 4))[..., None]
    img += (grain - 0.5) * 0.2
    for _ in range(int(rng.integers(*style.clutter))):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        px, py = rng.uniform(0, size, 2)
        if rng.random() < 0.5:  # a thin line
            t = rng.uniform(0, np.pi)
            region = np.abs((x - px) * np.sin(t) - (y - py) * np.cos(t)) < rng.uniform(0.5, 1.5)
        else:  # a small blob, well below the smallest object
            region = (x - px) ** 2 + (y - py) ** 2 < (rng.uniform(0.02, 0.06) * size) ** 2
        img[region] = colour
    return img


def _frame(rng: np.random.Generator, size: int, xy: Coords, style: "Style") -> tuple[np.ndarray, np.ndarray, float]:
    """Object-local coordinates (u along a random direction, v across) and a radius."""
    x, y = xy
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    r = float(rng.uniform(*style.radius) * size)
    t = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    return u, v, r


def _period(rng: np.random.Generator, size: int) -> float:
    return max(3.0, float(size / rng.uniform(10, 16)))


def _triangle_inside(u: np.ndarray, v: np.ndarray, apothem: float) -> np.ndarray:
    """Equilateral: inside when on the inner side of all three edges."""
    inside = np.ones(u.shape, bool)
    for k in range(3):
        ang = 2 * np.pi * k / 3
        inside &= u * np.cos(ang) + v * np.sin(ang) < apothem
    return inside


def _stripes(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    """An ellipse of stripes in the object's colour and its complement (both versions)."""
    u, v, r = _frame(rng, size, xy, style)
    b = r * rng.uniform(0.45, 0.8)
    p = _period(rng, size)
    on = (np.sin(2 * np.pi * u / p) > 0)[..., None]
    return (u / r) ** 2 + (v / b) ** 2 < 1, np.where(on, c, 1 - c)


# Version 3: a texture of its own per class.
def _speckled_disc(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    """A disc of speckle: 2x2-pixel cells of the object's colour or its complement, at random
    (cells, not single pixels, so the pattern survives the training scale range and blur)."""
    u, v, r = _frame(rng, size, xy, style)
    cells = rng.random(((size + 1) // 2, (size + 1) // 2)) < 0.5
    speck = np.kron(cells, np.ones((2, 2), bool))[:size, :size][..., None]
    return u * u + v * v < r * r, np.where(speck, c, 1 - c)


def _checked_box(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of large checks (twice the stripes' period)."""
    u, v, r = _frame(rng, size, xy, style)
    a, b = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 1.0)
    p = 2 * _period(rng, size)
    check = ((np.floor(u / p) + np.floor(v / p)) % 2)[..., None]
    return (np.abs(u) < a) & (np.abs(v) < b), c * (1 - 0.55 * check)


def _contrast_checked_box(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    """Version 4: a rectangle of checks in the object's colour and its complement (1.5x the
    stripes' period), as contrasted as the other classes' textures, so it does not pass for a
    patch of background."""
    u, v, r = _frame(rng, size, xy, style)
    a, b = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 1.0)
    p = 1.5 * _period(rng, size)
    check = (((np.floor(u / p) + np.floor(v / p)) % 2) > 0)[..., None]
    return (np.abs(u) < a) & (np.abs(v) < b), np.where(check, 1 - c, c)


def _big_dotted_triangle(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    """Versions 5-6: version 3's dotted triangle with larger dots (radius 0.28 of the grid step
    against 0.24) on a grid as wide as the stripes' period (against 0.7 of it)."""
    u, v, r = _frame(rng, size, xy, style)
    inside = _triangle_inside(u, v, 0.7 * r)
    p = _period(rng, size)
    du, dv = (u / p) % 1 - 0.5, (v / p) % 1 - 0.5
    dot = (du * du + dv * dv < 0.08)[..., None]
    return inside, np.where(dot, 1 - c, c)


def _dotted_triangle(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    """An equilateral triangle (apothem 0.7 r) filled with a grid of dots in the complement."""
    u, v, r = _frame(rng, size, xy, style)
    inside = _triangle_inside(u, v, 0.7 * r)
    p = 0.7 * _period(rng, size)
    du, dv = (u / p) % 1 - 0.5, (v / p) % 1 - 0.5
    dot = (du * du + dv * dv < 0.06)[..., None]
    return inside, np.where(dot, 1 - c, c)


# Version 2: subtler cues.
def _shaded_disc(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy, style)
    d2 = (u * u + v * v) / (r * r)
    return d2 < 1, c * (1.15 - 0.55 * d2)[..., None]


def _checkerboard_box(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy, style)
    a, b = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 1.0)
    p = _period(rng, size)
    check = ((np.floor(u / p) + np.floor(v / p)) % 2)[..., None]
    return (np.abs(u) < a) & (np.abs(v) < b), c * (1 - 0.55 * check)


def _gradient_triangle(rng: np.random.Generator, size: int, xy: Coords, c: np.ndarray, style: "Style") -> tuple[np.ndarray, np.ndarray]:
    u, v, r = _frame(rng, size, xy, style)
    inside = _triangle_inside(u, v, r / 2)
    t = np.clip((u / r + 1) / 2, 0, 1)[..., None]
    return inside, c * (0.45 + 0.7 * t)


@dataclass(frozen=True)
class CaptureCondition:
    """One capture condition per image, over the whole image — exposure, contrast, a colour cast,
    sensor noise and sometimes blur — as between cameras, times of day and sites. Each field is
    the range drawn from (`blurs`: the Gaussian radii drawn from with equal chance, 0 = none)."""

    gain: tuple[float, float]
    contrast: tuple[float, float]
    cast: tuple[float, float]
    noise: tuple[float, float]
    blurs: tuple[float, ...]

    def __call__(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        gain = float(np.exp(rng.uniform(np.log(self.gain[0]), np.log(self.gain[1]))))
        contrast = float(rng.uniform(*self.contrast))
        cast = rng.uniform(*self.cast, 3).astype(np.float32)
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = (mean + (img - mean) * contrast) * gain * cast
        img = img + rng.normal(0, rng.uniform(*self.noise), img.shape).astype(np.float32)
        blur = float(rng.choice(self.blurs))
        if blur:
            from PIL import ImageFilter

            u8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
            img = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255
        return img


# Version 3 (and 4-5): mild; a slight blur in a quarter of the images.
_capture_condition = CaptureCondition(gain=(0.65, 1.2), contrast=(0.7, 1.05), cast=(0.88, 1.12), noise=(0.01, 0.04), blurs=(0.0, 0.0, 0.0, 0.7))
# Version 6: wider — exposure down to 0.5, contrast down to 0.5, a cast of up to 20%, more noise,
# blur in half the images.
_strong_capture_condition = CaptureCondition(gain=(0.5, 1.3), contrast=(0.5, 1.0), cast=(0.8, 1.2), noise=(0.01, 0.06), blurs=(0.0, 0.0, 0.6, 1.0))


def _sensor_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Version 2: the same mild noise on every image."""
    return img + rng.normal(0, 0.025, img.shape).astype(np.float32)


@dataclass(frozen=True)
class Style:
    """What a generator version draws; every version draws its random numbers in the same order."""

    shapes: dict[int, Shape]
    clutter: tuple[int, int]  # lines and blobs per background: integers(lo, hi)
    objects: tuple[int, int]  # objects per image: integers(lo, hi)
    radius: tuple[float, float]  # object radius, as a fraction of the image side
    plain_fraction: float  # objects drawn in flat colour, without their class texture
    capture: Callable[[np.random.Generator, np.ndarray], np.ndarray]


STYLES = {
    2: Style({1: _shaded_disc, 2: _checkerboard_box, 3: _gradient_triangle, 4: _stripes},
             clutter=(2, 7), objects=(1, 5), radius=(0.16, 0.30), plain_fraction=0.1, capture=_sensor_noise),
    3: Style({1: _speckled_disc, 2: _checked_box, 3: _dotted_triangle, 4: _stripes},
             clutter=(1, 4), objects=(1, 4), radius=(0.18, 0.32), plain_fraction=0.0, capture=_capture_condition),
    4: Style({1: _speckled_disc, 2: _contrast_checked_box, 3: _dotted_triangle, 4: _stripes},
             clutter=(1, 4), objects=(2, 6), radius=(0.14, 0.28), plain_fraction=0.0, capture=_capture_condition),
    5: Style({1: _speckled_disc, 2: _contrast_checked_box, 3: _big_dotted_triangle, 4: _stripes},
             clutter=(1, 4), objects=(1, 4), radius=(0.18, 0.32), plain_fraction=0.0, capture=_capture_condition),
    6: Style({1: _speckled_disc, 2: _contrast_checked_box, 3: _big_dotted_triangle, 4: _stripes},
             clutter=(1, 4), objects=(2, 6), radius=(0.14, 0.28), plain_fraction=0.0, capture=_strong_capture_condition),
}


def render_sample(rng: np.random.Generator, size: int, version: int = VERSION) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 image, HxW uint8 class-id mask)."""
    style = STYLES[version]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = _background(rng, size, (x, y), style)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(*style.objects))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        region, pixels = style.shapes[cls](rng, size, (x, y), colour, style)
        if rng.random() < style.plain_fraction:
            pixels = np.broadcast_to(colour, pixels.shape)
        img[region] = pixels[region]
        mask[region] = cls
    img = style.capture(rng, img)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


# --------------------------------------------------------------------------------- writing


def _check_args(n_train: int, n_val: int, size: int, version: int) -> None:
    if version not in STYLES:
        raise UserError(f"demo generator version {version} does not exist; choose one of {', '.join(map(str, VERSIONS))}")
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


def _write_split(tmp: Path, split: str, n: int, size: int, rng: np.random.Generator, palette: list[int], version: int) -> None:
    (tmp / "images" / split).mkdir(parents=True)
    (tmp / "masks" / split).mkdir(parents=True)
    for i in range(n):
        image, mask = render_sample(rng, size, version)
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
    out: str | Path, n_train: int = 300, n_val: int = 60, size: int = 128, seed: int = 0, overwrite: bool = False,
    version: int = VERSION,
) -> Path:
    """Write the demo set (folder layout) into `out` and return it.

    Generated into a hidden sibling folder first, so an interrupted run leaves `out` untouched.
    """
    out = Path(out)
    _check_args(n_train, n_val, size, version)
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
        _write_split(tmp, "train", n_train, size, np.random.default_rng(train_seq), palette, version)
        _write_split(tmp, "val", n_val, size, np.random.default_rng(val_seq), palette, version)
        (tmp / "classes.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))
        info = {"generator": "semiseg demo", "version": version, "seed": seed, "n_train": n_train, "n_val": n_val, "size": size}
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
