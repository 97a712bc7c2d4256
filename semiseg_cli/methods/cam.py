"""Class activation maps, their pixel-adaptive refinement (PAR) and DuPL's pseudo-label rule.

Conventions: `C` counts every class including background 0; CAMs exist for the `C - 1`
foreground classes only, so CAM channel `k` is class `k + 1`. Tags are `(B, C - 1)` multi-hot
foreground tags (the dataset's `(B, C)` tags without column 0).

The pipeline (official DuPL code, which the paper summarises):
1. `multi_scale_cam`: raw CAMs at scales (1, 0.5, 1.5), each with its horizontal flip; flips are
   undone and fused by max, scales are summed after a ReLU; then min-max normalised per image
   and class, and zeroed for classes the image is not tagged with.
2. `tau_high_schedule`: the high threshold descends by a cosine from 0.70 to 0.55.
3. `refine_pseudo_labels`: a background channel held at the threshold is put in front of the
   CAMs, a softmax is taken over the image's valid channels (background + its tags), PAR
   propagates these maps along colour-coherent neighbours (at half resolution), and the argmax
   decides. Done once with tau_h and once with tau_l: foreground where the tau_h run picks a
   class, background where both runs pick background, ignore in between.
   `cam_to_label` is the same rule without PAR, on raw thresholds.

What can go wrong: a class whose CAM is all zeros after the ReLU stays zero (its min-max range
is 0; the 1e-5 guard avoids a NaN). An image without tags is all background.

Also here, because DuPL and the single-network baseline (`cam_baseline.py`) train with them
alike: the official training view (`training_view`), the image box of a padded crop
(`inside_image`), BatchNorm statistics frozen for the CAM passes (`frozen_bn_stats`), the
segmentation loss against a pseudo-label map (`seg_loss`) and the per-image tau_h
(`image_tau_high`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.transforms import strong_photometric
from semiseg_cli.errors import UserError, warn

IGNORE = 255


# ----------------------------------------------------------------------------- training view


def training_view(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The official training view, one draw per image: ColorJitter(brightness 0.4, contrast 0.4,
    saturation 0.2, hue 0.1) with p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2) p 1.0.

    The official code has one training view and always augments it, so the CAMs, PAR and the
    heads all see the augmented image. Brightness, contrast, saturation and hue are applied in
    that fixed order (`strong_photometric`); torchvision's ColorJitter shuffles the order.
    """
    return strong_photometric(x, mean, std, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=1.0)


def inside_image(batch: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels of the image proper, from the batch's `valid` map (False where
    the training transform padded a scaled image up to the crop); all True without one."""
    b, _, h, w = x.shape
    valid = batch.get("valid")
    if valid is None:
        return torch.ones(b, h, w, dtype=torch.bool, device=x.device)
    if tuple(valid.shape) != (b, h, w):
        raise ValueError(f"batch['valid'] is {tuple(valid.shape)}, expected {(b, h, w)} like the images")
    return valid.to(x.device, torch.bool)


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm keeps normalising with batch statistics but does not update its running stats
    (momentum 0): the extra CAM passes at other scales and flips must not drift them."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


# ----------------------------------------------------------------------------- CAMs


def minmax_normalise(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel: (cam - min) / (max - min + eps), over the spatial dimensions."""
    lo = cam.amin(dim=(2, 3), keepdim=True)
    cam = cam - lo
    return cam / (cam.amax(dim=(2, 3), keepdim=True) + eps)


@torch.no_grad()
def multi_scale_cam(
    cam_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    tags: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused, normalised CAMs (B, C-1, H, W) at the input size.

    `cam_fn(images) -> raw CAMs (N, C-1, h, w)` at any resolution (the classifier weights applied
    to the feature map). Each scale runs the image and its flip as one batch; the flipped CAM is
    flipped back and the two are fused by max; scales are summed after a ReLU (as the official
    code), then min-max normalised. With `tags` (B, C-1), untagged classes are zeroed.
    """
    b, _, h, w = x.shape
    total: torch.Tensor | None = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        cam = cam_fn(torch.cat([xs, xs.flip(-1)], 0)).float()
        cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
        cam = F.relu(torch.maximum(cam[:b], cam[b:].flip(-1)))
        total = cam if total is None else total + cam
    assert total is not None, "cam scales must not be empty"
    cam = minmax_normalise(total)
    if tags is not None:
        cam = cam * tags[:, :, None, None].to(cam.dtype)
    return cam


def cam_to_label(cam: torch.Tensor, tags: torch.Tensor, tau_high: torch.Tensor | float, tau_low: float) -> torch.Tensor:
    """Threshold rule without refinement: (B, H, W) long labels in {0..C-1, 255}.

    max CAM over the tagged classes <= tau_low: background 0; > tau_high: that class (k + 1);
    in between: ignore. `tau_high` may be a float or a per-image tensor (B,).
    """
    valid = cam * tags[:, :, None, None].to(cam.dtype)
    value, idx = valid.max(1)
    label = idx + 1
    th = torch.as_tensor(tau_high, dtype=cam.dtype, device=cam.device).reshape(-1, 1, 1)
    label = torch.where(value <= th, torch.full_like(label, IGNORE), label)
    label = torch.where(value <= tau_low, torch.zeros_like(label), label)
    return label


# ----------------------------------------------------------------------------- tau_h


def cosine_descent(start: float, end: float, step: int, begin: int, total: int) -> float:
    """start at `begin`, end at `total - 1`, half a cosine in between (official `cosine_descent`)."""
    t = step - begin
    n = total - begin
    if t <= 0:
        return start
    if t >= n - 1:
        return end
    f = t / (n - 1)
    return start + (end - start) * (1.0 - math.cos(math.pi * f)) / 2.0


def tau_high_schedule(
    step: int,
    begin: int,
    total: int,
    start: float,
    end: float,
    num_fg: int,
    fixed_classes: Sequence[int] = (),
) -> torch.Tensor:
    """Per-foreground-class tau_h (C-1,) at `step`. Classes in `fixed_classes` (dataset ids, 1..C-1)
    keep `start` (the official code's six VOC classes); the rest descend to `end`."""
    value = cosine_descent(start, end, step, begin, total)
    tau = torch.full((num_fg,), value)
    for c in fixed_classes:
        tau[c - 1] = start
    return tau


def per_image_tau(tau_cls: torch.Tensor, tags: torch.Tensor, default: float) -> torch.Tensor:
    """Max of the per-class thresholds over each image's tags (B,); `default` for untagged images."""
    t = tau_cls.to(tags.device, torch.float32)[None, :].expand_as(tags)
    masked = torch.where(tags > 0, t, torch.full_like(t, -1.0))
    best = masked.amax(1)
    return torch.where(best < 0, torch.full_like(best, default), best)


def image_tau_high(
    step: int,
    begin: int,
    total: int,
    start: float,
    end: float,
    fg_tags: torch.Tensor,
    per_class: bool = False,
    fixed_classes: Sequence[int] = (),
) -> torch.Tensor:
    """Each image's tau_h (B,) at `step`: the cosine descent from `begin` to the last step (the
    paper), or with `per_class` the max over the image's tags of per-class targets whose
    `fixed_classes` keep `start` (the official code)."""
    value = cosine_descent(start, end, step, begin, total)
    if not per_class:
        return torch.full((fg_tags.shape[0],), value, device=fg_tags.device)
    per_cls = tau_high_schedule(step, begin, total, start, end, fg_tags.shape[1], fixed_classes)
    return per_image_tau(per_cls, fg_tags, value)


# ----------------------------------------------------------------------------- PAR


_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def dilated_neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8 * len(dilations), H, W): the 8 neighbours at each dilation, with
    replicate padding (one pad by the largest dilation, then shifted views)."""
    _, _, h, w = x.shape
    p = max(dilations)
    xp = F.pad(x, [p, p, p, p], mode="replicate")
    views = [xp[:, :, p + dy * d : p + dy * d + h, p + dx * d : p + dx * d + w] for d in dilations for dy, dx in _OFFSETS]
    return torch.stack(views, 2)


class PAR(nn.Module):
    """Pixel-adaptive refinement (from the official DuPL/ToCo code), vectorised over neighbours.

    Affinity of a pixel to each neighbour n (8 per dilation):
    softmax_n(-mean_rgb((|I_n - I| / (sigma_I * w1))^2)) + w2 * softmax_n(-(dist_n / (sigma_d * w1))^2)
    with sigma_I the per-pixel, per-channel std of the neighbours' colours (all dilations) and
    dist_n = d or d*sqrt(2). Maps are then propagated `iters` times: M <- sum_n aff_n * M_n.

    Deviation, deliberately: the official affinities sum to 1 + w2, so every iteration scales a
    map by 1.01. We divide by 1 + w2 so that a constant map stays constant; DuPL only takes an
    argmax over maps refined together, which this common factor does not change.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), iters: int = 10, w1: float = 0.3, w2: float = 0.01) -> None:
        super().__init__()
        if not dilations or min(dilations) < 1:
            raise ValueError(f"PAR dilations must be positive integers (got {tuple(dilations)})")
        self.dilations = tuple(int(d) for d in dilations)
        self.iters, self.w1, self.w2 = iters, w1, w2
        dist = torch.tensor([d * (math.sqrt(2.0) if dy and dx else 1.0) for d in self.dilations for dy, dx in _OFFSETS])
        pos = -((dist / (dist.std() + 1e-8) / w1) ** 2)
        self.register_buffer("pos_aff", torch.softmax(pos, 0).view(1, 1, -1, 1, 1), persistent=False)

    def affinity(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, 1, K, H, W) propagation weights summing to 1 over K."""
        nb = dilated_neighbours(img, self.dilations)
        diff = (nb - img[:, :, None]).abs()
        std = nb.std(dim=2, keepdim=True)
        aff = -((diff / (std + 1e-8) / self.w1) ** 2)
        aff = torch.softmax(aff.mean(1, keepdim=True), dim=2)
        return (aff + self.w2 * self.pos_aff.to(aff.dtype)) / (1.0 + self.w2)

    @torch.no_grad()
    def forward(self, img: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Refine maps (B, K, h, w) against img (B, 3, H, W); returns (B, K, H, W)."""
        img = img.float()
        maps = F.interpolate(maps.float(), size=img.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(img)
        weights = [aff[:, :, k] for k in range(aff.shape[2])]
        for _ in range(self.iters):
            maps = self._propagate(maps, weights)
        return maps

    def _propagate(self, maps: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """One step M <- sum_n aff_n * M_n, accumulated view by view: materialising the
        (B, C, K, H, W) neighbour stack is ~20x slower on a CPU and K times the memory."""
        h, w = maps.shape[-2:]
        p = max(self.dilations)
        xp = F.pad(maps, [p, p, p, p], mode="replicate")
        out = torch.zeros_like(maps)
        k = 0
        for d in self.dilations:
            for dy, dx in _OFFSETS:
                out.addcmul_(xp[:, :, p + dy * d : p + dy * d + h, p + dx * d : p + dx * d + w], weights[k])
                k += 1
        return out


@torch.no_grad()
def refine_pseudo_labels(
    par: PAR | None,
    img: torch.Tensor,
    cam: torch.Tensor,
    tags: torch.Tensor,
    tau_high: torch.Tensor,
    tau_low: float,
    downscale: int = 2,
) -> torch.Tensor:
    """DuPL's refined pseudo-labels (B, H, W) in {0..C-1, 255}.

    img: the *denormalised* image (B, 3, H, W) (any linear colour scale; PAR is scale-free);
    cam: normalised CAMs (B, C-1, H, W); tags (B, C-1); tau_high (B,) per image.
    Both threshold runs are refined in one PAR call. With `par=None` (or 0 iterations) this
    equals `cam_to_label` up to ties.

    Only the channels some image of the batch is tagged with (and background) are refined: an
    untagged channel is exactly 0 after the masked softmax, PAR is linear per channel with positive
    weights, and every pixel's values sum to 1, so such a channel stays 0 and never wins the
    argmax. The labels are the same bit for bit, and a COCO-sized class list (80 classes, a few
    per image) costs a few channels of PAR instead of 160.
    """
    b, _, h, w = img.shape
    hs, ws = max(1, h // downscale), max(1, w // downscale)
    bg_h = tau_high.to(cam.device, cam.dtype).view(b, 1, 1, 1).expand(b, 1, h, w)
    bg_l = torch.full((b, 1, h, w), float(tau_low), device=cam.device, dtype=cam.dtype)
    valid = torch.cat([torch.ones_like(tags[:, :1]), tags], 1) > 0  # (B, C)
    used = valid.any(0).nonzero().flatten()  # class ids refined: background + the batch's tags
    stacks = []
    for bg in (bg_h, bg_l):
        m = torch.cat([bg, cam], 1)
        m = F.interpolate(m, size=(hs, ws), mode="bilinear", align_corners=False)
        m = m.masked_fill(~valid[:, :, None, None], float("-inf"))
        stacks.append(torch.softmax(m, 1).index_select(1, used))
    maps = torch.cat(stacks, 1)  # (B, 2K, hs, ws)
    if par is not None and par.iters > 0:
        small = F.interpolate(img.float(), size=(hs, ws), mode="bilinear", align_corners=False)
        maps = par(small, maps)
    maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    k = used.numel()
    lab_h = used[maps[:, :k].argmax(1)]
    lab_l = used[maps[:, k:].argmax(1)]
    label = torch.where(lab_h == 0, torch.full_like(lab_h, IGNORE), lab_h)
    return torch.where((lab_h == 0) & (lab_l == 0), torch.zeros_like(label), label)


# ----------------------------------------------------------------------------- loss


def seg_loss(logits: torch.Tensor, label: torch.Tensor, kind: str = "ce", ignore: int = IGNORE) -> torch.Tensor:
    """Cross-entropy against a pseudo-label map; 0 (still in the graph) when nothing is labelled.

    "balanced" (official code): the mean of the background-pixel CE and the foreground-pixel CE.
    """
    ce = F.cross_entropy(logits.float(), label, ignore_index=ignore, reduction="none")
    valid = label != ignore
    if kind == "ce":
        return (ce * valid).sum() / valid.sum().clamp_min(1)
    bg = label == 0
    fg = valid & ~bg
    return 0.5 * ((ce * bg).sum() / (bg.sum() + 1e-6) + (ce * fg).sum() / (fg.sum() + 1e-6))


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def pseudo_label_stats(
    label: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore: int = IGNORE, inside: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mIoU of pseudo-labels against ground truth, fraction of pixels with a pseudo-label).

    Pixels ignored in either map are left out of the confusion matrix; classes absent from both
    the pseudo-labels and the ground truth of this batch are left out of the mean. `inside`
    (B, H, W) bool: the pixels of the image proper; the fraction is taken over those (crop
    padding is never labelled).
    """
    labelled = label != ignore
    keep = labelled & (gt != ignore) & (gt >= 0) & (gt < num_classes)
    t = gt[keep].long()
    p = label[keep].long()
    mat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    tp = mat.diag()
    union = mat.sum(0) + mat.sum(1) - tp
    present = union > 0
    miou = (tp[present] / union[present]).mean() if bool(present.any()) else torch.tensor(float("nan"), device=label.device)
    cover = labelled.float().mean() if inside is None else (labelled & inside).sum().float() / inside.sum().clamp_min(1)
    return miou.float(), cover


# ----------------------------------------------------------------------------- config rules


def check_cam_config(cfg: Any, section: str, num_classes: int | None, smallest_scale: float, scales_hint: str) -> None:
    """The rules every CAM-trained method's section shares (`[dupl]`, `[cam_baseline]`): a
    warning when segmentation never starts, background plus a foreground class, valid
    `fixed_tau_classes`, and at least one 16-pixel ViT patch at `smallest_scale` of the crop."""
    p = getattr(cfg, section)
    if p.seg_start >= cfg.train.iters:
        warn(
            f"{section}.seg_start ({p.seg_start}) is not below train.iters ({cfg.train.iters}): the segmentation "
            f"head never learns from the CAM pseudo-labels and the model predicts nothing useful; lower {section}.seg_start"
        )
    if num_classes is None:
        return
    if num_classes < 2:
        raise UserError(f"{section} needs background (class 0) plus at least one foreground class; the dataset has {num_classes}")
    bad = [c for c in p.fixed_tau_classes if not 1 <= c < num_classes]
    if bad:
        raise UserError(f"{section}.fixed_tau_classes {bad} are not foreground class ids 1..{num_classes - 1}")
    if p.backbone == "vit_b_16" and int(min(cfg.data.crop_size) * smallest_scale) < 16:
        raise UserError(
            f"data.crop_size {tuple(cfg.data.crop_size)} at scale {smallest_scale} is under one 16-pixel ViT patch; "
            f"use larger crops or larger {scales_hint}"
        )
