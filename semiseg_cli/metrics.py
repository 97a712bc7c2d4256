"""Confusion-matrix metrics: mIoU, aAcc, mAcc and per-class IoU.

A class absent from both the predictions and the ground truth has an undefined IoU (0/0): it is
NaN, left out of the mean, and the report says how many were left out. Pixels labelled with the
ignore index never count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from semiseg_cli.engine import distributed


class ConfusionMatrix:
    """Rows: ground truth; columns: prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.num_classes
        keep = target != self.ignore_index
        t = target[keep].to(self.mat.device, torch.int64)
        p = pred[keep].to(self.mat.device, torch.int64)
        if t.numel() and (int(t.max()) >= n or int(t.min()) < 0):
            raise ValueError(f"target holds class ids outside 0..{n - 1}")
        self.mat += torch.bincount(t * n + p, minlength=n * n).view(n, n)

    def reduce_from_all_processes(self) -> None:
        distributed.all_reduce_sum_(self.mat)

    def compute(self) -> "SegMetrics":
        m = self.mat.double().cpu()
        tp = m.diag()
        gt = m.sum(1)
        pr = m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return SegMetrics(
            iou=iou.tolist(),
            acc=acc.tolist(),
            aacc=float(tp.sum() / total) if total > 0 else float("nan"),
            pixels=gt.long().tolist(),
            confusion=self.mat.cpu().tolist(),
        )


def _nanmean(xs: list[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class SegMetrics:
    iou: list[float]
    acc: list[float]
    aacc: float
    pixels: list[int] = field(default_factory=list)
    confusion: list[list[int]] | None = None

    @property
    def miou(self) -> float:
        return _nanmean(self.iou)

    @property
    def macc(self) -> float:
        return _nanmean(self.acc)

    @property
    def absent(self) -> list[int]:
        return [i for i, x in enumerate(self.iou) if math.isnan(x)]

    def as_dict(self, class_names: list[str] | None = None) -> dict[str, Any]:
        names = class_names or [str(i) for i in range(len(self.iou))]

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 6)

        return {
            "mIoU": clean(self.miou),
            "aAcc": clean(self.aacc),
            "mAcc": clean(self.macc),
            "per_class": {
                n: {"IoU": clean(i), "Acc": clean(a), "pixels": p}
                for n, i, a, p in zip(names, self.iou, self.acc, self.pixels or [0] * len(names))
            },
            "absent_classes": [names[i] for i in self.absent],
        }
