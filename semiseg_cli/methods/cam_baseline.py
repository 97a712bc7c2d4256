"""The single-network weak baseline: one CAM network that learns its segmentation head from its
own refined CAM pseudo-labels (the one-stage baseline DuPL's ablation starts from), image-level
tags only.

One training step, top to bottom (DuPL's pipeline with one sub-network; docs/methods_dupl.md,
"The single-network baseline"):
0. The crop gets the official photometric augmentation (colour jitter, grayscale, blur); every
   later stage, the CAMs included, sees this view.
1. The network's CAMs (multi-scale + flip, normalised, tag-masked) become pseudo-labels:
   background below tau_l, foreground above tau_h (cosine 0.70 -> 0.55 after `seg_start`),
   ignore between, after PAR refinement against the image. Crop padding is ignore.
2. One forward of the network.
3. Classification: multilabel soft margin on the main and the auxiliary classifier.
4. From `seg_start`: self-training, the pseudo-labels of step 1 supervise the same network's head.

No second network, so no cross supervision and no discrepancy loss; no GMM noise filtering, no
consistency term. Masks never reach a loss: the loop moves them to `gt_mask`, used only to log
the mIoU of the pseudo-labels. Class 0 is background; CAMs exist for classes 1..C-1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.transforms import denormalize
from semiseg_cli.engine import distributed
from semiseg_cli.methods.base import Method, OptimizerSpec, build_optimizer
from semiseg_cli.methods.cam import (
    IGNORE,
    PAR,
    check_cam_config,
    frozen_bn_stats,
    image_tau_high,
    inside_image,
    multi_scale_cam,
    pseudo_label_stats,
    refine_pseudo_labels,
    seg_loss,
    training_view,
)
from semiseg_cli.methods.dupl_net import DuPLSubNet, SingleNet, build_single_net


class CAMBaseline(Method):
    name = "cam_baseline"
    uses_tags = True
    uses_unlabeled = False

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        p = cfg.cam_baseline
        self.par = PAR(p.par_dilations, p.par_iters, p.par_w1, p.par_w2) if p.par_iters > 0 else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_inference_model(cls, cfg: Any, num_classes: int) -> nn.Module:
        """One DuPL sub-network; `forward(x)` gives its segmentation logits at the input size."""
        return build_single_net(cfg, num_classes)

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        check_cam_config(cfg, "cam_baseline", num_classes, min(cfg.cam_baseline.cam_scales), "cam_baseline.cam_scales")

    def configure_optimizers(self, total_iters: int) -> list[OptimizerSpec]:
        """cfg.optim: the backbone at lr, classifiers and head at lr x head_lr_mult (DuPL's recipe:
        AdamW 6e-5, x10, wd 0.01, warm-up then poly 0.9; set in the preset)."""
        return [build_optimizer(distributed.unwrap(self.model), self.cfg.optim, total_iters)]

    # ------------------------------------------------------------------ schedules
    def tau_high(self, step: int, fg_tags: torch.Tensor) -> torch.Tensor:
        """The high threshold for each image (B,) at `step`."""
        p = self.cfg.cam_baseline
        return image_tau_high(
            step, p.seg_start, self.total_iters(), p.tau_high_start, p.tau_high_end, fg_tags, p.per_class_tau, p.fixed_tau_classes
        )

    # ------------------------------------------------------------------ training
    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, torch.Tensor]:
        p, d = self.cfg.cam_baseline, self.cfg.data
        if "tags" not in labeled:
            raise KeyError("cam_baseline needs image-level `tags` in the labeled batch (uses_tags = True)")
        x = training_view(labeled["image"], d.mean, d.std)
        fg_tags = labeled["tags"][:, 1:].float()
        gt = labeled.get("gt_mask")
        inside = inside_image(labeled, x)
        seg_on = step >= p.seg_start
        net: SingleNet = distributed.unwrap(self.model)  # type: ignore[assignment]
        tau_h = self.tau_high(step, fg_tags)
        logs: dict[str, torch.Tensor] = {"tau_h": tau_h.mean()}

        # 1. The network's own CAM pseudo-labels (no grad).
        label: torch.Tensor | None = None
        if seg_on or (p.log_cam_miou and gt is not None):
            label = self.pseudo_labels(net.net, x, fg_tags, tau_h, inside)
            if gt is not None:
                logs.update(self.label_quality(label, gt, inside))

        # 2. One forward that DDP sees.
        out = self.model(x, train_outputs=True)
        seg = F.interpolate(out["seg"].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)

        # 3. Tags, on both classifiers.
        loss_cls = sum(F.multilabel_soft_margin_loss(out[k].float(), fg_tags) for k in ("cls", "cls_aux"))

        # 4. Self-training: the network's pseudo-labels train its own head.
        loss_seg = seg.sum() * 0.0  # before seg_start: the head in the graph (DDP), weight 0
        if seg_on:
            assert label is not None
            loss_seg = seg_loss(seg, label, p.seg_loss)

        loss = loss_cls + p.seg_weight * loss_seg
        logs.update(loss=loss, loss_cls=loss_cls.detach(), loss_seg=loss_seg.detach())
        return logs

    @torch.no_grad()
    def pseudo_labels(
        self, sub: DuPLSubNet, x: torch.Tensor, fg_tags: torch.Tensor, tau_h: torch.Tensor, inside: torch.Tensor
    ) -> torch.Tensor:
        """Refined CAM pseudo-labels (B, H, W) of `sub` on the training view `x`; crop padding is
        ignore (PAR still runs over the whole crop, as the official code's image box)."""
        p, d = self.cfg.cam_baseline, self.cfg.data
        img = denormalize(x.float(), d.mean, d.std).clamp(0, 1)
        with frozen_bn_stats(sub):
            cam = multi_scale_cam(sub.cam, x, p.cam_scales, fg_tags)
        label = refine_pseudo_labels(self.par, img, cam, fg_tags, tau_h, p.tau_low, p.par_downscale)
        return label.masked_fill(~inside, IGNORE)

    @torch.no_grad()
    def label_quality(self, label: torch.Tensor, gt: torch.Tensor, inside: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pl_miou` of the pseudo-labels against the ground truth and `pl_cover` (the share of
        image pixels with a label); nothing for a ground truth of another shape."""
        if gt.shape != label.shape:
            return {}
        miou, cover = pseudo_label_stats(label, gt, self.num_classes, self.cfg.data.ignore_index, inside)
        return {"pl_miou": miou, "pl_cover": cover} if torch.isfinite(miou) else {"pl_cover": cover}
