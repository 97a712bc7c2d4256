"""Which classes a confidence threshold gives targets to: per ground-truth class, the share of
pixels a model predicts with max probability >= tau, and how many of those are right.

    python bench/demo_confidence.py -c runs/demo-seeds-v3/s0-supervised/last.pt \
        -c runs/demo-seeds-v3/s0-unimatch/last.pt --split runs/demo-seeds-v3/splits/unlabeled.txt \
        [--tau 0.95] [--json bench/results/demo_confidence.json]

For UniMatch and FixMatch the threshold decides which unlabeled pixels get a pseudo-label, so a
class with few confident pixels gets few targets, whatever the unlabeled images hold. Needs images
with masks (the demo's unlabeled images have them). Whole images, the model in eval mode: training
sees crops (64 px in the demo), where the model is a few points less accurate, so this is what the
threshold would pass at best.

Per class: `pixels`; `confident` = share of its pixels at or above tau; `right_of_confident` = share
of those predicted as the class; `targets_right` = share of its pixels that get a correct target;
`targets_into` = how many confident pixels of *other* classes are labeled as this one, per pixel
of this class (wrong targets it receives).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


def class_confidence(checkpoint: Path, split: str, tau: float) -> dict:
    from semiseg_cli.data.datasets import build_dataset
    from semiseg_cli.engine.inputs import load_model, open_split
    from semiseg_cli.eval_report import eval_config
    from semiseg_cli.inference import InferenceSettings, predict_probs

    inputs = open_split(checkpoint, split, device="cpu", configure=lambda stored: eval_config(stored, [], {"data.workers": 0}, {}))
    pairs = [p for p in inputs.pairs if p[1] is not None]
    if not pairs:
        raise SystemExit(f"{split}: no image has a mask")
    ds = build_dataset(inputs.cfg.data, pairs, train=False)
    model, ckpt = load_model(checkpoint, torch.device("cpu"))
    settings = InferenceSettings.from_config(inputs.cfg)
    k = int(ckpt["num_classes"])
    count = torch.zeros(k, dtype=torch.long)  # pixels per ground-truth class
    conf = torch.zeros(k, dtype=torch.long)  # ... of them confident
    right = torch.zeros(k, dtype=torch.long)  # ... confident and right
    into = torch.zeros(k, dtype=torch.long)  # confident pixels of other classes labeled as this one
    for i in range(len(ds)):
        item = ds[i]
        gt = item["mask"].long()
        p = predict_probs(model, item["image"][None], settings)[0]
        top, pred = p.max(0)
        ok = gt != 255
        sure = (top >= tau) & ok
        count += torch.bincount(gt[ok], minlength=k)[:k]
        conf += torch.bincount(gt[sure], minlength=k)[:k]
        right += torch.bincount(gt[sure & (pred == gt)], minlength=k)[:k]
        into += torch.bincount(pred[sure & (pred != gt)], minlength=k)[:k]
    names = list(ckpt["class_names"])
    per_class = {}
    for c in range(k):
        n = int(count[c])
        per_class[names[c]] = {
            "pixels": n,
            "confident": float(conf[c]) / n if n else None,
            "right_of_confident": float(right[c]) / int(conf[c]) if int(conf[c]) else None,
            "targets_right": float(right[c]) / n if n else None,
            "targets_into": float(into[c]) / n if n else None,
        }
    return {"checkpoint": _repo_relative(checkpoint), "method": inputs.cfg.method, "split": split, "images": len(ds), "tau": tau, "per_class": per_class}


def _repo_relative(path: Path) -> str:
    """As seen from the repository root when inside it (results carry no machine paths)."""
    p = path.resolve()
    return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else path.as_posix()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--checkpoint", type=Path, action="append", required=True)
    ap.add_argument("--split", required=True, help="a split file (or name) whose images have masks")
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not 0.0 <= a.tau <= 1.0:
        ap.error(f"--tau {a.tau}: a probability threshold lies in [0, 1]")
    torch.set_grad_enabled(False)
    from semiseg_cli.errors import UserError

    try:
        results = [class_confidence(c, a.split, a.tau) for c in a.checkpoint]
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    console = Console()
    for r in results:
        t = Table(title=f"{r['checkpoint']} ({r['method']}), {r['images']} images, tau {r['tau']}")
        for col in ("class", "confident", "right of confident", "gets a right target", "wrong targets into it"):
            t.add_column(col, justify="right")
        for name, v in r["per_class"].items():
            cells = [v[key] for key in ("confident", "right_of_confident", "targets_right", "targets_into")]
            t.add_row(name, *("n/a" if x is None else f"{100 * x:.1f}%" for x in cells))
        console.print(t)
    if a.json is not None:
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
