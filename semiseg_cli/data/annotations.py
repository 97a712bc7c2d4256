"""Annotation exports as datasets: YOLO segmentation labels (`yolo`) and COCO instances JSON (`coco`).

Both formats describe objects (polygons, RLE), not pixels. Each layout rasterises an image's
objects into the usual mask (uint8 class ids, 255 = ignore) the first time it is read, stores the
result in a PNG cache outside the dataset, and from then on every epoch and DataLoader worker
reads that PNG. The rules, stated once:

Class ids. Neither format has a background class, but every pixel outside the objects must be a
class the model learns: class 0 is `background`, and the format's classes follow, shifted by one.
YOLO id k is class k+1 (names from `data.classes_file`, a `data.yaml`, or `classes.txt`); COCO
categories are classes 1..K in increasing category-id order, named from the file. A class list
that names `background` itself is refused: with the shift it would be counted twice, and every
class after it would be off by one without an error.

YOLO (`images/<split>/*.jpg|jpeg|png` + `labels/<split>/<stem>.txt`; also Roboflow's
`<split>/images` + `<split>/labels`, and flat `images/` + `labels/` as split `train`). One object
per line, `class x1 y1 x2 y2 ...`, vertices normalised by the image width and height (read from
the image header). Polygons are filled in file order, later ones over earlier ones (Ultralytics'
order). A line that is not numbers, a class id out of range, an odd coordinate count, fewer than
three vertices, a coordinate outside [0, 1] by more than 0.01, or a detection box (class + 4
numbers) makes the file unreadable, with its line number. An image without a label file, or with
an empty one, is a labeled image that is all background (Ultralytics' negatives); a split without
a `labels/` folder is unlabeled.

COCO (`annotations/instances_<split>.json`, images at `<split>/FILE_NAME` or
`images/<split>/FILE_NAME`; also Roboflow's `<split>/_annotations.coco.json` beside its images).
Polygons and RLE (compressed or not) are decoded with `pycocotools` (`pip install
'semiseg[coco]'`). Crowd regions (`iscrowd: 1`) are painted first, as 255 (ignore); then the
other objects from the largest to the smallest (pixel area; equal areas in annotation-id order),
so small objects stay visible on top of large ones and every object covers crowd ignore. An image
without annotations is all background. Each annotations file is parsed once per process.

The mask column of a split file. YOLO: the label file (`labels/train2017/x.txt`), or, for an image
without one, the image itself (read as all background). COCO: the image path itself, repeated
(`train2017/x.jpg train2017/x.jpg`); its objects are looked up in the annotations file of the
split its folder names. Both are real files under the root, as split files require.

Cache. `$SEMISEG_CACHE/masks` (default `~/.cache/semiseg/masks`, or `$XDG_CACHE_HOME/semiseg/masks`),
one PNG per mask named by a SHA-256 of what determines it: the label bytes (YOLO) or the image's
annotations (COCO), the image size, the class mapping and a format version. Editing a label file
therefore makes a new entry; stale ones are never read. Files are written atomically, so
concurrent workers are safe. A cache that cannot be written costs one warning and the masks are
rasterised in memory instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from semiseg_cli.data.layouts import (
    IGNORE,
    IMAGE_EXTS,
    Layout,
    Pair,
    _refuse_shared_stems,
    index_palette,
    register_layout,
)
from semiseg_cli.data.reading import _Unreadable
from semiseg_cli.errors import UserError, warn
from semiseg_cli.io import atomic_path, read_text

BACKGROUND = "background"
# How far outside [0, 1] a normalised YOLO vertex may lie (rounding in exporters) before the
# line is refused; vertices within it are clipped.
COORD_TOLERANCE = 0.01
# Most classes a layout can have: ids 0..254, since 255 marks ignored pixels.
MAX_CLASSES = IGNORE


# ================================================================================== cache


def mask_cache_dir() -> Path:
    """Where rasterised masks are kept: `$SEMISEG_CACHE/masks`, else the user cache folder."""
    env = os.environ.get("SEMISEG_CACHE")
    if env:
        return Path(env).expanduser() / "masks"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "semiseg" / "masks"


_unwritable: set[str] = set()  # cache folders that failed a write in this process (warned once)


class MaskCache:
    """Rasterised masks as PNG files named by a content key; a folder that cannot be written
    is given up after one warning, and masks are then made in memory each time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.png"

    def get(self, key: str, shape: tuple[int, int], make: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path(key)
        if path.is_file():
            try:
                with Image.open(path) as im:
                    arr = np.array(im)
                if arr.shape == shape and arr.dtype == np.uint8:
                    return arr
            except (OSError, ValueError, SyntaxError):
                pass  # damaged entry: make it again and replace it
        arr = make()
        self._store(path, arr)
        return arr

    def _store(self, path: Path, arr: np.ndarray) -> None:
        folder = str(self.folder)
        if folder in _unwritable:
            return
        try:
            with atomic_path(path) as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")  # 2-D uint8: mode L
        except (UserError, OSError) as e:
            _unwritable.add(folder)
            warn(f"cannot write the mask cache {self.folder} ({e}); masks are rasterised in memory on every read "
                 "instead: set SEMISEG_CACHE to a writable folder")


def _key(kind: str, *parts: bytes | str) -> str:
    h = hashlib.sha256(kind.encode())
    for p in parts:
        h.update(b"\0")
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header (no decoding)."""
    if not path.is_file():
        raise _Unreadable(f"its image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _Unreadable(f"cannot read the size of its image {path.name}: {e}") from None


# ================================================================================== class names


def _check_names(names: list[str], source: str, fix: str) -> list[str]:
    """The format's class names (without background), checked: 1..254 of them, none empty, none
    named background (that would shift every class after it by one)."""
    if not names:
        raise UserError(f"{source} lists no class names; {fix}")
    if len(names) > MAX_CLASSES - 1:
        raise UserError(f"{source} lists {len(names)} classes; at most {MAX_CLASSES - 1} fit beside background "
                        f"(class ids 0..{MAX_CLASSES - 1}, {IGNORE} = ignore)")
    for i, name in enumerate(names):
        if not name.strip():
            raise UserError(f"{source}: the name of class {i} is empty; give every class a name")
        if name.strip().lower() in (BACKGROUND, "_background_", "__background__"):
            raise UserError(
                f"{source} lists {name!r} (entry {i}), but class 0 is background already and the listed classes "
                f"are shifted by one (entry {i} is class {i + 1}), so it would be counted twice: remove {name!r} "
                "from the list, or rename it if it is a real object class"
            )
    return names


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r'\\(.)', r"\1", text[1:-1])
    return text


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_items(text: str) -> list[str]:
    """Comma-separated items of a flow list or mapping, commas inside quotes kept."""
    items, cur, quote = [], "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def _names_from_mapping(pairs: list[tuple[str, str]], source: str) -> list[str]:
    by_id: dict[int, str] = {}
    for key, value in pairs:
        try:
            cid = int(_unquote(key))
        except ValueError:
            raise UserError(f"{source}: names key {key!r} is not a class id; write `names:` as `0: name` lines or a list") from None
        if cid in by_id:
            raise UserError(f"{source}: class id {cid} is named twice under `names:`")
        by_id[cid] = _unquote(value)
    missing = [i for i in range(len(by_id)) if i not in by_id]
    if missing:
        raise UserError(f"{source}: the ids under `names:` must be 0..{len(by_id) - 1}, but {missing[0]} is missing")
    return [by_id[i] for i in range(len(by_id))]


def parse_yaml_names(text: str, source: str) -> list[str]:
    """Class names from a YOLO `data.yaml`: `names:` as a flow list (`[a, b]`), a block list
    (`- a`), a flow mapping (`{0: a}`) or a block mapping (`0: a`); `nc:`, when present, must
    agree. A small subset of YAML read here, so that no YAML library is needed."""
    lines = [_strip_comment(ln) for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if re.match(r"names\s*:", ln)), None)
    if start is None:
        raise UserError(f"{source} has no top-level `names:` entry; list the class names there (or give a plain one-name-per-line file)")
    rest = lines[start].split(":", 1)[1].strip()
    if rest[:1] in ("[", "{"):
        close = "]" if rest[0] == "[" else "}"
        j = start
        while not rest.endswith(close) and j + 1 < len(lines):  # a flow list may span lines
            j += 1
            rest += " " + lines[j].strip()
        if not rest.endswith(close):
            raise UserError(f"{source}: the `names:` list opened with {rest[0]!r} is never closed with {close!r}")
        items = _split_items(rest[1:-1])
        if close == "]":
            names = [_unquote(i) for i in items]
        else:
            names = _names_from_mapping([tuple(i.split(":", 1)) if ":" in i else (i, "") for i in items], source)  # type: ignore[misc]
    elif rest:
        raise UserError(f"{source}: `names:` must be a list or an id-to-name mapping, not {rest!r}")
    else:
        block: list[str] = []
        for ln in lines[start + 1:]:
            if not ln.strip():
                continue
            if not ln[0].isspace() and not ln.startswith("-"):
                break
            block.append(ln.strip())
        if all(b.startswith("-") for b in block):
            names = [_unquote(b[1:]) for b in block]
        elif all(":" in b and not b.startswith("-") for b in block):
            names = _names_from_mapping([tuple(b.split(":", 1)) for b in block], source)  # type: ignore[misc]
        else:
            raise UserError(f"{source}: under `names:` write either `- name` lines or `id: name` lines, not a mix")
    nc = next((ln.split(":", 1)[1].strip() for ln in lines if re.match(r"nc\s*:", ln)), None)
    if nc is not None and nc != str(len(names)):
        raise UserError(f"{source} says nc: {nc} but lists {len(names)} names; make them agree")
    return names


def read_class_names(path: Path) -> list[str]:
    """Class names from a plain one-name-per-line file, or from `names:` in a .yaml/.yml file."""
    text = read_text(path, "class list")
    if path.suffix.lower() in (".yaml", ".yml"):
        return parse_yaml_names(text, str(path))
    return [line.strip() for line in text.splitlines() if line.strip()]


_NAMES_FIX = "pass --classes-file (data.classes_file): one class name per line in YOLO id order, or a YOLO data.yaml"


def yolo_class_names(root: Path, classes_file: Path | None) -> tuple[list[str], str]:
    """(YOLO class names in id order, the file they came from): `classes_file`, else `data.yaml`
    or `dataset.yaml` in the root or its parent, else `classes.txt` / `names.txt` in the root."""
    if classes_file is not None:
        candidates = [Path(classes_file)]
        if not candidates[0].is_file():
            raise UserError(f"classes file {classes_file} does not exist; {_NAMES_FIX}")
    else:
        candidates = [d / n for d in (root, root.parent) for n in ("data.yaml", "dataset.yaml")]
        candidates += [root / "classes.txt", root / "names.txt"]
    for path in candidates:
        if path.is_file():
            return _check_names(read_class_names(path), str(path), _NAMES_FIX), str(path)
    raise UserError(f"the yolo dataset {root} has no class names (no data.yaml, dataset.yaml, classes.txt or names.txt); {_NAMES_FIX}")


# ================================================================================== YOLO


class YoloObject(NamedTuple):
    class_id: int  # after the background shift
    points: list[tuple[float, float]]  # normalised vertices


def parse_yolo_label(text: str, num_names: int, names_source: str = "class list") -> list[YoloObject]:
    """The objects of a YOLO segmentation label file, in file order; `_Unreadable` naming the
    line for anything that is not a polygon of a known class."""
    objects: list[YoloObject] = []
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        values = []
        for tok in tokens:
            try:
                v = float(tok)
            except ValueError:
                raise _Unreadable(f"line {n}: {tok!r} is not a number; lines read `class x1 y1 x2 y2 ...`") from None
            if not math.isfinite(v):
                raise _Unreadable(f"line {n}: {tok!r} is not a finite number")
            values.append(v)
        cls, coords = values[0], values[1:]
        if cls != int(cls) or not 0 <= cls < num_names:
            raise _Unreadable(f"line {n}: class id {tokens[0]} is not one of 0..{num_names - 1} (the {num_names} names in {names_source})")
        if len(coords) == 4:
            raise _Unreadable(f"line {n}: `class x y w h` is a YOLO detection box, not a polygon; "
                              "the yolo layout reads segmentation labels (export them as YOLO segmentation)")
        if len(coords) % 2:
            raise _Unreadable(f"line {n}: {len(coords)} coordinates after the class id; vertices come in x y pairs")
        if len(coords) < 6:
            raise _Unreadable(f"line {n}: {len(coords) // 2} vert{'ex' if len(coords) == 2 else 'ices'}; a polygon needs at least 3")
        worst = max(coords, key=lambda v: max(-v, v - 1))
        if worst < -COORD_TOLERANCE or worst > 1 + COORD_TOLERANCE:
            raise _Unreadable(f"line {n}: coordinate {worst:g} is outside 0..1; YOLO vertices are normalised by the "
                              "image width and height (divide pixel coordinates by them)")
        pts = [(min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)) for x, y in zip(coords[0::2], coords[1::2])]
        objects.append(YoloObject(int(cls) + 1, pts))
    return objects


def rasterise_polygons(objects: Sequence[YoloObject], size: tuple[int, int]) -> np.ndarray:
    """Class ids (HxW uint8, 0 = background): polygons filled in order, later over earlier."""
    w, h = size
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for obj in objects:
        draw.polygon([(x * w, y * h) for x, y in obj.points], fill=obj.class_id)
    return np.array(im)


def _last_part(rel: str, name: str) -> int | None:
    parts = rel.split("/")
    hits = [i for i, p in enumerate(parts[:-1]) if p == name]
    return hits[-1] if hits else None


class YoloLayout(Layout):
    name = "yolo"
    expected = ("images/{split}/*.jpg|jpeg|png with labels/{split}/{stem}.txt polygons (YOLO segmentation; or "
                "{split}/images + {split}/labels; or flat images/ + labels/ as split train) and the class names in "
                "data.yaml, classes.txt or --classes-file")
    tag_exclude = (0,)  # background is in nearly every image

    def __init__(self, root: str | Path, classes_file: Path | None = None) -> None:
        self.root = Path(root)
        self._check_root()
        names, self.names_source = yolo_class_names(self.root, classes_file)
        super().__init__(root, [BACKGROUND, *names], index_palette(len(names) + 1))
        self.cache = MaskCache(mask_cache_dir())

    # ------------------------------------------------------------------ where files are

    def image_dir(self, split: str) -> Path:
        for cand in (self.root / "images" / split, self.root / split / "images"):
            if cand.is_dir():
                return cand
        flat = self.root / "images"
        if split == "train" and flat.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in flat.iterdir()):
            return flat
        found = sorted(p.name for p in (self.root / "images").iterdir() if p.is_dir()) if flat.is_dir() else []
        found += sorted(p.name for p in self.root.iterdir() if (p / "images").is_dir())
        hint = f" (splits here: {', '.join(found)}; pass --split / data.train_split)" if found else ""
        raise self._fail(f"split folder {self.root / 'images' / split} does not exist{hint}")

    def label_rel(self, image_rel: str) -> str:
        """The label file of an image: its last `images` folder becomes `labels`, the suffix .txt."""
        i = _last_part(image_rel, "images")
        if i is None:
            raise _Unreadable("it is not inside an images/ folder, so it has no YOLO label file")
        parts = image_rel.split("/")
        parts[i] = "labels"
        parts[-1] = PurePosixPath(parts[-1]).stem + ".txt"
        return "/".join(parts)

    def image_for_label(self, label_rel: str) -> Path:
        i = _last_part(label_rel, "labels")
        if i is None:
            raise _Unreadable("it is not inside a labels/ folder, so its image cannot be found")
        parts = label_rel.split("/")
        parts[i] = "images"
        folder = self.root.joinpath(*parts[:-1])
        stem = PurePosixPath(parts[-1]).stem
        for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
        raise _Unreadable(f"there is no image {stem}.png/.jpg/.jpeg for it in {folder}")

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        folder = self.image_dir(split)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not images:
            raise self._fail(f"no .png/.jpg/.jpeg images in {folder}")
        _refuse_shared_stems(images)
        rels = [self._rel(p) for p in images]
        label_dir = self.root / PurePosixPath(self.label_rel(rels[0])).parent
        if not label_dir.is_dir():  # like a masks-less folder split: unlabeled
            return [(r, None) for r in rels]
        pairs: list[tuple[str, str | None]] = []
        negatives = []
        for rel in rels:
            lab = self.label_rel(rel)
            if (self.root / lab).is_file():
                pairs.append((rel, lab))
            else:
                pairs.append((rel, rel))  # no label file: an image with no objects
                negatives.append(rel)
        if negatives:
            warn(f"{len(negatives)} image(s) in {folder} have no label file in {label_dir} (e.g. {Path(negatives[0]).name}); "
                 "they are read as all background (YOLO's negatives): add their label files if they show objects")
        stems = {p.stem for p in images}
        orphans = sorted(p.name for p in label_dir.glob("*.txt") if p.stem not in stems)
        if orphans:
            warn(f"{len(orphans)} label file(s) in {label_dir} have no image in {folder} (e.g. {orphans[0]}); "
                 "they are not used: add their images or remove them")
        return pairs

    # ------------------------------------------------------------------ reading

    def stored_mask(self, rel: str) -> np.ndarray:
        """Class ids rasterised from the label file `rel` (or all background when `rel` is an
        image without one), through the cache."""
        if PurePosixPath(rel).suffix.lower() in IMAGE_EXTS:
            label = self.root / self.label_rel(rel)
            if not label.parent.is_dir():
                raise _Unreadable(f"there is no labels folder {label.parent} for this image")
            w, h = _header_size(self.root / rel)
            if not label.is_file():
                return np.zeros((h, w), np.uint8)
            label_path = label
        elif rel.endswith(".txt"):
            label_path = self.root / rel
            w, h = _header_size(self.image_for_label(rel))
        else:
            raise _Unreadable("a yolo mask is a label .txt file (or an image without one)")
        try:
            data = label_path.read_bytes()
        except OSError as e:
            raise _Unreadable(e.strerror or type(e).__name__) from None
        n = self.num_classes - 1
        key = _key("yolo-seg-v1", data, f"{w}x{h}", f"names={n};shift=1")

        def make() -> np.ndarray:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise _Unreadable(f"not UTF-8 text (byte {e.start})") from None
            return rasterise_polygons(parse_yolo_label(text, n, self.names_source), (w, h))

        return self.cache.get(key, (h, w), make)

    def _check_pair(self, pair: Pair, require_masks: bool) -> tuple[list[str], list[int] | None]:
        img, mask = pair
        if mask == img and not (self.root / img).exists():  # one line for a missing negative, not two
            return [f"{img}: image does not exist"], None
        return super()._check_pair(pair, require_masks)


# ================================================================================== COCO


def _mask_api() -> Any:
    try:
        from pycocotools import mask
    except ImportError:
        raise UserError("the coco layout decodes polygons and RLE with pycocotools, which is not installed: "
                        "pip install 'semiseg[coco]' (or pip install pycocotools)") from None
    return mask


class CocoIndex(NamedTuple):
    """What one annotations file says, indexed once: categories (sorted by id), each image's
    (id, width, height) by file name, and each image id's annotations."""

    path: Path
    categories: list[tuple[int, str]]
    images: dict[str, tuple[int, int, int]]
    annotations: dict[int, list[dict[str, Any]]]


_INDEXES: dict[tuple[str, int, int], CocoIndex] = {}
_INDEX_LOCK = threading.Lock()


def _bad_json(path: Path, what: str) -> UserError:
    return UserError(f"annotations file {path}: {what}; expected a COCO instances file (images, annotations, categories)")


def load_coco_index(path: Path) -> CocoIndex:
    """The index of a COCO instances file; each file is parsed once per process (it is reused
    while its size and modification time stay the same)."""
    try:
        st = path.stat()
    except OSError as e:
        raise UserError(f"cannot read annotations file {path}: {e.strerror or e}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _INDEX_LOCK:
        if key in _INDEXES:
            return _INDEXES[key]
        index = _parse_coco(path)
        if len(_INDEXES) >= 4:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = index
        return index


def _parse_coco(path: Path) -> CocoIndex:
    text = read_text(path, "annotations file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"annotations file {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise _bad_json(path, f"the top level is a {type(data).__name__}, not an object")
    for field in ("images", "categories"):
        if not isinstance(data.get(field), list):
            raise _bad_json(path, f"no {field!r} list")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise _bad_json(path, "'annotations' is not a list")
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise _bad_json(path, f"category {json.dumps(c)[:60]} needs an integer id and a name")
        if c["id"] in cats:
            raise _bad_json(path, f"category id {c['id']} is defined twice")
        cats[c["id"]] = c["name"]
    images: dict[str, tuple[int, int, int]] = {}
    ids: set[int] = set()
    for im in data["images"]:
        ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
        ok = ok and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height"))
        if not ok:
            raise _bad_json(path, f"image entry {json.dumps(im)[:80]} needs an integer id, a file_name, width and height")
        name = im["file_name"].replace("\\", "/")
        if name in images:
            raise _bad_json(path, f"file_name {name!r} is listed twice")
        if any(c.isspace() for c in name):
            raise _bad_json(path, f"file_name {name!r} contains a space, which split files cannot hold; rename the image")
        images[name] = (im["id"], im["width"], im["height"])
        ids.add(im["id"])
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), int):
            raise _bad_json(path, f"annotation {json.dumps(a)[:80]} has no integer image_id")
        if a["image_id"] in ids:
            keep = {k: a.get(k) for k in ("id", "category_id", "iscrowd", "segmentation")}
            by_image.setdefault(a["image_id"], []).append(keep)
    return CocoIndex(path, sorted(cats.items()), images, by_image)


def _decode_object(api: Any, ann: dict[str, Any], h: int, w: int) -> Any:
    """The RLE of one annotation's segmentation (polygons merged); `_Unreadable` otherwise."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            raise _Unreadable("it has no segmentation (a detection-only export?); the coco layout needs polygons or RLE")
        for poly in seg:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
                raise _Unreadable("a polygon must be a list of numbers x1 y1 x2 y2 ...")
            if len(poly) % 2 or len(poly) < 6:
                raise _Unreadable(f"a polygon of {len(poly)} numbers; it needs x y pairs for at least 3 vertices")
        return api.merge(api.frPyObjects(seg, h, w))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise _Unreadable(f"its RLE size {seg['size']} is not the image's [height, width] [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise _Unreadable(f"its uncompressed RLE counts do not add up to {h}x{w} pixels")
            return api.frPyObjects(seg, h, w)
        if isinstance(counts, (str, bytes)):
            return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    raise _Unreadable("its segmentation is neither polygons nor RLE")


def rasterise_coco(api: Any, anns: Sequence[dict[str, Any]], h: int, w: int, class_of: dict[int, int], where: str) -> np.ndarray:
    """Class ids for one image: crowd regions as ignore first, then objects largest to smallest."""
    out = np.zeros((h, w), np.uint8)
    crowd, objects = [], []
    for a in anns:
        aid = a.get("id")
        try:
            if a.get("category_id") not in class_of:
                raise _Unreadable(f"category_id {a.get('category_id')} is not among the file's categories")
            rle = _decode_object(api, a, h, w)
            area = int(api.area(rle))
        except _Unreadable as e:
            raise _Unreadable(f"{where}, annotation {aid}: {e}") from None
        if a.get("iscrowd"):
            crowd.append(rle)
        else:
            objects.append((-area, aid if isinstance(aid, int) else 0, class_of[a["category_id"]], rle))
    for rle in crowd:
        out[api.decode(rle).astype(bool)] = IGNORE
    for _, _, cid, rle in sorted(objects, key=lambda o: (o[0], o[1])):
        out[api.decode(rle).astype(bool)] = cid
    return out


class CocoLayout(Layout):
    name = "coco"
    expected = ("annotations/instances_{split}.json with its images in {split}/ or images/{split}/ "
                "(or Roboflow's {split}/_annotations.coco.json beside its images)")
    tag_exclude = (0,)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        _mask_api()
        self._check_root()
        self.files = self._annotation_files()
        if not self.files:
            raise self._fail(f"{self.root} holds no annotations/instances_<split>.json")
        # Names come from the smallest file (usually val); every split must agree with it.
        first = min(self.files.values(), key=lambda p: p.stat().st_size)
        self._indexes: dict[str, CocoIndex] = {}
        self._bases: dict[str, str] = {}
        self._lock = threading.Lock()
        self.categories = load_coco_index(first).categories
        names = _check_names([n for _, n in self.categories], f"the categories of {first}",
                             "add the categories to the annotations file")
        self.class_of = {cid: i + 1 for i, (cid, _) in enumerate(self.categories)}
        super().__init__(root, [BACKGROUND, *names], index_palette(len(names) + 1))
        self.cache = MaskCache(mask_cache_dir())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _annotation_files(self) -> dict[str, Path]:
        files = {}
        ann = self.root / "annotations"
        if ann.is_dir():
            for p in sorted(ann.glob("instances_*.json")):
                files[p.stem[len("instances_"):]] = p
        for p in sorted(self.root.glob("*/_annotations.coco.json")):
            files.setdefault(p.parent.name, p)
        return files

    def index(self, split: str) -> CocoIndex:
        with self._lock:
            if split not in self._indexes:
                if split not in self.files:
                    raise self._fail(f"no annotations file for split {split!r} (splits here: {', '.join(self.files)})")
                idx = load_coco_index(self.files[split])
                if idx.categories != self.categories:
                    raise UserError(f"the categories of {idx.path} differ from those of the other annotations files "
                                    "under the root; every split must define the same categories")
                self._indexes[split] = idx
            return self._indexes[split]

    def base(self, split: str) -> str:
        """The root-relative folder the file names of `split` are relative to."""
        idx = self.index(split)
        with self._lock:
            if split not in self._bases:
                own = self._rel(self.files[split].parent) if self.files[split].parent != self.root / "annotations" else None
                cands = [c for c in (split, f"images/{split}", own, "") if c is not None]
                probe = sorted(idx.images)[:5]
                for c in cands:
                    if probe and any((self.root / c / name).is_file() for name in probe):
                        self._bases[split] = c
                        break
                else:
                    where = ", ".join(f"{c or '.'}/" for c in dict.fromkeys(cands))
                    raise self._fail(f"the images of {idx.path.name} ({probe[0] if probe else 'none listed'}, ...) are in none of {where} under {self.root}")
            return self._bases[split]

    def _rel_of(self, base: str, name: str) -> str:
        return f"{base}/{name}" if base else name

    def list_pairs(self, split: str) -> list[tuple[str, str | None]]:
        idx = self.index(split)
        if not idx.images:
            raise self._fail(f"{idx.path} lists no images")
        base = self.base(split)
        rels = sorted(self._rel_of(base, name) for name in idx.images)
        return [(r, r) for r in rels]  # the mask of an image is its annotations, found from its path

    def _locate(self, rel: str) -> tuple[str, str]:
        """(split, file name) of an image path."""
        parts = rel.split("/")
        guesses = [parts[1]] if parts[0] == "images" and len(parts) > 2 else []
        guesses += [parts[0]] if len(parts) > 1 else []
        guesses += [s for s in self.files if s not in guesses]
        for split in guesses:
            if split not in self.files:
                continue
            base = self.base(split)
            prefix = f"{base}/" if base else ""
            if rel.startswith(prefix) and rel[len(prefix):] in self.index(split).images:
                return split, rel[len(prefix):]
        raise _Unreadable(f"no annotations file under the root lists this image ({', '.join(p.name for p in self.files.values())})")

    def stored_mask(self, rel: str) -> np.ndarray:
        """Class ids of the image at `rel`, rasterised from its annotations, through the cache."""
        try:
            split, name = self._locate(rel)
        except UserError as e:
            raise _Unreadable(str(e)) from None
        idx = self.index(split)
        image_id, w, h = idx.images[name]
        anns = idx.annotations.get(image_id, [])
        if not anns:
            return np.zeros((h, w), np.uint8)
        mapping = json.dumps(sorted(self.class_of.items()))
        key = _key("coco-v1", json.dumps(anns, sort_keys=True), f"{w}x{h}", mapping)
        where = self._rel(self.files[split])
        return self.cache.get(key, (h, w), lambda: rasterise_coco(_mask_api(), anns, h, w, self.class_of, where))

    def _check_pair(self, pair: Pair, require_masks: bool) -> tuple[list[str], list[int] | None]:
        img, mask = pair
        if mask == img and not (self.root / img).exists():
            return [f"{img}: image does not exist (it is listed in the annotations)"], None
        return super()._check_pair(pair, require_masks)


register_layout("yolo", lambda root, o: YoloLayout(root, o.classes_file))
register_layout("coco", lambda root, o: CocoLayout(root))
