"""The training-curve picture of a run (`RUN/curves.png`), drawn from its `metrics.jsonl`.

Two panels over the training steps: every loss term (the keys `loss` and `loss_*` of the training
records) and the validation mIoU (in %, best value marked). Drawn with PIL, which every install
already has (it reads the images), so the picture needs no plotting library and looks the same
everywhere; for zooming, smoothing and the other logged values there is TensorBoard.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from semiseg_cli.io import write_bytes

WIDTH, PANEL_HEIGHT = 960, 320
SIZE = (WIDTH, 2 * PANEL_HEIGHT)  # the picture's (width, height)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 24, 30, 44
BACKGROUND, AXIS, GRID, TEXT = (255, 255, 255), (40, 40, 40), (228, 228, 228), (20, 20, 20)
# Distinct, print-safe colours (Tableau 10), one per series in the order the keys first appear.
COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
VAL_COLOUR = COLOURS[0]
LINE_WIDTH, TOTAL_WIDTH = 2, 5


def is_loss_key(key: str) -> bool:
    return key == "loss" or key.startswith("loss_")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if it is missing); a line that does not parse (cut by
    a kill) is skipped."""
    out: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            out.append(rec)
    return out


Series = dict[str, list[tuple[float, float]]]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_series(records: Iterable[dict[str, Any]]) -> tuple[Series, list[tuple[float, float]]]:
    """(loss term -> [(step, value)], [(step, val mIoU in %)]), sorted by step; non-finite values
    are left out."""
    losses: Series = {}
    val: list[tuple[float, float]] = []
    for rec in sorted(records, key=lambda r: r["step"]):
        step = float(rec["step"])
        for k, v in rec.items():
            if is_loss_key(k) and _finite(v):
                losses.setdefault(k, []).append((step, float(v)))
        if _finite(rec.get("val_mIoU")):
            val.append((step, 100.0 * float(rec["val_mIoU"])))
    if "loss" in losses:  # the total first, then the terms in the order they were logged
        losses = {"loss": losses.pop("loss"), **losses}
    return losses, val


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi];
    `integer`: steps of at least 1 (training steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = max((hi - lo) / max(n, 1), 1.0 if integer else 0.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(t, 12))
    return ticks


def _span(values: Sequence[float], floor_zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if floor_zero and lo >= 0:
        lo = 0.0
    if hi - lo < 1e-12:  # a flat series: some room around it
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.6g}"


@dataclass
class Axes:
    """A panel's plot area in picture pixels and the data range it shows."""

    left: int
    top: int
    right: int
    bottom: int
    xticks: list[float]
    yticks: list[float]

    @property
    def x_range(self) -> tuple[float, float]:
        return self.xticks[0], self.xticks[-1]

    @property
    def y_range(self) -> tuple[float, float]:
        return self.yticks[0], self.yticks[-1]

    def px(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
        fy = (y - y0) / (y1 - y0) if y1 > y0 else 0.5
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _font(size: int = 13) -> Any:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def curve_axes(records: Sequence[dict[str, Any]]) -> tuple[Axes, Axes]:
    """The loss panel's and the validation panel's axes for these records (what `draw_curves`
    draws into; tests use it to find where a value lands)."""
    losses, val = curve_series(records)
    steps = [s for pts in losses.values() for s, _ in pts] + [s for s, _ in val]
    xticks = nice_ticks(0.0, max(steps) if steps else 1.0, 8, integer=True)
    loss_values = [v for pts in losses.values() for _, v in pts]
    axes = []
    for k, values in enumerate((loss_values, [v for _, v in val])):
        top = k * PANEL_HEIGHT
        yticks = nice_ticks(*_span(values, floor_zero=k == 0)) if values else [0.0, 1.0]
        if len(yticks) < 2:
            yticks = [yticks[0], yticks[0] + 1.0]
        axes.append(Axes(MARGIN_LEFT, top + MARGIN_TOP, WIDTH - MARGIN_RIGHT, top + PANEL_HEIGHT - MARGIN_BOTTOM, xticks, yticks))
    return axes[0], axes[1]


def _text(d: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: tuple[int, int, int], font: Any,
          anchor: str = "la") -> None:
    """Text placed by its box (horizontal l/m/r, vertical t/m/s): works with FreeType and
    bitmap fonts alike (the latter do not take PIL's own `anchor`)."""
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
    h, v = anchor[0], anchor[1]
    dx = {"l": 0.0, "m": (x1 - x0) / 2, "r": float(x1 - x0)}[h] + x0
    dy = {"t": 0.0, "m": (y1 - y0) / 2, "s": float(y1 - y0)}.get(v, 0.0) + y0
    d.text((xy[0] - dx, xy[1] - dy), text, fill=fill, font=font)


def _frame(d: ImageDraw.ImageDraw, ax: Axes, title: str, ylabel: str, font: Any) -> None:
    for t in ax.yticks:
        _, y = ax.px(ax.x_range[0], t)
        d.line([(ax.left, y), (ax.right, y)], fill=GRID)
        d.line([(ax.left - 5, y), (ax.left, y)], fill=AXIS)
        _text(d, (ax.left - 8, y), _label(t), fill=TEXT, font=font, anchor="rm")
    for t in ax.xticks:
        x, _ = ax.px(t, ax.y_range[0])
        d.line([(x, ax.top), (x, ax.bottom)], fill=GRID)
        d.line([(x, ax.bottom), (x, ax.bottom + 5)], fill=AXIS)
        _text(d, (x, ax.bottom + 8), _label(t), fill=TEXT, font=font, anchor="mt")
    d.rectangle([ax.left, ax.top, ax.right, ax.bottom], outline=AXIS)
    _text(d, (ax.left, ax.top - 8), title, fill=TEXT, font=font, anchor="ls")
    _text(d, ((ax.left + ax.right) / 2, ax.bottom + 26), "step", fill=TEXT, font=font, anchor="mt")
    _text(d, (ax.right, ax.top - 8), ylabel, fill=TEXT, font=font, anchor="rs")


def _polyline(d: ImageDraw.ImageDraw, ax: Axes, pts: list[tuple[float, float]], colour: tuple[int, int, int],
              markers: bool, width: int = 2) -> None:
    xy = [ax.px(s, v) for s, v in pts]
    if len(xy) > 1:
        d.line(xy, fill=colour, width=width, joint="curve")
    if markers or len(xy) == 1:
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def _legend(d: ImageDraw.ImageDraw, ax: Axes, entries: list[tuple[str, tuple[int, int, int]]], font: Any) -> None:
    if not entries:
        return
    row = 16
    width = 34 + max(d.textlength(name, font=font) for name, _ in entries)
    x1, y0 = ax.right - 8, ax.top + 8
    x0 = x1 - width
    d.rectangle([x0, y0, x1, y0 + row * len(entries) + 6], fill=BACKGROUND, outline=GRID)
    for i, (name, colour) in enumerate(entries):
        y = y0 + 3 + row * i + row / 2
        d.line([(x0 + 6, y), (x0 + 26, y)], fill=colour, width=4)
        _text(d, (x0 + 30, y), name, fill=TEXT, font=font, anchor="lm")


def draw_curves(records: Sequence[dict[str, Any]]) -> Image.Image:
    """The two-panel picture (SIZE) of a run's records."""
    losses, val = curve_series(records)
    loss_ax, val_ax = curve_axes(records)
    img = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(img)
    font = _font()
    _frame(d, loss_ax, "training loss terms", "loss", font)
    _frame(d, val_ax, "validation mIoU", "mIoU (%)", font)
    entries = []
    for i, (name, pts) in enumerate(losses.items()):
        colour = COLOURS[i % len(COLOURS)]
        # The total drawn first and wider: where it equals one term (a supervised run, a
        # warm-up) it still shows around that term's line.
        _polyline(d, loss_ax, pts, colour, markers=False, width=TOTAL_WIDTH if name == "loss" else LINE_WIDTH)
        entries.append((name, colour))
    _legend(d, loss_ax, entries, font)
    if val:
        _polyline(d, val_ax, val, VAL_COLOUR, markers=True, width=LINE_WIDTH)
        step, best = max(val, key=lambda p: p[1])
        x, y = val_ax.px(step, best)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], outline=COLOURS[3], width=2)
        _legend(d, val_ax, [(f"val mIoU (best {best:.2f} at step {int(step)})", VAL_COLOUR)], font)
    for ax, empty in ((loss_ax, not losses), (val_ax, not val)):
        if empty:
            _text(d, ((ax.left + ax.right) / 2, (ax.top + ax.bottom) / 2), "no records yet", fill=TEXT, font=font, anchor="mm")
    return img


def write_curves(metrics: str | Path, out: str | Path) -> Path:
    """Draw `metrics` (a metrics.jsonl) into the PNG `out`, atomically; returns `out`."""
    buf = io.BytesIO()
    draw_curves(read_records(metrics)).save(buf, format="PNG")
    write_bytes(out, buf.getvalue())
    return Path(out)
