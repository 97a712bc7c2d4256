"""FLOPs of one training step, achieved TFLOP/s and its share of the device's peak, per method at
its VOC preset, before and after each speed switch; peak memory per image; and the largest
per-GPU batch of the 16+16 U2PL recipe that fits a memory budget.

- FLOPs: one eager step of the plain variant under `torch.utils.flop_counter.FlopCounterMode`,
  forward and backward (teacher passes included). It counts the operators torch has formulas
  for (convolutions, matrix products, attention): the network passes. Elementwise work, norms,
  losses and the optimizer step are not counted, so achieved TFLOP/s is the network's rate.
- Step time: median of `--steps` steps after `--warmup` (synthetic batches of the preset's crop
  and batch, the step index past every warm-up), as bench_train_step.py times it.
- Variants, cumulative, in `--variants` order: `plain` (every switch off, the optimizer as torch
  steps it by default: foreach on CUDA, the loop on a CPU; the configuration of the GPU figures
  measured before the switches existed), `channels_last`, `cudnn_benchmark`, `fused`
  (optim.impl = "fused"), `compile` (opt-in: compiling a ResNet-101 step takes minutes). Each
  row gives its speed-up over the row before and over plain.
- Memory (CUDA): `torch.cuda.max_memory_allocated` over one step of each variant, per image of
  the step; and for U2PL with the eager switches of `--variants` at `--fit-batches` per-GPU
  batches (B labeled + B unlabeled), a linear fit of peak memory against B, solved for 90 % of
  `--budget-gib` (the rest for the CUDA context, workspaces outside the allocator and its
  fragmentation): the largest B that fits, and the gradient accumulation the 16+16 recipe then
  needs on one GPU.

    python bench/bench_flops.py --device cuda --peak-tflops 989              # the VOC presets
    python bench/bench_flops.py --device cuda --methods u2pl --variants plain,channels_last,cudnn_benchmark,fused,compile
    python bench/bench_flops.py --device cpu --tiny                          # smoke test, seconds

`--tiny` shrinks every preset for a CPU (ResNet-18, 64x64 crops, 2+2 images, small heads and
U2PL queues, one timed step): it checks the script, not the numbers. `METHOD@PRESET` in
`--methods` times a method at another preset. The table is printed and the JSON
(bench/results/flops_voc_<device>[_tiny].json, or --out) is rewritten after every row, so a run
stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import Runner  # noqa: E402
from semiseg_cli.engine.device import resolve_device  # noqa: E402

VOC_PRESETS = {
    "supervised": "supervised_r101-os8_4x4-80e_voc-classic-513",
    "u2pl": "u2pl_r101-os8_4x4+4-80e_voc-classic-513",
    "unimatch": "unimatch_r101-os16_4x2+2-80e_voc-classic-321",
    "advsemiseg": "advsemiseg_r101-os8_1x10+10-20k_voc-blender-321",
}
COMMON = ["model.pretrained=none"]
# Cumulative: each variant is the one before plus its switch.
SWITCHES = {  # "plain" also sets optim.impl to torch's own default for the device (main)
    "plain": ["train.channels_last=false", "train.cudnn_benchmark=false", "train.compile=false"],
    "channels_last": ["train.channels_last=true"],
    "cudnn_benchmark": ["train.cudnn_benchmark=true"],
    "fused": ['optim.impl="fused"'],
    "compile": ["train.compile=true"],
}
TINY = [
    'model.backbone="resnet18"', "model.deep_stem=false", "model.multi_grid=none", "model.output_stride=16",
    "model.aspp_dilations=none", "model.rep_dim=16", "data.crop_size=[64, 64]", "data.batch_size=2",
    "data.unlabeled_batch_size=2",
    "u2pl.queue_size=64", "u2pl.queue_size_background=96", "u2pl.num_queries=8", "u2pl.num_negatives=4",
]
TINY_V3 = ["model.aspp_channels=32", "model.decoder_channels=32", "model.low_proj_channels=16"]  # DeepLabv3+ only
# Dense bf16 tensor-core peaks from the vendor's spec sheets (without sparsity), TFLOP/s, for the
# SXM parts; PCIe/NVL cards run lower clocks: pass --peak-tflops for those.
KNOWN_PEAKS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "A100-SXM": 312.0}


def tiny(preset: str, args: argparse.Namespace) -> list[str]:
    if not args.tiny:
        return []
    from semiseg_cli.config import build_config

    return TINY + (TINY_V3 if build_config(preset).model.arch == "deeplabv3plus" else [])


def count_flops(runner: Runner) -> int:
    """FLOPs of one training step of `runner` (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        runner.run(record=False)
    return int(fc.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_of_step(runner: Runner) -> tuple[float, float] | None:
    """MiB allocated and reserved (the allocator's cache) at the peak of one step (CUDA), after
    the warm-up allocated the optimizer state."""
    if runner.device.type != "cuda":
        return None
    sync(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.run(record=False)
    return torch.cuda.max_memory_allocated(runner.device) / 2**20, torch.cuda.max_memory_reserved(runner.device) / 2**20


def time_runner(runner: Runner, steps: int, warmup: int) -> None:
    for _ in range(warmup):
        runner.run(record=False)
    for _ in range(steps):
        runner.run(record=True)


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str | None]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS.items():
            if key in name and not any(t in name for t in ("PCIe", "NVL")):
                return value, f"{key} dense bf16 (spec sheet)"
    return None, None


def ladder(method: str, preset: str, args: argparse.Namespace, device: torch.device, nc: int, out: dict[str, Any],
           write: Any) -> None:
    """Every variant of one method, one after another; rows appended to out["rows"]."""
    base = [*COMMON, *tiny(preset, args), *args.overrides]
    switches: list[str] = []
    flops: int | None = None
    first_s: float | None = None
    prev_s: float | None = None
    peak = out["meta"]["peak_tflops"]
    for variant in args.variants:
        switches = [*switches, *SWITCHES[variant]]
        row: dict[str, Any] = {"method": method, "preset": preset, "variant": variant}
        t0 = time.perf_counter()
        try:
            runner = Runner(method, preset, [*base, *switches], nc, device, args.at_step)
            if flops is None:  # the plain variant's eager step: the same arithmetic for every variant
                runner.run(record=False)  # optimizer state and any lazy buffers first
                flops = count_flops(runner)
            time_runner(runner, args.steps, args.warmup)
            med = statistics.median(runner.times)
            peaks = peak_of_step(runner)
            mem = peaks[0] if peaks else None
            row.update({
                "speed_switches": runner.switches(),
                "compiled": None if runner.compiled is None else runner.compiled.active,
                "images_per_step": runner.images,
                "step_s_median": round(med, 4), "step_s_min": round(min(runner.times), 4),
                "speedup_vs_previous": round(prev_s / med, 3) if prev_s else None,
                "speedup_vs_plain": round(first_s / med, 3) if first_s else None,
                "tflop_per_step": round(flops / 1e12, 4),
                "achieved_tflops": round(flops / med / 1e12, 3),
                "share_of_peak": round(flops / med / 1e12 / peak, 4) if peak else None,
                "peak_mem_mib": round(mem, 1) if mem is not None else None,
                "peak_mem_mib_per_image": round(mem / runner.images, 1) if mem is not None else None,
                "setup_and_timing_s": round(time.perf_counter() - t0, 1),
            })
            prev_s = med
            first_s = first_s or med
            del runner
        except Exception as e:  # noqa: BLE001 - one variant failing (e.g. out of memory) leaves the others
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        free(device)
        out["rows"].append(row)
        write()
        print(json.dumps(row), flush=True)


def memory_fit(args: argparse.Namespace, device: torch.device, nc: int) -> dict[str, Any]:
    """Peak memory of the U2PL step at several per-GPU batches, a linear fit, the largest
    batch under the budget and the accumulation the 16+16 recipe needs at it."""
    preset = VOC_PRESETS["u2pl"]
    if device.type != "cuda":
        return {"preset": preset, "result": "needs CUDA"}
    switches: list[str] = []
    for v in args.variants:
        if v != "compile":  # memory of the eager step: compile changes it little and costs minutes
            switches += SWITCHES[v]
    points = []
    for b in args.fit_batches:
        try:
            r = Runner("u2pl", preset, [*COMMON, *tiny(preset, args), *args.overrides, *switches,
                                        f"data.batch_size={b}", f"data.unlabeled_batch_size={b}"], nc, device, args.at_step)
            r.run(record=False)
            alloc, reserved = peak_of_step(r) or (0.0, 0.0)
            points.append({"batch_per_side": b, "images": 2 * b, "peak_mib": round(alloc, 1), "reserved_mib": round(reserved, 1)})
            del r
        except Exception as e:  # noqa: BLE001 - out of memory above some batch: the fit uses the others
            points.append({"batch_per_side": b, "images": 2 * b, "peak_mib": None,
                           "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"})
        free(device)
        print(json.dumps(points[-1]), flush=True)
    ok = [(p["batch_per_side"], p["peak_mib"]) for p in points if p.get("peak_mib")]
    res: dict[str, Any] = {"preset": preset, "switches": switches, "points": points, "budget_gib": args.budget_gib}
    if len(ok) < 2:
        res["result"] = "fewer than two batches measured"
        return res
    n = len(ok)
    mx = sum(b for b, _ in ok) / n
    my = sum(m for _, m in ok) / n
    slope = sum((b - mx) * (m - my) for b, m in ok) / sum((b - mx) ** 2 for b, _ in ok)
    fixed = my - slope * mx
    # 90 % of the budget: the CUDA context, cuDNN/NCCL workspaces outside the allocator and its
    # fragmentation (see reserved_mib against peak_mib) need the rest.
    budget = args.budget_gib * 1024 * 0.9
    b_max = math.floor((budget - fixed) / slope) if slope > 0 else None
    res.update({
        "fit": f"peak MiB = {fixed:.0f} + {slope:.0f} x B (B labeled + B unlabeled per GPU)",
        "fixed_mib": round(fixed, 1), "mib_per_batch_step": round(slope, 1), "mib_per_image": round(slope / 2, 1),
        "largest_batch_per_side": b_max, "largest_batch_rule": f"fit <= 90% of {args.budget_gib:g} GiB allocated",
        "largest_batch_per_side_at_100pct": math.floor((args.budget_gib * 1024 - fixed) / slope) if slope > 0 else None,
    })
    if b_max:
        # 16 + 16 images a step on one GPU: the fewest micro-batches of equal size that fit.
        accum = next((k for k in range(1, 17) if 16 % k == 0 and 16 // k <= b_max), None)
        res["recipe_16_16_one_gpu"] = ({"grad_accum": accum, "micro_batch": f"{16 // accum}+{16 // accum}",
                                        "predicted_peak_mib": round(fixed + slope * 16 / accum, 1)}
                                       if accum else "does not fit even at 1+1")
    return res


def print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["method", "variant", "step_s_median", "speedup_vs_previous", "speedup_vs_plain", "tflop_per_step",
            "achieved_tflops", "share_of_peak", "peak_mem_mib_per_image"]
    meta = out["meta"]
    table = Table(title=f"training step FLOPs and rate on {meta['device']} ({meta['gpu'] or 'CPU'}), "
                        f"peak {meta['peak_tflops'] or '?'} TFLOP/s")
    for c in cols:
        table.add_column(c, justify="right")
    for r in out["rows"]:
        if "error" in r:
            table.add_row(r["method"], r["variant"], "failed", *[""] * (len(cols) - 3))
        else:
            table.add_row(*[str(r.get(c)) for c in cols])
    Console(width=max(160, Console().width)).print(table)
    fit = out.get("memory_fit")
    if fit:
        print("memory, U2PL 16+16 recipe:", json.dumps({k: v for k, v in fit.items() if k != "points"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="supervised,u2pl,unimatch,advsemiseg", help="METHOD or METHOD@PRESET, comma-separated")
    ap.add_argument("--variants", default="plain,channels_last,cudnn_benchmark,fused", help=f"cumulative, of {', '.join(SWITCHES)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--at-step", type=int, default=100000, help="step index passed to methods (past warm-ups)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the share (default: known GPUs)")
    ap.add_argument("--fit-batches", default="2,4,8", help="per-GPU batches (B+B) of the U2PL memory fit; empty: skip")
    ap.add_argument("--budget-gib", type=float, default=80.0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny networks and crops, one timed step")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in SWITCHES]
    if bad or not args.variants or args.variants[0] != "plain":
        ap.error(f"--variants: a comma-separated list starting with plain, of {', '.join(SWITCHES)} (got {bad or args.variants})")
    args.fit_batches = [int(b) for b in args.fit_batches.split(",") if b.strip()]
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 1), min(args.warmup, 1)
    device = resolve_device(args.device)
    SWITCHES["plain"] = [*SWITCHES["plain"], f'optim.impl="{"foreach" if device.type == "cuda" else "plain"}"']
    peak, peak_src = peak_tflops(args, device)
    entries = []
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method, _, preset = spec.partition("@")
        entries.append((method, preset or VOC_PRESETS[method]))
    tag = "_tiny" if args.tiny else ""
    path = args.out or Path(__file__).parent / "results" / f"flops_voc_{device.type}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "meta": {
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "host": platform.node(), "tiny": args.tiny, "steps": args.steps,
            "warmup": args.warmup, "at_step": args.at_step, "overrides": [*COMMON, *args.overrides],
            "peak_tflops": peak, "peak_source": peak_src,
            "flops": "torch.utils.flop_counter.FlopCounterMode over one eager step of the plain variant (forward + backward; "
                     "convolutions, matrix products, attention; not elementwise work or the optimizer)",
            "peak_mem": "torch.cuda.max_memory_allocated over one step after the warm-up",
        },
        "rows": [],
    }

    def write() -> None:
        path.write_text(json.dumps(out, indent=2) + "\n")

    for method, preset in entries:
        nc = 21  # VOC
        print(f"== {method} at {preset}", flush=True)
        ladder(method, preset, args, device, nc, out, write)
    if args.fit_batches:
        print("== memory fit, U2PL", flush=True)
        out["memory_fit"] = memory_fit(args, device, 21)
        write()
    print_table(out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
