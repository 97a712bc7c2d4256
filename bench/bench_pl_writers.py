"""Throughput of the pseudo-label writer stage, and of the whole dump against pure inference.

    python bench/bench_pl_writers.py                      # writer stage at 512x512 and 1024x2048, CPU end to end
    python bench/bench_pl_writers.py --tiny               # smoke run (seconds, numbers meaningless)
    python bench/bench_pl_writers.py --device cuda --e2e-size 512 --e2e-images 96 --batch-size 8 --workers 4

Part 1, the writer stage alone. Synthetic images shaped like a network's output (logits at 1/8
resolution, upsampled bilinearly, softmax; a mix of confident and unsure ones) become quantised
arrays through the real device code (`quantise.pixel_outputs`, run on the CPU before the clock
starts), with every output on: labels, train_labels (a stored encoding, as for Cityscapes),
confidence, entropy, overlays and records. `writer.Writer` then writes them as the runner does:
- `--writers 0`: encoded and written in this process, one core: the per-worker cost;
- 1 and N writer processes fed by this process (images/s from the first submit to the last file
  written, and this process's own CPU time per image: the copy into shared memory and the
  record, i.e. what one main process can feed).
Map encodings: stored 16-bit PNGs (the default, `--map-compression 0`), Pillow at level 1 (the
files of earlier versions) and npz. Files go to `--dir` (default: a temporary folder), every
image under a new name as in a real dump (replacing existing files is much slower on ext4,
which flushes a file renamed over another), and are deleted after each run.

This module imports torch only inside functions: writer processes (spawned) import the main
module again, and the CLI's writers do not hold torch either.

The per-worker rate gives the writers needed for the H200's measured inference rates (96 img/s
at 513x513 for ResNet-101, ~500 img/s for the CamVid MobileNetV2): ceil(rate / per-worker rate),
per size (Mpx/s per worker scales it to other sizes).

Part 2, end to end (`--no-e2e` skips it): `semiseg pseudo-label` against pure inference on the
same checkpoint and images (`bench_pseudo_label.pure_inference`: the same loader feeding the
model, nothing written), with the default writers, with `--writers 0`, and with Pillow maps.
Best of `--repeats` interleaved runs. A table and bench/results/pl_writers_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semiseg_cli.pseudo_label.folder import output_paths  # noqa: E402
from semiseg_cli.pseudo_label.quantise import host_arrays, pixel_outputs  # noqa: E402
from semiseg_cli.pseudo_label.stats import image_numbers  # noqa: E402
from semiseg_cli.pseudo_label.writer import Writer, default_writers, overlay_colours  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"R101 513x513 (H200)": 96.0, "CamVid MobileNetV2 (H200)": 500.0}
NUM_CLASSES = 19


def synthetic_images(h: int, w: int, n: int, fmt: str, seed: int = 0) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """`n` images of (host arrays, record numbers), made by the real per-pixel code."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    palette = [tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g)) for _ in range(NUM_CLASSES)]
    colours = torch.from_numpy(overlay_colours(palette))
    encoding = torch.full((256,), 255, dtype=torch.uint8)
    encoding[:NUM_CLASSES] = torch.arange(7, 7 + NUM_CLASSES, dtype=torch.uint8)
    out = []
    for i in range(n):
        scale = (3.0, 8.0, 20.0)[i % 3]  # unsure to confident
        logits = torch.randn(1, NUM_CLASSES, max(1, h // 8), max(1, w // 8), generator=g) * scale
        probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
        rgb = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=g)
        arrays, counts = pixel_outputs(probs, NUM_CLASSES, fmt, drop_percent=20.0, encoding=encoding, rgb=rgb, colours=colours)
        host = host_arrays(arrays)
        numbers = image_numbers({k: v.numpy() for k, v in counts.items()}, 0, False)
        out.append(({k: np.ascontiguousarray(a[0]) for k, a in host.items()}, numbers))
    return out


def run_writer(images: list[tuple[dict[str, np.ndarray], dict[str, Any]]], n_jobs: int, writers: int, fmt: str,
               level: int, folder: Path) -> dict[str, Any]:
    """Write `n_jobs` images (cycling over `images`) with `writers` processes; throughput and costs."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    palette = [(i, i, i) for i in range(NUM_CLASSES)]
    h, w = images[0][0]["label"].shape
    writer = Writer(folder, fmt, palette, writers, level)
    if writer.pool is not None:  # let the processes start before the clock does
        a0, n0 = images[0]
        stem = "warm/0"
        writer.submit(-1, stem, {"image": stem, "files": output_paths(stem, fmt, True, True), **n0}, a0)
        writer.drain()
    t, c = time.perf_counter(), time.process_time()
    try:
        for j in range(n_jobs):
            arrays, numbers = images[j % len(images)]
            stem = f"img/{j:06d}"
            rec = {"image": f"{stem}.png", "mask": None, "files": output_paths(stem, fmt, True, True), "size": [h, w], **numbers}
            writer.submit(j, stem, rec, arrays)
        writer.drain()
        wall, cpu = time.perf_counter() - t, time.process_time() - c  # to the last file written
    finally:
        writer.close()
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.parts[-2] == "warm")
    shutil.rmtree(folder, ignore_errors=True)
    per_img_files = written / n_jobs
    return {"writers": writers, "images": n_jobs, "wall_s": wall, "images_per_s": n_jobs / wall,
            "parent_cpu_ms_per_image": 1000 * cpu / n_jobs, "parent_wait_s": writer.wait_s,
            "bytes_per_image": per_img_files, "peak_in_flight": writer.pool.peak_in_flight if writer.pool else 0}


def writer_stage(args: argparse.Namespace, work: Path, console: Console) -> list[dict[str, Any]]:
    rows = []
    n_list = sorted({1, *args.writers})
    for size in args.sizes:
        h, w = size
        base = max(8, int(args.images * 512 * 512 / (h * w))) if not args.tiny else 8
        for label, fmt, level in (("png (stored maps)", "png", 0), ("png (Pillow maps, level 1)", "png", 1), ("npz", "npz", 0)):
            if label != "png (stored maps)" and args.only_default:
                continue
            images = synthetic_images(h, w, 4 if args.tiny else 6, fmt)
            for writers in [0, *n_list]:
                # inline and 1 process: enough images for a few seconds; N processes: N times more
                n_jobs = base * max(1, writers) if writers > 1 else base
                r = run_writer(images, n_jobs, writers, fmt, level, work / "writers")
                r.update({"size": f"{h}x{w}", "pixels": h * w, "maps": label})
                r["mpx_per_s"] = r["images_per_s"] * h * w / 1e6
                rows.append(r)
                console.print(f"  {h}x{w} {label:28s} writers {writers}: {r['images_per_s']:8.1f} img/s "
                              f"({r['parent_cpu_ms_per_image']:.2f} ms parent CPU per image)")
    return rows


def needed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size (default maps): the per-worker rate (1 process), the scaling to N, the workers
    each target rate needs."""
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        sel = [r for r in rows if r["size"] == size and r["maps"] == "png (stored maps)"]
        one = next(r for r in sel if r["writers"] == 1)
        inline = next(r for r in sel if r["writers"] == 0)
        top = max(sel, key=lambda r: r["writers"])
        per_worker = one["images_per_s"]
        entry = {"size": size, "per_worker_images_per_s": per_worker, "inline_images_per_s": inline["images_per_s"],
                 "per_worker_mpx_per_s": one["mpx_per_s"], "max_writers_measured": top["writers"],
                 "images_per_s_at_max": top["images_per_s"],
                 "scaling_efficiency": top["images_per_s"] / (top["writers"] * per_worker) if top["writers"] > 1 else 1.0,
                 "parent_cpu_ms_per_image": one["parent_cpu_ms_per_image"],
                 "parent_limit_images_per_s": 1000 / max(one["parent_cpu_ms_per_image"], 1e-6),
                 "workers_needed": {k: math.ceil(v / per_worker) for k, v in TARGETS.items()}}
        out.append(entry)
    return out


def end_to_end(args: argparse.Namespace, work: Path, device: Any, console: Console) -> dict[str, Any]:
    from bench_pseudo_label import cpu_seconds, make_demo_checkpoint, pure_inference

    from semiseg_cli.pseudo_label import PseudoLabelSettings, run_pseudo_label

    if args.checkpoint is not None:
        ckpt, root, split = args.checkpoint, args.root, args.split or "val"
    elif (work / "run" / "best.pt").is_file():
        ckpt, root, split = work / "run" / "best.pt", work / "demo", args.split or "train"
    else:
        ckpt, root = make_demo_checkpoint(work, args.e2e_images, args.e2e_size, args.train_iters, console)
        split = args.split or "train"
    variants: dict[str, dict[str, Any]] = {
        "png --overlays": {"overlays": True},
        "png --overlays --writers 0": {"overlays": True, "writers": 0},
        "png --overlays --map-compression 1": {"overlays": True, "map_compression": 1},
        "png --drop-percent 20": {"drop_percent": 20.0},
    }
    best: dict[str, dict[str, Any]] = {}
    base = base_cpu = float("inf")
    for _ in range(args.repeats):
        wall, cpu = pure_inference(ckpt, split, root, device, args.batch_size, args.workers)
        base, base_cpu = min(base, wall), min(base_cpu, cpu)
        for name, kw in variants.items():
            s = PseudoLabelSettings(batch_size=args.batch_size, workers=args.workers, **kw)
            c = cpu_seconds()
            r = run_pseudo_label(ckpt, split, work / "pl" / name.replace(" ", "_"), root=root, settings=s,
                                 device=str(device), overwrite=True)
            rec = {"variant": name, "images": r.processed, "loop_s": r.seconds, "cpu_s": cpu_seconds() - c,
                   "writers": r.writers, "writer_wait_s": r.writer_wait_s}
            if name not in best or rec["loop_s"] < best[name]["loop_s"]:
                best[name] = rec
    n = next(iter(best.values()))["images"]
    for r in best.values():
        r["ratio"] = r["loop_s"] / base
    return {"checkpoint": "demo (trained here)" if args.checkpoint is None else str(args.checkpoint),
            "image_size": args.e2e_size if args.checkpoint is None else None, "images": n, "batch_size": args.batch_size,
            "workers": args.workers, "pure_inference_s": base, "pure_inference_cpu_s": base_cpu,
            "pure_inference_images_per_s": n / base, "variants": list(best.values()), "goal_ratio": 1.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512x512,1024x2048", help="HxW of the writer stage, comma-separated")
    ap.add_argument("--images", type=int, default=200, help="images per writer-stage run at 512x512 (scaled by pixels)")
    ap.add_argument("--writers", default=None, help="process counts besides 1, comma-separated (default: default_writers())")
    ap.add_argument("--only-default", action="store_true", help="stored maps only (skip Pillow maps and npz)")
    ap.add_argument("--dir", type=Path, default=None, help="write the files here (default: a temporary folder)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end comparison")
    ap.add_argument("-c", "--checkpoint", type=Path, default=None, help="end to end: a checkpoint (default: train one on demo data)")
    ap.add_argument("--split", default=None)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--e2e-images", type=int, default=40)
    ap.add_argument("--e2e-size", type=int, default=128)
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (end to end)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--work", type=Path, default=None, help="end to end: keep data and checkpoint here and reuse them")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 64x64 and 96x160, 8 images, tiny end to end")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from semiseg_cli.engine.device import resolve_device

    console = Console(stderr=True)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.sizes, args.only_default, args.repeats = "64x64,96x160", True, 1
        args.e2e_images, args.e2e_size, args.train_iters, args.batch_size = 6, 64, 2, 2
    args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    args.writers = [int(v) for v in args.writers.split(",")] if args.writers else [default_writers()]

    with tempfile.TemporaryDirectory(prefix="bench_plw_") as tmp:
        folder = args.dir or Path(tmp)
        console.print("writer stage")
        rows = writer_stage(args, folder, console)
        e2e = None
        if not args.no_e2e:
            console.print("end to end")
            e2e = end_to_end(args, args.work or Path(tmp) / "e2e", device, console)
        if args.dir is not None:
            shutil.rmtree(folder / "writers", ignore_errors=True)
    summary = needed(rows)

    wide = Console(width=max(Console().width, 120))
    t = Table(title=f"writer stage: images/s, every output on ({os.cpu_count()} cores)")
    for col in ("size", "maps", "writers", "images/s", "Mpx/s", "parent CPU ms/img", "MB/img", "peak in flight"):
        t.add_column(col, justify="left" if col in ("size", "maps") else "right")
    for r in rows:
        t.add_row(r["size"], r["maps"], "this process" if r["writers"] == 0 else str(r["writers"]), f"{r['images_per_s']:.1f}",
                  f"{r['mpx_per_s']:.1f}", f"{r['parent_cpu_ms_per_image']:.2f}", f"{r['bytes_per_image'] / 1e6:.2f}",
                  str(r["peak_in_flight"]))
    wide.print(t)
    t = Table(title="writers needed (stored maps, every output on; per-worker rate = 1 writer process)")
    for col in ("size", "per worker img/s", "scaling at N", *TARGETS, "main process limit img/s"):
        t.add_column(col, justify="left" if col == "size" else "right")
    for s in summary:
        t.add_row(s["size"], f"{s['per_worker_images_per_s']:.1f}", f"{s['scaling_efficiency']:.2f} (N={s['max_writers_measured']})",
                  *[str(s["workers_needed"][k]) for k in TARGETS], f"{s['parent_limit_images_per_s']:.0f}")
    wide.print(t)
    if e2e is not None:
        t = Table(title=f"end to end, {e2e['images']} images, {device.type}, batch {e2e['batch_size']}: pseudo-label vs pure inference")
        for col in ("variant", "writers", "images/s", "loop s", "x pure", "blocked on writers s"):
            t.add_column(col, justify="left" if col == "variant" else "right")
        t.add_row("pure inference", "", f"{e2e['pure_inference_images_per_s']:.2f}", f"{e2e['pure_inference_s']:.2f}", "1.00", "")
        for r in e2e["variants"]:
            t.add_row(r["variant"], str(r["writers"]), f"{r['images'] / r['loop_s']:.2f}", f"{r['loop_s']:.2f}", f"{r['ratio']:.2f}",
                      f"{r['writer_wait_s']:.2f}")
        t.caption = f"goal: within {e2e['goal_ratio']}x; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        wide.print(t)
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "tiny": args.tiny, "load_average_end": list(os.getloadavg()),
        "targets_images_per_s": TARGETS, "writer_stage": rows, "writers_needed": summary, "end_to_end": e2e,
    }
    out = args.out or RESULTS / f"pl_writers_{device.type}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
