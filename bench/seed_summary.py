"""Aggregate per-seed comparisons (`compare_runs.py --out` files, one per seed) into paired gaps.

    python bench/seed_summary.py bench/results/camvid_u2pl_cpu_1200.json \
        bench/results/camvid_u2pl_cpu_1200_s1.json ... [--base supervised] [--out summary.json]

Runs are matched across files by their label (the run folder's name); the gap of each run to the
base run is taken within a file (same seed, same init), then averaged over the files that have
both. Prints mIoU per seed, mean and standard deviation, the mean paired gap with its standard
error (standard deviation of the paired gaps over the square root of their number), the seeds
won, the two-sided p-value of an exact sign-flip permutation test of the mean gap (how often the
2^n sign patterns of the gaps give a mean at least as far from zero), and the mean paired gap per
class.

`--markdown` prints the same as Markdown tables for docs/benchmarks.md (mIoU per seed, mean,
mean paired gap ± se, seeds won, p; then the mean IoU per class and run); `--test FILES...` adds
the held-out split's files of the same seeds, in the same order, so every cell reads "val / test".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _name(label: str) -> str:
    # compare_runs labels are "method (folder)"; the folder names the run.
    return label.rsplit("(", 1)[-1].rstrip(")") if "(" in label else label


def sign_flip_p(gaps: list[float]) -> float | None:
    """Two-sided exact paired permutation test: the share of the 2^n sign flips of the gaps whose
    mean is at least as far from 0 as the observed one (None for fewer than two gaps)."""
    if len(gaps) < 2:
        return None
    observed = abs(sum(gaps)) - 1e-9
    hits = sum(
        abs(sum(-g if flips >> i & 1 else g for i, g in enumerate(gaps))) >= observed
        for flips in range(2 ** len(gaps))
    )
    return hits / 2 ** len(gaps)


def summarise(files: dict[str, dict], base: str) -> dict:
    seeds = list(files)
    runs: dict[str, dict[str, dict]] = {}
    for seed, data in files.items():
        for r in data["runs"]:
            runs.setdefault(_name(r["label"]), {})[seed] = r
    if base not in runs:
        raise SystemExit(f"no run named {base!r} in {', '.join(seeds)}; pick one of {', '.join(runs)} with --base")
    out: dict[str, dict] = {}
    for name, by_seed in runs.items():
        miou = {s: 100 * r["mIoU"] for s, r in by_seed.items()}
        paired = [s for s in by_seed if s in runs[base]]
        gaps = {s: miou[s] - 100 * runs[base][s]["mIoU"] for s in paired}
        classes = list(next(iter(by_seed.values()))["per_class"])
        class_gap = {
            c: statistics.fmean(
                100 * (by_seed[s]["per_class"][c]["IoU"] - runs[base][s]["per_class"][c]["IoU"]) for s in paired
            )
            for c in classes
        } if paired else {}
        vals = list(miou.values())
        out[name] = {
            "mIoU": miou,
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "gap": gaps,
            "mean_gap": statistics.fmean(gaps.values()) if gaps else None,
            "gap_se": statistics.stdev(gaps.values()) / len(gaps) ** 0.5 if len(gaps) > 1 else None,
            "wins": sum(g > 0 for g in gaps.values()),
            "p_sign_flip": sign_flip_p(list(gaps.values())) if name != base else None,
            "mean_class_gap": class_gap,
        }
    per_class_mean = {
        name: {c: statistics.fmean(100 * r["per_class"][c]["IoU"] for r in by_seed.values())
               for c in next(iter(by_seed.values()))["per_class"]}
        for name, by_seed in runs.items()
    }
    return {"base": base, "seeds": seeds, "runs": out, "per_class_mean": per_class_mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--base", default="supervised", help="the run every gap is taken against")
    ap.add_argument("--out", type=Path, help="also write the summary as JSON")
    ap.add_argument("--test", nargs="+", type=Path, help="the same seeds' test-split files, for --markdown")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables instead")
    args = ap.parse_args()
    files = {p.stem: json.loads(p.read_text()) for p in args.files}
    summary = summarise(files, args.base)
    if args.out:
        write_json(args.out, summary)
    if args.markdown:
        test = None
        if args.test:
            if len(args.test) != len(args.files):
                raise SystemExit(f"--test: {len(args.test)} files for {len(args.files)} seeds; give one per seed, in the same order")
            test = summarise({p.stem: json.loads(p.read_text()) for p in args.test}, args.base)
        print(markdown(summary, test))
        return
    seeds = summary["seeds"]
    table = Table(title=f"mIoU per seed, paired gap to {args.base}")
    table.add_column("run")
    common = os.path.commonprefix(seeds) if len(seeds) > 1 else ""
    common = common[: common.rfind("_") + 1]  # cut at a "_": "1200", "1200_s1", ...
    for s in seeds:  # headers without the file names' common prefix
        table.add_column(s[len(common):] or s, justify="right")
    for col in ("mean ± std", "mean gap ± se", "wins", "p"):
        table.add_column(col, justify="right")
    for name, r in summary["runs"].items():
        cells = [f"{r['mIoU'][s]:.2f}" if s in r["mIoU"] else "-" for s in seeds]
        gap = "" if name == args.base or r["mean_gap"] is None else f"{r['mean_gap']:+.2f}"
        if gap and r["gap_se"] is not None:
            gap += f" ± {r['gap_se']:.2f}"
        wins = "" if name == args.base else f"{r['wins']}/{len(r['gap'])}"
        p = "" if r["p_sign_flip"] is None else f"{r['p_sign_flip']:.3f}"
        table.add_row(name, *cells, f"{r['mean']:.2f} ± {r['std']:.2f}", gap, wins, p)
    console = Console()
    console.print(table)
    for name, r in summary["runs"].items():
        if name != args.base and r["mean_class_gap"]:
            parts = ", ".join(f"{c} {g:+.1f}" for c, g in r["mean_class_gap"].items())
            console.print(f"{name}, mean class IoU gap: {parts}")


def write_json(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)


def markdown(val: dict, test: dict | None = None) -> str:
    """Markdown tables of `summarise` results: per seed, mean and paired gap; then per class.
    With `test` (the same seeds on the held-out split) every cell is "val / test"."""
    seeds, base = val["seeds"], val["base"]
    tseeds = test["seeds"] if test else []

    def both(fmt: str, v: float | None, t: float | None = None) -> str:
        a = "—" if v is None else format(v, fmt)
        return a if test is None else f"{a} / {'—' if t is None else format(t, fmt)}"

    def gap(x: dict | None) -> str:
        if x is None or x["mean_gap"] is None:
            return "—"
        return f"{x['mean_gap']:+.2f}" + (f" ± {x['gap_se']:.2f}" if x["gap_se"] is not None else "")

    head = ["run", *[f"seed {i}" for i in range(len(seeds))], "mean", f"mean paired gap to {base} ± se", "ahead on", "p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in val["runs"].items():
        t = test["runs"].get(name) if test else None
        cells = [both(".2f", r["mIoU"].get(s), t["mIoU"].get(ts) if t else None) for s, ts in zip(seeds, tseeds or seeds)]
        n = len(r["mIoU"])
        mean = both(".2f", r["mean"], t["mean"] if t else None) + ("" if n == len(seeds) else f" ({n} seed{'s' * (n > 1)})")
        if name == base:
            gaps = wins = p = ""
        else:
            gaps = gap(r) + (f" / {gap(t)}" if test else "")
            wins = f"{r['wins']}/{len(r['gap'])}" + (f" / {t['wins']}/{len(t['gap'])}" if t else "")
            p = both(".3f", r["p_sign_flip"], t["p_sign_flip"] if t else None) if r["p_sign_flip"] is not None else ""
        lines.append("| " + " | ".join([name, *cells, mean, gaps, wins, p]) + " |")
    # Mean IoU per class and run (over the seeds it has), val.
    classes = list(next(iter(val["per_class_mean"].values())))
    lines += ["", "| class | " + " | ".join(val["runs"]) + " |", "|" + "---|" * (len(val["runs"]) + 1)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{val['per_class_mean'][n][c]:.1f}" for n in val["runs"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
