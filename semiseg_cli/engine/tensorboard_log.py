"""TensorBoard event files of a run, in `RUN/tensorboard/` (`tensorboard --logdir runs`).

Written on rank 0 when `train.tensorboard` is true (the default) and the optional `tensorboard`
package imports (`pip install 'semiseg[tensorboard]'`); otherwise every method here does nothing
and the run is what it was without it. Tags:

  train/<key>        every key of each training record in metrics.jsonl (loss terms, lr,
                     it_per_s, the method's statistics), at that record's step
  val/mIoU, val/aAcc, val/mAcc, val_IoU/<class>   at each validation (classes absent from both
                     ground truth and prediction have no IoU and are left out)
  val_images/<i>     the first few validation images: image | ground truth | prediction

Nothing here draws from a random generator or touches the model: the pictures are of the
validation pass's own predictions, copied as it goes (`ImageSampler`), so a run trains bit for
bit the same with and without TensorBoard. On `--resume` the writer purges the events after the
resumed step, as MetricLog drops those records, so no step appears twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IMAGES = 4  # validation images shown per validation
PANEL_SIDE = 256  # each of the three panels is scaled down to at most this many pixels a side
GAP = 4  # black pixels between the panels


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class ImageSampler:
    """Given to `evaluate` as its per-batch hook: keeps the first `n` images of the pass with
    their ground truth and prediction, on the CPU. Reads tensors only."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, batch: dict[str, Any], pred: torch.Tensor) -> None:
        need = self.n - len(self.items)
        if need <= 0:
            return
        gt = batch.get("gt_mask", batch.get("mask"))
        for i in range(min(need, pred.shape[0])):
            self.items.append((batch["image"][i].detach().float().cpu(), gt[i].cpu(), pred[i].cpu()))


def _resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize(size, resample))


def comparison_image(image: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, colours: np.ndarray,
                     mean: Sequence[float], std: Sequence[float], side: int = PANEL_SIDE) -> np.ndarray:
    """HxWx3 uint8: the (denormalised) image, its ground truth and the prediction side by side,
    masks painted with `colours` (ignored pixels white), scaled down to at most `side` pixels."""
    from PIL import Image

    from semiseg_cli.data.transforms import denormalize
    from semiseg_cli.viz import colorize

    rgb = (denormalize(image, mean, std).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    gt_rgb = colorize(gt.numpy().astype(np.uint8), colours)
    pred_rgb = colorize(pred.numpy().astype(np.uint8), colours)
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale < 1.0:
        rgb = _resize(rgb, size, Image.BILINEAR)
        gt_rgb = _resize(gt_rgb, size, Image.NEAREST)
        pred_rgb = _resize(pred_rgb, size, Image.NEAREST)
    gap = np.zeros((size[1], GAP, 3), np.uint8)
    return np.concatenate([rgb, gap, gt_rgb, gap, pred_rgb], axis=1)


class TensorBoardLog:
    """The run's event files, or nothing (not rank 0, `train.tensorboard = false`, no package)."""

    def __init__(self, log_dir: Path, enabled: bool, class_names: list[str], colours: np.ndarray,
                 mean: Sequence[float], std: Sequence[float], images: int = IMAGES) -> None:
        self.log_dir, self.enabled = Path(log_dir), enabled
        self.class_names, self.colours = list(class_names), colours
        self.mean, self.std, self.images = tuple(mean), tuple(std), images
        self.writer: Any = None

    def open(self, resume_step: int | None) -> None:
        """Start writing (resume_step: the step a resumed run continues from; later events go)."""
        if not self.enabled or self.writer is not None:
            return
        cls = summary_writer_class()
        if cls is None:
            return
        purge = None if resume_step is None else resume_step + 1
        self.writer = cls(log_dir=str(self.log_dir), purge_step=purge)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, record: dict[str, Any]) -> None:
        """A training record of metrics.jsonl: each number as `train/<key>`."""
        if self.writer is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", float(value), step)

    def sampler(self) -> ImageSampler | None:
        """A hook for the validation pass that keeps its first images (None when not writing)."""
        return ImageSampler(self.images) if self.writer is not None and self.images > 0 else None

    def validation(self, step: int, metrics: Any, sampler: ImageSampler | None) -> None:
        """A validation's metrics (`SegMetrics`: the values metrics.jsonl holds, unrounded) and
        the sampled images, at `step`."""
        if self.writer is None:
            return
        w = self.writer
        for key, value in (("mIoU", metrics.miou), ("aAcc", metrics.aacc), ("mAcc", metrics.macc)):
            w.add_scalar(f"val/{key}", float(value), step)
        for name, iou in zip(self.class_names, metrics.iou):
            if math.isfinite(iou):
                w.add_scalar(f"val_IoU/{name}", float(iou), step)
        for i, (image, gt, pred) in enumerate(sampler.items if sampler is not None else []):
            pic = comparison_image(image, gt, pred, self.colours, self.mean, self.std)
            w.add_image(f"val_images/{i}", pic, step, dataformats="HWC")
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
