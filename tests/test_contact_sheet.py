"""`semiseg show` and the display palette: the sheet layout on synthetic arrays (size, panel
colours, legend), the palette rules, then the command end to end on two tiny runs and its
refusals of bad input (one line, nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli import contact_sheet as cs
from semiseg_cli.cli import app
from semiseg_cli.contact_sheet import Panel, choose_samples, compose_sheet, image_scores, plan_sheet
from semiseg_cli.data.layouts import CAMVID_PALETTE, CITYSCAPES_PALETTE, index_palette
from semiseg_cli.viz import IGNORE_COLOUR, blend, colorize, display_palette
from tests.cli_checks import no_temp_files, one_line_error

runner = CliRunner()


def luminance(rgb: object) -> float:
    """WCAG relative luminance of an sRGB colour, 0 (black) .. 1 (white)."""
    c = np.asarray(rgb, np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


def contrast(a: object, b: object) -> float:
    la, lb = sorted((luminance(a), luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def colours_in(im: Image.Image, box: cs.Box) -> set[tuple[int, int, int]]:
    arr = np.asarray(im)[box.y : box.y + box.h, box.x : box.x + box.w].reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(arr, axis=0)}


def pixel(im: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(im)[xy[1], xy[0]])  # type: ignore[return-value]


def two_class_mask(h: int = 40, w: int = 60, ignore_row: bool = False) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[:, w // 2 :] = 1
    if ignore_row:
        m[0] = 255
    return m


# ----------------------------------------------------------------------------- display palette


def test_two_class_display_colours_are_legible() -> None:
    c = display_palette(2, index_palette(2))  # what a folder/demo/yolo dataset carries
    assert c.shape == (2, 3) and c.dtype == np.uint8
    black, dark_red = (0, 0, 0), (128, 0, 0)
    assert [tuple(x) for x in c] != [black, dark_red]
    assert contrast(c[0], c[1]) > 3  # apart from each other
    assert contrast(c[1], black) > 7  # the foreground is bright on dark images
    assert tuple(c[0]) != black and contrast(c[0], black) > 1.3  # background not black either
    for col in c:
        assert contrast(col, IGNORE_COLOUR) > 1.5  # and none is the white of ignored pixels


def test_dataset_palettes_are_kept_and_the_index_scheme_replaced() -> None:
    assert [tuple(x) for x in display_palette(11, CAMVID_PALETTE)] == CAMVID_PALETTE
    assert [tuple(x) for x in display_palette(19, CITYSCAPES_PALETTE)] == CITYSCAPES_PALETTE
    for n in (2, 5, 21):  # VOC's bit-spread scheme (and the demo's): the display colours instead
        assert np.array_equal(display_palette(n, index_palette(n)), display_palette(n))
        assert not np.array_equal(display_palette(n), np.asarray(index_palette(n), np.uint8))
    # A palette of the wrong length or with repeated colours is not usable as is.
    assert np.array_equal(display_palette(3, [(1, 2, 3), (1, 2, 3), (9, 9, 9)]), display_palette(3))
    assert np.array_equal(display_palette(3, CAMVID_PALETTE), display_palette(3))


@pytest.mark.parametrize("n", [1, 20, 21, 60, 255])
def test_display_palette_colours_are_distinct(n: int) -> None:
    c = display_palette(n)
    assert c.shape == (n, 3)
    assert len({tuple(x) for x in c}) == n
    assert tuple(IGNORE_COLOUR) not in {tuple(x) for x in c}


def test_colorize_and_blend_paint_classes_and_leave_ignored_pixels() -> None:
    colours = display_palette(2)
    mask = two_class_mask(4, 4, ignore_row=True)
    pic = colorize(mask, colours)
    assert tuple(pic[1, 0]) == tuple(colours[0]) and tuple(pic[1, 3]) == tuple(colours[1])
    assert tuple(pic[0, 0]) == IGNORE_COLOUR
    rgb = np.full((4, 4, 3), 10, np.uint8)
    out = blend(rgb, mask, colours)
    assert (out[0] == 10).all()  # ignored row: the image itself
    assert tuple(out[1, 3]) == tuple(np.round((10 + colours[1].astype(float)) / 2).astype(int))


def test_pseudo_label_overlays_use_the_display_palette() -> None:
    from semiseg_cli.pseudo_label.writer import overlay, overlay_colours, palette_bytes

    table = overlay_colours(index_palette(2))
    assert np.array_equal(table[:2], display_palette(2).astype(np.float32))
    assert (table[255] == 0).all()
    assert np.array_equal(overlay_colours(CAMVID_PALETTE)[:11], np.asarray(CAMVID_PALETTE, np.float32))
    # On a black image the two classes come out clearly apart (VOC's were black and dark red).
    out = overlay(np.zeros((1, 3, 3), np.uint8), np.array([[0, 1, 255]], np.uint8), table)
    assert contrast(out[0, 0], out[0, 1]) > 2 and tuple(out[0, 2]) == (0, 0, 0)
    # The label PNGs keep the dataset's palette.
    assert palette_bytes(index_palette(2))[:6] == [0, 0, 0, 128, 0, 0]


# ----------------------------------------------------------------------------- sheet layout


def synthetic_rows(n_rows: int, captions: bool = True, ignore: bool = False) -> list[list[Panel]]:
    rows = []
    for r in range(n_rows):
        pic = np.zeros((40, 60, 3), np.uint8)
        pic[...] = (30 + r, 60, 90)  # flat, so the resized panel is exactly this colour
        gt = two_class_mask(ignore_row=ignore)
        pred = 1 - two_class_mask()
        rows.append([Panel(pic, f"img{r}.png" if captions else None), Panel(gt),
                     Panel(gt, "mIoU 100.0  acc 100.0" if captions else None), Panel(pred, None)])
    return rows


def test_sheet_size_follows_rows_columns_panels_and_legend() -> None:
    colours = display_palette(2)
    headers = ["image", "ground truth", "run a", "run b"]
    for n_rows, captions in ((3, True), (1, False)):
        rows = synthetic_rows(n_rows, captions)
        im = compose_sheet(rows, headers, ["background", "thing"], colours)
        pw = round(60 * cs.PANEL_HEIGHT / 40)  # 240: aspect kept at 160 px high
        cap = cs.CAPTION_H if captions else 0
        width = cs.PAD * 5 + 4 * pw
        height = cs.PAD + cs.HEADER_H + n_rows * (cs.PANEL_HEIGHT + cap + cs.PAD) + cs.LEGEND_ROW_H + cs.PAD
        assert im.size == (width, height)
        assert im.mode == "RGB"
        plan = plan_sheet(rows, headers, ["background", "thing"], colours)
        assert plan.size == im.size and plan.column_widths == [pw] * 4
        assert len(plan.panels) == n_rows and all(len(r) == 4 for r in plan.panels)
    # Another panel height scales the panels, not the text.
    small = compose_sheet(synthetic_rows(2), headers, ["background", "thing"], colours, panel_height=80)
    assert small.size == (cs.PAD * 5 + 4 * 120, cs.PAD + cs.HEADER_H + 2 * (80 + cs.CAPTION_H + cs.PAD) + cs.LEGEND_ROW_H + cs.PAD)


def test_each_panel_holds_its_picture_or_the_display_colours() -> None:
    colours = display_palette(2)
    rows = synthetic_rows(2, ignore=True)
    headers = ["image", "ground truth", "run a", "run b"]
    im = compose_sheet(rows, headers, ["background", "thing"], colours)
    plan = plan_sheet(rows, headers, ["background", "thing"], colours)
    c0, c1 = (tuple(int(v) for v in c) for c in colours)
    for r, boxes in enumerate(plan.panels):
        image_box, gt_box, pred_a, pred_b = boxes
        assert colours_in(im, image_box) == {(30 + r, 60, 90)}
        assert colours_in(im, gt_box) == {c0, c1, IGNORE_COLOUR}  # nearest neighbour: no blends
        assert colours_in(im, pred_a) == {c0, c1, IGNORE_COLOUR}
        assert colours_in(im, pred_b) == {c0, c1}
        # Left half background, right half the class, in the GT panel (below the ignored row).
        y = gt_box.y + gt_box.h // 2
        assert pixel(im, (gt_box.x + 5, y)) == c0 and pixel(im, (gt_box.x + gt_box.w - 5, y)) == c1
        assert pixel(im, (pred_b.x + 5, y)) == c1 and pixel(im, (pred_b.x + pred_b.w - 5, y)) == c0
        # A frame round every panel, so white (ignored) pixels stay apart from the sheet.
        assert pixel(im, (gt_box.x - 1, y)) == cs.FRAME
    assert contrast(c0, c1) > 3 and contrast(c1, (0, 0, 0)) > 7


def test_legend_lists_every_class_with_its_colour_and_ignore_when_present() -> None:
    colours = display_palette(3)
    names = ["background", "cat", "dog"]
    headers = ["image", "ground truth", "run a", "run b"]
    rows = synthetic_rows(1, ignore=True)
    im = compose_sheet(rows, headers, names, colours)
    plan = plan_sheet(rows, headers, names, colours)
    assert [e.name for e in plan.legend] == names + ["ignore"]
    for k, e in enumerate(plan.legend):
        expected = IGNORE_COLOUR if e.name == "ignore" else tuple(int(v) for v in colours[k])
        assert e.colour == expected
        assert pixel(im, e.swatch.centre) == expected
        assert pixel(im, (e.swatch.x - 1, e.swatch.centre[1])) == cs.FRAME
        assert e.swatch.y > plan.panels[-1][0].y + plan.panels[-1][0].h  # below the panels
        # Text beside the swatch: some dark pixels right of it.
        x0 = e.swatch.x + e.swatch.w + 2
        strip = np.asarray(im)[e.swatch.y : e.swatch.y + e.swatch.h, x0 : x0 + 20]
        assert (strip.max(axis=2) < 128).any()
    # Without 255 in any label map there is no ignore entry.
    assert [e.name for e in plan_sheet(synthetic_rows(1), headers, names, colours).legend] == names


def test_legend_wraps_on_a_narrow_sheet_and_stays_inside_it() -> None:
    n = 30
    names = [f"class number {k}" for k in range(n)]
    colours = display_palette(n)
    rows = [[np.arange(n, dtype=np.uint8)[None].repeat(8, 0)]]  # one label-map panel, 8 x 30
    plan = plan_sheet(rows, ["ground truth"], names, colours, panel_height=40)
    im = compose_sheet(rows, ["ground truth"], names, colours, panel_height=40)
    lines = sorted({e.swatch.y for e in plan.legend})
    assert len(lines) > 1
    body = cs.PAD + cs.HEADER_H + 40 + cs.PAD
    assert im.size == plan.size == (cs.PAD * 2 + 150, body + len(lines) * cs.LEGEND_ROW_H + cs.PAD)
    for k, e in enumerate(plan.legend):
        assert 0 <= e.swatch.x and e.swatch.x + e.swatch.w <= im.size[0]
        assert e.swatch.y + e.swatch.h <= im.size[1]
        assert pixel(im, e.swatch.centre) == tuple(int(v) for v in colours[k])


def test_rows_must_match_the_headers() -> None:
    with pytest.raises(ValueError):
        plan_sheet([[np.zeros((4, 4), np.uint8)]], ["image", "ground truth"], ["a"], display_palette(1))


def test_choose_samples_is_deterministic_and_spread() -> None:
    assert choose_samples(3, 4) == [0, 2, 3]
    assert choose_samples(4, 100) == [12, 37, 62, 87]
    assert choose_samples(10, 4) == [0, 1, 2, 3]
    assert choose_samples(1, 9) == [4]
    a = choose_samples(5, 50, seed=3)
    assert a == choose_samples(5, 50, seed=3) and a == sorted(set(a)) and len(a) == 5
    assert a != choose_samples(5, 50, seed=4)


def test_image_scores() -> None:
    gt = np.array([[0, 0, 1, 1], [255, 255, 1, 1]], np.uint8)
    assert image_scores(gt.copy(), gt, 2) == (1.0, 1.0)
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1]], np.uint8)
    miou, acc = image_scores(pred, gt, 2)  # type: ignore[misc]
    assert acc == pytest.approx(5 / 6)
    assert miou == pytest.approx((1 / 2 + 4 / 5) / 2)
    assert image_scores(pred, np.full_like(gt, 255), 2) is None


# ----------------------------------------------------------------------------- the command


def _train(root: Path, out: Path, seed: int) -> Path:
    from semiseg_cli.config import build_config
    from semiseg_cli.engine.loop import train

    cfg = build_config(None, [
        f'data.root="{root}"', 'data.dataset="demo"', "data.crop_size=[64,64]", "data.batch_size=2",
        "data.workers=0", "train.iters=2", "train.val_interval=0", 'model.backbone="resnet18"',
        "model.aspp_channels=32", "model.decoder_channels=32", 'train.device="cpu"', f"train.seed={seed}", f'out="{out}"',
    ], "supervised")
    train(cfg, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="module")
def runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """best.pt of two 2-iteration supervised runs on the demo set (4 val images, 64x64)."""
    base = tmp_path_factory.mktemp("show_runs")
    return _train(demo_root, base / "run-a", 0), _train(demo_root, base / "run-b", 1)


def test_show_writes_a_sheet_of_image_truth_and_each_run(runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = runs
    out = tmp_path / "sheets" / "sheet.png"
    r = runner.invoke(app, ["show", "-c", str(a), "-c", str(b), "--out", str(out), "--samples", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"contact sheet: {out}" in r.stdout
    assert no_temp_files(out.parent)
    im = Image.open(out)
    assert im.format == "PNG" and im.mode == "RGB"
    # 3 rows (images) by 2 + 2 columns of 64x64 images at 160 px, captions, a one-line legend.
    dummy = [[Panel(np.zeros((64, 64, 3), np.uint8), "x"), np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8),
              np.zeros((64, 64), np.uint8)]] * 3
    from semiseg_cli.data.demo import CLASS_NAMES

    colours = display_palette(5)
    plan = plan_sheet(dummy, ["image", "ground truth", "a", "b"], CLASS_NAMES, colours, show_ignore=False)
    assert im.size == plan.size == (cs.PAD * 5 + 4 * 160, cs.PAD + cs.HEADER_H + 3 * (160 + cs.CAPTION_H + cs.PAD) + cs.LEGEND_ROW_H + cs.PAD)
    palette = {tuple(int(v) for v in c) for c in colours}
    for boxes in plan.panels:
        assert len(colours_in(im, boxes[0])) > 20  # a photo-like picture
        for box in boxes[1:]:  # ground truth and both predictions: palette colours only
            assert colours_in(im, box) <= palette
        assert len(colours_in(im, boxes[1])) >= 2  # the demo masks hold objects
    # Same images, same order for another call: the selection is deterministic.
    again = tmp_path / "again.png"
    r = runner.invoke(app, ["show", "-c", str(a), "-c", str(b), "--out", str(again), "--samples", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(im))
    # --overwrite replaces; --labels names the columns; --seed and --no-scores change the layout.
    r = runner.invoke(app, ["show", "-c", str(a), "--out", str(out), "--samples", "2", "--labels", "baseline",
                            "--seed", "1", "--no-scores", "--overwrite", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (cs.PAD * 4 + 3 * 160, cs.PAD + cs.HEADER_H + 2 * (160 + cs.CAPTION_H + cs.PAD) + cs.LEGEND_ROW_H + cs.PAD)


def test_default_run_labels_tell_runs_and_files_apart() -> None:
    assert cs.run_labels([Path("runs/x/best.pt"), Path("runs/y/best.pt")], ["supervised", "u2pl"]) == \
        ["supervised (x)", "u2pl (y)"]
    assert cs.run_labels([Path("runs/x/best.pt"), Path("runs/x/last.pt")], ["u2pl", "u2pl"]) == \
        ["u2pl (x/best.pt)", "u2pl (x/last.pt)"]


def _other_classes(ckpt: Path, out: Path) -> Path:
    from semiseg_cli.engine.checkpoint import load_checkpoint, save_checkpoint

    data = load_checkpoint(ckpt)
    data["class_names"] = ["sky", "road", "car", "tree", "person"]
    save_checkpoint(out, {k: v for k, v in data.items() if k not in ("format", "format_version", "semiseg_version")})
    return out


def test_bad_input_is_one_line_and_writes_nothing(runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = runs
    out = tmp_path / "sheet.png"

    def refused(*args: str) -> str:
        r = runner.invoke(app, ["show", *args, "--device", "cpu"])
        err = one_line_error(r)
        assert not out.exists() and no_temp_files(tmp_path)
        return err

    assert "does not exist" in refused("-c", str(tmp_path / "nope.pt"), "-c", str(a), "--out", str(out))
    assert "is a folder" in refused("-c", str(a.parent), "--out", str(out))
    assert "--samples" in refused("-c", str(a), "--out", str(out), "--samples", "0")
    assert "at least one checkpoint" in refused("--out", str(out))
    assert "--labels" in refused("-c", str(a), "-c", str(b), "--out", str(out), "--labels", "one")
    assert ".png" in refused("-c", str(a), "--out", str(tmp_path / "sheet.jpg"))
    assert "--weights" in refused("-c", str(a), "--out", str(out), "--weights", "ema")
    assert "missing.txt" in refused("-c", str(a), "--out", str(out), "--split", str(tmp_path / "missing.txt"))
    other = _other_classes(a, tmp_path / "other" / "best.pt")
    err = refused("-c", str(a), "-c", str(other), "--out", str(out))
    assert str(a) in err and str(other) in err and "different classes" in err
    # An existing sheet is kept without --overwrite.
    out.write_bytes(b"keep")
    r = runner.invoke(app, ["show", "-c", str(a), "--out", str(out), "--device", "cpu"])
    assert "--overwrite" in one_line_error(r)
    assert out.read_bytes() == b"keep"
