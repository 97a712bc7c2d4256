"""Bring your own data: flat folders, colour masks through a palette file, `prepare-splits --val`
(val.txt for `train --val-list`) and the data report (report.json and its warnings).

Trees are generated in tmp_path with hand-chosen pixels, so every count is checked against a
number worked out by hand. CLI checks assert what a user sees, as in test_bad_input.py: one
`error:` line, no traceback, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app
from semiseg_cli.data.layouts import IGNORE, LayoutOptions, get_layout
from semiseg_cli.data.splits import draw_val, parse_val_amount, prepare_dataset, prepare_splits, read_split_file
from semiseg_cli.errors import UserError
from tests.cli_checks import one_line_error
from tests.method_harness import TINY

runner = CliRunner()

BLACK, RED, GREEN, WHITE = (0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 255)
PALETTE_TXT = "# colour masks\n0 0 0 background\n255,0,0 cat\n\n0, 255, 0  tabby cat\n255 255 255 void\n"
NAMES = ["background", "cat", "tabby cat"]


def snapshot(root: Path) -> dict[str, Any]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused_cleanly(tmp_path: Path, args: list[str], *fragments: str) -> str:
    before = snapshot(tmp_path)
    err = one_line_error(runner.invoke(app, args), *fragments)
    assert snapshot(tmp_path) == before, "a refused command changed the output tree"
    return err


def warning_lines(result: Any) -> list[str]:
    assert result.exit_code == 0, (result.output, result.stderr)
    return [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]


def _rgb_mask(ids: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    table = np.array(colours + [WHITE], np.uint8)  # id len(colours) -> white (void)
    return Image.fromarray(table[np.where(ids == IGNORE, len(colours), ids)])


def make_flat_colour_tree(root: Path, n: int = 10, size: int = 24, seed: int = 0) -> Path:
    """A flat folder: images/*.png and RGB masks/*.png in the three palette colours plus a
    white (void) top row; every mask shows every class."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"im{i:02d}.png")
        ids = np.kron(rng.integers(0, 3, (size // 8, size // 8)), np.ones((8, 8), int))
        ids.flat[:3] = [0, 1, 2]
        ids[:8, :8], ids[:8, 8:16], ids[8:16, :8] = 0, 1, 2
        ids[0, :] = IGNORE
        _rgb_mask(ids, [BLACK, RED, GREEN]).save(root / "masks" / f"im{i:02d}.png")
    (root / "palette.txt").write_text(PALETTE_TXT)
    return root


def _prep(root: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare-splits", "--dataset", "folder", "--root", str(root), "--out", str(out), *extra]


# ------------------------------------------------------------------------------ colour masks


def test_palette_maps_colours_to_class_ids_by_hand(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=1)
    rgb = np.array([[BLACK, RED, GREEN, WHITE], [RED, RED, BLACK, GREEN]], np.uint8)
    Image.fromarray(rgb).save(root / "masks" / "im00.png")
    layout = get_layout("folder", root)
    assert layout.class_names == NAMES  # from palette.txt: the void line takes no class id
    assert layout.palette == [BLACK, RED, GREEN]  # the palette's colours also colour predictions
    assert layout.read_mask("masks/im00.png").tolist() == [[0, 1, 2, IGNORE], [1, 1, 0, 2]]
    # Greyscale masks are read as the colour (v, v, v): 0/255 binary masks with a grey palette.
    (root / "palette.txt").write_text("0 0 0 background\n255 255 255 foreground\n")
    Image.fromarray(np.array([[0, 255, 255]], np.uint8)).save(root / "masks" / "im00.png")
    assert get_layout("folder", root).read_mask("masks/im00.png").tolist() == [[0, 1, 1]]
    # Palette PNGs: each index by its colour, index 255 ignore (pseudo-labels write unreliable so).
    (root / "palette.txt").write_text(PALETTE_TXT)
    p = Image.frombytes("P", (4, 1), bytes([7, 3, 255, 7]))
    pal = [0] * 768
    pal[21:24], pal[9:12], pal[765:768] = RED, GREEN, WHITE
    p.putpalette(pal)
    p.save(root / "masks" / "im00.png")
    assert get_layout("folder", root).read_mask("masks/im00.png").tolist() == [[1, 2, IGNORE, 1]]
    # ... so pseudo-labels, written as palette PNGs in the dataset's colours, read back as they were.
    from semiseg_cli.pseudo_label.writer import palette_bytes

    p = Image.frombytes("P", (4, 1), bytes([2, 0, 255, 1]))
    p.putpalette(palette_bytes(get_layout("folder", root).palette))
    p.save(root / "masks" / "im00.png")
    assert get_layout("folder", root).read_mask("masks/im00.png").tolist() == [[2, 0, IGNORE, 1]]


def test_a_palette_file_outside_the_root_and_greyscale_masks_without_one(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=1)
    elsewhere = tmp_path / "colours.txt"
    elsewhere.write_text("0 0 0 bg\n255 0 0 a\n0 255 0 b\n255 255 255 ignore\n")
    layout = get_layout("folder", root, LayoutOptions(palette_file=elsewhere))  # the option wins over palette.txt
    assert layout.class_names == ["bg", "a", "b"]
    # data.classes_file replaces classes.txt for the folder layout (one name per line, not YAML).
    names = tmp_path / "names.txt"
    names.write_text("background\ncat\ntabby cat\n")
    assert get_layout("folder", root, LayoutOptions(classes_file=names)).class_names == NAMES
    names.write_text("background\ncat\n")
    with pytest.raises(UserError, match="names.txt lists 2 classes but .*palette.txt defines 3"):
        get_layout("folder", root, LayoutOptions(classes_file=names))
    with pytest.raises(UserError, match="YAML, which only the yolo layout reads"):
        get_layout("folder", root, LayoutOptions(classes_file=tmp_path / "data.yaml"))
    # Without a palette, masks hold class ids as before, and a colour mask names the fix.
    (root / "palette.txt").unlink()
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    plain = get_layout("folder", root)
    assert plain.palette != [BLACK, RED, GREEN] and plain.class_names == NAMES
    with pytest.raises(UserError, match="colour image.*palette.txt"):
        plain.read_mask("masks/im00.png")
    Image.fromarray(np.array([[0, 1, 2, 255]], np.uint8)).save(root / "masks" / "im00.png")
    assert plain.read_mask("masks/im00.png").tolist() == [[0, 1, 2, IGNORE]]


def test_an_unknown_colour_names_the_file_colour_place_and_count(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=4)
    path = root / "masks" / "im02.png"
    rgb = np.array(Image.open(path))
    rgb[5, 7] = rgb[9, 3] = (1, 2, 3)  # first in row-major order: x=7, y=5
    rgb[20, 20] = (9, 9, 9)
    Image.fromarray(rgb).save(path)
    with pytest.raises(UserError) as info:
        get_layout("folder", root).read_mask("masks/im02.png")
    msg = str(info.value)
    for fragment in (str(path), "colour (1, 2, 3) at x=7, y=5 (2 pixels)", "1 other colour is unknown too",
                     str(root / "palette.txt"), "`1 2 3 ignore`"):
        assert fragment in msg, (fragment, msg)
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "2"),
                    "masks/im02.png", "colour (1, 2, 3) at x=7, y=5 (2 pixels)")


def test_palette_and_classes_txt_must_agree(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=4)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "2"),
                    "class 2 is 'dog' in", "'tabby cat' in", "palette.txt", "make the two agree")
    (root / "classes.txt").write_text("background\ncat\n")
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "2"), "lists 2 classes but", "defines 3")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    assert get_layout("folder", root).class_names == NAMES  # agreeing files are fine


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("0 0 0 background\n300 0 0 cat\n", ["line 2", "expected `R G B name`", "300 0 0 cat"]),
        ("0 0 0 background\n12 34 56\n", ["line 2", "expected `R G B name`"]),
        ("0 0 0 background\n255 0 0 cat\n0 0 0 dog\n", ["lines 1 and 3", "(0, 0, 0)", "one class only"]),
        ("# nothing\n255 255 255 ignore\n", ["defines 0 classes"]),
    ],
)
def test_bad_palette_files_are_one_line_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=2)
    (root / "palette.txt").write_text(text)
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "1"), "palette", *fragments)


# ------------------------------------------------------------------------------ flat folders


def test_flat_folder_is_one_pool_named_train(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=3)
    Image.new("RGB", (24, 24)).save(root / "images" / "unpaired.jpg")  # an image without its mask
    layout = get_layout("folder", root)
    pairs = layout.list_pairs("train")
    assert pairs[:3] == [(f"images/im0{i}.png", f"masks/im0{i}.png") for i in range(3)]
    assert pairs[3] == ("images/unpaired.jpg", "masks/unpaired.png")
    assert layout.validate(pairs) == ["masks/unpaired.png: missing mask for image images/unpaired.jpg"]
    with pytest.raises(UserError, match=r"flat folder dataset .* no 'val' split; .*prepare-splits --val 0.2.*--val-list"):
        layout.list_pairs("val")
    (root / "images" / "val").mkdir()
    with pytest.raises(UserError, match=r"images/train does not exist \(the image files directly in images/ are not read.*expected the folder layout"):
        layout.list_pairs("train")


def test_a_stray_image_beside_split_folders_changes_nothing(make_tree: Any, tmp_path: Path) -> None:
    root = make_tree["folder"](tmp_path)
    before = get_layout("folder", root).list_pairs("train")
    Image.new("RGB", (8, 8)).save(root / "images" / "preview.png")
    layout = get_layout("folder", root)
    assert layout.list_pairs("train") == before and len(layout.list_pairs("extra")) == 2
    with pytest.raises(UserError, match="images/test does not exist"):
        layout.list_pairs("test")


def test_flat_folder_without_masks_is_unlabeled(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "a.jpg")
    (root / "classes.txt").write_text("x\ny\n")
    assert get_layout("folder", root).list_pairs("train") == [("images/a.jpg", None)]


# ------------------------------------------------------------------------------ --val


def test_val_split_is_reproducible_disjoint_and_written_beside_every_split(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=20)
    pool = get_layout("folder", root).list_pairs("train")
    a = prepare_splits("folder", root, ["1/4"], 3, tmp_path / "a", val="0.2")
    b = prepare_splits("folder", root, ["1/4"], 3, tmp_path / "b", val="0.2")
    assert [p.name for p in a] == ["labeled.txt", "unlabeled.txt", "val.txt"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # same seed: byte-identical
    lab, unl, val = (read_split_file(p, root) for p in a)
    assert (len(val), len(lab), len(unl)) == (4, 4, 12)  # 0.2 of 20, then 1/4 of the 16 left
    assert not {x[0] for x in val} & ({x[0] for x in lab} | {x[0] for x in unl})
    assert sorted(val + lab + unl) == sorted(pool)
    assert val == draw_val(pool, "0.2", 3)[0] and val == sorted(val)
    other = prepare_splits("folder", root, ["1/4"], 4, tmp_path / "c", val="0.2")
    assert other[2].read_bytes() != a[2].read_bytes()
    # Several amounts: the same val.txt beside each labeled.txt, drawn once before them; the
    # count 4 is what 0.2 of 20 means, so the files equal the fraction's.
    many = prepare_splits("folder", root, ["1/4", "2"], 3, tmp_path / "m", val="4")
    texts = {p.relative_to(tmp_path / "m").as_posix(): p.read_bytes() for p in many}
    assert texts["1_4/val.txt"] == texts["2/val.txt"] == a[2].read_bytes()
    assert texts["1_4/labeled.txt"] == a[0].read_bytes()
    assert parse_val_amount(" 0.2 ") == "0.2"


def test_val_errors_are_one_line(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=10)
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "9", "--val", "0.2"),
                    "labeled amount 9 asks for 9 images but only 8 of the 10 remain after --val 0.2", "lower --labeled or --val")
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "2", "--val", "10"), "leaves none to train on")
    for bad, fragment in (("1.0", "whole pool"), ("0", "at least 1"), ("abc", "not a number"), ("0.1,0.2", "one amount")):
        refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "2", "--val", bad), fragment)
    r = runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "2", "--val", "1"))
    assert r.exit_code == 0 and len(read_split_file(tmp_path / "s" / "val.txt", root)) == 1


def test_without_val_a_flat_folder_gets_a_hint_and_no_val_txt(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=6)
    r = runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "3"))
    assert any("has no 'val' split" in ln and "--val 0.2" in ln for ln in warning_lines(r)), r.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["labeled.txt", "report.json", "unlabeled.txt"]


# ------------------------------------------------------------------------------ the report


def test_report_counts_match_a_hand_computed_tree(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    m0 = np.zeros((4, 8), np.uint8)
    m0[1, :4] = 1
    m0[0, :2] = IGNORE  # 26 a, 4 b, 2 ignore
    m1 = np.zeros((4, 8), np.uint8)
    m1[2:] = 2  # 16 a, 16 c
    m2 = np.ones((6, 6), np.uint8)  # 36 b
    for name, mask, mode in (("i0", m0, "RGB"), ("i1", m1, "L"), ("i2", m2, "RGB")):
        Image.new(mode, (mask.shape[1], mask.shape[0])).save(root / "images" / "train" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / "train" / f"{name}.png")
    result = prepare_dataset("folder", root, ["1.0"], 0, tmp_path / "s", val_split=None)
    rep = result.report
    assert rep is not None and json.loads((tmp_path / "s" / "report.json").read_text()) == rep
    assert [p.name for p in result.written] == ["labeled.txt", "unlabeled.txt", "report.json"]
    assert rep["images"] == 3
    assert rep["image_sizes"]["width"] == {"min": 6, "median": 8, "max": 8}
    assert rep["image_sizes"]["height"] == {"min": 4, "median": 4, "max": 6}
    assert rep["image_sizes"]["distinct"] == 2 and rep["image_sizes"]["most_common"] == [[8, 4, 2], [6, 6, 1]]
    assert rep["image_modes"] == {"L": 1, "RGB": 2}
    assert rep["mask_pixels"] == 100 and rep["ignore_fraction"] == 0.02
    assert [(c["name"], c["pixels"], c["images"]) for c in rep["classes"]] == [("a", 42, 2), ("b", 40, 2), ("c", 16, 1), ("d", 0, 0)]
    assert [c["pixel_fraction"] for c in rep["classes"]] == [round(42 / 98, 6), round(40 / 98, 6), round(16 / 98, 6), 0.0]
    assert rep["absent_classes"] == ["d"]
    (split,) = rep["splits"]
    assert (split["amount"], split["folder"], split["labeled"], split["unlabeled"]) == ("1.0", ".", 3, 0)
    assert split["labeled_images_per_class"] == [2, 2, 1, 0] and split["rare_classes"] == ["a", "b", "c"]
    assert rep["warnings"] == [
        "with --labeled 1.0 (3 images), 3 classes are shown by fewer than 3 labeled images (a: 2, b: 2, c: 1); the model "
        "sees too few examples of them: label more images, raise --labeled or try another --seed"
    ]


def test_report_with_val_is_printed_and_its_warnings_once(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=10)
    r = runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "1/2", "--val", "0.2", "--seed", "1"))
    assert r.exit_code == 0, r.stderr
    assert "10 images in the train split" in r.stdout and "tabby cat" in r.stdout and "validation: 2 images" in r.stdout
    assert f"wrote {tmp_path / 's' / 'report.json'}" in r.stdout
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["val"] == {"amount": "0.2", "images": 2, "images_per_class": [2, 2, 2]}
    assert rep["splits"][0]["labeled_images_per_class"] == [4, 4, 4] and rep["warnings"] == []
    # 24x24 masks with a void top row: 24 of 576 pixels per mask are ignored.
    assert rep["ignore_fraction"] == round(24 / 576, 6)
    assert warning_lines(r) == []
    # report.json is part of the write set: rerunning is harmless, a changed one is not replaced silently.
    assert runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "1/2", "--val", "0.2", "--seed", "1")).exit_code == 0
    (tmp_path / "s" / "report.json").write_text("{}\n")
    refused_cleanly(tmp_path, _prep(root, tmp_path / "s", "--labeled", "1/2", "--val", "0.2", "--seed", "1"),
                    "report.json already exists", "--overwrite")
    r = runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "1/2", "--val", "0.2", "--seed", "1", "--overwrite"))
    assert r.exit_code == 0 and json.loads((tmp_path / "s" / "report.json").read_text()) == rep


def test_binary_0_255_masks_get_the_warning(tmp_path: Path) -> None:
    # Three of four masks hold only 0 and 255 (foreground saved as 255), one was converted to 0/1:
    # the pool shows both classes, so nothing refuses it, but 255 would be ignored.
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nobject\n")
    for i in range(4):
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 1 if i == 0 else 255
        Image.new("RGB", (8, 8)).save(root / "images" / "train" / f"m{i}.png")
        Image.fromarray(mask).save(root / "masks" / "train" / f"m{i}.png")
    r = runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "2"))
    binary = [ln for ln in warning_lines(r) if "0/255" in ln]
    assert len(binary) == 1, r.stderr
    assert "3 of 4 masks" in binary[0] and "store foreground as 1" in binary[0] and "palette" in binary[0]


def test_large_images_and_identical_tags_are_warned_about(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("bg\nfg\n")
    for i, width in enumerate((2100, 64, 64)):
        mask = np.zeros((4, width), np.uint8)
        mask[:, :2] = 1  # every image shows bg and fg: identical tags
        Image.new("RGB", (width, 4)).save(root / "images" / "train" / f"t{i}.png")
        Image.fromarray(mask).save(root / "masks" / "train" / f"t{i}.png")
    r = runner.invoke(app, _prep(root, tmp_path / "s", "--labeled", "3", "--tags"))
    lines = warning_lines(r)
    assert any("1 of 3 images" in ln and "longer than 2048" in ln and "2100x4" in ln and "data.resize = 0.5" in ln for ln in lines), lines
    assert any("same tags (bg, fg)" in ln and "DuPL" in ln for ln in lines), lines


# ------------------------------------------------------------------------------ training


def _tiny_cli() -> list[str]:
    out: list[str] = []
    for item in TINY:
        out += ["--set", item]
    return out + ["--iters", "2"]


def test_train_on_a_flat_colour_folder_with_val_list_then_eval_on_it(tmp_path: Path) -> None:
    root = make_flat_colour_tree(tmp_path / "data", n=8, size=32)
    splits = tmp_path / "splits"
    r = runner.invoke(app, _prep(root, splits, "--labeled", "1/2", "--val", "2"))
    assert r.exit_code == 0, r.stderr
    # Without --val-list the flat folder has no val split: refused before the run folder exists.
    refused_cleanly(tmp_path, ["train", "--root", str(root), "--set", 'data.dataset="folder"', "--labeled-list",
                               str(splits / "labeled.txt"), "--out", str(tmp_path / "run0"), *_tiny_cli()],
                    "flat folder dataset", "--val-list")
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--root", str(root), "--set", 'data.dataset="folder"',
                            "--labeled-list", str(splits / "labeled.txt"), "--val-list", str(splits / "val.txt"),
                            "--out", str(run), *_tiny_cli()])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert (run / "best.pt").is_file() and "best val mIoU" in r.stdout
    assert f'val_list = "{splits / "val.txt"}"' in (run / "config.toml").read_text()
    r = runner.invoke(app, ["eval", "-c", str(run / "best.pt"), "--split", str(splits / "val.txt"), "--workers", "0",
                            "--json", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["images"] == 2 and report["split"] == str(splits / "val.txt")
    # Without --split, eval takes the run's own validation set: its val.txt, not a `val` split.
    r = runner.invoke(app, ["eval", "-c", str(run / "best.pt"), "--workers", "0", "--json", str(tmp_path / "eval2.json")])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert json.loads((tmp_path / "eval2.json").read_text())["split"] == str(splits / "val.txt")


def test_validation_images_that_are_also_training_images_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from semiseg_cli.data.checks import check_training_data

    root = make_flat_colour_tree(tmp_path / "data", n=4)
    layout = get_layout("folder", root)
    pairs = layout.list_pairs("train")
    check_training_data(layout, pairs[:2], pairs[2:], pairs[1:2], labeled_needs_masks=True, val_split="val.txt",
                        labeled_batch=1, unlabeled_batch=1)
    err = capsys.readouterr().err
    assert "1 validation image(s) (val.txt) are training images too (e.g. images/im01.png)" in err
