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


# What `eval --set` may change in the checkpoint's config: how it is evaluated and where the
# data is read from. Everything else (model, classes, training) is what the checkpoint is.
EVAL_SET_KEYS = ("eval.*", "data.root", "data.workers", "data.resize")
# The config key behind each of eval's typed options, for error messages.
OPTION_NAMES = {
    "data.root": "--root", "data.workers": "--workers", "eval.batch_size": "--batch-size", "eval.mode": "--mode",
    "eval.scales": "--scales", "eval.flip": "--flip", "eval.crop_size": "--crop-size",
}


def _eval_key_allowed(key: str) -> bool:
    parts = [p for p in key.strip().split(".") if p]
    return (len(parts) == 2 and parts[0] == "eval") or ".".join(parts) in EVAL_SET_KEYS


def eval_config(
    stored: dict[str, Any], sets: list[str] | None = None, values: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Any:
    """The checkpoint's config with eval's `defaults`, then its `--set KEY=VALUE` (TOML text),
    then its typed options (`values`, dotted key -> value) applied, validated by the config
    models, so every field bound applies to eval's options too. Keys outside EVAL_SET_KEYS are
    refused."""
    import copy

    from semiseg_cli.config import apply_override, set_value, validate

    raw = copy.deepcopy(stored)
    for key, value in (defaults or {}).items():
        set_value(raw, key, value)
    for assignment in sets or []:
        key = assignment.split("=", 1)[0] if "=" in assignment else ""
        if "=" in assignment and not _eval_key_allowed(key):
            raise UserError(
                f"--set {key.strip()}: eval accepts only {', '.join(EVAL_SET_KEYS)} "
                "(the rest of the config is fixed by the checkpoint)"
            )
        apply_override(raw, assignment)  # also refuses a malformed assignment
    cfg = validate(raw, "eval's --set options" if sets else "the checkpoint's config")
    for key, value in (values or {}).items():  # one at a time, so an error names its option
        set_value(raw, key, value)
        cfg = validate(raw, OPTION_NAMES.get(key, key))
    return cfg


def weights_label(weights: str, has_teacher: bool) -> tuple[str, str]:
    """(JSON value, title text) of the weights `load_for_inference(weights=...)` evaluates."""
    if weights != "student" and has_teacher:
        return "teacher", "EMA teacher weights" + (" (auto)" if weights == "auto" else "")
    return "student", "student weights"


def _check_outputs(json_out: Path | None, confusion_png: Path | None, overwrite: bool) -> None:
    from semiseg_cli.io import check_output_file

    if json_out is not None and confusion_png is not None and Path(json_out).resolve() == Path(confusion_png).resolve():
        raise UserError(f"--json and --confusion-png are the same file {json_out}; give two different names")
    check_output_file(json_out, overwrite, "--json report")
    check_output_file(confusion_png, overwrite, "--confusion-png image")


def run_eval(
    checkpoint: Path,
    split: str | None = None,
    root: Path | None = None,
    mode: str | None = None,
    scales: tuple[float, ...] | None = None,
    flip: bool = False,
    crop_size: tuple[int, int] | None = None,
    weights: str = "auto",
    device: str | None = None,
    json_out: Path | None = None,
    confusion_png: Path | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    console: Any = None,
    batch_size: int | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split`. Every option is applied to the checkpoint's config and
    validated (`eval_config`), the outputs and every image header are checked, all before the
    model is loaded. `None` keeps the checkpoint's value, except `workers`: None is 2 unless
    `--set data.workers` says otherwise. `flip=True` adds flips; False keeps the config's."""
    from semiseg_cli.data import build_dataset
    from semiseg_cli.engine.inputs import load_model, open_split
    from semiseg_cli.engine.loaders import dataset_sizes, eval_loader
    from semiseg_cli.inference import InferenceSettings, evaluate

    _check_outputs(json_out, confusion_png, overwrite)
    values: dict[str, Any] = {
        "data.root": str(root) if root is not None else None,
        "data.workers": workers,
        "eval.batch_size": batch_size,
        "eval.mode": mode,
        "eval.scales": list(scales) if scales is not None else None,
        "eval.flip": True if flip else None,
        "eval.crop_size": list(crop_size) if crop_size is not None else None,
    }
    values = {k: v for k, v in values.items() if v is not None}
    defaults = {"data.workers": 2}  # eval's own default, below any --set (not the training machine's)
    # --root travels in `values` (as data.root, validated and named like every other option).
    inputs = open_split(checkpoint, split, device=device, weights=weights,
                        configure=lambda stored: eval_config(stored, sets, values, defaults))
    cfg, dev, split = inputs.cfg, inputs.device, inputs.split
    pairs = [p for p in inputs.pairs if p[1] is not None]
    if not pairs:
        raise UserError(f"split {split!r} has no images with masks to evaluate against")
    ds = build_dataset(cfg.data, pairs, train=False)
    sizes = dataset_sizes(ds)  # every header, before the model is loaded
    settings = InferenceSettings.from_config(cfg)

    model, ckpt = load_model(checkpoint, dev, weights)
    num_classes = ckpt["num_classes"]
    class_names = ckpt["class_names"]
    used, used_text = weights_label(weights, bool(ckpt.get("has_teacher")))

    from rich.progress import Progress

    loader = eval_loader(ds, cfg.eval.batch_size, cfg.data.workers, dev.type == "cuda", sizes=sizes)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"eval {split}", total=len(ds))

        def batches() -> Any:  # advance by the images of each batch: same-size batches vary in length
            for batch in loader:
                yield batch
                bar.advance(task, len(batch["image"]))

        metrics = evaluate(model, batches(), num_classes, settings, dev, cfg.data.ignore_index, cfg.train.amp)
    report = metrics.as_dict(class_names)
    report.update(
        checkpoint=str(checkpoint), step=ckpt.get("step"), method=cfg.method, split=split, images=len(ds),
        protocol={"mode": settings.mode, "scales": list(settings.scales), "flip": settings.flip,
                  "crop_size": list(settings.crop_size) if settings.mode == "slide" else None},
        weights=used,
    )
    if console is not None:
        print_report(report, console, title=f"{cfg.method} @ step {ckpt.get('step')} on {split} ({len(ds)} images, {used_text}, "
                     f"{settings.mode}{', flip' if settings.flip else ''}"
                     f"{', scales ' + ','.join(map(str, settings.scales)) if settings.scales != (1.0,) else ''})")
    if json_out is not None:
        write_json(json_out, report)
    if confusion_png is not None:
        write_confusion_png(torch.tensor(metrics.confusion), confusion_png)
    return report
