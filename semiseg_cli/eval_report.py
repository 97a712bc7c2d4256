"""`semiseg eval`: metrics of a checkpoint on a split, as a table, JSON and a confusion PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg_cli.errors import UserError
from semiseg_cli.io import atomic_path, write_json


def print_report(report: dict[str, Any], console: Any, title: str = "Evaluation") -> None:
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    for name, row in report["per_class"].items():
        table.add_row(name, pct(row["IoU"]), pct(row["Acc"]))
    caption = f"mIoU {pct(report['mIoU'])}   aAcc {pct(report['aAcc'])}   mAcc {pct(report['mAcc'])}"
    if report.get("absent_classes"):
        caption += (
            f"\nn/a: {', '.join(report['absent_classes'])} absent from both prediction and ground truth,"
            " left out of the mean"
        )
    table.caption = caption
    console.print(table)


def write_confusion_png(mat: torch.Tensor, path: Path) -> None:
    """Row-normalised confusion matrix as an image (one cell = 16 px), white = 1."""
    from PIL import Image

    m = mat.double()
    rows = m.sum(1, keepdim=True).clamp(min=1)
    norm = (m / rows).numpy()
    cell = 16
    img = (255 * (1 - np.kron(norm, np.ones((cell, cell))))).clip(0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(img, mode="L").save(tmp, format="PNG")


def run_eval(
    checkpoint: Path,
    split: str = "val",
    root: Path | None = None,
    mode: str | None = None,
    scales: tuple[float, ...] | None = None,
    flip: bool = False,
    crop_size: tuple[int, int] | None = None,
    weights: str = "auto",
    device: str | None = None,
    json_out: Path | None = None,
    confusion_png: Path | None = None,
    workers: int = 2,
    overwrite: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    from semiseg_cli.data import build_dataset, get_layout
    from semiseg_cli.data.splits import read_split_file
    from semiseg_cli.engine.checkpoint import load_for_inference
    from semiseg_cli.engine.loaders import eval_loader
    from semiseg_cli.engine.loop import resolve_device
    from semiseg_cli.inference import InferenceSettings, evaluate

    for p in (json_out, confusion_png):
        if p is not None and p.exists() and not overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it")
    dev = resolve_device(device or "auto")
    model, cfg, ckpt = load_for_inference(checkpoint, dev, weights)
    data_root = str(root) if root else cfg.data.root
    layout = get_layout(cfg.data.dataset, data_root)
    if split.endswith(".txt") or Path(split).is_file():
        pairs = read_split_file(split, layout.root)
    else:
        pairs = layout.list_pairs(split)
    pairs = [p for p in pairs if p[1] is not None]
    if not pairs:
        raise UserError(f"split {split!r} has no images with masks to evaluate against")
    data_cfg = cfg.data.model_copy(update={"root": data_root, "workers": workers})
    ds = build_dataset(data_cfg, pairs, train=False)
    settings = InferenceSettings.from_config(cfg, mode=mode, scales=scales, crop_size=crop_size)
    if flip:
        settings.flip = True
    num_classes = ckpt["num_classes"]
    class_names = ckpt["class_names"]

    from rich.progress import Progress

    loader = eval_loader(ds, cfg.eval.batch_size, workers, dev.type == "cuda")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"eval {split}", total=len(ds))
        metrics = evaluate(model, loader, num_classes, settings, dev, cfg.data.ignore_index, cfg.train.amp,
                           progress=lambda: bar.advance(task, cfg.eval.batch_size))
    report = metrics.as_dict(class_names)
    report.update(
        checkpoint=str(checkpoint), step=ckpt.get("step"), method=cfg.method, split=split, images=len(ds),
        protocol={"mode": settings.mode, "scales": list(settings.scales), "flip": settings.flip,
                  "crop_size": list(settings.crop_size) if settings.mode == "slide" else None},
        weights="teacher" if (weights != "student" and ckpt.get("has_teacher")) else "student",
    )
    if console is not None:
        print_report(report, console, title=f"{cfg.method} @ step {ckpt.get('step')} on {split} ({len(ds)} images, {settings.mode}"
                     f"{', flip' if settings.flip else ''}{', scales ' + ','.join(map(str, settings.scales)) if settings.scales != (1.0,) else ''})")
    if json_out is not None:
        write_json(json_out, report)
    if confusion_png is not None:
        write_confusion_png(torch.tensor(metrics.confusion), confusion_png)
    return report
