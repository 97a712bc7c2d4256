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
- A failure mid-run (a damaged image, a full disk, a writer error, Ctrl-C) still rebuilds the
  manifest from the records that were finished (`folder.finish`); a failure before the first
  image is done removes everything the run wrote (`folder.discard`).
- The host as the bottleneck: every per-pixel output is computed on the device for the whole
  batch (`quantise`), the quantised arrays are copied to the host asynchronously while the next
  batch is queued (one batch in flight on the device), and encoding and writing happen in writer
  processes (`writer.Writer`, `--writers`), fed without a copy through shared memory.
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
    META_FORMAT, META_VERSION, discard, file_formats, finish, is_done, output_paths, prepare_out_dir,
    unique_stems, weights_digest,
)
from semiseg_cli.pseudo_label.stats import image_numbers, print_summary, summarise
from semiseg_cli.pseudo_label.writer import Writer, default_writers

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
    # Writer processes (None: writer.default_writers(); 0: write in the calling thread) and the
    # zlib level of the 16-bit map PNGs (0: stored, fast; 1: the bytes of earlier versions).
    # Neither changes the decoded content, so neither is part of the folder identity.
    writers: int | None = None
    map_compression: int = 0

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
        if self.writers is not None and self.writers < 0:
            raise UserError(f"--writers must be at least 0 (got {self.writers})")
        if not 0 <= self.map_compression <= 9:
            raise UserError(f"--map-compression must be a zlib level from 0 to 9 (got {self.map_compression})")

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
    seconds: float  # wall time from the first batch to the last file written (excludes loading the checkpoint)
    meta: dict[str, Any] = field(default_factory=dict)
    writers: int = 0  # writer processes used (0: written in the calling thread)
    writer_wait_s: float = 0.0  # time the loop was blocked because every writer was busy


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
    # The writer processes start here and boot while the weights load and the folder is checked.
    # Room for two batches in flight (at least two images per writer), so a batch handed over in
    # one burst does not wait for the previous one to be written.
    n_writers = min(default_writers() if s.writers is None else s.writers, len(pairs))
    depth = max(2, -(-2 * s.batch_size // max(n_writers, 1)))
    writer = Writer(out, s.fmt, layout.palette, n_writers, s.map_compression, depth)
    try:
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
        known: dict[int, dict[str, Any]] = {}  # records of finished images, by split index
        for i, st in enumerate(stems):
            rec = None if overwrite else is_done(out, st, wanted[i])
            if rec is not None:
                known[i] = rec
        todo = [i for i in range(len(stems)) if i not in known]
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
        tables = _device_tables(layout, encoding, s.overlays, dev)
    except BaseException:
        writer.terminate()
        raise
    if not todo:
        writer.close()
        n_writers = 0
    progress_console = progress_console or console
    t0 = time.perf_counter()
    t_done: float | None = None
    error: str | None = None
    try:
        with Progress(TextColumn("pseudo-label"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=progress_console, transient=True, disable=progress_console is None) as bar:
            task = bar.add_task("pseudo-label", total=len(todo))
            staged: _Staged | None = None  # the batch whose outputs are on their way to the host
            for batch in (loader if batches else []):  # an empty loader would still start its workers
                if "error" in batch:
                    error = batch["error"]
                    break
                # Queue this batch on the device before handing the previous one to the writers,
                # so the device works while the host copies, builds records and submits.
                nxt = _process_batch(model, batch, inf, dev, amp, num_classes, s, tables)
                if staged is not None:
                    bar.advance(task, _hand_over(staged, stems, pairs, wanted, writer, pending))
                staged = nxt
            if staged is not None:
                bar.advance(task, _hand_over(staged, stems, pairs, wanted, writer, pending))
            writer.drain()
            t_done = time.perf_counter()  # the last file is written (stopping the writers is not the loop)
    finally:
        try:
            writer.close()
        finally:
            seconds = (t_done if t_done is not None else time.perf_counter()) - t0
            known.update(writer.records)
            records = finish(out, pairs, stems, wanted, layout.root, encoding is not None, known)
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
    return PseudoLabelResult(out, len(todo), skipped, summary, seconds, meta, n_writers, writer.wait_s)


def _device_tables(layout: Any, encoding: Any, overlays: bool, dev: "torch.device") -> dict[str, "torch.Tensor"]:
    """The lookup tables the device needs: class id -> stored value, label -> overlay colour."""
    import torch

    from semiseg_cli.pseudo_label.writer import overlay_colours

    tables = {}
    if encoding is not None:
        tables["encoding"] = torch.from_numpy(encoding).to(dev)
    if overlays:
        tables["colours"] = torch.from_numpy(overlay_colours(layout.palette)).to(dev)
    return tables


@dataclass
class _Staged:
    """A batch whose outputs are being copied to the host."""

    index: list[int]
    has_mask: list[bool]
    arrays: dict[str, Any]  # host tensors (B, ...), valid once `event` completed
    counts: dict[str, Any]
    event: Any  # None: already valid


def _process_batch(model: "nn.Module", batch: dict[str, Any], inf: Any, dev: "torch.device", amp: bool, num_classes: int,
                   s: PseudoLabelSettings, tables: dict[str, "torch.Tensor"]) -> _Staged:
    """Predict one same-size batch and compute every per-pixel output on the device
    (`quantise.pixel_outputs`); start copying the quantised arrays and the counts to the host."""
    import torch
    import torch.nn.functional as F

    from semiseg_cli.inference import predict_probs
    from semiseg_cli.pseudo_label.quantise import pixel_outputs, to_host

    x = batch["image"].to(dev, non_blocking=True)
    gt = batch["mask"].to(dev, non_blocking=True)
    rgb = batch["rgb"].to(dev, non_blocking=True) if s.overlays else None
    with torch.no_grad():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            probs = predict_probs(model, x, inf)
        probs = probs.float()
        if probs.shape[2:] != gt.shape[1:]:  # data.resize: labels are written at the stored size
            probs = F.interpolate(probs, size=gt.shape[1:], mode="bilinear", align_corners=inf.align_corners)
        arrays, counts = pixel_outputs(
            probs, num_classes, s.fmt, s.min_confidence, s.drop_percent, gt=gt if any(batch["has_mask"]) else None,
            encoding=tables.get("encoding"), rgb=rgb, colours=tables.get("colours"),
        )
    host, event = to_host({**{f"a.{k}": v for k, v in arrays.items()}, **{f"c.{k}": v for k, v in counts.items()}})
    return _Staged(
        [int(i) for i in batch["index"]], [bool(m) for m in batch["has_mask"]],
        {k[2:]: v for k, v in host.items() if k.startswith("a.")}, {k[2:]: v for k, v in host.items() if k.startswith("c.")},
        event,
    )


def _hand_over(st: _Staged, stems: Sequence[str], pairs: Sequence[tuple[str, str | None]], wanted: Sequence[dict[str, str]],
               writer: Writer, pending: set[int]) -> int:
    """Wait for a staged batch's host copies and give each image still `pending` to the writer
    with its record; returns how many were given."""
    from semiseg_cli.pseudo_label.quantise import host_arrays

    if st.event is not None:
        st.event.synchronize()
    arrays = host_arrays(st.arrays)
    counts = {k: v.numpy() for k, v in st.counts.items()}
    label = arrays["label"]
    n = 0
    for b, idx in enumerate(st.index):
        if idx not in pending:
            continue
        img, mask = pairs[idx]
        rec: dict[str, Any] = {
            "image": img,
            "mask": mask,
            "files": wanted[idx],
            "size": [int(label.shape[1]), int(label.shape[2])],
            **image_numbers(counts, b, st.has_mask[b]),
        }
        writer.submit(idx, stems[idx], rec, {k: a[b] for k, a in arrays.items()})
        n += 1
    return n
