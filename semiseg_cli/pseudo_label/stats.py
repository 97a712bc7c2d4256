"""The numbers of a pseudo-label dump: which pixels are reliable, per-image counts, the totals.

Every number of a record and of the summary is a sum of per-image, per-class pixel counts, so the
summary of a resumed dump (records of several runs) equals that of one uninterrupted run, and
`summarise` can rebuild it from the records alone.

What can go wrong:
- Thresholds that depend on the batch: U2PL's entropy percentile is over the training batch,
  which would make a pixel's label depend on the images it was batched with; here the
  percentile is per image (`reliable_mask`).
- Ties at the percentile: a saturated model has many pixels at entropy 0, and U2PL's
  `entropy >= percentile` then drops every pixel of the image; ties are kept here.
- Speed: boolean-mask indexing per count cost ~10% of the whole loop on a CPU, so the counts are
  three bincounts per batch (`batch_counts`). On CUDA `bincount` reads the input's min and max
  back to the host (a sync that would stop the next batch from being queued), so there the
  same counts are `index_add_` into a zeroed tensor of the known length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch and numpy load lazily: `semiseg --help` should not import torch
    import numpy as np
    import torch

# The per-class sums a record keeps under "counts" (the gt ones only when the image has a mask).
COUNT_KEYS = ("hist", "reliable_hist", "conf_sum", "gt_hist", "inter", "pred_valid", "reliable_valid", "reliable_correct")
GT_KEYS = ("gt_hist", "inter", "pred_valid", "reliable_valid", "reliable_correct")


def normalised_entropy(probs: "torch.Tensor") -> "torch.Tensor":
    """Entropy of (B,C,H,W) probabilities divided by ln(C): 0 = one-hot, 1 = uniform (0 for C = 1)."""
    from semiseg_cli.ops import entropy

    return entropy(probs, 1, normalise=True)


def reliable_mask(
    confidence: "torch.Tensor",
    entropy: "torch.Tensor",
    min_confidence: float | None = None,
    drop_percent: float | None = None,
) -> "torch.Tensor":
    """(B,H,W) bool: pixels kept as pseudo-labels; the rest become 255.

    `min_confidence`: keep pixels whose max probability is >= the value.
    `drop_percent` (U2PL-style): drop the `drop_percent`% highest-entropy pixels *of each image*
    (a per-image percentile; U2PL computes it over the training batch, which would make a
    pixel's fate depend on the other images of a batch). A pixel is dropped when its entropy is
    strictly above the largest entropy among the kept (100 - p)%; pixels tied with that value are
    kept, so at most p% go. U2PL's `entropy.ge(percentile)` drops ties instead, which for a
    saturated model (many pixels at entropy 0) drops every pixel of the image.
    Both together: a pixel must pass both.
    """
    import torch

    from semiseg_cli.ops import keep_low_entropy

    keep = torch.ones_like(confidence, dtype=torch.bool)
    if min_confidence is not None:
        keep &= confidence >= min_confidence
    if drop_percent is not None and drop_percent > 0:
        keep &= keep_low_entropy(entropy, 100.0 - drop_percent, scope="image")
    return keep


def batch_counts(
    label: "torch.Tensor",
    reliable: "torch.Tensor",
    confidence: "torch.Tensor",
    gt: "torch.Tensor | None",
    num_classes: int,
) -> dict[str, "torch.Tensor"]:
    """Per-image, per-class pixel counts (each (B,C)) in three bincounts over the whole batch.

    `label` is the argmax (no 255), `gt` holds class ids with 255 (or any id >= C) for pixels
    without ground truth. Keys: hist (predicted pixels), reliable_hist, conf_sum (float64), and
    with `gt`: gt_hist, inter (argmax == gt), pred_valid (predicted where gt is valid),
    reliable_valid, reliable_correct.

    Each pixel's (image, predicted class, reliable, has gt, correct) is one bin of a single
    bincount, and the counts are sums over bins: boolean-mask indexing per count (8 of them)
    cost ~10% of the whole pseudo-label loop on a CPU.
    """
    import torch

    b = label.shape[0]
    c = num_classes
    offset = (torch.arange(b, device=label.device) * c).view(b, *([1] * (label.dim() - 1)))
    idx = (label.long() + offset).flatten()
    out = {"conf_sum": _bincount(idx, b * c, confidence.double().flatten()).view(b, c)}
    if gt is None:
        n = _bincount(idx * 2 + reliable.flatten().long(), b * c * 2).view(b, c, 2)
        out["hist"] = n.sum(-1)
        out["reliable_hist"] = n[..., 1]
        return out
    gt = gt.long()
    valid = (gt >= 0) & (gt < c)
    correct = valid & (label.long() == gt)
    flags = reliable.long() + 2 * valid.long() + 4 * correct.long()  # correct implies valid: 0-3, 6, 7
    n = _bincount(idx * 8 + flags.flatten(), b * c * 8).view(b, c, 8)
    out["hist"] = n.sum(-1)
    out["reliable_hist"] = n[..., 1::2].sum(-1)
    out["pred_valid"] = n[..., 2:].sum(-1)
    out["inter"] = n[..., 6:].sum(-1)
    out["reliable_valid"] = n[..., 3] + n[..., 7]
    out["reliable_correct"] = n[..., 7]
    gt_idx = torch.where(valid, gt.clamp(0, c - 1) + offset, torch.full_like(gt, b * c)).flatten()
    out["gt_hist"] = _bincount(gt_idx, b * c + 1)[: b * c].view(b, c)
    return out


def _bincount(idx: "torch.Tensor", length: int, weights: "torch.Tensor | None" = None) -> "torch.Tensor":
    """`torch.bincount(idx, weights, minlength=length)` for indices known to be in [0, length),
    without its host sync on CUDA."""
    import torch

    if idx.device.type != "cuda":
        return torch.bincount(idx, weights=weights, minlength=length)
    if weights is None:
        return torch.zeros(length, dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
    return torch.zeros(length, dtype=weights.dtype, device=idx.device).index_add_(0, idx, weights)


def _ratio(num: float, den: float) -> float | None:
    return None if den <= 0 else num / den


def _miou(inter: Sequence[float], pred: Sequence[float], gt: Sequence[float]) -> float | None:
    ious = [i / (p + g - i) for i, p, g in zip(inter, pred, gt) if p + g - i > 0]
    return sum(ious) / len(ious) if ious else None


def image_numbers(counts: dict[str, "np.ndarray"], b: int, has_mask: bool) -> dict[str, Any]:
    """The numbers of image `b` of a batch's counts (host arrays of `batch_counts`), in the order
    of its record: mean_confidence, reliable_fraction, class_hist, with a mask accuracy,
    accuracy_reliable and miou, then the raw `counts` (gt ones dropped without a mask)."""
    c = {k: (v[b].round(4).tolist() if k == "conf_sum" else v[b].astype(int).tolist()) for k, v in counts.items()}
    if not has_mask:
        for k in GT_KEYS:
            c.pop(k, None)
    npx = int(sum(c["hist"]))
    rec: dict[str, Any] = {
        "mean_confidence": round(sum(c["conf_sum"]) / max(npx, 1), 6),
        "reliable_fraction": round(sum(c["reliable_hist"]) / max(npx, 1), 6),
        "class_hist": c["hist"],
    }
    if "gt_hist" in c:
        acc = _ratio(sum(c["inter"]), sum(c["gt_hist"]))
        acc_r = _ratio(sum(c["reliable_correct"]), sum(c["reliable_valid"]))
        miou = _miou(c["inter"], c["pred_valid"], c["gt_hist"])
        rec["accuracy"] = None if acc is None else round(acc, 6)
        rec["accuracy_reliable"] = None if acc_r is None else round(acc_r, 6)
        rec["miou"] = None if miou is None else round(miou, 6)
    rec["counts"] = c
    return rec


def summarise(records: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Totals over the records: per-class pixel share, mean confidence, reliable fraction,
    accuracy of the reliable pseudo-labels (precision against ground truth) and IoU of the
    argmax, plus the overall numbers. Accuracy fields are None where no image had a mask."""
    c = len(class_names)
    tot = {k: [0.0] * c for k in COUNT_KEYS}
    with_gt = 0
    for rec in records:
        counts = rec["counts"]
        for k in COUNT_KEYS:
            if k in counts:
                tot[k] = [a + b for a, b in zip(tot[k], counts[k])]
        with_gt += "gt_hist" in counts
    pixels = sum(tot["hist"])
    per_class = {}
    for i, name in enumerate(class_names):
        union = tot["pred_valid"][i] + tot["gt_hist"][i] - tot["inter"][i]
        per_class[name] = {
            "pixel_share": _ratio(tot["hist"][i], pixels),
            "mean_confidence": _ratio(tot["conf_sum"][i], tot["hist"][i]),
            "reliable_fraction": _ratio(tot["reliable_hist"][i], tot["hist"][i]),
            "accuracy": _ratio(tot["reliable_correct"][i], tot["reliable_valid"][i]) if with_gt else None,
            "iou": _ratio(tot["inter"][i], union) if with_gt else None,
        }
    return {
        "images": len(records),
        "images_with_masks": with_gt,
        "pixels": int(pixels),
        "mean_confidence": _ratio(sum(tot["conf_sum"]), pixels),
        "reliable_fraction": _ratio(sum(tot["reliable_hist"]), pixels),
        "accuracy": _ratio(sum(tot["inter"]), sum(tot["gt_hist"])) if with_gt else None,
        "accuracy_reliable": _ratio(sum(tot["reliable_correct"]), sum(tot["reliable_valid"])) if with_gt else None,
        "miou": _miou(tot["inter"], tot["pred_valid"], tot["gt_hist"]) if with_gt else None,
        "per_class": per_class,
    }


def print_summary(summary: dict[str, Any], console: Any, title: str) -> None:
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    table = Table(title=title)
    for col in ("class", "pixels %", "mean conf %", "reliable %", "acc % (reliable)", "IoU %"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, row in summary["per_class"].items():
        table.add_row(name, pct(row["pixel_share"]), pct(row["mean_confidence"]), pct(row["reliable_fraction"]),
                      pct(row["accuracy"]), pct(row["iou"]))
    caption = (f"{summary['images']} images: mean confidence {pct(summary['mean_confidence'])}%, "
               f"reliable {pct(summary['reliable_fraction'])}%")
    if summary["images_with_masks"]:
        caption += (f"\nagainst the masks of {summary['images_with_masks']} images: pixel acc {pct(summary['accuracy'])}% "
                    f"(reliable pixels {pct(summary['accuracy_reliable'])}%), mIoU {pct(summary['miou'])}%")
    else:
        caption += "\nno ground-truth masks in this split: accuracy not measured"
    table.caption = caption
    console.print(table)
