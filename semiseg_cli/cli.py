"""The `semiseg` command line: each command parses its options and calls the library. Nothing else.

Option types, value parsers and the mapping of `UserError` to one line on stderr live one level
down, in `cli_options.py` (the mapping is the command group's, so it happens once for all
commands). Every command is registered here, statically; library modules never import this one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from semiseg_cli import __version__
from semiseg_cli.cli_options import (
    Checkpoint,
    DeviceOpt,
    FlipOpt,
    ModeOpt,
    Overwrite,
    RootOpt,
    ScalesOpt,
    SemisegGroup,
    WeightsOpt,
    check_choice,
    err_console,
    out_console,
    parse_floats,
    parse_size,
)
from semiseg_cli.errors import UserError
from semiseg_cli.export import DEFAULT_OPSET

_UNSET = object()

app = typer.Typer(
    name="semiseg",
    cls=SemisegGroup,
    help="Semantic segmentation with scarce labels: semi-supervised (UniMatch, FixMatch, U2PL, AdvSemiSeg) and weakly supervised (DuPL).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"semiseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train with few labels, inspect pseudo-labels, evaluate and ship the model."""


# ----------------------------------------------------------------------------- prepare-splits
@app.command("prepare-splits", rich_help_panel="Data")
def prepare_splits_cmd(
    dataset: Annotated[str, typer.Option(help="voc | cityscapes | camvid | folder | demo | yolo | coco.")],
    root: Annotated[Path, typer.Option(help="Dataset root folder.")],
    labeled: Annotated[str, typer.Option(help="Fraction (1/8), count (183), or several: 1/16,1/8,92.")],
    out: Annotated[Path, typer.Option(help="Folder for labeled.txt / unlabeled.txt.")] = Path("splits"),
    seed: Annotated[int, typer.Option(help="Split seed: same seed, byte-identical files.")] = 0,
    split: Annotated[str, typer.Option(help="Training pool (voc: train or train_aug).")] = "train",
    unlabeled_split: Annotated[Optional[str], typer.Option(help="Add this pool's other images to unlabeled.txt (U2PL's VOC classic: --split train --unlabeled-split train_aug).")] = None,
    tags: Annotated[bool, typer.Option("--tags", help="Also write tags.json (image-level class tags) for weak supervision.")] = False,
    val_split: Annotated[str, typer.Option(help="Validation split checked too (training validates on it); not with --val.")] = "val",
    val: Annotated[Optional[str], typer.Option("--val", help="Carve a validation split out of the pool first: fraction (0.2) or count (50); writes val.txt for `train --val-list`.")] = None,
    classes_file: Annotated[Optional[Path], typer.Option(help="Class names (one per line, or a YOLO data.yaml) where the layout has none (data.classes_file).")] = None,
    palette_file: Annotated[Optional[Path], typer.Option(help="Colour masks: the file mapping RGB colours to classes (data.palette_file).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Validate a dataset (training pool and validation split), draw reproducible labeled/unlabeled (and --val) splits and report on the data.

    Example: [cyan]semiseg prepare-splits --dataset folder --root data/mine --val 0.2 --labeled 1/8 --out splits/mine[/]
    """
    from semiseg_cli.data.layouts import LayoutOptions
    from semiseg_cli.data.report import print_data_report
    from semiseg_cli.data.splits import parse_amounts, prepare_dataset

    amounts = parse_amounts(labeled)
    result = prepare_dataset(
        dataset, root, amounts, seed, out, split=split, overwrite=overwrite, tags=tags,
        unlabeled_split=unlabeled_split, val_split=val_split, options=LayoutOptions(classes_file, palette_file),
        val=val, report=True,
    )
    if result.report is not None:
        print_data_report(result.report, out_console)
    for path in result.written:
        out_console.print(f"wrote {path}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- train
GENERIC_PRESET = "generic_mbv2-os16_8+8-4000it_auto"


@app.command("train", rich_help_panel="Train and evaluate")
def train_cmd(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name in presets/ or a .toml path.")] = None,
    method: Annotated[Optional[str], typer.Option(help="supervised | u2pl | advsemiseg | dupl | cam_baseline | fixmatch | unimatch | unimatch_v2 (overrides the preset).")] = None,
    labeled: Annotated[Optional[str], typer.Option(help="Labeled fraction or count drawn from the training pool, e.g. 1/8.", rich_help_panel="Data")] = None,
    labeled_list: Annotated[Optional[Path], typer.Option(help="labeled.txt from prepare-splits.", rich_help_panel="Data")] = None,
    unlabeled_list: Annotated[Optional[Path], typer.Option(help="unlabeled.txt from prepare-splits.", rich_help_panel="Data")] = None,
    val_list: Annotated[Optional[Path], typer.Option(help="val.txt from prepare-splits --val: validate on it instead of data.val_split.", rich_help_panel="Data")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root (overrides data.root).", rich_help_panel="Data")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="voc | cityscapes | camvid | folder | demo | yolo | coco (overrides data.dataset); without --preset, the generic preset sizes itself from the data.", rich_help_panel="Data")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Training iterations.", rich_help_panel="Schedule")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Labeled images per step (and unlabeled unless set apart).", rich_help_panel="Schedule")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate (backbone).", rich_help_panel="Schedule")] = None,
    crop_size: Annotated[Optional[str], typer.Option(help="Training crop: 321 or 224,288 (H,W).", rich_help_panel="Data")] = None,
    device: DeviceOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.", rich_help_panel="Runtime")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder.", rich_help_panel="Runtime")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any field: section.key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last.pt.", rich_help_panel="Runtime")] = False,
    no_tensorboard: Annotated[bool, typer.Option("--no-tensorboard", help="Write no TensorBoard event files (train.tensorboard = false); they go to RUN/tensorboard/ when the tensorboard package is installed.", rich_help_panel="Runtime")] = False,
    overwrite: Overwrite = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="List the shipped presets and exit.")] = False,
) -> None:
    """Train a model (supervised baseline, U2PL, AdvSemiSeg, FixMatch, UniMatch or DuPL).

    Example: [cyan]semiseg train --preset u2pl_mbv2-os16_1x4+4-1200it_camvid-176x224 --labeled 1/8[/]
    """
    from semiseg_cli.config import config_to_toml, list_presets as _list
    from semiseg_cli.engine.setup import check_run_config, resolve_run_config

    if list_presets:
        for name in _list():
            out_console.print(name)
        return
    if labeled and labeled_list:
        raise UserError("--labeled and --labeled-list contradict each other; pass one of them")
    # Typed values, never TOML text: a path with a backslash or a quote stays what was typed.
    shortcut: dict[str, Any] = {
        "data.labeled": labeled if labeled else (None if labeled_list else _UNSET),
        "data.labeled_list": str(labeled_list) if labeled_list else _UNSET,
        "data.unlabeled_list": str(unlabeled_list) if unlabeled_list else _UNSET,
        "data.val_list": str(val_list) if val_list else _UNSET,
        "data.root": str(root) if root else _UNSET,
        "data.dataset": dataset if dataset else _UNSET,
        "train.iters": iters if iters is not None else _UNSET,
        "data.batch_size": batch_size if batch_size is not None else _UNSET,
        "optim.lr": lr if lr is not None else _UNSET,
        "data.crop_size": list(parse_size(crop_size, "--crop-size")) if crop_size else _UNSET,
        "train.device": device if device else _UNSET,
        "train.seed": seed if seed is not None else _UNSET,
        "out": str(out) if out else _UNSET,
        "train.tensorboard": False if no_tensorboard else _UNSET,
    }
    values = {k: v for k, v in shortcut.items() if v is not _UNSET}
    if dataset and not preset:
        preset = GENERIC_PRESET
    notes: list[str] = []
    cfg = resolve_run_config(preset, method, list(set_ or []), values, resume=resume, overwrite=overwrite, notes=notes)
    for line in notes:
        err_console.print(f"auto: {line}", highlight=False, markup=False)
    if dry_run:
        check_run_config(cfg, resume=resume, overwrite=overwrite)  # every rule `train` applies before starting
        out_console.print(config_to_toml(cfg), highlight=False, markup=False)
        return
    from semiseg_cli.engine.loop import train

    result = train(cfg, resume=resume, overwrite=overwrite, console=err_console)
    if not result.main:  # under torchrun, rank 0 reports
        return
    out_console.print(f"run folder: {result.run_dir}  best val mIoU: {100 * result.best_miou:.2f}")
    if result.last_metrics:
        from semiseg_cli.eval_report import print_report

        print_report(result.last_metrics, out_console, title=f"{cfg.method} — final validation")


# ----------------------------------------------------------------------------- eval
@app.command("eval", rich_help_panel="Train and evaluate")
def eval_cmd(
    checkpoint: Checkpoint,
    split: Annotated[Optional[str], typer.Option(help="Dataset split (val, test) or a split file (default: the run's validation set, data.val_list or data.val_split).")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root, if it moved since training.", rich_help_panel="Data")] = None,
    mode: ModeOpt = None,
    scales: ScalesOpt = None,
    flip: FlipOpt = False,
    crop_size: Annotated[Optional[str], typer.Option(help="Sliding-window size.", rich_help_panel="Inference")] = None,
    weights: WeightsOpt = "auto",
    device: DeviceOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON.")] = None,
    confusion_png: Annotated[Optional[Path], typer.Option(help="Write the row-normalised confusion matrix as PNG.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers (default 2).", rich_help_panel="Runtime")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass; batches only ever hold images of one size (default: the checkpoint's eval.batch_size).", rich_help_panel="Runtime")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="eval.* or data.root / data.workers / data.resize: key=value (repeatable).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Evaluate a checkpoint: mIoU, aAcc, mAcc and the per-class IoU table.

    Images of different sizes are fine: each batch holds images of one size.

    Example: [cyan]semiseg eval -c runs/demo/best.pt --split val --scales 0.75,1.0,1.25 --flip --json report.json[/]
    """
    from semiseg_cli.eval_report import run_eval

    check_choice(mode, "--mode", ("whole", "slide"))
    run_eval(
        checkpoint, split=split, root=root, mode=mode, scales=parse_floats(scales, "--scales"), flip=flip,
        crop_size=parse_size(crop_size, "--crop-size") if crop_size else None, weights=weights,
        device=device, json_out=json_out, confusion_png=confusion_png, workers=workers,
        overwrite=overwrite, console=out_console, batch_size=batch_size, sets=list(set_ or []),
    )


# ----------------------------------------------------------------------------- show
@app.command("show", rich_help_panel="Train and evaluate")
def show_cmd(
    out: Annotated[Path, typer.Option(help="The contact sheet PNG to write.")],
    checkpoints: Annotated[Optional[list[Path]], typer.Option("--checkpoint", "-c", help="A best.pt/last.pt written by `semiseg train`; repeat for each run to compare.")] = None,
    samples: Annotated[int, typer.Option(help="Images (rows), chosen evenly over the sorted split; the same for every run.")] = 6,
    split: Annotated[Optional[str], typer.Option(help="Dataset split (val, test) or a split file (default: the first run's validation set).")] = None,
    root: RootOpt = None,
    labels: Annotated[Optional[str], typer.Option(help="Column names for the runs, comma-separated, one per -c (default: method (run folder)).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Draw the images at random with this seed instead of evenly spaced.")] = None,
    scores: Annotated[bool, typer.Option("--scores/--no-scores", help="Caption each prediction with its image's mIoU and pixel accuracy.")] = True,
    weights: WeightsOpt = "auto",
    device: DeviceOpt = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a contact sheet PNG: image, ground truth, then each run's prediction, in the class palette with a legend.

    Example: [cyan]semiseg show -c runs/demo-supervised/best.pt -c runs/demo-u2pl/best.pt --out sheet.png --samples 6[/]
    """
    from semiseg_cli.contact_sheet import write_contact_sheet

    names = [s.strip() for s in labels.split(",")] if labels is not None else None
    path = write_contact_sheet(list(checkpoints or []), out, samples=samples, split=split, root=root, labels=names,
                               weights=weights, device=device, overwrite=overwrite, seed=seed, scores=scores,
                               console=err_console)
    out_console.print(f"contact sheet: {path}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- demo data
@app.command("demo-data", rich_help_panel="Data")
def demo_data_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the demo dataset into.")] = Path("demo_data"),
    n_train: Annotated[int, typer.Option(help="Training images.")] = 300,
    n_val: Annotated[int, typer.Option(help="Validation images.")] = 60,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    version: Annotated[int, typer.Option(help="Generator version: 3 (default, what make demo uses), 2 (earlier releases) or 4-6 (the variants in docs/benchmarks.md, \"Demo data variants\").")] = 3,
    overwrite: Overwrite = False,
) -> None:
    """Generate the built-in synthetic demo dataset (no download)."""
    from semiseg_cli.data.demo import generate_demo

    path = generate_demo(out, n_train=n_train, n_val=n_val, size=size, seed=seed, overwrite=overwrite, version=version)
    out_console.print(f"demo dataset in {path}")


# ----------------------------------------------------------------------------- pseudo-label
@app.command("pseudo-label", rich_help_panel="Train and evaluate")
def pseudo_label_cmd(
    checkpoint: Checkpoint,
    split: Annotated[str, typer.Option(help="A split file (unlabeled.txt) or a split name of the checkpoint's dataset.")],
    out: Annotated[Path, typer.Option(help="Output folder (resumed when it holds the same checkpoint's labels).")],
    root: RootOpt = None,
    min_confidence: Annotated[Optional[float], typer.Option(help="Mark pixels below this max probability 255.", rich_help_panel="Reliability")] = None,
    drop_percent: Annotated[Optional[float], typer.Option(help="Mark the N% highest-entropy pixels of each image 255 (U2PL).", rich_help_panel="Reliability")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Confidence/entropy maps: png (16-bit) or npz (float16).")] = "png",
    overlays: Annotated[bool, typer.Option("--overlays", help="Also write overlays/NAME.jpg (image + colour labels).")] = False,
    mode: ModeOpt = None,
    scales: ScalesOpt = None,
    flip: FlipOpt = False,
    crop_size: Annotated[Optional[str], typer.Option(help="Sliding-window size (with --mode slide).", rich_help_panel="Inference")] = None,
    weights: WeightsOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (same-size images only).", rich_help_panel="Runtime")] = 4,
    workers: Annotated[int, typer.Option(help="DataLoader workers.", rich_help_panel="Runtime")] = 2,
    writers: Annotated[Optional[int], typer.Option(help="Processes that encode and write the files (0: this process; default: half the cores, at most 8).", rich_help_panel="Runtime")] = None,
    map_compression: Annotated[int, typer.Option(help="zlib level of the 16-bit confidence/entropy PNGs: 0 stores them (fastest; up to ~1.8x larger), 1 writes what earlier versions wrote.", rich_help_panel="Runtime")] = 0,
    device: DeviceOpt = None,
    overwrite: Overwrite = False,
) -> None:
    """Write pseudo-labels, confidence and entropy maps, a manifest and a split file for a split.

    Example: [cyan]semiseg pseudo-label -c runs/demo-u2pl/best.pt --split splits/demo/unlabeled.txt --out pl/demo --drop-percent 20[/]
    """
    from semiseg_cli.pseudo_label import PseudoLabelSettings, run_pseudo_label

    check_choice(mode, "--mode", ("whole", "slide"))
    check_choice(weights, "--weights", ("auto", "teacher", "student"))
    s = PseudoLabelSettings(
        min_confidence=min_confidence, drop_percent=drop_percent, fmt=fmt, mode=mode,
        scales=parse_floats(scales, "--scales"), flip=flip,
        crop_size=parse_size(crop_size, "--crop-size") if crop_size else None,
        overlays=overlays, batch_size=batch_size, workers=workers, writers=writers, map_compression=map_compression,
    )
    run_pseudo_label(checkpoint, split, out, root=root, settings=s, weights=weights, device=device,
                     overwrite=overwrite, console=out_console, progress_console=err_console)


# ----------------------------------------------------------------------------- export
@app.command("export", rich_help_panel="Ship")
def export_cmd(
    checkpoint: Checkpoint,
    onnx: Annotated[Path, typer.Option("--onnx", help="Output .onnx file (one file, weights inside).")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights in float16 (input and output stay float32).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = DEFAULT_OPSET,
    exporter: Annotated[str, typer.Option(help="dynamo (torch.export, default) | legacy (TorchScript tracing).")] = "dynamo",
    weights: WeightsOpt = "auto",
    min_agreement: Annotated[Optional[float], typer.Option(help="Argmax agreement goal of the check (default 0.999; 0.99 with --fp16).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Export the inference network to one ONNX file and check it with onnxruntime.

    Example: [cyan]semiseg export -c runs/demo-u2pl/best.pt --onnx demo.onnx[/]
    """
    from semiseg_cli.export import run_export

    report = run_export(checkpoint, onnx, opset=opset, fp16=fp16, exporter=exporter, weights=weights,
                        min_agreement=min_agreement, overwrite=overwrite, console=out_console)
    out_console.print(f"wrote {report.path} ({report.size_bytes / 2**20:.1f} MiB, {report.precision}, opset {report.opset}, "
                      f"{report.exporter} exporter, exported in {report.seconds:.1f} s)", highlight=False)


# ----------------------------------------------------------------------------- compare
@app.command("compare", rich_help_panel="Train and evaluate")
def compare_cmd(
    reports: Annotated[Optional[list[Path]], typer.Argument(metavar="RUN_OR_EVAL_JSON", help="Eval reports (`semiseg eval --json`) or run folders (their eval.json); the first is the baseline.", show_default=False)] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Column name, one per input in order (default: METHOD (RUN FOLDER)).")] = None,
    split: Annotated[Optional[str], typer.Option(help="In run folders, use the eval*.json whose split is this (default: eval.json).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the comparison as JSON (- for stdout; the table then goes to stderr).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Compare eval reports side by side: per-class IoU, mIoU, aAcc, mAcc and each run's gap to the first.

    Example: [cyan]semiseg compare runs/supervised runs/u2pl --label sup --label u2pl --json compare.json[/]
    """
    from semiseg_cli.compare import run_compare

    to_stdout = json_out is not None and str(json_out) == "-"
    run_compare(list(reports or []), labels=list(label or []), split=split, json_out=json_out,
                overwrite=overwrite, console=err_console if to_stdout else out_console)


def main() -> None:
    app(prog_name="semiseg")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
