"""Which classes a confidence threshold gives targets to: per ground-truth class, the share of
pixels a model predicts with max probability >= tau, and how many of those are right.

    python bench/demo_confidence.py -c runs/demo-seeds-v3/s0-supervised/last.pt \
        -c runs/demo-seeds-v3/s0-unimatch/last.pt --split runs/demo-seeds-v3/splits/unlabeled.txt \
        [--tau 0.95] [--json bench/results/demo_confidence_v3_s0.json]

For UniMatch and FixMatch the threshold decides which unlabeled pixels get a pseudo-label: a class
with few confident pixels gets few targets, and one the model confidently takes for another class
gets wrong ones, whatever the unlabeled images hold. Needs images with masks (the demo's unlabeled
images have them). The model in eval mode on whole images (training sees crops, 64 px in the demo,
of the same images), so this describes the model a run ends with, not each step's targets.

Per class: `pixels`; `recall` = share of its pixels predicted right (no threshold); `confident` =
share of its pixels at or above tau; `right_of_confident` = share of those predicted as the class;
`targets_right` / `targets_wrong` = share of its pixels that get a right / a wrong target;
`targets_into` = how many confident pixels of *other* classes are labeled as this one, per pixel
of this class (wrong targets it receives); `targets_as` = share of its pixels whose target is each
class (the table names the most common wrong one).
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
    hit = torch.zeros(k, dtype=torch.long)  # ... predicted right, whatever the confidence
    conf_as = torch.zeros(k, k, dtype=torch.long)  # [true class, target]: the confident pixels
    for i in range(len(ds)):
        item = ds[i]
        gt = item["mask"].long()
        p = predict_probs(model, item["image"][None], settings)[0]
        top, pred = p.max(0)
        ok = gt != 255
        sure = (top >= tau) & ok
        count += torch.bincount(gt[ok], minlength=k)[:k]
        hit += torch.bincount(gt[ok & (pred == gt)], minlength=k)[:k]
        conf_as += torch.bincount(gt[sure] * k + pred[sure], minlength=k * k)[: k * k].view(k, k)
    conf = conf_as.sum(1)  # confident pixels per true class
    right = conf_as.diagonal()  # ... of them right
    into = conf_as.sum(0) - right  # confident pixels of other classes labeled as this one
    names = list(ckpt["class_names"])
    per_class = {}
    for c in range(k):
        n = int(count[c])
        per_class[names[c]] = {
            "pixels": n,
            "recall": float(hit[c]) / n if n else None,
            "confident": float(conf[c]) / n if n else None,
            "right_of_confident": float(right[c]) / int(conf[c]) if int(conf[c]) else None,
            "targets_right": float(right[c]) / n if n else None,
            "targets_wrong": float(conf[c] - right[c]) / n if n else None,
            "targets_into": float(into[c]) / n if n else None,
            "targets_as": {names[j]: float(conf_as[c, j]) / n for j in range(k)} if n else None,
        }
    return {"checkpoint": _repo_relative(checkpoint), "method": inputs.cfg.method, "split": split, "images": len(ds), "tau": tau, "per_class": per_class}


def _repo_relative(path: Path) -> str:
    """As seen from the repository root when inside it (results carry no machine paths)."""
    p = path.resolve()
    return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else path.as_posix()


def _mostly(name: str, v: dict) -> str:
    """The class most of a class's wrong targets name, and how many of its pixels get it."""
    wrong = {j: x for j, x in (v.get("targets_as") or {}).items() if j != name}
    if not wrong or not max(wrong.values()):
        return "n/a"
    j = max(wrong, key=wrong.get)
    return f"{j} {100 * wrong[j]:.1f}%"


COLUMNS = (("recall", "predicted right"), ("confident", ">= tau"), ("right_of_confident", "right of those"),
           ("targets_right", "right target"), ("targets_wrong", "wrong target"), ("targets_into", "wrong into it"))


def _cells(name: str, v: dict) -> list[str]:
    """One table row: the class, its COLUMNS in %, then where its wrong targets mostly go."""
    return [name, *("n/a" if v[k] is None else f"{100 * v[k]:.1f}%" for k, _ in COLUMNS), _mostly(name, v)]


def markdown(r: dict) -> str:
    lines = [f"{r['checkpoint']} ({r['method']}), {r['images']} images, tau {r['tau']}:", "",
             "| class | " + " | ".join(h for _, h in COLUMNS) + " | wrong targets mostly |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, v in r["per_class"].items():
        lines.append("| " + " | ".join(_cells(name, v)) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--checkpoint", type=Path, action="append", default=[])
    ap.add_argument("--split", default=None, help="a split file (or name) whose images have masks")
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from", dest="source", type=Path, default=None, help="show a JSON this script wrote instead of computing")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    a = ap.parse_args()
    if a.source is not None:
        results = json.loads(a.source.read_text())
    else:
        if not a.checkpoint or a.split is None:
            ap.error("give -c CHECKPOINT (one or more) and --split, or --from JSON")
        if not 0.0 <= a.tau <= 1.0:
            ap.error(f"--tau {a.tau}: a probability threshold lies in [0, 1]")
        torch.set_grad_enabled(False)
        from semiseg_cli.errors import UserError

        try:
            results = [class_confidence(c, a.split, a.tau) for c in a.checkpoint]
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
    console = Console(width=max(Console().width, 110))
    for r in results:
        t = Table(title=f"{r['checkpoint']} ({r['method']}), {r['images']} images, tau {r['tau']}")
        t.add_column("class")
        for _, head in COLUMNS:
            t.add_column(head, justify="right")
        t.add_column("wrong targets mostly", justify="right")
        for name, v in r["per_class"].items():
            t.add_row(*_cells(name, v))
        console.print(t)
    if a.markdown:
        print("\n\n".join(markdown(r) for r in results))
    if a.json is not None and a.source is None:
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
