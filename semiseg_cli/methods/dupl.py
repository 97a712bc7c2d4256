"""DuPL: dual students with trustworthy progressive learning (CVPR 2024), image-level tags only.

One training step, top to bottom (see docs/methods_dupl.md for paper-vs-code choices):
0. The crop gets the official photometric augmentation (colour jitter, grayscale, blur); every
   later stage, the CAMs included, sees this view.
1. Each sub-net's CAMs (multi-scale + flip, normalised, tag-masked) become pseudo-labels:
   background below tau_l, foreground above tau_h (cosine 0.70 -> 0.55 after `seg_start`),
   ignore between, after PAR refinement against the image. Crop padding is ignore.
2. One forward of both sub-nets (plus, once consistency is on, the strong view's segmentation).
3. Classification: multilabel soft margin on both sub-nets' main and auxiliary classifiers.
   Discrepancy: push the two backbones' features apart, stop-gradient on the other branch.
4. From `seg_start`: cross supervision, sub-net 1's labels train sub-net 2's head and vice versa.
   From `gmm_start`: before that, each label map loses the foreground pixels that a per-image
   two-Gaussian fit of its own sub-net's losses calls noisy; and the ignored pixels of the image
   get a consistency loss (strong view vs. the clean view's confident predictions).

Masks never reach a loss: the loop moves them to `gt_mask`, used only to log the mIoU of the
pseudo-labels. Class 0 is background; CAMs exist for classes 1..C-1. The batch's optional
`valid` map (B, H, W) bool marks the pixels of the image proper (False on crop padding).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.transforms import denormalize, normalize
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
from semiseg_cli.methods.dupl_net import DualNet, build_dual_net
from semiseg_cli.methods.gmm import gmm_noise_mask

# ----------------------------------------------------------------------------- losses


def discrepancy_term(f: torch.Tensor, other: torch.Tensor, form: str = "paper", eps: float = 1e-6) -> torch.Tensor:
    """One direction of the discrepancy loss; `other` is detached (stop-gradient).

    The cosine is taken per channel (each channel's spatial map as a vector, as the official
    code) and averaged over channels and images. paper: -log(1 - cos); code: 1 + cos.
    """
    a = f.flatten(2).float()
    b = other.detach().flatten(2).float()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-6)
    if form == "code":
        return (1.0 + cos).mean()
    if form == "paper":
        return -torch.log((1.0 - cos).clamp_min(eps)).mean()
    raise ValueError(f"unknown discrepancy form {form!r}")


def discrepancy_loss(f1: torch.Tensor, f2: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Symmetric: d(f1, sg f2) + d(f2, sg f1) (the official code sums the two directions)."""
    return discrepancy_term(f1, f2, form) + discrepancy_term(f2, f1, form)


def consistency_loss(
    strong_logits: torch.Tensor,
    clean_logits: torch.Tensor,
    peer_label: torch.Tensor,
    thresh: float = 0.9,
    inside: torch.Tensor | None = None,
    ignore: int = IGNORE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the strong view against the clean view's argmax, on pixels the peer's pseudo-label
    leaves ignored (uncertain or filtered) where the clean prediction is confident (> thresh).
    `inside` (B, H, W) bool keeps crop padding out: it is ignored, but not for want of confidence.

    Both logits must be aligned with `peer_label` (B, H, W): flip the strong view back first.
    Returns (loss, mask); the loss is a sum over the mask divided by its size (0 if empty).
    """
    with torch.no_grad():
        conf, target = torch.softmax(clean_logits.detach().float(), 1).max(1)
        mask = (peer_label == ignore) & (conf > thresh)
        if inside is not None:
            mask = mask & inside
    ce = F.cross_entropy(strong_logits.float(), target, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp_min(1), mask


# ----------------------------------------------------------------------------- strong view


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance semantics: factor 0 gives `degenerate`, 1 the image."""
    return (degenerate + factor * (img - degenerate)).clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation on 256 levels (a vectorised PIL-like version)."""
    n, c, h, w = x.shape
    q = (x * 255).round().long().clamp(0, 255).reshape(n * c, h * w)  # reshape: x may be channels_last
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1)).clamp(0, 1)
    flat = (cdf_min >= h * w).expand_as(lut)  # a single level: leave the channel alone
    lut = torch.where(flat, torch.arange(256, device=x.device).float().expand_as(lut) / 255, lut)
    return lut.gather(1, q).view(n, c, h, w)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13.0
    smooth = F.conv2d(F.pad(x, [1, 1, 1, 1], mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    return _blend(smooth, x, factor)


def strong_colour_augment(img01: torch.Tensor, n_ops: int = 5, magnitude: float = 10.0) -> torch.Tensor:
    """RandAugment-style colour perturbation of images in [0, 1], vectorised over the batch.

    Each image gets `n_ops` operations drawn with replacement from: autocontrast, equalize,
    posterize, color (saturation), contrast, brightness, sharpness (the official code's list)
    and solarize (added; standard RandAugment). Magnitude m of 30 maps as in the official code:
    enhance factor 0.1 + 1.8 m/30 (m=10: 0.7), posterize to max(1, int(6 m/30)) bits (m=10: 2),
    solarize above 1 - m/30.
    """
    x = img01.detach().float().clamp(0, 1).clone()
    v = 0.1 + 1.8 * magnitude / 30.0
    bits = max(1, int(6 * magnitude / 30.0))
    thresh = 1.0 - magnitude / 30.0
    keep = 256 - 2 ** (8 - bits)
    ops = [
        _autocontrast,
        _equalize,
        lambda t: (((t * 255).round().long().clamp(0, 255) & keep).float() / 255.0),
        lambda t: _blend(_gray(t), t, v),
        lambda t: _blend(_gray(t).mean(dim=(1, 2, 3), keepdim=True).expand_as(t), t, v),
        lambda t: (t * v).clamp(0, 1),
        lambda t: _sharpness(t, v),
        lambda t: torch.where(t >= thresh, 1.0 - t, t),
    ]
    b = x.shape[0]
    for _ in range(n_ops):
        choice = torch.randint(len(ops), (b,))  # on the CPU: no device sync to find the images
        for k, op in enumerate(ops):
            idx = (choice == k).nonzero().flatten()
            if idx.numel():
                idx = idx.to(x.device)
                x[idx] = op(x[idx])
    return x


def strong_view(
    img01: torch.Tensor, n_ops: int, magnitude: float, scale: float, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The consistency view of images in [0, 1]: RandAugment colour ops, then a horizontal flip
    (always, as the official code) and a resize by `scale`; normalised. Predictions on it must be
    flipped back before they are compared with the clean view."""
    s = normalize(strong_colour_augment(img01, n_ops, magnitude), mean, std).flip(-1)
    if scale != 1.0:
        h, w = s.shape[-2:]
        s = F.interpolate(s, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="bilinear", align_corners=False)
    return s


def _upsample(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- the method


class DuPL(Method):
    name = "dupl"
    uses_tags = True
    uses_unlabeled = False

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        p = cfg.dupl
        self.par = PAR(p.par_dilations, p.par_iters, p.par_w1, p.par_w2) if p.par_iters > 0 else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_inference_model(cls, cfg: Any, num_classes: int) -> nn.Module:
        """Both sub-networks; `forward(x)` gives sub-net 1's logits (or the mean, `dupl.inference`)."""
        return build_dual_net(cfg, num_classes)

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        p = cfg.dupl
        smallest = min(min(p.cam_scales), p.strong_scale if p.consistency else 1.0)
        check_cam_config(cfg, "dupl", num_classes, smallest, "dupl.cam_scales / dupl.strong_scale")

    def configure_optimizers(self, total_iters: int) -> list[OptimizerSpec]:
        """cfg.optim over both sub-nets: backbones at lr, classifiers and heads at lr x head_lr_mult.

        DuPL's recipe is AdamW, lr 6e-5, x10 heads, wd 0.01, warm-up 1500 (code) / 2000 (paper)
        iterations then poly 0.9; set those in the preset (`optim.name = "adamw"`, ...).
        """
        return [build_optimizer(distributed.unwrap(self.model), self.cfg.optim, total_iters)]

    # ------------------------------------------------------------------ schedules
    def tau_high(self, step: int, fg_tags: torch.Tensor) -> torch.Tensor:
        """The high threshold for each image (B,) at `step`."""
        p = self.cfg.dupl
        return image_tau_high(
            step, p.seg_start, self.total_iters(), p.tau_high_start, p.tau_high_end, fg_tags, p.per_class_tau, p.fixed_tau_classes
        )

    # ------------------------------------------------------------------ training
    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, torch.Tensor]:
        p, d = self.cfg.dupl, self.cfg.data
        if "tags" not in labeled:
            raise KeyError("DuPL needs image-level `tags` in the labeled batch (uses_tags = True)")
        x = training_view(labeled["image"], d.mean, d.std)
        fg_tags = labeled["tags"][:, 1:].float()
        gt = labeled.get("gt_mask")
        inside = inside_image(labeled, x)
        h, w = x.shape[-2:]
        seg_on = step >= p.seg_start
        late = seg_on and step >= p.gmm_start
        gmm_on, cons_on = late and p.gmm, late and p.consistency
        net: DualNet = distributed.unwrap(self.model)  # type: ignore[assignment]
        img = denormalize(x.float(), d.mean, d.std).clamp(0, 1)
        tau_h = self.tau_high(step, fg_tags)
        logs: dict[str, torch.Tensor] = {"tau_h": tau_h.mean()}

        # 1. CAM pseudo-labels of both sub-nets (no grad).
        labels: list[torch.Tensor] = []
        if seg_on or (p.log_cam_miou and gt is not None):
            labels = self.pseudo_labels(net, x, img, fg_tags, tau_h, inside)
            if gt is not None:
                logs.update(self.label_quality(labels, gt, inside))

        # 2. One forward that DDP sees: both sub-nets, and their heads on the strong view.
        strong = strong_view(img, p.strong_ops, p.strong_magnitude, p.strong_scale, d.mean, d.std).to(x.dtype) if cons_on else None
        out1, out2 = self.model(x, strong=strong, train_outputs=True).values()
        segs = [_upsample(o["seg"], (h, w)) for o in (out1, out2)]

        # 3. Tags and discrepancy.
        loss_cls = sum(F.multilabel_soft_margin_loss(o[k].float(), fg_tags) for o in (out1, out2) for k in ("cls", "cls_aux"))
        loss_dis = discrepancy_loss(out1["feat"], out2["feat"], p.discrepancy)

        # 4. Cross supervision on the GMM-filtered labels, consistency on the pixels they ignore.
        loss_seg = sum(sg.sum() * 0.0 for sg in segs)  # before seg_start: heads in the graph (DDP), weight 0
        loss_cons = loss_seg.new_zeros(())
        if seg_on:
            if gmm_on:
                labels, noise = self.filter_noise(segs, labels)
                logs.update(noise)
            peers = [labels[1], labels[0]]  # sub-net 1's labels train sub-net 2, and vice versa
            loss_seg = sum(seg_loss(sg, lab, p.seg_loss) for sg, lab in zip(segs, peers))
            if cons_on:
                frac = loss_seg.new_zeros(())
                for o, clean, peer in zip((out1, out2), segs, peers):
                    st = _upsample(o["seg_strong"].flip(-1), (h, w))  # the strong view was flipped
                    lc, mask = consistency_loss(st, clean, peer, p.consistency_thresh, inside)
                    loss_cons, frac = loss_cons + lc, frac + mask.float().mean() / 2
                logs.update(loss_cons=loss_cons.detach(), cons_frac=frac)

        loss = loss_cls + p.discrepancy_weight * loss_dis + p.seg_weight * loss_seg + p.consistency_weight * loss_cons
        logs.update(loss=loss, loss_cls=loss_cls.detach(), loss_dis=loss_dis.detach(), loss_seg=loss_seg.detach())
        return logs

    @torch.no_grad()
    def pseudo_labels(
        self, net: DualNet, x: torch.Tensor, img: torch.Tensor, fg_tags: torch.Tensor, tau_h: torch.Tensor, inside: torch.Tensor
    ) -> list[torch.Tensor]:
        """Refined CAM pseudo-labels of sub-net 1 and sub-net 2, (B, H, W) each.

        Pixels outside the image (crop padding) are ignore, as the official code's image box:
        PAR still runs over the whole crop, only its labels there are dropped.
        """
        p = self.cfg.dupl
        out = []
        with frozen_bn_stats(net):
            for sub in net.subnets:
                cam = multi_scale_cam(sub.cam, x, p.cam_scales, fg_tags)
                label = refine_pseudo_labels(self.par, img, cam, fg_tags, tau_h, p.tau_low, p.par_downscale)
                out.append(label.masked_fill(~inside, IGNORE))
        return out

    @torch.no_grad()
    def label_quality(self, labels: list[torch.Tensor], gt: torch.Tensor, inside: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pl_miou` / `pl_miou_2` of each sub-net's pseudo-labels against the ground truth and
        `pl_cover` (sub-net 1's share of image pixels with a label); nothing for a mismatched gt."""
        if gt.shape != labels[0].shape:
            return {}
        logs: dict[str, torch.Tensor] = {}
        for key, lab in zip(("pl_miou", "pl_miou_2"), labels):
            miou, cover = pseudo_label_stats(lab, gt, self.num_classes, self.cfg.data.ignore_index, inside)
            if torch.isfinite(miou):
                logs[key] = miou
            logs.setdefault("pl_cover", cover)
        return logs

    @torch.no_grad()
    def filter_noise(self, segs: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Set GMM-flagged foreground pixels of each label map to ignore.

        As the official code, sub-net k's label map is judged by sub-net k's own prediction
        against it (the map then trains the other sub-net). All images of both maps are fitted
        in one batched EM.
        """
        p = self.cfg.dupl
        b = labels[0].shape[0]
        lab = torch.cat(labels, 0)
        loss = F.cross_entropy(torch.cat(segs, 0).float(), lab, ignore_index=IGNORE, reduction="none").flatten(1)
        flat = lab.flatten(1)
        fg = (flat != 0) & (flat != IGNORE)
        res = gmm_noise_mask(loss, fg, p.gmm_eta, p.gmm_gamma, p.gmm_min_pixels, p.gmm_min_loss, p.gmm_iters, p.gmm_reg)
        filtered = torch.where(res.noise, torch.full_like(flat, IGNORE), flat).view_as(lab)
        stats = {
            "noise_frac": res.noise.float().mean(),
            "noise_frac_fg": res.noise.sum().float() / fg.sum().clamp_min(1),
            "gmm_active": res.active.float().mean(),
        }
        return list(filtered.split(b, 0)), stats
