"""The `pseudo-label` run: check everything, load the model, label the images not yet done.

What can go wrong, and what this module does about it:
- A typo (a bad option, an unwritable --out, a split naming missing files, an undecodable
  header, two images with the same output name) found after loading the weights wastes the load:
  all of these are checked first, the weights are loaded last (`engine.inputs`).
- Settings left open (`mode`, `scales`, ...) come from the checkpoint's `[eval]` section, and a
  later change of that section must not silently mix into a resumed folder: the settings that
  ran are written back into `PseudoLabelSettings` and become part of the folder identity.
- `data.resize`: the network sees the resized image and its probabilities are resized back, so
  every file has the stored image's size (and the mask's, for the accuracy counts).
- A failure mid-run (a damaged image, a full disk, Ctrl-C) still rebuilds the manifest from the
  records that were finished (`folder.finish`); a failure before the first image is done removes
  everything the run wrote (`folder.discard`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from semiseg_cli import __version__
from semiseg_cli.errors import UserError, flush_warnings
from semiseg_cli.io import check_output_dir, write_json
from semiseg_cli.pseudo_label.dataset import PseudoLabelDataset, collate, unique_pairs
from semiseg_cli.pseudo_label.folder import (
    IGNORE, META_FORMAT, META_VERSION, U16, discard, file_formats, finish, is_done, output_paths, prepare_out_dir,
    unique_stems, weights_digest,
)
from semiseg_cli.pseudo_label.stats import batch_counts, image_numbers, normalised_entropy, print_summary, reliable_mask, summarise
from semiseg_cli.pseudo_label.writer import ImageOutputs, Writer

if TYPE_CHECKING:  # torch loads lazily: `semiseg --help` should not import it
    import torch
    from torch import nn


@dataclass
class PseudoLabelSettings:
    """Everything that decides the content of the written files (part of the folder identity),
    plus runtime knobs that do not (batch size, workers, overlays)."""

    min_confidence: float | None = None
    drop_percent: float | None = None
    fmt: str = "png"  # png | npz
    # None: the checkpoint's eval settings (cfg.eval) decide; flip=True adds flips either way.
    mode: str | None = None
    scales: tuple[float, ...] | None = None
    flip: bool = False
    crop_size: tuple[int, int] | None = None
    overlays: bool = False
    batch_size: int = 4
    workers: int = 2
    amp: bool = True

    def check(self) -> None:
        """Refuse values no run could use, in one line naming the option."""
        if self.fmt not in ("png", "npz"):
            raise UserError(f"--format must be png or npz (got {self.fmt!r})")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise UserError(f"--min-confidence must be in [0, 1] (got {self.min_confidence})")
        if self.drop_percent is not None and not 0 <= self.drop_percent <= 100:
            raise UserError(f"--drop-percent must be in [0, 100] (got {self.drop_percent})")
        if self.batch_size < 1 or self.workers < 0:
            raise UserError("--batch-size must be at least 1 and --workers at least 0")

    def identity(self) -> dict[str, Any]:
        return {
            "min_confidence": self.min_confidence,
            "drop_percent": self.drop_percent,
            "drop_percent_scope": "per image",
            "format": self.fmt,
            "mode": self.mode,
            "scales": list(self.scales) if self.scales else None,
            "flip": self.flip,
            "crop_size": list(self.crop_size) if self.mode == "slide" and self.crop_size else None,
        }


@dataclass
class PseudoLabelResult:
    out: Path
    processed: int
    skipped: int
    summary: dict[str, Any]
    seconds: float  # wall time of the inference + writing loop (excludes loading the checkpoint)
    meta: dict[str, Any] = field(default_factory=dict)


def run_pseudo_label(
    checkpoint: Path,
    split: str,
    out: Path,
    root: Path | None = None,
    settings: PseudoLabelSettings | None = None,
    weights: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    console: Any = None,
    progress_console: Any = None,
) -> PseudoLabelResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from torch.utils.data import DataLoader

    from semiseg_cli.engine.inputs import load_model, open_split
    from semiseg_cli.engine.loaders import image_sizes, size_batches
    from semiseg_cli.inference import InferenceSettings

    s = settings or PseudoLabelSettings()
    check_output_dir(out, "--out")
    s.check()
    inputs = open_split(checkpoint, split, root, device, weights)
    cfg, dev, layout, class_names, num_classes = inputs.cfg, inputs.device, inputs.layout, inputs.class_names, inputs.num_classes
    if num_classes > 255:
        raise UserError(f"{num_classes} classes do not fit an 8-bit label PNG with 255 for unreliable pixels")
    pairs = unique_pairs(inputs.pairs)
    images = [p[0] for p in pairs]
    stems = unique_stems(images)
    sizes = image_sizes(layout, images)  # header check of every image before anything is written
    encoding = layout.training_encoding()  # class id -> stored value; None where they are equal
    model, ckpt = load_model(checkpoint, dev, weights)

    inf = InferenceSettings.from_config(cfg, mode=s.mode, scales=s.scales, crop_size=s.crop_size)
    inf.flip = inf.flip or s.flip
    # Record what runs (the checkpoint's eval settings fill what the caller left open).
    s.flip, s.mode, s.scales, s.crop_size = inf.flip, inf.mode, tuple(inf.scales), tuple(inf.crop_size)
    used_weights = "teacher" if (weights != "student" and ckpt.get("has_teacher")) else "student"
    identity = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": ckpt.get("step"),
        "method": cfg.method,
        "weights": used_weights,
        "weights_sha256": weights_digest(model),
        "settings": s.identity(),
    }
    out = Path(out)
    created = not out.exists()
    prepare_out_dir(out, identity, overwrite)
    flush_warnings()
    meta = {
        "format": META_FORMAT,
        "format_version": META_VERSION,
        "semiseg_version": __version__,
        "identity": identity,
        "dataset": cfg.data.dataset,
        "root": str(layout.root.resolve()),
        "split": split,
        "class_names": class_names,
        "palette": [list(c) for c in layout.palette],
        **file_formats(s.fmt, num_classes, encoding is not None),
    }
    write_json(out / "meta.json", meta)

    wanted = [output_paths(st, s.fmt, s.overlays, encoding is not None) for st in stems]
    todo = [i for i, st in enumerate(stems) if overwrite or is_done(out, st, wanted[i]) is None]
    skipped = len(stems) - len(todo)

    ds = PseudoLabelDataset(layout, pairs, cfg.data.mean, cfg.data.std, cfg.data.resize, s.overlays)
    # The batches are cut over every image, then the finished ones are dropped: a resumed dump
    # predicts each remaining image in the same batch as an uninterrupted one (batched kernels
    # may round differently for another batch size or composition), and writes only what is missing.
    pending = set(todo)
    batches = [b for b in size_batches(range(len(stems)), sizes, s.batch_size) if pending.intersection(b)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=s.workers, collate_fn=collate,  # type: ignore[arg-type]
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    amp = s.amp and dev.type == "cuda"
    writer = Writer(out, s.fmt, layout.palette, encoding)
    progress_console = progress_console or console
    t0 = time.perf_counter()
    error: str | None = None
    try:
        with Progress(TextColumn("pseudo-label"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=progress_console, transient=True, disable=progress_console is None) as bar:
            task = bar.add_task("pseudo-label", total=len(todo))
            for batch in (loader if batches else []):  # an empty loader would still start its workers
                if "error" in batch:
                    error = batch["error"]
                    break
                _process_batch(model, batch, inf, dev, amp, num_classes, s, stems, pairs, wanted, writer, pending)
                bar.advance(task, len(pending.intersection(batch["index"])))
            writer.drain()
    finally:
        try:
            writer.close()
        finally:
            seconds = time.perf_counter() - t0
            records = finish(out, pairs, stems, wanted, layout.root, encoding is not None)
    if error is not None and not records:  # a failed start leaves nothing behind
        discard(out, created)
        raise UserError(f"{error}; nothing was written to {out}: fix the file and rerun")
    summary = summarise(records, class_names)
    write_json(out / "summary.json", summary)
    if error is not None:
        raise UserError(f"{error} ({len(records)} of {len(pairs)} images are done in {out}; fix the file and rerun to continue)")
    if console is not None:
        ttl = f"pseudo-labels of {split} by {cfg.method} @ step {ckpt.get('step')} ({used_weights}) -> {out}"
        print_summary(summary, console, ttl)
        console.print(f"{len(todo)} images labelled, {skipped} already done (skipped); manifest {out / 'manifest.jsonl'}", highlight=False)
    return PseudoLabelResult(out, len(todo), skipped, summary, seconds, meta)


def _process_batch(model: "nn.Module", batch: dict[str, Any], inf: Any, dev: "torch.device", amp: bool, num_classes: int,
                   s: PseudoLabelSettings, stems: Sequence[str], pairs: Sequence[tuple[str, str | None]],
                   wanted: Sequence[dict[str, str]], writer: Writer, pending: set[int]) -> None:
    """Predict one same-size batch, threshold and count it on the device, and hand the arrays and
    record of each image still `pending` to the writer (one host copy per array for the batch)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from semiseg_cli.inference import predict_probs

    x = batch["image"].to(dev, non_blocking=True)
    gt = batch["mask"].to(dev, non_blocking=True)
    with torch.no_grad():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            probs = predict_probs(model, x, inf)
        probs = probs.float()
        if probs.shape[2:] != gt.shape[1:]:  # data.resize: labels are written at the stored size
            probs = F.interpolate(probs, size=gt.shape[1:], mode="bilinear", align_corners=inf.align_corners)
        conf, label = probs.max(1)
        ent = normalised_entropy(probs)
        keep = reliable_mask(conf, ent, s.min_confidence, s.drop_percent)
        has_gt = any(batch["has_mask"])
        counts = batch_counts(label, keep, conf, gt if has_gt else None, num_classes)
        out_label = torch.where(keep, label, torch.full_like(label, IGNORE)).to(torch.uint8)
        if s.fmt == "png":
            conf_q = (conf * U16).round_().to(torch.int32)
            ent_q = (ent * U16).round_().to(torch.int32)
        else:
            conf_q, ent_q = conf.half(), ent.half()
    out_label_np = out_label.cpu().numpy()
    conf_np, ent_np = conf_q.cpu().numpy(), ent_q.cpu().numpy()
    if s.fmt == "png":
        conf_np, ent_np = conf_np.astype(np.uint16), ent_np.astype(np.uint16)
    counts_np = {k: v.cpu().numpy() for k, v in counts.items()}
    rgb = batch.get("rgb")
    for b, idx in enumerate(batch["index"]):
        if idx not in pending:
            continue
        img, mask = pairs[idx]
        rec: dict[str, Any] = {
            "image": img,
            "mask": mask,
            "files": wanted[idx],
            "size": [int(out_label_np.shape[1]), int(out_label_np.shape[2])],
            **image_numbers(counts_np, b, batch["has_mask"][b]),
        }
        writer.submit(ImageOutputs(stems[idx], out_label_np[b], conf_np[b], ent_np[b], rec,
                                   None if rgb is None else rgb[b].numpy()))
