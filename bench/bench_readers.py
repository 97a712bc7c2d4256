"""Reader throughput of the annotation layouts: masks/s and (image + mask) pairs/s, first pass
(polygons rasterised and written to the mask cache) against cached (the cache's PNG read back).

    python bench/bench_readers.py --dataset yolo --root ../shared/data/coco128-seg --split train2017 \
        --classes-file coco80.txt --out bench/results/readers_coco128_cpu.json

One process, one thread, every pair of the split; the cache is a fresh temporary folder
(`SEMISEG_CACHE`), so the first pass really rasterises. `--classes-file` may be omitted for coco128:
the 80 COCO names in YOLO order are then written to a temporary file (the dataset ships none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COCO80 = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,"
    "tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,"
    "tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,"
    "hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,"
    "keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,"
    "hair drier,toothbrush"
).split(",")


def timed(fn, items) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="yolo")
    ap.add_argument("--root", type=Path, default=Path("../shared/data/coco128-seg"))
    ap.add_argument("--split", default="train2017")
    ap.add_argument("--classes-file", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SEMISEG_CACHE"] = str(Path(tmp) / "cache")
        classes = a.classes_file
        if classes is None and a.dataset == "yolo":
            classes = Path(tmp) / "coco80.txt"
            classes.write_text("\n".join(COCO80) + "\n")
        from semiseg_cli.data.layouts import LayoutOptions, get_layout

        layout = get_layout(a.dataset, a.root, LayoutOptions(classes_file=classes))
        pairs = [p for p in layout.list_pairs(a.split) if p[1] is not None]
        masks = [m for _, m in pairs]
        first = timed(layout.read_mask, masks)
        cached = timed(layout.read_mask, masks)
        images = timed(layout.read_image, [i for i, _ in pairs])
        cache_files = len(list((Path(tmp) / "cache").rglob("*.png")))
    n = len(pairs)
    rows = {
        "masks_per_s_first_pass": round(n / first, 1),
        "masks_per_s_cached": round(n / cached, 1),
        "images_per_s_decode": round(n / images, 1),
        "pairs_per_s_first_pass": round(n / (first + images), 1),
        "pairs_per_s_cached": round(n / (cached + images), 1),
    }
    print(f"{a.dataset} {a.root} {a.split}: {n} pairs, {cache_files} cache files written, one thread")
    for k, v in rows.items():
        print(f"  {k:<26}{v:>10}")
    if a.out:
        meta = {"dataset": a.dataset, "root": str(a.root), "split": a.split, "pairs": n, "cache_files": cache_files,
                "host": platform.node(), "torch_threads": 1}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp_out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        tmp_out.replace(a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
