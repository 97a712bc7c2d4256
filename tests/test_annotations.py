"""The annotation-export layouts (`yolo`, `coco`) on tiny generated trees, and COCO128-seg.

Rules under test (stated in `semiseg_cli/data/annotations.py`): class 0 is background and the
format's classes follow shifted by one; YOLO polygons are filled in file order (later on top);
COCO paints crowd as ignore first, then objects largest to smallest; masks are rasterised once
into a PNG cache; every bad input is one line naming the file.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app
from semiseg_cli.data import annotations
from semiseg_cli.data.layouts import IGNORE, LayoutOptions, get_layout
from semiseg_cli.data.splits import prepare_splits, read_split_file
from semiseg_cli.errors import UserError

runner = CliRunner()

COCO80 = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own mask cache (never the user's) and a fresh per-process state."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEMISEG_CACHE", str(cache))
    monkeypatch.setattr(annotations, "_unwritable", set())
    monkeypatch.setattr(annotations, "_INDEXES", {})
    return cache / "masks"


def _image(path: Path, w: int, h: int, ext: str = "png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path.with_suffix(f".{ext}"))


def _square(cls: int, x0: float, y0: float, x1: float, y1: float) -> str:
    return f"{cls} {x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}"


# Left half class 0, a centred square of class 2 over it: pixel (y, x) at w=40, h=20.
OVERLAP = [_square(0, 0.0, 0.0, 0.5, 1.0), _square(2, 0.25, 0.25, 0.75, 0.75)]


def make_yolo_tree(base: Path, names: str = "classes.txt", n_train: int = 3) -> Path:
    """images/{train,val} of 40x20 px with polygon labels; 3 classes (a, b, c)."""
    root = base / "yolo"
    for split, n in (("train", n_train), ("val", 1)):
        for i in range(n):
            _image(root / "images" / split / f"im{i}.png", 40, 20)
            lab = root / "labels" / split / f"im{i}.txt"
            lab.parent.mkdir(parents=True, exist_ok=True)
            lab.write_text("\n".join(OVERLAP if i % 2 == 0 else [_square(1, 0.1, 0.1, 0.9, 0.9)]) + "\n")
    if names == "classes.txt":
        (root / "classes.txt").write_text("a\nb\nc\n")
    return root


# ------------------------------------------------------------------------------------ YOLO


def test_yolo_later_polygons_cover_earlier_ones_and_ids_shift_by_one(tmp_path: Path) -> None:
    root = make_yolo_tree(tmp_path)
    lay = get_layout("yolo", root)
    assert lay.class_names == ["background", "a", "b", "c"] and lay.num_classes == 4
    pairs = lay.list_pairs("train")
    assert pairs[0] == ("images/train/im0.png", "labels/train/im0.txt")
    m = lay.read_mask(pairs[0][1])
    assert m.shape == (20, 40) and m.dtype == np.uint8
    assert m[2, 5] == 1  # only the first polygon: YOLO 0 -> class 1
    assert m[10, 15] == 3 and m[10, 25] == 3  # the later polygon (YOLO 2) on top, also where both are
    assert m[2, 35] == 0 and m[18, 35] == 0  # outside every polygon: background
    (root / "labels" / "train" / "im0.txt").write_text("\n".join(reversed(OVERLAP)) + "\n")
    m = lay.read_mask("labels/train/im0.txt")
    assert m[10, 15] == 1 and m[10, 25] == 3  # file order decides: now the big one is on top


def test_yolo_negatives_are_background_and_a_split_without_labels_is_unlabeled(tmp_path: Path, capsys: Any) -> None:
    root = make_yolo_tree(tmp_path)
    (root / "labels" / "train" / "im1.txt").unlink()
    (root / "labels" / "train" / "im2.txt").write_text("\n\n")
    _image(root / "images" / "test" / "t0.jpg", 40, 20, "jpg")
    lay = get_layout("yolo", root)
    pairs = lay.list_pairs("train")
    assert pairs[1] == ("images/train/im1.png", "images/train/im1.png")  # no label file: the image stands for it
    assert "1 image(s)" in capsys.readouterr().err
    for _, mask in pairs[1:]:
        assert not lay.read_mask(mask).any()  # all background
    assert lay.scan(pairs).problems == []
    assert lay.list_pairs("test") == [("images/test/t0.jpg", None)]


def test_yolo_flat_and_roboflow_folders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _image(flat / "images" / "a.jpg", 40, 20, "jpg")
    (flat / "labels").mkdir()
    (flat / "labels" / "a.txt").write_text(OVERLAP[0] + "\n")
    (flat / "classes.txt").write_text("a\nb\nc\n")
    lay = get_layout("yolo", flat)
    assert lay.list_pairs("train") == [("images/a.jpg", "labels/a.txt")]
    assert lay.read_mask("labels/a.txt")[2, 5] == 1

    rf = tmp_path / "rf"
    _image(rf / "valid" / "images" / "b.png", 40, 20)
    (rf / "valid" / "labels").mkdir(parents=True)
    (rf / "valid" / "labels" / "b.txt").write_text(OVERLAP[1] + "\n")
    (rf / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 3\nnames: ['a', 'b', 'c']\n")
    lay = get_layout("yolo", rf)
    assert lay.list_pairs("valid") == [("valid/images/b.png", "valid/labels/b.txt")]
    assert lay.read_mask("valid/labels/b.txt")[10, 20] == 3
    with pytest.raises(UserError, match=r"splits here: valid"):
        lay.list_pairs("val")


@pytest.mark.parametrize(
    "where, text",
    [
        ("data.yaml", "nc: 3\nnames: [a, 'b c', \"d\"]  # flow list\n"),
        ("data.yaml", "path: .\nnames:\n  - a\n  - b c\n  - d\nnc: 3\n"),
        ("data.yaml", "names:\n- a\n- b c\n- d\n"),
        ("data.yaml", "names:\n  0: a\n  2: d\n  1: b c\n"),
        ("dataset.yaml", "names: {0: a, 1: 'b c', 2: d}\n"),
        ("../data.yaml", "names: [a,\n  b c,\n  d]\n"),
        ("classes.txt", "a\nb c\nd\n"),
        ("names.txt", "a\nb c\n\nd\n"),
    ],
)
def test_yolo_class_names_from_each_source(tmp_path: Path, where: str, text: str) -> None:
    root = make_yolo_tree(tmp_path, names="none")
    (root / where).write_text(text)
    assert get_layout("yolo", root).class_names == ["background", "a", "b c", "d"]


def test_yolo_classes_file_option_wins_and_bad_name_lists_are_one_line(tmp_path: Path) -> None:
    root = make_yolo_tree(tmp_path)  # classes.txt: a b c
    given = tmp_path / "mine.yaml"
    given.write_text("names:\n  0: x\n  1: y\n  2: z\n")
    assert get_layout("yolo", root, LayoutOptions(given)).class_names == ["background", "x", "y", "z"]
    (root / "classes.txt").unlink()
    with pytest.raises(UserError, match=r"--classes-file \(data.classes_file\)") as missing:
        get_layout("yolo", root)
    assert "\n" not in str(missing.value)
    cases = {
        "nc: 4\nnames: [a, b, c]\n": "nc: 4 but lists 3 names",
        "names:\n  0: a\n  2: c\n": "1 is missing",
        "names: person\n": "must be a list",
        "names: [a, b\n": "never closed",
        "classes: [a]\n": "no top-level `names:`",
    }
    for text, fragment in cases.items():
        given.write_text(text)
        with pytest.raises(UserError, match=fragment):
            get_layout("yolo", root, LayoutOptions(given))
    shifted = tmp_path / "with_bg.txt"
    shifted.write_text("background\na\nb\n")  # would silently shift every class by one
    with pytest.raises(UserError, match=r"class 0 is background already.*remove 'background'"):
        get_layout("yolo", root, LayoutOptions(shifted))
    with pytest.raises(UserError, match="does not exist"):
        get_layout("yolo", root, LayoutOptions(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("0 0.1 0.1 0.9 zero 0.5 0.9", "'zero' is not a number"),
        ("3 0.1 0.1 0.9 0.1 0.5 0.9", "class id 3 is not one of 0..2"),
        ("1.5 0.1 0.1 0.9 0.1 0.5 0.9", "class id 1.5 is not one of 0..2"),
        ("0 0.1 0.1 0.9 0.1 0.5", "5 coordinates after the class id; vertices come in x y pairs"),
        ("0 0.1 0.1 0.9 0.1 0.5 0.9 0.2", "7 coordinates"),
        ("0 0.1 0.1 0.9 0.1", "detection box"),
        ("0 0.1 0.1", "1 vertex; a polygon needs at least 3"),
        ("2", "0 vertices; a polygon needs at least 3"),
        ("0 0.1 0.1 0.9 nan 0.5 0.9", "'nan' is not a finite number"),
        ("0 12 4 30 4 20 16", "coordinate 30 is outside 0..1"),
        ("0 -0.2 0.1 0.9 0.1 0.5 0.9", "coordinate -0.2 is outside 0..1"),
    ],
)
def test_yolo_bad_label_line_fails_prepare_splits_naming_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    root = make_yolo_tree(tmp_path)
    (root / "labels" / "train" / "im1.txt").write_text(f"{OVERLAP[0]}\n{line}\n")
    with pytest.raises(UserError) as err:
        prepare_splits("yolo", root, ["1/2"], 0, tmp_path / "splits")
    msg = str(err.value)
    assert "labels/train/im1.txt: unreadable mask (line 2: " in msg and fragment in msg, msg
    assert "\n" not in msg and not (tmp_path / "splits").exists()


def test_yolo_tiny_rounding_outside_the_unit_square_is_clipped(tmp_path: Path) -> None:
    root = make_yolo_tree(tmp_path)
    (root / "labels" / "train" / "im0.txt").write_text("0 -0.005 0 1.004 0 1.004 1.0 -0.005 1.0\n")
    assert (get_layout("yolo", root).read_mask("labels/train/im0.txt") == 1).all()


def test_cli_prepare_splits_reports_a_bad_label_in_one_line_and_a_clean_tree_round_trips(tmp_path: Path) -> None:
    root = make_yolo_tree(tmp_path, n_train=4)
    (root / "labels" / "train" / "im3.txt").unlink()  # a negative: its pair is (image, image)
    out = tmp_path / "splits"
    args = ["prepare-splits", "--dataset", "yolo", "--root", str(root), "--labeled", "1/2", "--out", str(out)]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    lay = get_layout("yolo", root)
    pairs = read_split_file(out / "labeled.txt", root) + read_split_file(out / "unlabeled.txt", root)
    assert sorted(pairs) == lay.list_pairs("train")
    assert ("images/train/im3.png", "images/train/im3.png") in pairs
    for _, mask in pairs:
        assert lay.read_mask(mask).shape == (20, 40)

    (root / "labels" / "train" / "im2.txt").write_text("0 0.1 0.1 0.9 0.1\n")
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "other")])
    assert bad.exit_code == 2, bad.output
    err = bad.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in bad.output, err
    assert "labels/train/im2.txt: unreadable mask (line 1: `class x y w h` is a YOLO detection box" in err


def test_yolo_masks_are_rasterised_once_and_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path) -> None:
    root = make_yolo_tree(tmp_path)
    calls: list[int] = []
    real = annotations.rasterise_polygons
    monkeypatch.setattr(annotations, "rasterise_polygons", lambda objs, size: calls.append(1) or real(objs, size))
    first = get_layout("yolo", root).read_mask("labels/train/im0.txt")
    assert len(calls) == 1
    entries = list(_private_cache.rglob("*.png"))
    assert len(entries) == 1 and np.array_equal(np.array(Image.open(entries[0])), first)
    again = get_layout("yolo", root).read_mask("labels/train/im0.txt")  # a new layout, as in a new run
    assert len(calls) == 1 and np.array_equal(again, first)
    lab = root / "labels" / "train" / "im0.txt"
    lab.write_text(OVERLAP[1] + "\n")  # an edited label file is a new entry, never the stale one
    edited = get_layout("yolo", root).read_mask("labels/train/im0.txt")
    assert len(calls) == 2 and edited[2, 5] == 0 and len(list(_private_cache.rglob("*.png"))) == 2
    names = tmp_path / "more.txt"  # another class list is another mapping: another entry
    names.write_text("a\nb\nc\nd\n")
    get_layout("yolo", root, LayoutOptions(names)).read_mask("labels/train/im0.txt")
    assert len(calls) == 3


def test_an_unwritable_cache_falls_back_to_memory_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    root = make_yolo_tree(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SEMISEG_CACHE", str(blocker))
    lay = get_layout("yolo", root)
    masks = [lay.read_mask(f"labels/train/im{i}.txt") for i in (0, 1, 2, 0)]
    assert masks[0][10, 15] == 3 and np.array_equal(masks[0], masks[3])
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "cannot write the mask cache" in warnings[0] and "SEMISEG_CACHE" in warnings[0]


def test_training_runs_two_iterations_on_a_yolo_tree(tmp_path: Path) -> None:
    from semiseg_cli.engine.loop import train
    from tests.method_harness import make_cfg

    root = make_yolo_tree(tmp_path, n_train=4)
    for split in ("train", "val"):  # 64x64 images: the tiny config crops 64x64
        for p in (root / "images" / split).glob("*.png"):
            _image(p, 64, 64)
    cfg = make_cfg("supervised", out=str(tmp_path / "run"), overrides=[
        'data.dataset="yolo"', f'data.root="{root}"', 'data.labeled="1/2"', "train.iters=2", "train.ckpt_interval=2",
    ])
    res = train(cfg, progress=False)
    assert res.step == 2 and (tmp_path / "run" / "last.pt").is_file()


@pytest.mark.realdata
def test_real_coco128_seg_lists_128_pairs_and_reads_a_mask(shared: Any, tmp_path: Path) -> None:
    root = shared.require("data/coco128-seg")
    names = tmp_path / "coco80.txt"
    names.write_text("\n".join(COCO80) + "\n")
    lay = get_layout("yolo", root, LayoutOptions(names))
    assert lay.num_classes == 81 and lay.class_names[46] == "bowl"
    pairs = lay.list_pairs("train2017")
    assert len(pairs) == 128
    img, mask = pairs[0]
    assert (img, mask) == ("images/train2017/000000000009.jpg", "labels/train2017/000000000009.txt")
    m = lay.read_mask(mask)
    assert m.shape == (480, 640)
    assert [lay.class_names[c] for c in np.unique(m)] == ["background", "bowl", "orange", "broccoli"]
    assert lay.scan(pairs).problems == []


# ------------------------------------------------------------------------------------ COCO


def _rle(mask: np.ndarray) -> dict[str, Any]:
    api = pytest.importorskip("pycocotools.mask")

    enc = api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(enc["size"]), "counts": enc["counts"].decode()}


def _uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def make_coco_tree(base: Path, anns: list[dict[str, Any]], images_under: str = "{split}", h: int = 20, w: int = 30) -> Path:
    """annotations/instances_{train,val}.json; categories 3 (cat), 7 (dog), 12 (owl). Train has
    a.png (with `anns`), b.png (none); val has c.png with one polygon."""
    pytest.importorskip("pycocotools")  # the `coco` and `test` extras install it; CI runs these
    root = base / "coco"
    cats = [{"id": 12, "name": "owl"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    for split, files in (("train", ["a.png", "b.png"]), ("val", ["c.png"])):
        images = []
        for k, name in enumerate(files, 1):
            _image(root / images_under.format(split=split) / name, w, h)
            images.append({"id": k, "file_name": name, "width": w, "height": h})
        split_anns = anns if split == "train" else [
            {"id": 1, "image_id": 1, "category_id": 12, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 15, 2, 15]]}
        ]
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": split_anns, "categories": cats}))
    return root


def test_coco_polygon_rle_and_crowd_with_sorted_category_ids(tmp_path: Path) -> None:
    h, w = 20, 30
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0, 1.0, 9.0]]},
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": _rle(_box(h, w, 12, 18, 2, 8))},
        {"id": 3, "image_id": 1, "category_id": 12, "iscrowd": 0, "segmentation": _uncompressed(_box(h, w, 2, 8, 20, 28))},
        {"id": 4, "image_id": 1, "category_id": 3, "iscrowd": 1, "segmentation": _uncompressed(_box(h, w, 12, 18, 20, 28))},
    ]
    root = make_coco_tree(tmp_path, anns)
    lay = get_layout("coco", root)
    assert lay.class_names == ["background", "cat", "dog", "owl"]  # category ids 3, 7, 12 -> 1, 2, 3
    pairs = lay.list_pairs("train")
    assert pairs == [("train/a.png", "train/a.png"), ("train/b.png", "train/b.png")]
    m = lay.read_mask("train/a.png")
    assert m.shape == (h, w)
    assert m[5, 5] == 2  # polygon, dog (7)
    assert m[15, 5] == 1 and m[12, 2] == 1 and m[11, 5] == 0  # compressed RLE, cat (3), exact box
    assert m[5, 24] == 3 and (m[2:8, 20:28] == 3).all()  # uncompressed RLE, owl (12)
    assert (m[12:18, 20:28] == IGNORE).all()  # crowd
    assert m[0, 15] == 0 and m[19, 29] == 0
    assert not lay.read_mask("train/b.png").any()  # no annotations: background
    assert lay.scan(pairs).problems == []


def test_coco_overlap_rule_larger_first_smaller_on_top_crowd_underneath(tmp_path: Path) -> None:
    h, w = 20, 30
    anns = [
        {"id": 9, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": _rle(_box(h, w, 4, 8, 4, 8))},  # small, listed first
        {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": _rle(_box(h, w, 0, 16, 0, 16))},  # large
        {"id": 1, "image_id": 1, "category_id": 12, "iscrowd": 1, "segmentation": _rle(_box(h, w, 10, 20, 10, 20))},  # crowd
        {"id": 6, "image_id": 1, "category_id": 12, "iscrowd": 0, "segmentation": _rle(_box(h, w, 0, 4, 20, 24))},  # equal areas:
        {"id": 5, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": _rle(_box(h, w, 2, 6, 22, 26))},  # higher id on top
    ]
    m = get_layout("coco", make_coco_tree(tmp_path, anns)).read_mask("train/a.png")
    assert m[5, 5] == 1  # the small cat stays visible on the large dog, whatever the file order
    assert m[1, 1] == 2 and m[12, 12] == 2  # the dog covers the crowd where they meet
    assert m[18, 18] == IGNORE  # crowd elsewhere
    assert m[3, 23] == 3  # id 6 (owl) over id 5 (cat) at equal area
    assert m[5, 25] == 1 and m[1, 21] == 3


def test_coco_images_folder_split_files_round_trip_and_the_json_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 15, 2, 15]]},
            {"id": 2, "image_id": 2, "category_id": 7, "iscrowd": 0, "segmentation": [[5, 5, 25, 5, 25, 18]]}]
    root = make_coco_tree(tmp_path, anns, images_under="images/{split}")
    parsed: list[str] = []
    real = annotations._parse_coco
    monkeypatch.setattr(annotations, "_parse_coco", lambda p: parsed.append(p.name) or real(p))
    out = tmp_path / "splits"
    prepare_splits("coco", root, ["1/2"], 0, out)  # checks val too
    lay = get_layout("coco", root)
    pairs = read_split_file(out / "labeled.txt", root) + read_split_file(out / "unlabeled.txt", root)
    assert sorted(pairs) == [("images/train/a.png", "images/train/a.png"), ("images/train/b.png", "images/train/b.png")]
    assert lay.read_mask("images/val/c.png")[10, 10] == 3
    for _, mask in pairs:
        lay.read_mask(mask)
    assert sorted(parsed) == ["instances_train.json", "instances_val.json"]  # once each, for every layout and image


def test_coco_bad_annotations_are_one_line_problems_naming_image_and_annotation(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [[2, 2, 20, 2]]},
            {"id": 2, "image_id": 2, "category_id": 99, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 15]]}]
    root = make_coco_tree(tmp_path, anns)
    with pytest.raises(UserError) as err:
        prepare_splits("coco", root, ["1/2"], 0, tmp_path / "splits")
    msg = str(err.value)
    assert msg.startswith("2 problems in the train split") and "\n" not in msg, msg
    assert "train/a.png: unreadable mask (annotations/instances_train.json, annotation 1: a polygon of 4 numbers" in msg
    assert "train/b.png: unreadable mask (annotations/instances_train.json, annotation 2: category_id 99" in msg
    with pytest.raises(UserError, match=r"no annotations file for split 'test' \(splits here: train, val\)"):
        get_layout("coco", root).list_pairs("test")
    (root / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(UserError, match=r"instances_train.json is not valid JSON \(line 1"):
        get_layout("coco", root).list_pairs("train")


def test_coco_masks_are_cached_like_yolo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 15, 2, 15]]}]
    root = make_coco_tree(tmp_path, anns)
    calls: list[int] = []
    real = annotations.rasterise_coco
    monkeypatch.setattr(annotations, "rasterise_coco", lambda *a: calls.append(1) or real(*a))
    first = get_layout("coco", root).read_mask("train/a.png")
    again = get_layout("coco", root).read_mask("train/a.png")
    assert len(calls) == 1 and np.array_equal(first, again) and len(list(_private_cache.rglob("*.png"))) == 1


def test_coco_without_pycocotools_is_a_one_line_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_coco_tree(tmp_path, [])
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'semiseg\[coco\]'"):
        get_layout("coco", root)
