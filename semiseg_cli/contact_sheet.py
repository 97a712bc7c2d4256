"""`semiseg show`: a contact sheet PNG of a few images of a split, their ground truth and each
run's prediction, side by side, in the display palette, with a legend.

Layout (`plan_sheet` computes it, `compose_sheet` draws it; both pure, on arrays):

    PAD | header | header | header ...           one line of column headers
        | panel  | panel  | panel  ...           one row per image, PANEL_HEIGHT px high,
        | caption| caption| caption...           widths keep each image's aspect ratio
        ...                                      (PAD between rows)
        | [■] class  [■] class  [■] ignore       legend strip, wrapped to the sheet width

Pictures are resized bilinearly, label maps with nearest neighbour, so a mask panel holds only
palette colours. Colours are `viz.display_palette`: a dataset's own palette when it has one,
else colours that stay apart on dark images and in two-class data; ignored pixels are white.

`write_contact_sheet` runs the checkpoints: every check (output file, checkpoints, shared
classes, split, the chosen images and masks, the weights) passes before the first prediction,
and the PNG is written atomically, so bad input writes nothing. Every run sees the same images,
chosen deterministically from the sorted split (evenly spaced, or drawn with `seed`), predicted
whole-image with the checkpoint's own evaluation settings, as `eval` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semiseg_cli.errors import UserError, warn
from semiseg_cli.viz import IGNORE, colorize, display_palette

PANEL_HEIGHT = 160
PAD = 8  # margin round the sheet and gap between columns and rows
HEADER_H = 22  # the column header line
CAPTION_H = 18  # a caption line under every panel row (when any panel has a caption)
LEGEND_ROW_H = 22  # one line of the legend
SWATCH = 14  # legend colour square
SWATCH_GAP = 5  # between a swatch and its name
ENTRY_GAP = 16  # between legend entries
FONT_SIZE = 13
MAX_SAMPLES = 100

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
FRAME = (150, 150, 150)  # 1 px outside each panel and swatch: white (ignore) stays visible
IGNORE_NAME = "ignore"


# ----------------------------------------------------------------------------- pure layout


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    @property
    def centre(self) -> tuple[int, int]:
        return self.x + self.w // 2, self.y + self.h // 2


@dataclass
class Panel:
    """One cell: an HxWx3 uint8 picture or an HxW label map (class ids, 255 = ignore), and an
    optional caption under it."""

    array: np.ndarray
    caption: str | None = None

    @property
    def is_labels(self) -> bool:
        return self.array.ndim == 2


@dataclass
class LegendEntry:
    name: str
    colour: tuple[int, int, int]
    swatch: Box
    text_xy: tuple[int, int]


@dataclass
class SheetPlan:
    """Where everything goes: the sheet size, header, panel and caption boxes ([row][column])
    and the legend entries in class order (then `ignore` when shown)."""

    size: tuple[int, int]
    column_widths: list[int]
    headers: list[Box]
    panels: list[list[Box]]
    captions: list[list[Box]] | None
    legend: list[LegendEntry] = field(default_factory=list)


@lru_cache(maxsize=4)
def get_font(size: int = FONT_SIZE) -> Any:
    """Pillow's built-in font at `size` px (a scalable one since Pillow 10.1; older ones get the
    fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def text_width(text: str, font: Any = None) -> int:
    return int(round(_MEASURE.textlength(text, font=font or get_font())))


def fit_text(text: str, width: int, font: Any = None) -> str:
    """`text`, cut with an ellipsis to fit `width` px."""
    font = font or get_font()
    if text_width(text, font) <= width:
        return text
    while text and text_width(text + "...", font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _as_panel(p: Panel | np.ndarray) -> Panel:
    return p if isinstance(p, Panel) else Panel(np.asarray(p))


def panel_width(shape: Sequence[int], panel_height: int = PANEL_HEIGHT) -> int:
    """Width of a panel of `panel_height` px for an array of `shape` (aspect kept)."""
    h, w = int(shape[0]), int(shape[1])
    return max(1, round(w * panel_height / h))


def legend_names(class_names: Sequence[str], show_ignore: bool) -> list[str]:
    return list(class_names) + ([IGNORE_NAME] if show_ignore else [])


def _has_ignore(rows: Sequence[Sequence[Panel]]) -> bool:
    return any(p.is_labels and bool((p.array == IGNORE).any()) for row in rows for p in row)


def plan_sheet(
    rows: Sequence[Sequence[Panel | np.ndarray]],
    headers: Sequence[str],
    class_names: Sequence[str],
    colours: np.ndarray,
    panel_height: int = PANEL_HEIGHT,
    show_ignore: bool | None = None,
) -> SheetPlan:
    """The layout of `compose_sheet` for the same arguments (see the module docstring).

    Width = PAD * (columns + 1) + the column widths (each the widest panel in it); height =
    PAD + HEADER_H + rows * (panel_height + caption + PAD) + legend lines * LEGEND_ROW_H + PAD,
    caption = CAPTION_H when any panel has one, else 0. `show_ignore` None: an `ignore` legend
    entry when any label map holds 255."""
    cells = [[_as_panel(p) for p in row] for row in rows]
    if not cells:
        raise ValueError("a contact sheet needs at least one row")
    ncols = len(headers)
    for i, row in enumerate(cells):
        if len(row) != ncols:
            raise ValueError(f"row {i} has {len(row)} panels for {ncols} headers")
    if len(colours) < len(class_names):
        raise ValueError(f"{len(colours)} colours for {len(class_names)} classes")
    widths = [max(panel_width(row[c].array.shape, panel_height) for row in cells) for c in range(ncols)]
    captioned = any(p.caption for row in cells for p in row)
    cap_h = CAPTION_H if captioned else 0
    xs = [PAD + sum(widths[:c]) + PAD * c for c in range(ncols)]
    sheet_w = PAD * (ncols + 1) + sum(widths)

    y = PAD
    header_boxes = [Box(xs[c], y, widths[c], HEADER_H) for c in range(ncols)]
    y += HEADER_H
    panels: list[list[Box]] = []
    captions: list[list[Box]] = []
    for row in cells:
        boxes, caps = [], []
        for c, p in enumerate(row):
            pw = panel_width(p.array.shape, panel_height)
            x = xs[c] + (widths[c] - pw) // 2  # centred in its column
            boxes.append(Box(x, y, pw, panel_height))
            caps.append(Box(xs[c], y + panel_height, widths[c], cap_h))
        panels.append(boxes)
        captions.append(caps)
        y += panel_height + cap_h + PAD

    if show_ignore is None:
        show_ignore = _has_ignore(cells)
    names = legend_names(class_names, show_ignore)
    legend: list[LegendEntry] = []
    font = get_font()
    avail = sheet_w - 2 * PAD
    lx, line = PAD, 0
    for k, name in enumerate(names):
        tw = min(text_width(name, font), max(avail - SWATCH - SWATCH_GAP, 1))
        entry_w = SWATCH + SWATCH_GAP + tw
        if lx > PAD and lx + entry_w > PAD + avail:  # wrap
            lx, line = PAD, line + 1
        ly = y + line * LEGEND_ROW_H
        colour = (255, 255, 255) if k >= len(class_names) else tuple(int(v) for v in colours[k])
        swatch = Box(lx, ly + (LEGEND_ROW_H - SWATCH) // 2, SWATCH, SWATCH)
        legend.append(LegendEntry(name, colour, swatch, (lx + SWATCH + SWATCH_GAP, ly + LEGEND_ROW_H // 2)))  # type: ignore[arg-type]
        lx += entry_w + ENTRY_GAP
    lines = line + 1 if names else 0
    sheet_h = y + lines * LEGEND_ROW_H + PAD
    return SheetPlan((sheet_w, sheet_h), widths, header_boxes, panels, captions if captioned else None, legend)


def _frame(draw: ImageDraw.ImageDraw, box: Box) -> None:
    draw.rectangle((box.x - 1, box.y - 1, box.x + box.w, box.y + box.h), outline=FRAME)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, centred: bool) -> None:
    """`text` vertically centred on xy[1], starting at xy[0] or (`centred`) centred on it.
    Placed from its bounding box rather than with `anchor=`, which bitmap fonts lack."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - ((left + right) / 2 if centred else left)
    draw.text((round(x), round(xy[1] - (top + bottom) / 2)), text, fill=TEXT, font=font)


def _centred_text(draw: ImageDraw.ImageDraw, box: Box, text: str, font: Any) -> None:
    text = fit_text(text, box.w, font)
    if text:
        _draw_text(draw, (box.x + box.w / 2, box.y + box.h / 2), text, font, centred=True)


def _panel_image(p: Panel, box: Box, colours: np.ndarray) -> Image.Image:
    if p.is_labels:
        im = Image.fromarray(colorize(p.array, colours))
        return im.resize((box.w, box.h), Image.NEAREST)
    arr = np.asarray(p.array)
    if arr.dtype != np.uint8:
        arr = arr.clip(0, 255).astype(np.uint8)
    arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3]  # grey or RGBA: RGB
    return Image.fromarray(np.ascontiguousarray(arr)).resize((box.w, box.h), Image.BILINEAR)


def compose_sheet(
    rows: Sequence[Sequence[Panel | np.ndarray]],
    headers: Sequence[str],
    class_names: Sequence[str],
    colours: np.ndarray,
    panel_height: int = PANEL_HEIGHT,
    show_ignore: bool | None = None,
) -> Image.Image:
    """The contact sheet as an RGB image: `headers` over the columns, one row per entry of
    `rows` (pictures and label maps, label maps painted with `colours`, 255 white), captions
    under the panels that have one, a legend of every class. Layout: `plan_sheet`."""
    cells = [[_as_panel(p) for p in row] for row in rows]
    colours = np.asarray(colours, np.uint8)
    plan = plan_sheet(cells, headers, class_names, colours, panel_height, show_ignore)
    sheet = Image.new("RGB", plan.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = get_font()
    for box, text in zip(plan.headers, headers):
        _centred_text(draw, box, text, font)
    for r, row in enumerate(cells):
        for c, p in enumerate(row):
            box = plan.panels[r][c]
            sheet.paste(_panel_image(p, box, colours), (box.x, box.y))
            _frame(draw, box)
            if plan.captions is not None and p.caption:
                _centred_text(draw, plan.captions[r][c], p.caption, font)
    avail = plan.size[0] - PAD
    for e in plan.legend:
        s = e.swatch
        _frame(draw, s)
        draw.rectangle((s.x, s.y, s.x + s.w - 1, s.y + s.h - 1), fill=e.colour)
        name = fit_text(e.name, max(avail - e.text_xy[0], 1), font)
        if name:
            _draw_text(draw, e.text_xy, name, font, centred=False)
    return sheet


# ----------------------------------------------------------------------------- scores, samples


def image_scores(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[float, float] | None:
    """(mean IoU over the classes in the prediction or ground truth, pixel accuracy) of one
    image, ignoring 255; None when it has no labeled pixel."""
    valid = gt != IGNORE
    if not valid.any():
        return None
    p, g = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
    p = np.where(p < num_classes, p, num_classes)  # out-of-range ids count as wrong
    cm = np.bincount(g * (num_classes + 1) + p, minlength=(num_classes + 1) ** 2).reshape(num_classes + 1, num_classes + 1)
    cm = cm[:num_classes]
    inter = np.diag(cm[:, :num_classes]).astype(np.float64)
    union = cm.sum(1) + cm[:, :num_classes].sum(0) - inter
    present = union > 0
    miou = float((inter[present] / union[present]).mean()) if present.any() else 0.0
    return miou, float(inter.sum() / valid.sum())


def choose_samples(count: int, available: int, seed: int | None = None) -> list[int]:
    """`count` distinct indices into a sorted list of `available` items: evenly spaced (the
    middle of `count` equal stretches) or, with `seed`, drawn at random; ascending."""
    n = min(count, available)
    if n <= 0:
        return []
    if seed is not None:
        rng = np.random.default_rng(seed)
        return sorted(int(i) for i in rng.choice(available, n, replace=False))
    return [int((i + 0.5) * available / n) for i in range(n)]


# ----------------------------------------------------------------------------- the command


def _check_request(checkpoints: Sequence[Path], out: Path, samples: int, labels: Sequence[str] | None,
                   overwrite: bool, weights: str) -> None:
    from semiseg_cli.engine.inputs import check_weights
    from semiseg_cli.io import check_output_file

    if not checkpoints:
        raise UserError("give at least one checkpoint: -c runs/NAME/best.pt (repeat -c to compare runs)")
    if not 1 <= samples <= MAX_SAMPLES:
        raise UserError(f"--samples must be 1..{MAX_SAMPLES} (got {samples})")
    if labels is not None:
        if len(labels) != len(checkpoints):
            raise UserError(f"--labels gives {len(labels)} names for {len(checkpoints)} checkpoints; give one per -c, comma-separated")
        if any(not str(s).strip() for s in labels):
            raise UserError("--labels holds an empty name; give one non-empty name per -c, comma-separated")
    check_weights(weights)
    if Path(out).suffix.lower() != ".png":
        raise UserError(f"--out {out} must be a .png file")
    check_output_file(out, overwrite, "contact sheet")


def run_labels(checkpoints: Sequence[Path], methods: Sequence[str]) -> list[str]:
    """Default column headers: `method (run folder)`, with the file name when two would match."""
    base = [f"{m} ({Path(c).resolve().parent.name})" for c, m in zip(checkpoints, methods)]
    return [f"{m} ({Path(c).resolve().parent.name}/{Path(c).name})" if base.count(b) > 1 else b
            for b, c, m in zip(base, checkpoints, methods)]


def write_contact_sheet(
    checkpoints: Sequence[Path],
    out: Path,
    samples: int = 6,
    split: str | None = None,
    root: Path | None = None,
    labels: Sequence[str] | None = None,
    weights: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    seed: int | None = None,
    scores: bool = True,
    panel_height: int = PANEL_HEIGHT,
    console: Any = None,
) -> Path:
    """Write the contact sheet of `samples` images of `split` (default: the first checkpoint's
    validation split) for `checkpoints`, which must share their classes; returns its path.

    Images and masks come from the first checkpoint's dataset (`root` replaces its data root)
    and every run reads that same data. Each run is predicted whole-image with its own
    `eval.*` settings and weights (`weights`: auto, teacher or student)."""
    import torch

    from semiseg_cli.data import build_dataset
    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.engine.inputs import load_model, open_split
    from semiseg_cli.engine.loaders import image_sizes
    from semiseg_cli.errors import flush_warnings
    from semiseg_cli.eval_report import eval_config
    from semiseg_cli.inference import InferenceSettings, predict_probs
    from semiseg_cli.io import atomic_path

    checkpoints = [Path(c) for c in checkpoints]
    out = Path(out)
    _check_request(checkpoints, out, samples, labels, overwrite, weights)

    # Classes first, from the checkpoints alone: a mismatch is the user's real problem.
    stored = [load_checkpoint(c, mmap=True) for c in checkpoints]
    first_names = list(stored[0]["class_names"])
    for c, s in zip(checkpoints[1:], stored[1:]):
        names = list(s["class_names"])
        if names != first_names:
            raise UserError(
                f"{checkpoints[0]} and {c} were trained on different classes ({len(first_names)}: "
                f"{', '.join(first_names[:4])}{', ...' if len(first_names) > 4 else ''} vs {len(names)}: "
                f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); show runs of one dataset together"
            )
    del stored

    def configure(data_root: Path | None) -> Any:
        values = {"data.root": str(data_root)} if data_root is not None else {}
        return lambda raw: eval_config(raw, None, values)

    main = open_split(checkpoints[0], split, device=device, weights=weights, configure=configure(root))
    data_root = Path(main.cfg.data.root)
    runs = [main] + [open_split(c, main.split, device=device, weights=weights, configure=configure(data_root))
                     for c in checkpoints[1:]]
    layout, dev = main.layout, main.device

    pairs = sorted({(img, mask) for img, mask in main.pairs if mask is not None})
    if not pairs:
        raise UserError(f"split {main.split!r} has no images with masks to show")
    if samples > len(pairs):
        warn(f"--samples {samples}: split {main.split!r} has {len(pairs)} images with masks; showing all of them")
    chosen = [pairs[i] for i in choose_samples(samples, len(pairs), seed)]
    image_sizes(layout, [img for img, _ in chosen])  # every header, one line naming a bad file
    pictures = [np.asarray(layout.read_image(img)) for img, _ in chosen]
    truths = []
    for (img, mask), pic in zip(chosen, pictures):
        gt = layout.read_mask(mask)  # type: ignore[arg-type]
        if gt.shape != pic.shape[:2]:
            raise UserError(f"mask {layout.root / mask} is not the size of image {img}")  # type: ignore[operator]
        truths.append(gt)
    datasets = [build_dataset(r.cfg.data, chosen, train=False) for r in runs]
    models = [load_model(c, dev, weights) for c in checkpoints]  # weights verified before any prediction
    flush_warnings()

    preds: list[list[tuple[np.ndarray, tuple[float, float] | None]]] = []
    for r, ds, (model, _ckpt) in zip(runs, datasets, models):
        settings = InferenceSettings.from_config(r.cfg)
        amp = bool(r.cfg.train.amp) and dev.type == "cuda"
        column = []
        for i in range(len(ds)):
            item = ds[i]
            x = item["image"][None].to(dev)
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                pred = predict_probs(model, x, settings).argmax(1)[0].to(torch.uint8).cpu().numpy()
            gt = item["mask"].numpy().astype(np.uint8)  # at data.resize, as eval scores it
            column.append((pred, image_scores(pred, gt, main.num_classes)))
        preds.append(column)
        if console is not None:
            console.print(f"predicted {len(ds)} images with {r.cfg.method} ({checkpoints[len(preds) - 1]})", highlight=False)
    del models

    headers = ["image", "ground truth"] + (list(labels) if labels is not None else run_labels(checkpoints, [r.cfg.method for r in runs]))
    rows = []
    for k, ((img, _), pic, gt) in enumerate(zip(chosen, pictures, truths)):
        row = [Panel(pic, Path(img).name), Panel(gt, None)]
        for column in preds:
            pred, sc = column[k]
            caption = None
            if scores:
                caption = "no labeled pixels" if sc is None else f"mIoU {100 * sc[0]:.1f}  acc {100 * sc[1]:.1f}"
            row.append(Panel(pred, caption))
        rows.append(row)
    colours = display_palette(main.num_classes, layout.palette)
    sheet = compose_sheet(rows, headers, main.class_names, colours, panel_height,
                          show_ignore=any(bool((gt == IGNORE).any()) for gt in truths))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
