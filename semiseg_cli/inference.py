"""Inference shared by `eval`, `pseudo-label` and the training loop's validation.

`predict_probs` runs a model over a batch the way the evaluation protocol asks: the whole image
or sliding windows, optionally at several scales and with horizontal flips, and returns class
probabilities at the input size. Papers differ in protocol (centre crop, whole image, sliding
window): the report always records which was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.metrics import ConfusionMatrix, SegMetrics


@dataclass
class InferenceSettings:
    mode: str = "whole"  # whole | slide
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    # For resizing logits back to the input size; the network's own `model.align_corners`, so
    # multi-scale evaluation resizes as the network does.
    align_corners: bool = False

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "InferenceSettings":
        e = cfg.eval
        s = cls(
            mode=e.mode,
            crop_size=tuple(e.crop_size or cfg.data.crop_size),  # type: ignore[arg-type]
            stride=tuple(e.stride) if e.stride else None,  # type: ignore[arg-type]
            scales=tuple(e.scales),
            flip=e.flip,
            align_corners=cfg.model.align_corners,
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)["logits"].float()


def slide_logits(model: nn.Module, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int] | None) -> torch.Tensor:
    """Average logits of overlapping windows; images smaller than the window are padded."""
    b, _, h, w = x.shape
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[2:]
    rows = list(range(0, max(H - ch, 0) + 1, sh))
    cols = list(range(0, max(W - cw, 0) + 1, sw))
    if rows[-1] + ch < H:
        rows.append(H - ch)
    if cols[-1] + cw < W:
        cols.append(W - cw)
    out: torch.Tensor | None = None
    count = x.new_zeros((1, 1, H, W))
    for r in rows:
        for c in cols:
            logit = _logits(model, x[:, :, r : r + ch, c : c + cw])
            if out is None:
                out = x.new_zeros((b, logit.shape[1], H, W))
            out[:, :, r : r + ch, c : c + cw] += logit
            count[:, :, r : r + ch, c : c + cw] += 1
    assert out is not None
    return (out / count)[:, :, :h, :w]


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Softmax probabilities (B,C,H,W) at the input size, averaged over scales and flips."""
    h, w = x.shape[2:]
    total: torch.Tensor | None = None
    n = 0
    for scale in settings.scales:
        xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        views = [False, True] if settings.flip else [False]
        for flip in views:
            xi = xs.flip(-1) if flip else xs
            if settings.mode == "slide":
                logit = slide_logits(model, xi, settings.crop_size, settings.stride)
            else:
                logit = _logits(model, xi)
            if flip:
                logit = logit.flip(-1)
            if logit.shape[2:] != (h, w):
                logit = F.interpolate(logit, size=(h, w), mode="bilinear", align_corners=settings.align_corners)
            p = logit.softmax(1)
            total = p if total is None else total + p
            n += 1
    assert total is not None
    return total / n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    num_classes: int,
    settings: InferenceSettings,
    device: torch.device,
    ignore_index: int = 255,
    amp: bool = False,
    progress: Any = None,
    on_batch: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
) -> SegMetrics:
    """Confusion-matrix metrics over a loader (reduced across ranks under torchrun).
    `on_batch(batch, prediction)` sees each batch's argmax prediction (to keep a few for
    pictures); it must only read them."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        y = batch.get("gt_mask", batch.get("mask"))
        assert y is not None
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            probs = predict_probs(model, x, settings)
        pred = probs.argmax(1)
        cm.update(pred, y)
        if on_batch is not None:
            on_batch(batch, pred)
        if progress is not None:
            progress()
    cm.reduce_from_all_processes()
    model.train(was_training)
    return cm.compute()
