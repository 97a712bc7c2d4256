"""Shared data fixtures: tiny dataset trees generated on the fly, one per supported layout.

The session-scoped trees are read-only by convention; a test that breaks files builds its own
copy with the `make_*_tree` factories below (they take a folder and return the dataset root).

Real data and weights (CamVid, COCO128-seg, MobileNetV2 features) live in the shared folder,
`<repo root>/../shared` unless `SEMISEG_SHARED` names another. Tests that need them are marked
`realdata` and get their paths from the `shared` fixture: `shared.require("data/camvid")`
skips when the path is missing, or fails when `SEMISEG_REQUIRE_SHARED=1` (as in CI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from semiseg_cli.data.layouts import index_palette

TreeFactory = Callable[[Path], Path]

REPO_ROOT = Path(__file__).resolve().parents[1]


class SharedData:
    """Where the shared folder is, and the one place that skips or fails when it is missing."""

    env_var = "SEMISEG_SHARED"
    require_var = "SEMISEG_REQUIRE_SHARED"

    def root(self) -> Path:
        """`$SEMISEG_SHARED` if set, else the `shared` folder beside this clone."""
        env = os.environ.get(self.env_var)
        return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"

    def require(self, relpath: str) -> Path:
        """The path of `relpath` in the shared folder; skip if it is missing, or fail with
        `SEMISEG_REQUIRE_SHARED=1` (there a skipped real-data test would hide a broken setup)."""
        path = self.root() / relpath
        if path.exists():
            return path
        if os.environ.get(self.require_var) == "1":
            pytest.fail(
                f"{self.require_var}=1 but shared data {path} is missing (set {self.env_var} to the shared folder)",
                pytrace=False,
            )
        pytest.skip(f"shared data {path} not present (set {self.env_var} to the shared folder; default <repo>/../shared)")


@pytest.fixture
def shared() -> SharedData:
    """The shared folder: `shared.require("data/camvid")` for tests marked `realdata`."""
    return SharedData()


def _rng_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _blocks(rng: np.random.Generator, h: int, w: int, values: list[int]) -> np.ndarray:
    """A mask of 8x8 blocks with values drawn from `values` (each value at least once)."""
    cells = rng.choice(values, ((h + 7) // 8, (w + 7) // 8)).astype(np.uint8)
    cells.flat[: len(values)] = values
    return np.kron(cells, np.ones((8, 8), np.uint8))[:h, :w]


def _save_palette_png(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    im.putpalette([c for rgb in index_palette(256) for c in rgb])
    im.save(path)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_voc_tree(base: Path) -> Path:
    """VOC2012 with 6 images: train 1-3, val 4-5, SegmentationClassAug for 1-6 (so train_aug
    without a list is 1, 2, 3, 6). Masks hold background, one class and a 255 border."""
    rng = np.random.default_rng(1)
    root = base / "VOCdevkit" / "VOC2012"
    for k in range(1, 7):
        stem = f"2007_00000{k}"
        _save(_rng_image(rng, 24, 32), root / "JPEGImages" / f"{stem}.jpg")
        mask = _blocks(rng, 24, 32, [0, k + 5])
        mask[0, :] = 255
        if k <= 5:
            _save_palette_png(mask, root / "SegmentationClass" / f"{stem}.png")
        _save_palette_png(mask, root / "SegmentationClassAug" / f"{stem}.png")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    (lists / "val.txt").write_text("2007_000004\n2007_000005\n")
    return root


def make_cityscapes_tree(base: Path) -> Path:
    """Two train cities and one val city; labelIds 0 (unlabeled), 7 (road), 26 (car), 33 (bicycle)."""
    rng = np.random.default_rng(2)
    root = base / "cityscapes"
    for split, city, n in (("train", "aachen", 2), ("train", "bremen", 1), ("val", "frankfurt", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            _save(_rng_image(rng, 16, 32), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            mask = _blocks(rng, 16, 32, [0, 7, 26, 33])
            _save(Image.fromarray(mask), root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def make_camvid_tree(base: Path) -> Path:
    """SegNet layout: 3 train and 2 val images, masks 0..11 (11 = void)."""
    rng = np.random.default_rng(3)
    root = base / "camvid"
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            _save(_rng_image(rng, 24, 32), root / split / name)
            _save(Image.fromarray(_blocks(rng, 24, 32, list(range(12)))), root / f"{split}annot" / name)
    return root


def make_folder_tree(base: Path) -> Path:
    """Generic layout, 3 classes: train has 6 images (png and jpg) with masks; `extra` has no
    masks folder, so its pairs are unlabeled."""
    rng = np.random.default_rng(4)
    root = base / "folder"
    for i in range(6):
        ext = "jpg" if i % 2 else "png"
        _save(_rng_image(rng, 24, 24), root / "images" / "train" / f"img{i}.{ext}")
        _save(Image.fromarray(_blocks(rng, 24, 24, [0, 1, 2, 255])), root / "masks" / "train" / f"img{i}.png")
    for i in range(2):
        _save(_rng_image(rng, 24, 24), root / "images" / "extra" / f"u{i}.png")
    (root / "classes.txt").write_text("background\nthing\nstuff\n")
    return root


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cityscapes_tree(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="session")
def camvid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_camvid_tree(tmp_path_factory.mktemp("camvid"))


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_tree(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo set (12 train / 4 val images of 64x64, 5 classes, seed 0), read-only."""
    from semiseg_cli.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", n_train=12, n_val=4, size=64, seed=0)


@pytest.fixture
def make_tree() -> dict[str, TreeFactory]:
    """Factories for private, writable trees: make_tree["folder"](tmp_path) -> root."""
    return {"voc": make_voc_tree, "cityscapes": make_cityscapes_tree, "camvid": make_camvid_tree, "folder": make_folder_tree}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    spin-waiting between processes makes them several times slower."""
    import torch

    torch.set_num_threads(1)
