"""The demo's comparison over training seeds: supervised, U2PL and UniMatch on the built-in demo data,
each seed trained one run after the other, final weights (last.pt) evaluated on the demo's val split.

    python bench/demo_seeds.py [--seeds 0,1,2] [--json bench/results/demo_seeds.json]
    python bench/demo_seeds.py --tiny          # end-to-end at a tiny size (the test runs this)

Prints one table per seed and the mean, the gap of each method to the supervised run of the same
seed, whether it is ahead on every seed, the supervised baseline's weakest class, and the wall time
of each run; writes it all as JSON. The data, split and presets are those of `make demo` (the
Makefile's variables) unless overridden; a finished run (its eval.json exists) is reused, so a killed
bench continues where it stopped.

Targets (issue #19): best semi-supervised method >= supervised + 5 mIoU and U2PL >= supervised + 2,
both on the mean of 3 seeds and on each seed; supervised >= 30 IoU on every class.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
# What `make demo` trains (keep in step with the Makefile).
METHODS = {
    "supervised": "supervised_r18-os16_1x8-800it_demo-64",
    "u2pl": "u2pl_r18-os16_1x8+8-800it_demo-64",
    "unimatch": "unimatch_r18-os16_1x8+8-800it_demo-64",
}
TARGETS = {"unimatch": 5.0, "u2pl": 2.0}
MIN_CLASS_IOU = 30.0


def sh(args: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        r = subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(args)}; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/demo-seeds"), help="run folders (and data, splits)")
    ap.add_argument("--json", type=Path, default=None, help="write the results (default: bench/results/demo_seeds.json)")
    ap.add_argument("--n-train", type=int, default=None, help="demo-data --n-train (default: the generator's)")
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--version", type=int, default=None, help="demo-data --version (default: the generator's)")
    ap.add_argument("--labeled", default=None, help="labeled fraction or count (default: make demo's)")
    ap.add_argument("--iters", type=int, default=None, help="override every preset's train.iters")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    ap.add_argument("--tiny", action="store_true", help="a few images and iterations: checks the bench runs end to end")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown (for docs/benchmarks.md)")
    a = ap.parse_args()
    py = sys.executable
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = {m: METHODS[m] for m in a.methods.split(",")}
    extra = list(a.sets)
    if a.tiny:
        a.n_train, a.n_val, a.size, a.iters = a.n_train or 24, a.n_val or 4, a.size or 48, a.iters or 4
        extra += ["data.crop_size=[32,32]", "data.batch_size=4", "data.unlabeled_batch_size=4", "train.val_interval=0", "train.ckpt_interval=2", "train.log_interval=2",
                  "u2pl.sup_only_iters=2", "data.workers=0", "eval.batch_size=4"]
    out = a.out if a.out.is_absolute() else REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    data, splits = out / "data", out / "splits"
    gen = [py, "-m", "semiseg_cli", "demo-data", "--out", str(data), "--overwrite"]
    for flag, v in (("--n-train", a.n_train), ("--n-val", a.n_val), ("--size", a.size), ("--version", a.version)):
        if v is not None:
            gen += [flag, str(v)]
    if not (data / "semiseg_demo.json").is_file():
        sh(gen, log)
    labeled = a.labeled or _make_var("DEMO_LABELED", "1/16")
    if not (splits / "labeled.txt").is_file():
        sh([py, "-m", "semiseg_cli", "prepare-splits", "--dataset", "demo", "--root", str(data), "--labeled", labeled,
            "--seed", "0", "--out", str(splits), "--overwrite"], log)

    results: dict[str, dict[str, dict]] = {}
    for seed in seeds:
        for m, preset in methods.items():
            run = out / f"s{seed}-{m}"
            report = run / "eval.json"
            if not report.is_file():
                args = [py, "-m", "semiseg_cli", "train", "--preset", preset, "--root", str(data),
                        "--labeled-list", str(splits / "labeled.txt"), "--out", str(run), "--seed", str(seed)]
                if m != "supervised":
                    args += ["--unlabeled-list", str(splits / "unlabeled.txt")]
                if a.iters is not None:
                    args += ["--iters", str(a.iters)]
                for kv in extra:
                    if kv.startswith("u2pl.") and m != "u2pl":
                        continue
                    args += ["--set", kv]
                resume = (run / "last.pt").is_file()
                args += ["--resume"] if resume else ["--overwrite"]
                t0 = time.perf_counter()
                sh(args, log)
                seconds = time.perf_counter() - t0
                sh([py, "-m", "semiseg_cli", "eval", "-c", str(run / "last.pt"), "--json", str(report), "--overwrite"], log)
                (run / "bench_time.json").write_text(json.dumps({"train_seconds": seconds, "resumed": resume}))
            r = json.loads(report.read_text())
            t = json.loads((run / "bench_time.json").read_text()) if (run / "bench_time.json").is_file() else {}
            results.setdefault(m, {})[str(seed)] = {
                "pseudo_labels": pseudo_label_stats(run / "metrics.jsonl"),
                "mIoU": 100 * r["mIoU"], "per_class": {k: (None if v["IoU"] is None else 100 * v["IoU"]) for k, v in r["per_class"].items()},
                "train_seconds": t.get("train_seconds"), "checkpoint": _repo_relative(r["checkpoint"]), "weights": r.get("weights"), "split": r["split"],
            }
    summary = summarise(results, seeds)
    show(results, summary, seeds)
    if a.markdown:
        print(markdown(results, summary, seeds))
    dest = a.json or (REPO / "bench/results" / ("demo_seeds_tiny.json" if a.tiny else "demo_seeds.json"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    payload = {"seeds": seeds, "presets": methods, "labeled": labeled, "iters": a.iters, "sets": extra,
               "data": json.loads((data / "semiseg_demo.json").read_text()), "runs": results, "summary": summary}
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, dest)
    Console().print(f"wrote {dest}")


# What the methods log about their pseudo-labels on the unlabeled images (which have masks here):
# accuracy of all pseudo-labels, of the ones trained on, and the share trained on.
PL_KEYS = ("pl_acc", "pl_acc_kept", "pl_acc_conf", "unsup_kept", "conf_frac")


def pseudo_label_stats(metrics: Path) -> dict[str, float]:
    """Mean of each PL_KEYS value over the second half of training (the first holds warm-ups)."""
    if not metrics.is_file():
        return {}
    recs = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    if not recs:
        return {}
    half = [r for r in recs if r["step"] > recs[-1]["step"] / 2]
    return {k: statistics.fmean(r[k] for r in half if k in r) for k in PL_KEYS if any(k in r for r in half)}


def _repo_relative(path: str) -> str:
    """A path inside the repository as seen from its root (results carry no machine paths)."""
    p = Path(path)
    return p.relative_to(REPO).as_posix() if p.is_absolute() and p.is_relative_to(REPO) else path


def _make_var(name: str, default: str) -> str:
    """A variable's value from the Makefile (`NAME ?= value`), so the bench follows `make demo`."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.replace(" ", "").startswith(f"{name}?="):
            return line.split("=", 1)[1].strip()
    return default


def summarise(results: dict[str, dict[str, dict]], seeds: list[int]) -> dict:
    sup = results.get("supervised", {})
    out: dict = {}
    if sup:
        worst = {s: min((v, k) for k, v in sup[str(s)]["per_class"].items() if v is not None) for s in seeds}
        out["supervised"] = {
            "mean": statistics.fmean(sup[str(s)]["mIoU"] for s in seeds),
            "weakest_class": {str(s): {"class": worst[s][1], "IoU": worst[s][0]} for s in seeds},
            "every_class_at_least": {"threshold": MIN_CLASS_IOU, "met": all(worst[s][0] >= MIN_CLASS_IOU for s in seeds)},
        }
    for m, per_seed in results.items():
        if m == "supervised" or not sup:
            continue
        gaps = [per_seed[str(s)]["mIoU"] - sup[str(s)]["mIoU"] for s in seeds]
        target = TARGETS.get(m)
        mean_gap = statistics.fmean(gaps)
        out[m] = {
            "mean": statistics.fmean(per_seed[str(s)]["mIoU"] for s in seeds), "gaps": gaps, "mean_gap": mean_gap,
            "ahead_on_every_seed": all(g > 0 for g in gaps), "target_gap": target,
            "target_met": None if target is None else (mean_gap >= target and all(g > 0 for g in gaps)),
        }
    return out


def markdown(results: dict[str, dict[str, dict]], summary: dict, seeds: list[int]) -> str:
    """The per-seed and per-class tables as Markdown."""
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gap to supervised: mean (per seed) | train s (mean) |"
    lines = [head, "|" + "---|" * (len(seeds) + 4)]
    for m, per_seed in results.items():
        info = summary.get(m, {})
        gap = f"{info['mean_gap']:+.2f} ({', '.join(f'{g:+.2f}' for g in info['gaps'])})" if "gaps" in info else ""
        secs = [per_seed[str(s)]["train_seconds"] for s in seeds if per_seed[str(s)]["train_seconds"] is not None]
        lines.append(f"| {m} | " + " | ".join(f"{per_seed[str(s)]['mIoU']:.2f}" for s in seeds)
                     + f" | {statistics.fmean(per_seed[str(s)]['mIoU'] for s in seeds):.2f} | {gap} | "
                     + (f"{statistics.fmean(secs):.0f}" if secs else "") + " |")
    classes = list(next(iter(next(iter(results.values())).values()))["per_class"])
    lines += ["", "| class (IoU, " + ", ".join(f"seed {s}" for s in seeds) + ") | " + " | ".join(results) + " |",
              "|" + "---|" * (len(results) + 1)]
    for c in classes:
        cells = []
        for per_seed in results.values():
            xs = [per_seed[str(s)]["per_class"][c] for s in seeds]
            cells.append(" / ".join("n/a" if x is None else f"{x:.1f}" for x in xs))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show(results: dict[str, dict[str, dict]], summary: dict, seeds: list[int]) -> None:
    console = Console()
    table = Table(title="demo: val mIoU of the final weights, per training seed")
    table.add_column("method")
    for s in seeds:
        table.add_column(f"seed {s}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("gap to supervised (per seed)", justify="right")
    table.add_column("target", justify="right")
    for m, per_seed in results.items():
        row = [m] + [f"{per_seed[str(s)]['mIoU']:.2f}" for s in seeds]
        row.append(f"{statistics.fmean(per_seed[str(s)]['mIoU'] for s in seeds):.2f}")
        info = summary.get(m, {})
        if "gaps" in info:
            row.append(f"{info['mean_gap']:+.2f} ({', '.join(f'{g:+.1f}' for g in info['gaps'])})")
            row.append("" if info["target_gap"] is None else f"+{info['target_gap']:.0f}: {'met' if info['target_met'] else 'missed'}")
        else:
            row += ["", ""]
        table.add_row(*row)
    console.print(table)
    classes = list(next(iter(next(iter(results.values())).values()))["per_class"])
    ct = Table(title="per-class IoU, mean over seeds")
    ct.add_column("class")
    for m in results:
        ct.add_column(m, justify="right")
    for c in classes:
        vals = []
        for m, per_seed in results.items():
            xs = [per_seed[str(s)]["per_class"][c] for s in seeds if per_seed[str(s)]["per_class"][c] is not None]
            vals.append(f"{statistics.fmean(xs):.1f}" if xs else "n/a")
        ct.add_row(c, *vals)
    console.print(ct)
    if "supervised" in summary:
        w = summary["supervised"]["weakest_class"]
        console.print("supervised weakest class per seed: " + ", ".join(f"seed {s}: {v['class']} {v['IoU']:.1f}" for s, v in w.items()))
    times = {m: [per_seed[str(s)]["train_seconds"] for s in seeds if per_seed[str(s)]["train_seconds"] is not None]
             for m, per_seed in results.items()}
    for m, per_seed in results.items():
        pl = [per_seed[str(s)].get("pseudo_labels", {}) for s in seeds]
        keys = sorted(set().union(*pl))
        if keys:
            console.print(f"{m} pseudo-labels, second half of training, per seed: " + "; ".join(
                f"{k} " + "/".join(f"{100 * d[k]:.1f}" for d in pl if k in d) for k in keys))
    console.print("train wall time (s, mean over seeds): " + ", ".join(f"{m} {statistics.fmean(v):.0f}" for m, v in times.items() if v))


if __name__ == "__main__":
    main()
