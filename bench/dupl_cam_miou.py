"""CAM pseudo-label mIoU of a DuPL checkpoint over a whole split: the standard weak-supervision
metric (one confusion matrix over every image, not the per-batch figure the training log shows).

For each image: its tags (from the mask, as training derives them, or from --tags), the
multi-scale + flip CAMs of each sub-network in eval mode, then the pseudo-labels at the final
`tau_h` (or --tau-high) with PAR refinement, as training makes them but on the whole image
without the training view's photometric augmentation (no crop, so no padding). Pixels the rule
leaves uncertain (255) count as wrong for `miou` (they are no label) and are left out for
`miou_confident`; `coverage` is the share of labelled pixels that receive a label.

    python bench/dupl_cam_miou.py -c runs/dupl/best.pt --split train --json cam_miou.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semiseg_cli.data import build_dataset, layout_for, load_tags  # noqa: E402
from semiseg_cli.data.transforms import denormalize  # noqa: E402
from semiseg_cli.engine.checkpoint import load_for_inference  # noqa: E402
from semiseg_cli.engine.device import resolve_device  # noqa: E402
from semiseg_cli.methods.cam import IGNORE, PAR, multi_scale_cam, refine_pseudo_labels  # noqa: E402
from semiseg_cli.metrics import ConfusionMatrix  # noqa: E402


@torch.no_grad()
def cam_miou(ckpt: Path, split: str, device: torch.device, tau_high: float | None, tags_file: Path | None,
             limit: int | None = None) -> dict:
    model, cfg, meta = load_for_inference(ckpt, device)
    if cfg.method not in ("dupl", "cam_baseline"):
        raise SystemExit(f"error: {ckpt} was trained with {cfg.method}, not dupl or cam_baseline")
    p, d = getattr(cfg, cfg.method), cfg.data
    subnets = list(getattr(model, "subnets", [model]))  # DuPL's two sub-nets, or the baseline's one
    layout = layout_for(d)
    pairs = layout.list_pairs(split)[:limit]
    ds = build_dataset(d, pairs, train=False)
    if tags_file is not None:
        ds.tags = load_tags(tags_file, layout.num_classes)
    par = PAR(p.par_dilations, p.par_iters, p.par_w1, p.par_w2).to(device) if p.par_iters > 0 else None
    th = p.tau_high_end if tau_high is None else tau_high
    n = layout.num_classes
    mats = {name: ConfusionMatrix(n + 1, ignore_index=IGNORE, device=device) for name in ("net1", "net2")[: len(subnets)]}
    labelled = {k: 0 for k in mats}
    total = 0
    for i in range(len(ds)):
        item = ds[i]
        x = item["image"][None].to(device)
        gt = item["mask"][None].to(device)
        fg = item["tags"][None, 1:].to(device)
        img = denormalize(x.float(), d.mean, d.std).clamp(0, 1)
        total += int((gt != IGNORE).sum())
        for name, sub in zip(mats, subnets):
            cam = multi_scale_cam(sub.cam, x, p.cam_scales, fg)
            lab = refine_pseudo_labels(par, img, cam, fg, torch.full((1,), th, device=device), p.tau_low, p.par_downscale)
            keep = gt != IGNORE
            labelled[name] += int((keep & (lab != IGNORE)).sum())
            # "no label" is its own column (index n) so that uncertain pixels count against IoU.
            mats[name].update(torch.where(lab == IGNORE, torch.full_like(lab, n), lab), gt)
    out: dict = {"checkpoint": str(ckpt), "split": split, "images": len(ds), "tau_high": th, "tau_low": p.tau_low,
                 "cam_scales": list(p.cam_scales), "classes": layout.class_names, "subnets": {}}
    for name, cm in mats.items():
        m = cm.mat.double().cpu()
        conf = m[:n, :n]
        tp = conf.diag()
        gt_all = m[:n].sum(1)  # every labelled pixel of the class, uncertain ones included
        pred = conf.sum(0)
        iou = tp / (gt_all + pred - tp).clamp(min=1)
        iou_conf = tp / (conf.sum(1) + pred - tp).clamp(min=1)
        present = gt_all > 0
        out["subnets"][name] = {
            "miou": float(iou[present].mean()),
            "miou_confident": float(iou_conf[present].mean()),
            "coverage": labelled[name] / max(total, 1),
            "iou": [round(float(v), 4) if ok else None for v, ok in zip(iou, present)],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--checkpoint", type=Path, required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tau-high", type=float, default=None, help="default: the schedule's final value")
    ap.add_argument("--tags", type=Path, default=None, help="a tags.json (default: tags from the masks)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res = cam_miou(args.checkpoint, args.split, resolve_device(args.device), args.tau_high, args.tags, args.limit)
    for name, r in res["subnets"].items():
        print(f"{name}: CAM pseudo-label mIoU {100 * r['miou']:.2f} (confident pixels only {100 * r['miou_confident']:.2f}, "
              f"coverage {100 * r['coverage']:.1f}%) over {res['images']} {res['split']} images")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
