"""Training-loader throughput against the GPU step rate: samples/s of the labeled stream at the
CamVid and VOC presets, for several worker counts, with and without the decoded-image cache and
the JPEG draft decode, and the ratio to the H200 step times recorded in docs/benchmarks.md.

    OMP_NUM_THREADS=1 python bench/bench_loader.py --out bench/results/loader_cpu.json
    python bench/bench_loader.py --tiny                    # smoke test: synthetic VOC only, seconds

Scenarios (each the preset's own crop, scale range, flip, batch and data.resize, through
`build_dataset` + `infinite_loader`, i.e. exactly what `semiseg train` runs):
- `camvid`: `u2pl_mbv2-os16_1x4+4-300it_camvid-176x224` on the 367 CamVid train images
  (`$SEMISEG_SHARED/data/camvid`, default `<repo>/../shared`), PNGs at data.resize 0.5;
- `voc`: `u2pl_r101-os8_4x4+4-80e_voc-classic-513` on synthetic 500x375 JPEGs with palette masks
  written in the VOC layout to a temporary folder (VOC's own size; no VOC data needed);
- `photos` (not run by default): the generic preset's settings for large photos (data.resize 0.5,
  crop 512, batch 8) on synthetic 2048x1536 JPEGs, the case the JPEG draft is for.
The draft only applies where data.resize < 1 on JPEG files; the other scenarios show `n/a`.

Ratio = loader samples/s divided by the samples/s the GPU consumes: "labeled" against the labeled
batch per step (one stream, what is measured), "all" against labeled + unlabeled per step (the
other streams cost the same per sample, on the same cores). Step times: the median H200 step in
bench/results/gpu/train_step_{camvid,voc_u2pl}_cuda.json (the "On a CUDA GPU" table of
docs/benchmarks.md: CamVid supervised 0.024 s, U2PL 0.050 s at 4+4; VOC supervised 0.154 s, U2PL
0.334 s at 4+4). Each configuration is timed `--rounds` times round-robin and the median kept;
the rate is the steady state after `--warmup` batches, with the cache filled first (its fill time
is reported apart). The main process runs one torch thread; DataLoader workers run one each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from semiseg_cli.config import build_config, shared_dir  # noqa: E402
from semiseg_cli.data import build_dataset, layout_for  # noqa: E402
from semiseg_cli.data.decoded import DecodedCache, admit, available_memory  # noqa: E402
from semiseg_cli.data.layouts import index_palette  # noqa: E402
from semiseg_cli.data.reading import scaled_size  # noqa: E402
from semiseg_cli.engine.loaders import LoaderSettings, infinite_loader, loader_settings  # noqa: E402

GPU_DIR = REPO / "bench" / "results" / "gpu"
# Fallbacks when the JSON is not in this checkout: the figures docs/benchmarks.md quotes.
GPU_STEPS = {
    "camvid": ("train_step_camvid_cuda.json", {"supervised": 0.0239, "u2pl": 0.0502}),
    "voc": ("train_step_voc_u2pl_cuda.json", {"supervised": 0.154, "u2pl": 0.3344}),
}
SCENARIOS = {
    "camvid": {"preset": "u2pl_mbv2-os16_1x4+4-300it_camvid-176x224", "sets": []},
    "voc": {"preset": "u2pl_r101-os8_4x4+4-80e_voc-classic-513", "sets": []},
    "photos": {"preset": "generic_mbv2-os16_8+8-4000it_auto",
               "sets": ["data.auto=false", "data.resize=0.5", "data.crop_size=[512,512]"]},
}
VARIANTS = {  # name -> (cache_decoded, jpeg_draft)
    "plain": (False, False), "cache": (True, False), "draft": (False, True), "cache+draft": (True, True),
}


def gpu_steps(scenario: str, gpu_dir: Path = GPU_DIR) -> dict[str, Any] | None:
    """Median step seconds per method from bench_train_step.py's CUDA JSON in `gpu_dir`."""
    if scenario not in GPU_STEPS:
        return None
    name, fallback = GPU_STEPS[scenario]
    path = gpu_dir / name
    steps, source = dict(fallback), "docs/benchmarks.md (JSON not found)"
    if path.is_file():
        rows = json.loads(path.read_text())["results"]
        found = {r["method"]: r["step_s_median"] for r in rows if r["method"] in fallback}
        if set(found) == set(fallback):
            steps = found
            source = str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)
    return {"source": source, "step_s": steps}


# ----------------------------------------------------------------------------- synthetic data


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random scene with fine noise: JPEG sizes and decode times near real photos'
    (a pure-noise image would compress badly and decode slowly)."""
    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90.0), (16, 50.0), (64, 25.0)):
        small = rng.normal(0, 1, (max(2, cells * h // w + 2), cells + 2, 3)).astype(np.float32)
        small = ((small - small.min()) / (np.ptp(small) + 1e-6) * 255).astype(np.uint8)
        out += (np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 128) * amp / 128
    out += rng.normal(0, 10, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(out + 128, 0, 255).astype(np.uint8))


def _mask(rng: np.random.Generator, w: int, h: int, classes: int) -> np.ndarray:
    cell = 25
    cells = rng.integers(0, classes, (h // cell + 1, w // cell + 1)).astype(np.uint8)
    m = np.kron(cells, np.ones((cell, cell), np.uint8))[:h, :w]
    m[::cell, :] = 255  # VOC's ignore borders
    return m


def write_voc(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`n` synthetic JPEG/palette-PNG pairs in the VOC layout; every image in train.txt."""
    rng = np.random.default_rng(seed)
    w, h = size
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [c for rgb in index_palette(256) for c in rgb]
    stems = [f"2007_{i:06d}" for i in range(n)]
    for s in stems:
        _photo(rng, w, h).save(root / "JPEGImages" / f"{s}.jpg", quality=90)
        m = Image.frombytes("P", (w, h), _mask(rng, w, h, 21).tobytes())
        m.putpalette(palette)
        m.save(root / "SegmentationClass" / f"{s}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


# ----------------------------------------------------------------------------- measuring


def scenario_config(name: str, root: Path, extra: list[str]) -> Any:
    spec = SCENARIOS[name]
    sets = [*spec["sets"], *extra]
    values: dict[str, Any] = {"data.root": str(root)}
    if name == "photos":
        values["data.dataset"] = "voc"
    return build_config(spec["preset"], sets, values=values)


def profile(ds: Any, n: int) -> dict[str, float]:
    """Per-sample milliseconds of the deterministic part (decode, label mapping, data.resize:
    what the cache saves) and of the random part (scale, crop, flip, normalise), one thread."""
    import random

    idx = list(range(min(n, len(ds))))
    t0 = time.perf_counter()
    items = [ds.decode(i) for i in idx]
    t1 = time.perf_counter()
    random.seed(0)
    for img, mask, _ in items:
        ds.transform(Image.fromarray(img), mask if mask is not None else np.full(img.shape[:2], 255, np.uint8))
    t2 = time.perf_counter()
    return {"decode_ms": round(1000 * (t1 - t0) / len(idx), 2), "transform_ms": round(1000 * (t2 - t1) / len(idx), 2)}


def measure(cfg: Any, pairs: list, workers: int, variant: str, batches: int, warmup: int, device: torch.device) -> dict[str, Any]:
    cache, draft = VARIANTS[variant]
    cfg = cfg.model_copy(deep=True)
    cfg.data.cache_decoded, cfg.data.jpeg_draft = cache, draft
    ds = build_dataset(cfg.data, pairs, train=True)
    t0 = time.perf_counter()
    filled = ds.fill_cache()  # workers > 0 would fill here anyway; workers = 0 fills as it reads
    fill_s = time.perf_counter() - t0
    opts: LoaderSettings = loader_settings(cfg.data, device)
    bl = cfg.data.batch_size
    t0 = time.perf_counter()
    it = infinite_loader(ds, bl, workers, cfg.train.seed, 0, 0, opts)
    next(it)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t0
    del it
    cache_obj = ds.decoded_cache()
    return {
        "samples_per_s": bl * batches / wall, "fill_s": fill_s, "filled": filled, "first_batch_s": first_s,
        "cache_mib": round(cache_obj.nbytes / 2**20, 1) if cache_obj is not None else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="camvid,voc", help="comma list of camvid, voc, photos")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--variants", default="plain,cache,draft,cache+draft")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="round-robin repeats; the median is kept")
    ap.add_argument("--voc-images", type=int, default=200)
    ap.add_argument("--photo-images", type=int, default=48)
    ap.add_argument("--camvid-root", type=Path, help="default: $SEMISEG_SHARED/data/camvid (or <repo>/../shared)")
    ap.add_argument("--device", default="auto", help="pinned memory follows it (auto: cuda if present)")
    ap.add_argument("--gpu-dir", type=Path, default=GPU_DIR, help="where the CUDA train-step JSON is (step times)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 8 synthetic images, a few batches")
    ap.add_argument("--out", type=Path, help="JSON (default bench/results/loader_cpu.json; none with --tiny)")
    a = ap.parse_args()
    if a.tiny:
        a.batches, a.warmup, a.rounds, a.voc_images, a.photo_images = 3, 1, 1, 8, 4
        if a.scenarios == "camvid,voc":
            a.scenarios = "voc"
        if a.workers == "0,1,2":
            a.workers = "0,1"
    out = a.out if a.out or a.tiny else REPO / "bench" / "results" / "loader_cpu.json"
    torch.set_num_threads(1)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    workers = [int(w) for w in a.workers.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS] + [s for s in a.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown variant or scenario {unknown[0]!r}")
    load0 = os.getloadavg()
    results: list[dict[str, Any]] = []
    scenario_meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        setups = []
        for name in a.scenarios.split(","):
            if name == "camvid":
                root = a.camvid_root or shared_dir() / "data" / "camvid"
                if not (root / "train").is_dir():
                    print(f"camvid: {root} not found (set SEMISEG_SHARED or --camvid-root); skipped")
                    continue
            elif name == "voc":
                root = write_voc(Path(tmp) / "voc", a.voc_images, (500, 375))
            else:
                root = write_voc(Path(tmp) / "photos", a.photo_images, (2048, 1536), seed=1)
            cfg = scenario_config(name, root, [])
            layout = layout_for(cfg.data)
            pairs = layout.list_pairs(cfg.data.train_split)
            if a.tiny:
                pairs = pairs[:8]
            jpeg = pairs[0][0].lower().endswith((".jpg", ".jpeg"))
            draft_applies = jpeg and cfg.data.resize < 1
            ds = build_dataset(cfg.data, pairs, train=True)
            sizes = [scaled_size(Image.open(layout.root / p[0]).size, cfg.data.resize) for p in pairs]
            need = DecodedCache.bytes_for(sizes, [m is not None for _, m in pairs])
            avail = available_memory()
            scenario_meta[name] = {
                "preset": SCENARIOS[name]["preset"], "sets": SCENARIOS[name]["sets"], "root": str(root),
                "images": len(pairs), "format": "jpeg" if jpeg else "png", "resize": cfg.data.resize,
                "crop": list(cfg.data.crop_size), "scale_range": list(cfg.data.scale_range),
                "batch_labeled": cfg.data.batch_size,
                "batch_unlabeled": cfg.data.unlabeled_batch_size or cfg.data.batch_size,
                "cache_mib": round(need / 2**20, 1), "auto_would_cache": admit("auto", need, cfg.data.cache_ram_fraction, "bench"),
                "available_mib": None if avail is None else round(avail / 2**20),
                "profile_one_thread": profile(ds, 8 if a.tiny else 24), "gpu": gpu_steps(name, a.gpu_dir),
            }
            if draft_applies:
                cfg_d = cfg.model_copy(deep=True)
                cfg_d.data.jpeg_draft = True
                scenario_meta[name]["profile_one_thread_draft"] = profile(build_dataset(cfg_d.data, pairs, train=True), 8 if a.tiny else 24)
            for v in variants:
                if VARIANTS[v][1] and not draft_applies:
                    continue
                for w in workers:
                    setups.append((name, cfg, pairs, w, v))
        runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        for r in range(a.rounds):
            for name, cfg, pairs, w, v in setups:
                m = measure(cfg, pairs, w, v, a.batches, a.warmup, device)
                runs.setdefault((name, w, v), []).append(m)
                print(f"  round {r + 1}: {name:<7} workers {w}  {v:<12} {m['samples_per_s']:8.1f} samples/s", flush=True)
    for (name, w, v), ms in runs.items():
        meta = scenario_meta[name]
        rate = statistics.median(m["samples_per_s"] for m in ms)
        row: dict[str, Any] = {
            "scenario": name, "workers": w, "variant": v, "samples_per_s": round(rate, 1),
            "samples_per_s_rounds": [round(m["samples_per_s"], 1) for m in ms],
            "fill_s": round(statistics.median(m["fill_s"] for m in ms), 2),
            "first_batch_s": round(statistics.median(m["first_batch_s"] for m in ms), 2),
            "cache_mib": ms[0]["cache_mib"],
        }
        gpu = meta["gpu"]
        if gpu:
            for method, step in gpu["step_s"].items():
                bl, bu = meta["batch_labeled"], meta["batch_unlabeled"] if method != "supervised" else 0
                row[f"ratio_{method}_labeled"] = round(rate / (bl / step), 2)
                row[f"ratio_{method}_all"] = round(rate / ((bl + bu) / step), 2)
        results.append(row)
    meta_all = {
        "host": platform.node(), "cpus": os.cpu_count(), "device": str(device), "torch": torch.__version__,
        "main_threads": 1, "load_avg_start": [round(x, 2) for x in load0], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "batches": a.batches, "warmup": a.warmup, "rounds": a.rounds, "tiny": a.tiny, "scenarios": scenario_meta,
    }
    print(f"\n{os.cpu_count()} CPUs, load average {meta_all['load_avg_start'][0]} -> {meta_all['load_avg_end'][0]}, "
          f"{a.batches} batches x {a.rounds} rounds, median")
    for name, meta in scenario_meta.items():
        gpu = meta["gpu"]
        prof = meta["profile_one_thread"]
        print(f"\n{name}: {meta['preset']} {meta['images']} {meta['format']} images, resize {meta['resize']}, "
              f"crop {meta['crop']}, batch {meta['batch_labeled']}+{meta['batch_unlabeled']}; one thread: "
              f"decode {prof['decode_ms']} ms + transform {prof['transform_ms']} ms per sample; cache {meta['cache_mib']} MiB "
              f"(auto would {'cache' if meta['auto_would_cache'] else 'not cache'})")
        if "profile_one_thread_draft" in meta:
            d = meta["profile_one_thread_draft"]
            print(f"  with the JPEG draft: decode {d['decode_ms']} ms + transform {d['transform_ms']} ms per sample")
        if gpu:
            print(f"  H200 step ({gpu['source']}): " + ", ".join(f"{k} {v} s" for k, v in gpu["step_s"].items()))
        methods = list(gpu["step_s"]) if gpu else []
        head = f"  {'workers':>7} {'variant':<12} {'samples/s':>9} {'fill s':>6}" + "".join(
            f" {m + ' l/all':>16}" for m in methods)
        print(head)
        for row in results:
            if row["scenario"] != name:
                continue
            ratios = "".join(f" {row[f'ratio_{m}_labeled']:>7} / {row[f'ratio_{m}_all']:<6}" for m in methods)
            print(f"  {row['workers']:>7} {row['variant']:<12} {row['samples_per_s']:>9} {row['fill_s']:>6}{ratios}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(out.suffix + ".tmp")
        tmp_out.write_text(json.dumps({"meta": meta_all, "results": results}, indent=2) + "\n")
        tmp_out.replace(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
