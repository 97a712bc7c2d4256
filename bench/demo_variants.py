"""One row per demo-data variant, from the JSON that `bench/demo_seeds.py` wrote for each.

    python bench/demo_variants.py bench/results/demo_variants/v*.json [--json OUT] [--markdown]

For each file: the generator version, the labeled share, the iterations, the seeds, supervised's mean mIoU and its weakest class on
each seed, and each semi-supervised method's mean gap to supervised (per seed in brackets) — the
two quantities issue #19's targets pull against each other: a baseline that learns every class,
and a gain from the unlabeled images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path


def row(path: Path) -> dict:
    d = json.loads(path.read_text())
    seeds = [str(s) for s in d["seeds"]]
    runs = d["runs"]
    sup = runs["supervised"]
    out = {
        "file": path.name, "version": d["data"]["version"], "labeled": d["labeled"], "iters": _iterations(d), "seeds": d["seeds"],
        "n_val": d["data"]["n_val"], "supervised": statistics.fmean(sup[s]["mIoU"] for s in seeds),
        "weakest": {s: min((v, k) for k, v in sup[s]["per_class"].items() if v is not None) for s in seeds},
        "gaps": {},
    }
    out["weakest"] = {s: {"class": k, "IoU": v} for s, (v, k) in out["weakest"].items()}
    # The class supervised learns worst on the mean over seeds, and what each method makes of it.
    means = {m: _class_means(per_seed, seeds) for m, per_seed in runs.items()}
    worst = min((v, k) for k, v in means["supervised"].items() if v is not None)[1]
    out["weakest_on_mean"] = {"class": worst, **{m: means[m].get(worst) for m in runs}}
    for m, per_seed in runs.items():
        if m == "supervised":
            continue
        common = [s for s in seeds if s in per_seed]
        gaps = [per_seed[s]["mIoU"] - sup[s]["mIoU"] for s in common]
        out["gaps"][m] = {"mean": statistics.fmean(gaps), "per_seed": dict(zip(common, gaps))}
    return out


def _iterations(d: dict) -> int:
    """The schedule the runs trained for: demo_seeds --iters, else the supervised preset's."""
    if d.get("iters") is not None:
        return int(d["iters"])
    from semiseg_cli.config import load_preset, resolve_preset

    return int(load_preset(resolve_preset(d["presets"]["supervised"]))["train"]["iters"])


def _class_means(per_seed: dict, seeds: list[str]) -> dict[str, float | None]:
    common = [s for s in seeds if s in per_seed]
    classes = per_seed[common[0]]["per_class"] if common else {}
    out: dict[str, float | None] = {}
    for c in classes:
        xs = [per_seed[s]["per_class"].get(c) for s in common]
        out[c] = None if any(x is None for x in xs) else statistics.fmean(xs)
    return out


def markdown(rows: list[dict]) -> str:
    methods = sorted({m for r in rows for m in r["gaps"]})
    lines = ["| results file | version | labeled | iterations | seeds | val images | supervised mIoU | supervised weakest class (per seed) | "
             + " | ".join(f"{m} gap: mean (per seed)" for m in methods)
             + " | that class on the mean: supervised → " + " / ".join(methods) + " |",
             "|" + "---|" * (9 + len(methods))]
    for r in rows:
        weak = ", ".join(f"{w['class']} {w['IoU']:.1f}" for w in r["weakest"].values())
        cells = []
        for m in methods:
            g = r["gaps"].get(m)
            cells.append("" if g is None else f"{g['mean']:+.2f} ({', '.join(f'{x:+.1f}' for x in g['per_seed'].values())})")
        w = r["weakest_on_mean"]
        moved = f"{w['class']} {w['supervised']:.1f} → " + " / ".join("" if w.get(m) is None else f"{w[m]:.1f}" for m in methods)
        lines.append(f"| {r['file']} | {r['version']} | {r['labeled']} | {r['iters']} | {','.join(map(str, r['seeds']))} | {r['n_val']} | {r['supervised']:.2f} | {weak} | "
                     + " | ".join(cells) + f" | {moved} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+", help="JSON written by bench/demo_seeds.py --json")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    a = ap.parse_args()
    rows = [row(p) for p in a.files]
    print(markdown(rows))
    if a.json is not None:
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
