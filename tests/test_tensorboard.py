"""TensorBoard event files and the training-curve picture of a run.

Events go to RUN/tensorboard/ when the optional package is installed and `train.tensorboard` is
on; turning them off, or the package being absent, writes none and changes nothing else. Training
is bit-identical either way. `curves.png` is drawn from metrics.jsonl at the end of every run.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.curves import COLOURS, SIZE, VAL_COLOUR, curve_axes, draw_curves, nice_ticks, write_curves
from semiseg_cli.engine.checkpoint import load_checkpoint
from semiseg_cli.engine.loop import train
from semiseg_cli.engine.tensorboard_log import GAP, comparison_image
from semiseg_cli.methods.supervised import Supervised
from semiseg_cli.viz import display_palette
from tests.method_harness import make_cfg

# 4 iterations, a record every step, validation and checkpoint every 2 (method_harness.TINY).
OVERRIDES = ['data.labeled="1/2"', "train.val_interval=2"]
CLASSES = ["background", "disc", "box", "triangle", "stripes"]


def _cfg(demo_root: Path, out: Path, *extra: str) -> Any:
    return make_cfg("supervised", root=str(demo_root), out=str(out), overrides=[*OVERRIDES, *extra])


def _events(run: Path) -> list[Path]:
    return sorted((run / "tensorboard").glob("events.out.tfevents.*")) if (run / "tensorboard").exists() else []


def _accumulator(run: Path) -> Any:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _steps(acc: Any, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "last.pt")["method_state"], load_checkpoint(b / "last.pt")["method_state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_speed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "it_per_s"} for r in records]


@pytest.fixture(scope="module")
def tb_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with the default `train.tensorboard = true` (events only where the package is installed)."""
    out = tmp_path_factory.mktemp("tb") / "run"
    train(_cfg(demo_root, out), progress=False)
    return out


# --------------------------------------------------------------------------- event files


def test_event_files_hold_every_logged_scalar_validation_and_images(tb_run: Path) -> None:
    pytest.importorskip("tensorboard")
    assert _events(tb_run), "no event files in RUN/tensorboard"
    acc = _accumulator(tb_run)
    scalars = set(acc.Tags()["scalars"])
    records = _records(tb_run)
    train_keys = {k for r in records if "loss" in r for k in r if k != "step"}
    assert {"loss", "loss_sup", "lr", "it_per_s"} <= train_keys
    assert {f"train/{k}" for k in train_keys} <= scalars  # every key of every training record
    assert _steps(acc, "train/loss") == [1, 2, 3, 4]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert _steps(acc, f"val/{key}") == [2, 4], key
    vals = [r["val_mIoU"] for r in records if "val_mIoU" in r]
    assert [e.value for e in acc.Scalars("val/mIoU")] == pytest.approx(vals, rel=1e-6)
    assert "val_IoU/background" in scalars and all(t.split("/", 1)[1] in CLASSES for t in scalars if t.startswith("val_IoU/"))
    images = acc.Tags()["images"]
    assert images == [f"val_images/{i}" for i in range(4)]
    first = acc.Images("val_images/0")
    assert [e.step for e in first] == [2, 4]
    pic = Image.open(io.BytesIO(first[-1].encoded_image_string))
    assert pic.size == (3 * 64 + 2 * GAP, 64)  # image | ground truth | prediction of a 64x64 val image


def test_no_tensorboard_writes_no_events_and_trains_bit_identically(tb_run: Path, demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "off"
    train(_cfg(demo_root, out, "train.tensorboard=false"), progress=False)
    assert not (out / "tensorboard").exists()
    _same_weights(tb_run, out)
    assert _without_speed(_records(out)) == _without_speed(_records(tb_run))
    assert (out / "curves.png").is_file()  # the picture does not need TensorBoard


def test_without_the_package_training_works_and_writes_no_events(tb_run: Path, demo_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "nopkg"
    res = train(_cfg(demo_root, out), progress=False)
    assert res.step == 4 and not (out / "tensorboard").exists()
    _same_weights(tb_run, out)
    assert (out / "curves.png").is_file()


def test_resume_purges_the_events_past_the_checkpoint(tb_run: Path, demo_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "cut"
    original = Supervised.training_step

    def killed_at_step_3(self, labeled, unlabeled, step):  # type: ignore[no-untyped-def]
        if step == 3:  # step 3 is logged, the checkpoint is from step 2: resuming redoes step 3
            raise KeyboardInterrupt
        return original(self, labeled, unlabeled, step)

    monkeypatch.setattr(Supervised, "training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(demo_root, out), progress=False)
    assert _steps(_accumulator(out), "train/loss") == [1, 2, 3]
    monkeypatch.setattr(Supervised, "training_step", original)
    train(_cfg(demo_root, out), resume=True, progress=False)

    assert len(_events(out)) == 2  # one file per process, the second starting with the purge
    acc = _accumulator(out)
    assert _steps(acc, "train/loss") == [1, 2, 3, 4]
    assert _steps(acc, "val/mIoU") == [2, 4]
    assert [e.step for e in acc.Images("val_images/0")] == [2, 4]
    full = _accumulator(tb_run)
    assert [e.value for e in acc.Scalars("train/loss")] == [e.value for e in full.Scalars("train/loss")]
    _same_weights(tb_run, out)
    assert (out / "curves.png").is_file()


def test_overwrite_removes_the_previous_runs_events(demo_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "again"
    train(_cfg(demo_root, out, "train.iters=2"), progress=False)
    assert _events(out)
    train(_cfg(demo_root, out, "train.iters=2", "train.tensorboard=false"), overwrite=True, progress=False)
    assert not (out / "tensorboard").exists()


def test_cli_no_tensorboard_sets_the_field_also_on_resume(tb_run: Path, demo_root: Path, tmp_path: Path) -> None:
    from semiseg_cli.cli import app

    runner = CliRunner()
    base = ["train", "--root", str(demo_root), "--labeled", "1/2", "--out", str(tmp_path / "r"), "--dry-run"]
    on = runner.invoke(app, base)
    off = runner.invoke(app, [*base, "--no-tensorboard"])
    assert on.exit_code == 0 and off.exit_code == 0, (on.output, off.output)
    assert "tensorboard = true" in on.stdout and "tensorboard = false" in off.stdout
    # Logging is no part of what makes the run: a resumed run may turn it off.
    resumed = runner.invoke(app, ["train", "--out", str(tb_run), "--resume", "--no-tensorboard", "--dry-run"])
    assert resumed.exit_code == 0, resumed.output
    assert "tensorboard = false" in resumed.stdout


# --------------------------------------------------------------------------- curves.png


def test_curves_png_is_written_at_the_end_of_a_run(tb_run: Path) -> None:
    path = tb_run / "curves.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(path)
    img.verify()
    img = Image.open(path)
    assert img.size == SIZE and img.mode == "RGB"
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert COLOURS[0] in colours and VAL_COLOUR in colours


def _near(img: Image.Image, xy: tuple[float, float], colour: tuple[int, int, int], r: int = 2) -> bool:
    x, y = round(xy[0]), round(xy[1])
    return any(img.getpixel((x + dx, y + dy)) == colour for dx in range(-r, r + 1) for dy in range(-r, r + 1))


def test_draw_curves_puts_each_series_where_its_values_are() -> None:
    records: list[dict[str, Any]] = [{"step": s, "loss": 2.0, "loss_sup": 1.0, "lr": 0.01} for s in range(10, 110, 10)]
    records += [{"step": 50, "val_mIoU": 0.30, "val_aAcc": 0.5, "val_mAcc": 0.4},
                {"step": 100, "val_mIoU": 0.40, "val_aAcc": 0.6, "val_mAcc": 0.5}]
    img = draw_curves(records)
    assert img.size == SIZE
    loss_ax, val_ax = curve_axes(records)
    assert loss_ax.y_range[0] == 0.0 and loss_ax.y_range[1] >= 2.0 and loss_ax.x_range == (0.0, 100.0)
    # The total loss first (colour 0), then loss_sup; lr is no loss term and is not drawn.
    for step in (20, 55, 90):
        assert _near(img, loss_ax.px(step, 2.0), COLOURS[0]), step
        assert _near(img, loss_ax.px(step, 1.0), COLOURS[1]), step
        assert not _near(img, loss_ax.px(step, 1.5), COLOURS[0]), step  # nothing between the lines
    assert _near(img, val_ax.px(75, 35.0), VAL_COLOUR)  # mIoU in %, a straight line from 30 to 40
    assert not _near(img, val_ax.px(75, 38.0), VAL_COLOUR)
    top, bottom = loss_ax.px(0, loss_ax.y_range[1])[1], loss_ax.px(0, loss_ax.y_range[0])[1]
    assert 0 < top < bottom < val_ax.top < SIZE[1]  # two panels, one above the other
    assert max(img.getcolors(1 << 20))[1] == (255, 255, 255)  # on a white background


def test_draw_curves_survives_odd_records(tmp_path: Path) -> None:
    odd: list[dict[str, Any]] = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 1.0}, {"step": 3, "val_mIoU": None}]
    assert draw_curves(odd).size == SIZE
    assert draw_curves([]).size == SIZE
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')  # cut by a kill
    out = write_curves(metrics, tmp_path / "curves.png")
    assert Image.open(out).size == SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary file left


def test_nice_ticks() -> None:
    assert nice_ticks(0, 4, 8, integer=True) == [0, 1, 2, 3, 4]
    assert nice_ticks(0, 100, 8, integer=True) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.0, 2.2) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    t = nice_ticks(33.9, 36.5)
    assert t[0] <= 33.9 and t[-1] >= 36.5 and 3 <= len(t) <= 8


# --------------------------------------------------------------------------- the pictures


def test_comparison_image_paints_ground_truth_and_prediction_with_the_display_palette() -> None:
    colours = display_palette(3)
    image = torch.zeros(3, 8, 10)  # normalised zeros: the mean colour
    gt = torch.zeros(8, 10, dtype=torch.long)
    gt[:, 5:] = 2
    gt[0, 0] = 255
    pred = torch.ones(8, 10, dtype=torch.long)
    mean, std = (0.5, 0.25, 0.0), (0.2, 0.2, 0.2)
    pic = comparison_image(image, gt, pred, colours, mean, std)
    assert pic.shape == (8, 3 * 10 + 2 * GAP, 3) and pic.dtype == np.uint8
    assert tuple(pic[4, 2]) == (128, 64, 0)  # denormalised image
    assert tuple(pic[4, 10 + GAP + 2]) == tuple(colours[0]) and tuple(pic[4, 10 + GAP + 7]) == tuple(colours[2])
    assert tuple(pic[0, 10 + GAP]) == (255, 255, 255)  # ignored pixel
    assert tuple(pic[4, 2 * (10 + GAP) + 3]) == tuple(colours[1])
    big = comparison_image(torch.zeros(3, 600, 300), torch.zeros(600, 300, dtype=torch.long),
                           torch.zeros(600, 300, dtype=torch.long), colours, mean, std)
    assert big.shape[0] == 256 and big.shape[1] == 3 * 128 + 2 * GAP  # scaled down, aspect kept
