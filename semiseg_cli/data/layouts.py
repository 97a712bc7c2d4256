"""Dataset layouts: VOC, Cityscapes, CamVid and plain folders (the demo data uses the latter).

A `Layout` knows where one dataset keeps its images and masks, how to list the pairs of a split
and how to turn a stored mask into class ids 0..C-1 with 255 for pixels to ignore. Everything
downstream (splits, transforms, loaders) only sees root-relative paths and uint8 masks, so a new
dataset is one more `Layout` subclass.

Masks are checked as they are read: a stored value the dataset does not define raises a
`UserError` naming the file, because letting it through ends in an opaque CUDA assert inside
the loss many minutes into a run. `Layout.scan` finds all such problems up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from semiseg_cli.data.reading import Scan, _ColourImage, _image_size, _load_mask, _present_values, _thread_map, _Unreadable
from semiseg_cli.errors import UserError, warn
from semiseg_cli.io import read_text

IGNORE = 255
IMAGE_EXTS = (".png", ".jpg", ".jpeg")

Pair = tuple[str, "str | None"]

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
# labelIds of the 19 evaluated classes, in train-id order; every other labelId is ignored.
CITYSCAPES_EVAL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
]
CAMVID_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]


def index_palette(n: int) -> list[tuple[int, int, int]]:
    """The VOC colour scheme for `n` classes: the bits of each class id spread over R, G and B,
    most significant first, so neighbouring ids get clearly different colours."""
    colours = []
    for cid in range(n):
        rgb = [0, 0, 0]
        for shift in range(8):
            for ch in range(3):
                bit = (cid >> (3 * shift + ch)) & 1
                rgb[ch] |= bit << (7 - shift)
        colours.append((rgb[0], rgb[1], rgb[2]))
    return colours


class Layout:
    """Where a dataset keeps its files and how its masks map to class ids.

    Subclasses set `name`, `expected` (a one-line description of the folder layout used in
    errors) and implement `list_pairs`; datasets whose stored mask values are not already class
    ids override `label_tables`.
    """

    name = "base"
    expected = ""
    # Class ids left out of image-level tags (VOC: background is in every image, so not a tag).
    tag_exclude: tuple[int, ...] = ()

    def __init__(self, root: str | Path, class_names: list[str], palette: list[tuple[int, int, int]]) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        self.palette = [tuple(int(c) for c in p) for p in palette]
        if len(self.palette) != len(self.class_names):
            raise ValueError(f"{len(self.palette)} palette colours for {len(self.class_names)} classes")
        self._lut, self._allowed, self.allowed_text = self.label_tables()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_tables(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(stored value -> class id, which stored values are legal, how to say the legal ones).

        The default: stored values are class ids 0..C-1, and 255 is ignore.
        """
        n = self.num_classes
        lut = np.full(256, IGNORE, np.uint8)
        lut[:n] = np.arange(n)
        allowed = np.zeros(256, bool)
        allowed[:n] = True
        allowed[IGNORE] = True
        return lut, allowed, f"0..{n - 1} and {IGNORE}"

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        raise NotImplementedError

    def training_encoding(self) -> np.ndarray | None:
        """class id -> stored mask value, so that labels written for training (pseudo-labels)
        read back as the same class ids; None when stored values are class ids already.

        For Cityscapes the written masks must be labelIds, or the reader would map them again."""
        n = self.num_classes
        if (self._lut[:n] == np.arange(n)).all():
            return None
        enc = np.full(256, IGNORE, np.uint8)
        for c in range(n):
            hits = np.flatnonzero(self._lut == c)
            if len(hits) == 0:
                raise UserError(f"the {self.name} layout stores no value for class {c}; cannot write its pseudo-labels as masks")
            enc[c] = hits[0]
        if self._lut[IGNORE] != IGNORE or not self._allowed[IGNORE]:
            raise UserError(f"the {self.name} layout does not read {IGNORE} as ignore; cannot write unreliable pixels")
        return enc

    # ----------------------------------------------------------------------------- helpers

    def _fail(self, what: str) -> UserError:
        return UserError(f"{what}; expected the {self.name} layout: {self.expected}")

    def _check_root(self, *required: str) -> None:
        if not self.root.is_dir():
            raise self._fail(f"dataset root {self.root} is not a folder")
        for sub in required:
            if not (self.root / sub).is_dir():
                raise self._fail(f"{self.root / sub} does not exist")

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # ----------------------------------------------------------------------------- reading

    def read_image(self, rel: str) -> Image.Image:
        """The image as RGB. EXIF orientation is deliberately not applied: masks carry none."""
        path = self.root / rel
        if not path.is_file():
            raise UserError(f"image {path} does not exist; check the dataset root and split file")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None

    def stored_mask(self, rel: str) -> np.ndarray:
        """The stored values of the mask at root-relative `rel` (2-D integers, before
        `label_tables`); raises `_Unreadable` with the reason. Layouts whose labels are not
        per-pixel PNGs of class values (colour masks, polygon or RLE annotations) override this:
        everything else (reading, checking, scanning, reports) goes through it."""
        return _load_mask(self.root / rel)

    def read_mask(self, rel: str) -> np.ndarray:
        """Class ids (uint8 HxW, 255 = ignore) after this dataset's label mapping."""
        path = self.root / rel
        try:
            arr = self.stored_mask(rel)
        except _Unreadable as e:
            raise UserError(f"cannot read mask {path}: {e}") from None
        bad = self._bad_values(_present_values(arr))
        if bad:
            raise UserError(
                f"mask {path} has label values {bad} outside {self.allowed_text}; "
                "run `semiseg prepare-splits` to list every bad file"
            )
        return self._lut[arr.astype(np.uint8, copy=False)]

    def _bad_values(self, present: np.ndarray) -> list[int]:
        return [int(v) for v in present if v < 0 or v > 255 or not self._allowed[v]]

    # ----------------------------------------------------------------------------- checking

    def scan(self, pairs: Sequence[Pair], require_masks: bool = True) -> "Scan":
        """(problems, class ids present per image, images whose mask has ignored pixels) in one
        pass over the files; every image is decoded completely.

        Problem lines start with the root-relative file name; images whose mask has a problem
        get no entry in the class-id dict.
        """
        results = _thread_map(lambda p: self._check_pair(p, require_masks), list(pairs))
        problems: list[str] = []
        present: dict[str, list[int]] = {}
        with_ignore: set[str] = set()
        for (img, _), (probs, ids) in zip(pairs, results):
            problems.extend(probs)
            if ids is not None:
                if IGNORE in ids:
                    with_ignore.add(img)
                present[img] = [c for c in ids if c != IGNORE]
        return Scan(problems, present, with_ignore)

    def validate(self, pairs: Sequence[Pair], require_masks: bool = True) -> list[str]:
        """Every problem in `pairs`, one line each naming the file; empty when all is well."""
        return self.scan(pairs, require_masks)[0]

    def _check_pair(self, pair: Pair, require_masks: bool) -> tuple[list[str], list[int] | None]:
        img, mask = pair
        problems: list[str] = []
        size = None
        try:
            size = _image_size(self.root / img)
        except _Unreadable as e:
            problems.append(f"{img}: unreadable image ({e})")
        if mask is None:
            if require_masks:
                problems.append(f"{img}: no mask for this image")
            return problems, None
        if not (self.root / mask).is_file():
            problems.append(f"{mask}: missing mask for image {img}")
            return problems, None
        try:
            arr = self.stored_mask(mask)
        except _Unreadable as e:
            problems.append(f"{mask}: unreadable mask ({e})")
            return problems, None
        if size is not None and (arr.shape[1], arr.shape[0]) != size:
            problems.append(
                f"{mask}: mask is {arr.shape[1]}x{arr.shape[0]} but image {img} is {size[0]}x{size[1]}"
            )
        values = _present_values(arr)
        bad = self._bad_values(values)
        if bad:
            problems.append(f"{mask}: label values {bad} outside {self.allowed_text}")
            return problems, None
        ids = sorted({int(c) for c in self._lut[values]})  # IGNORE included when present
        return problems, ids


# --------------------------------------------------------------------------------- layouts


def _read_stem_list(path: Path, layout: Layout) -> list[str]:
    """Stems from a list file: bare stems, or DeepLab-style `/JPEGImages/x.jpg /Seg.../x.png`."""
    if not path.is_file():
        raise layout._fail(f"split list {path} does not exist")
    stems = [Path(line.split()[0]).stem for line in read_text(path, "split list").splitlines() if line.strip()]
    if not stems:
        raise layout._fail(f"split list {path} is empty")
    return stems


class VocLayout(Layout):
    name = "voc"
    expected = (
        "root is the VOC2012 folder with JPEGImages/*.jpg, SegmentationClass/*.png and "
        "ImageSets/Segmentation/{train,val}.txt (plus SegmentationClassAug/*.png for train_aug)"
    )
    tag_exclude = (0,)

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, VOC_CLASSES, index_palette(len(VOC_CLASSES)))

    def _check_root(self, *required: str) -> None:
        for nested in ("VOC2012", "VOCdevkit/VOC2012"):
            if not (self.root / "JPEGImages").is_dir() and (self.root / nested / "JPEGImages").is_dir():
                raise self._fail(f"{self.root} has no JPEGImages/ (did you mean {self.root / nested}?)")
        super()._check_root(*required)

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        self._check_root("JPEGImages")
        lists = self.root / "ImageSets" / "Segmentation"
        if split == "train_aug":
            stems, mask_dir = self._aug_stems(lists), "SegmentationClassAug"
        else:
            stems, mask_dir = _read_stem_list(lists / f"{split}.txt", self), "SegmentationClass"
        # The VOC test set ships without masks.
        return [
            (f"JPEGImages/{s}.jpg", None if split == "test" else f"{mask_dir}/{s}.png")
            for s in sorted(set(stems))
        ]

    def _aug_stems(self, lists: Path) -> list[str]:
        """The 10582-image pool: the official list when present, else every augmented mask not
        in val (SBD train+val plus VOC train, minus VOC val, which is what that list holds)."""
        listed = self.root / "ImageSets" / "SegmentationAug" / "train_aug.txt"
        if listed.is_file():
            return _read_stem_list(listed, self)
        aug = self.root / "SegmentationClassAug"
        if not aug.is_dir():
            raise self._fail(f"split train_aug needs {aug} (the SBD-augmented masks) or {listed}")
        val = set(_read_stem_list(lists / "val.txt", self))
        stems = [p.stem for p in aug.glob("*.png") if p.stem not in val]
        if not stems:
            raise self._fail(f"{aug} holds no masks outside the val split")
        return stems


class CityscapesLayout(Layout):
    name = "cityscapes"
    expected = (
        "leftImg8bit/{split}/{city}/*_leftImg8bit.png with "
        "gtFine/{split}/{city}/*_gtFine_labelIds.png"
    )

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)

    def label_tables(self) -> tuple[np.ndarray, np.ndarray, str]:
        lut = np.full(256, IGNORE, np.uint8)
        lut[CITYSCAPES_EVAL_IDS] = np.arange(len(CITYSCAPES_EVAL_IDS))
        allowed = np.zeros(256, bool)
        allowed[:34] = True
        allowed[IGNORE] = True  # labelId -1 (license plate) stored in a uint8 PNG
        return lut, allowed, f"the labelIds 0..33 and {IGNORE}"

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        self._check_root("leftImg8bit")
        folder = self.root / "leftImg8bit" / split
        if not folder.is_dir():
            raise self._fail(f"split folder {folder} does not exist")
        suffix = "_leftImg8bit.png"
        pairs: list[tuple[str, str | None]] = []
        for p in sorted(folder.glob(f"*/*{suffix}")):
            stem = p.name[: -len(suffix)]
            pairs.append((self._rel(p), f"gtFine/{split}/{p.parent.name}/{stem}_gtFine_labelIds.png"))
        if not pairs:
            raise self._fail(f"no *{suffix} images in the city folders of {folder}")
        return pairs


class CamVidLayout(Layout):
    name = "camvid"
    expected = "{train,val,test}/*.png with masks of the same name in {train,val,test}annot/ (SegNet layout)"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, CAMVID_CLASSES, _camvid_palette(Path(root)))

    def label_tables(self) -> tuple[np.ndarray, np.ndarray, str]:
        n = len(CAMVID_CLASSES)
        lut = np.full(256, IGNORE, np.uint8)
        lut[:n] = np.arange(n)
        allowed = np.zeros(256, bool)
        allowed[: n + 1] = True  # 11 = void
        allowed[IGNORE] = True
        return lut, allowed, f"0..{n} (11 = void) and {IGNORE}"

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        self._check_root()
        folder = self.root / split
        if not folder.is_dir():
            raise self._fail(f"split folder {folder} does not exist")
        pairs: list[tuple[str, str | None]] = [
            (f"{split}/{p.name}", f"{split}annot/{p.name}") for p in sorted(folder.glob("*.png"))
        ]
        if not pairs:
            raise self._fail(f"no .png images in {folder}")
        return pairs


def _camvid_palette(root: Path) -> list[tuple[int, int, int]]:
    """Colours from the SegNet `camvid12_palette.png` when present, else the same fixed ones.

    That file has 12 class colours + unlabelled, with Road_marking at index 3; the 11-class
    SegNet masks merge road marking into Road, so that entry is dropped.
    """
    path = root / "camvid12_palette.png"
    if not path.is_file():
        return list(CAMVID_PALETTE)
    try:
        with Image.open(path) as im:
            colours = np.array(im.convert("RGB")).reshape(-1, 3)
    except (OSError, ValueError):
        return list(CAMVID_PALETTE)
    if len(colours) < 12:
        return list(CAMVID_PALETTE)
    keep = [i for i in range(12) if i != 3]
    return [(int(r), int(g), int(b)) for r, g, b in colours[keep]]


class FolderLayout(Layout):
    """Generic layout; `demo` data uses it too. A split without a masks/ folder is unlabeled.

    Two forms: split folders (`images/{split}/`, `masks/{split}/`), or flat (`images/*.png|jpg`,
    `masks/*.png`), which is one pool, the split `train`; a validation split of a flat folder is
    drawn by `prepare-splits --val` into val.txt. Masks hold class ids, or colours when a palette
    file is used (`palette.txt` in the root, or `LayoutOptions.palette_file`): class names then
    come from the palette, and a classes file, when there is one too, must agree with it.
    """

    expected = (
        "images/{split}/*.png|jpg|jpeg with masks/{split}/STEM.png (or flat: images/*.png|jpg with masks/STEM.png), "
        "masks holding class ids with classes.txt, or colours with palette.txt"
    )

    def __init__(self, root: str | Path, name: str = "folder", options: "LayoutOptions | None" = None) -> None:
        from semiseg_cli.data.palette import read_palette

        self.name = name
        self.root = Path(root)
        self._check_root()
        opts = options or LayoutOptions()
        palette_file = opts.palette_file
        if palette_file is None and (self.root / "palette.txt").is_file():
            palette_file = self.root / "palette.txt"
        classes_file = Path(opts.classes_file) if opts.classes_file is not None else self.root / "classes.txt"
        if opts.classes_file is not None and classes_file.suffix.lower() in (".yaml", ".yml"):
            raise UserError(
                f"classes file {classes_file} is YAML, which only the yolo layout reads; "
                "for the folder layout give a text file with one class name per line"
            )
        self.colour_palette = read_palette(palette_file) if palette_file is not None else None
        names = None
        if classes_file.is_file() or opts.classes_file is not None:
            names = [line.strip() for line in read_text(classes_file, "class list").splitlines() if line.strip()]
            if not 1 <= len(names) <= 255:
                raise UserError(f"{classes_file} lists {len(names)} classes; give between 1 and 255 names, one per line")
        if self.colour_palette is not None:
            if names is not None and names != self.colour_palette.names:
                raise UserError(_disagreement(classes_file, names, self.colour_palette.path, self.colour_palette.names))
            names, colours = self.colour_palette.names, self.colour_palette.colours
        elif names is None:
            raise self._fail(
                f"{classes_file} does not exist (one class name per line; for colour masks give palette.txt "
                "with lines `R G B name` instead)"
            )
        else:
            colours = index_palette(len(names))
        super().__init__(root, names, colours)

    def stored_mask(self, rel: str) -> np.ndarray:
        """Class values as stored, or, with a palette file, class ids mapped from the colours."""
        if self.colour_palette is not None:
            return self.colour_palette.read_ids(self.root / rel)
        try:
            return _load_mask(self.root / rel)
        except _ColourImage as e:
            raise _ColourImage(
                f"{e}, or map its colours to classes with palette.txt in the dataset root (lines `R G B name`)"
            ) from None

    def is_flat(self) -> bool:
        """Images directly in images/: a flat folder, one pool named `train` (a split folder
        images/{split}/ is still read as such, so a stray file beside the split folders of the
        usual layout changes nothing)."""
        folder = self.root / "images"
        return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir())

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        self._check_root("images")
        folder = self.root / "images" / split
        if folder.is_dir():
            return self._pairs(folder, self.root / "masks" / split, f"masks/{split}")
        images = self.root / "images"
        flat = self.is_flat()
        if any(p.is_dir() and not p.name.startswith(".") for p in images.iterdir()):  # the split-folder layout
            stray = (" (the image files directly in images/ are not read: with split folders, every image goes into one)"
                     if flat else "")
            raise self._fail(f"split folder {folder} does not exist{stray}")
        if flat:
            if split != "train":
                raise UserError(
                    f"{self.root} is a flat folder dataset (images/*.png|jpg without split folders): its one pool is the split "
                    f"'train', there is no {split!r} split; draw a validation split with `semiseg prepare-splits --val 0.2` "
                    "and pass its val.txt (`train --val-list`, `eval --split`)"
                )
            return self._pairs(images, self.root / "masks", "masks")
        raise self._fail(f"split folder {folder} does not exist")

    def _pairs(self, folder: Path, mask_dir: Path, mask_rel: str) -> list[tuple[str, str | None]]:
        listed = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        images = [p for p in listed if p.is_file()]
        broken = [p for p in listed if not p.is_file() and p.is_symlink()]
        if broken:
            warn(f"{len(broken)} image link(s) in {folder} lead nowhere (broken or looping symlinks, e.g. {broken[0].name}); "
                 "they are skipped: fix or remove them")
        if not images:
            raise self._fail(f"no .png/.jpg/.jpeg images in {folder}")
        _refuse_shared_stems(images)
        has_masks = mask_dir.is_dir()
        if has_masks:
            stems = {p.stem for p in images}
            orphans = sorted(m.name for m in mask_dir.iterdir() if m.suffix.lower() == ".png" and m.stem not in stems)
            if orphans:
                warn(f"{len(orphans)} mask(s) in {mask_dir} have no image in {folder} (e.g. {orphans[0]}); "
                     "they are not used: add their images or remove them")
        return [(self._rel(p), f"{mask_rel}/{p.stem}.png" if has_masks else None) for p in images]


def _disagreement(classes_file: Path, names: list[str], palette_file: Path, palette_names: list[str]) -> str:
    """One line saying where a classes file and a palette file first differ."""
    if len(names) != len(palette_names):
        where = f"{classes_file} lists {len(names)} classes but {palette_file} defines {len(palette_names)}"
    else:
        k = next(i for i, (a, b) in enumerate(zip(names, palette_names)) if a != b)
        where = f"class {k} is {names[k]!r} in {classes_file} but {palette_names[k]!r} in {palette_file}"
    return (f"{where}; the palette file names the classes of colour masks: make the two agree "
            f"or remove {classes_file.name}")


def _refuse_shared_stems(images: Iterable[Path]) -> None:
    """Masks are matched by stem, so a.png and a.jpg side by side would share one mask."""
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise UserError(f"{seen[p.stem]} and {p} share the stem {p.stem!r}, so their mask is ambiguous; rename one")
        seen[p.stem] = p


class LayoutOptions(NamedTuple):
    """Per-dataset files that are not at a fixed place in the root (`data.classes_file`,
    `data.palette_file`); layouts that do not use an option ignore it."""

    classes_file: Path | None = None
    palette_file: Path | None = None


_LAYOUTS: dict[str, Callable[[Path, LayoutOptions], Layout]] = {
    "voc": lambda root, o: VocLayout(root),
    "cityscapes": lambda root, o: CityscapesLayout(root),
    "camvid": lambda root, o: CamVidLayout(root),
    "folder": lambda root, o: FolderLayout(root, "folder", o),
    "demo": lambda root, o: FolderLayout(root, "demo", o),
}


def register_layout(name: str, factory: Callable[[Path, LayoutOptions], Layout]) -> None:
    """Add a dataset layout (the annotation-file readers register themselves this way)."""
    _LAYOUTS[name] = factory


def get_layout(dataset: str, root: str | Path, options: LayoutOptions | None = None) -> Layout:
    """The layout reader for `dataset` (voc, cityscapes, camvid, folder, demo, yolo, coco) at `root`."""
    if dataset not in _LAYOUTS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(_LAYOUTS)}")
    return _LAYOUTS[dataset](Path(root), options or LayoutOptions())


def layout_for(data: Any, root: str | Path | None = None) -> Layout:
    """The layout of a `DataConfig` (at `root` when given, else `data.root`)."""
    opts = LayoutOptions(
        Path(data.classes_file) if getattr(data, "classes_file", None) else None,
        Path(data.palette_file) if getattr(data, "palette_file", None) else None,
    )
    return get_layout(data.dataset, data.root if root is None else root, opts)
