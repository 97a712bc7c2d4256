"""Compare `semiseg eval --json` reports side by side: mIoU and per-class IoU.

    python bench/compare_runs.py runs/a/eval.json runs/b/eval.json [--out compare.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="also write the comparison as JSON")
    args = ap.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    labels = [f"{r['method']} ({p.parent.name})" for r, p in zip(reports, args.reports)]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    table = Table(title="val mIoU side by side")
    table.add_column("class")
    for lab in labels:
        table.add_column(lab, justify="right")
    for name in reports[0]["per_class"]:
        table.add_row(name, *[pct(r["per_class"][name]["IoU"]) for r in reports])
    table.add_row("[bold]mIoU", *[f"[bold]{pct(r['mIoU'])}" for r in reports])
    Console().print(table)
    base = reports[0]["mIoU"]
    for lab, r in zip(labels[1:], reports[1:]):
        if base is not None and r["mIoU"] is not None:
            Console().print(f"{lab}: {100 * (r['mIoU'] - base):+.2f} mIoU points over {labels[0]}")
    if args.out:
        args.out.write_text(json.dumps({"runs": [{"label": l, **r} for l, r in zip(labels, reports)]}, indent=2))


if __name__ == "__main__":
    main()
