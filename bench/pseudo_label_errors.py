"""Where a model's pseudo-labels go wrong, per ground-truth class, and how many of the wrong ones
an entropy drop would remove.

Reads folders written by `semiseg pseudo-label` (any --format; no --drop-percent or
--min-confidence, so every pixel is labelled) on a split whose images have masks, and prints per
class: IoU, recall and precision of the pseudo-labels, the share of the class's pixels in the
`--percent`-th highest-entropy part of their image, the same share among its *wrongly* labelled
pixels, and the classes it is mistaken for. With --tau (a FixMatch/UniMatch confidence
threshold), also per class: the share of its pixels whose confidence reaches τ (the pixels such a
method trains on), the precision of the confident labels, and the class's share of all confident
targets beside its share of the ground truth, which shows which classes a threshold starves.
JSON with --out.

    semiseg pseudo-label -c runs/camvid-cpu-1200/supervised/last.pt --split splits/camvid/unlabeled.txt --out pl/sup
    python bench/pseudo_label_errors.py pl/sup pl/u2pl --percent 20 --out bench/results/camvid_pseudo_label_errors.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semiseg_cli.metrics import ConfusionMatrix  # noqa: E402
from semiseg_cli.pseudo_label import U16  # noqa: E402


def read_confidence(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["confidence"].astype(np.float32)
    return np.asarray(Image.open(path), dtype=np.float32) / U16


def read_entropy(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["entropy"].astype(np.float32)
    return np.asarray(Image.open(path), dtype=np.float32) / U16


def analyse(folder: Path, percent: float, tau: float | None = None) -> dict:
    if not (folder / "meta.json").is_file() or not (folder / "manifest.jsonl").is_file():
        raise SystemExit(f"{folder}: not a `semiseg pseudo-label` output folder (no meta.json/manifest.jsonl)")
    meta = json.loads((folder / "meta.json").read_text())
    names, root = meta["class_names"], Path(meta["root"])
    c = len(names)
    every, top = ConfusionMatrix(c), ConfusionMatrix(c)  # all pixels; the high-entropy ones only
    sure = ConfusionMatrix(c)  # pixels whose confidence reaches tau
    images = 0
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("mask"):
            continue
        gt = torch.from_numpy(np.asarray(Image.open(root / rec["mask"]), dtype=np.int64))
        pred = torch.from_numpy(np.asarray(Image.open(folder / rec["files"]["label"]), dtype=np.int64))
        ent = read_entropy(folder / rec["files"]["entropy"])
        valid = gt < c
        if not valid.any():
            continue
        if (pred[valid] >= c).any():
            raise SystemExit(f"{folder}: pseudo-labels marked unreliable (255); write them without --drop-percent/--min-confidence")
        images += 1
        gt = gt.masked_fill(~valid, 255)
        every.update(pred, gt)
        high = torch.from_numpy(ent >= np.percentile(ent[valid.numpy()], 100 - percent))
        top.update(pred, gt.masked_fill(~high, 255))
        if tau is not None:
            confident = torch.from_numpy(read_confidence(folder / rec["files"]["confidence"]) >= tau)
            sure.update(pred, gt.masked_fill(~confident, 255))
    if not images:
        raise SystemExit(f"{folder}: no image with a mask; pseudo-label a split whose images have masks")
    metrics = every.compute()
    conf, conf_top = every.mat.numpy(), top.mat.numpy()
    tp, gt_n, pred_n = np.diag(conf), conf.sum(1), conf.sum(0)
    wrong, wrong_in_top = gt_n - tp, conf_top.sum(1) - np.diag(conf_top)
    conf_sure = sure.mat.numpy()
    sure_gt, sure_pred, sure_tp = conf_sure.sum(1), conf_sure.sum(0), np.diag(conf_sure)
    per_class = {}
    for k, name in enumerate(names):
        row = conf[k] / max(gt_n[k], 1)
        off = [(names[j], round(float(row[j]), 3)) for j in np.argsort(-row) if j != k][:2]
        iou = metrics.iou[k]
        per_class[name] = {
            "iou": None if math.isnan(iou) else round(iou, 4),
            "recall": round(float(tp[k] / max(gt_n[k], 1)), 4),
            "precision": round(float(tp[k] / max(pred_n[k], 1)), 4),
            "in_top": round(float(conf_top[k].sum() / max(gt_n[k], 1)), 4),
            "wrong_in_top": round(float(wrong_in_top[k] / max(wrong[k], 1)), 4),
            "mistaken_for": off,
        }
        if tau is not None:
            per_class[name].update({
                "gt_share": round(float(gt_n[k] / max(gt_n.sum(), 1)), 4),
                "covered": round(float(sure_gt[k] / max(gt_n[k], 1)), 4),
                "target_share": round(float(sure_pred[k] / max(sure_pred.sum(), 1)), 4),
                "precision_confident": round(float(sure_tp[k] / max(sure_pred[k], 1)), 4),
            })
    return {
        "folder": str(folder),
        "checkpoint": meta["identity"]["checkpoint"],
        "images": images,
        "percent": percent,
        "pixel_accuracy": round(metrics.aacc, 4),
        "miou": round(metrics.miou, 4),
        "wrong_in_top": round(float(wrong_in_top.sum() / max(wrong.sum(), 1)), 4),
        "tau": tau,
        "covered": None if tau is None else round(float(sure_gt.sum() / max(gt_n.sum(), 1)), 4),
        "accuracy_confident": None if tau is None else round(float(sure_tp.sum() / max(sure_gt.sum(), 1)), 4),
        "per_class": per_class,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="semiseg pseudo-label output folders")
    ap.add_argument("--percent", type=float, default=20.0, help="highest-entropy share of each image (default 20)")
    ap.add_argument("--tau", type=float, help="also report what a confidence threshold keeps (e.g. 0.95)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    a = ap.parse_args()
    if not 0 < a.percent < 100:
        raise SystemExit(f"--percent {a.percent}: must be between 0 and 100")
    if a.tau is not None and not 0 < a.tau <= 1:
        raise SystemExit(f"--tau {a.tau}: must be in (0, 1]")
    results = [analyse(f, a.percent, a.tau) for f in a.folders]
    for r in results:
        print(f"\n{r['checkpoint']}  ({r['images']} images)  pixel acc {r['pixel_accuracy']:.3f}  mIoU {100 * r['miou']:.2f}"
              f"  wrong labels in the top {a.percent:g}% entropy: {100 * r['wrong_in_top']:.0f}%")
        print(f"{'class':<12}{'IoU':>6}{'recall':>8}{'prec':>7}{'in top':>8}{'wrong in top':>14}  mistaken for")
        for name, v in r["per_class"].items():
            iou = "-" if v["iou"] is None else f"{100 * v['iou']:.1f}"
            off = ", ".join(f"{n} {100 * s:.0f}%" for n, s in v["mistaken_for"])
            print(f"{name:<12}{iou:>6}{100 * v['recall']:>7.0f}%{100 * v['precision']:>6.0f}%{100 * v['in_top']:>7.0f}%{100 * v['wrong_in_top']:>13.0f}%  {off}")
        if a.tau is not None:
            print(f"confidence >= {a.tau:g}: {100 * r['covered']:.1f}% of the pixels, {100 * r['accuracy_confident']:.1f}% right")
            print(f"{'class':<12}{'GT share':>9}{'covered':>9}{'target share':>14}{'precision':>11}")
            for name, v in r["per_class"].items():
                print(f"{name:<12}{100 * v['gt_share']:>8.1f}%{100 * v['covered']:>8.1f}%{100 * v['target_share']:>13.1f}%{100 * v['precision_confident']:>10.1f}%")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps({"results": results}, indent=1) + "\n")
        tmp.replace(a.out)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
