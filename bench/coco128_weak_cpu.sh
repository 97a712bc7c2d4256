#!/usr/bin/env bash
# Weak supervision on real object-centric data: DuPL against the single-network weak baseline
# (cam_baseline) from image-level tags only, on coco128-seg (128 COCO images, YOLO polygons, read
# by the `yolo` layout; 80 COCO classes + background). Tags come from the masks; the masks score
# only. There is no separate split, so both the CAM pseudo-labels and the segmentation are scored
# on the same 128 training images (transductive: what the method makes of the images it saw).
# Protocol for both: the CamVid DuPL preset's model and optimiser (two / one MobileNetV2 with the
# shared ImageNet features, AdamW 1e-4, heads x10), images at half size, crops 224x224, batch 4,
# ITERS iterations with segmentation from 30% and (DuPL) GMM + consistency from 60% of them (the
# preset's 90 / 180 of 300), same seed, final weights.
#   ITERS=300 bash bench/coco128_weak_cpu.sh
# Results: runs/coco128-weak-$ITERS/<method>/{eval,cam}.json, bench/results/coco128_weak_cpu_$ITERS.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ITERS=${ITERS:-300}
ROOT=${COCO128_ROOT:-../shared/data/coco128-seg}
SPL=splits/coco128
OUT=runs/coco128-weak-$ITERS
mkdir -p "$SPL" "$OUT" bench/results
if [ ! -f "$SPL/labeled.txt" ]; then
  $PY -c "import sys; sys.path.insert(0, 'bench'); from bench_readers import COCO80; open('$SPL/coco80.txt', 'w').write('\n'.join(COCO80) + '\n')"
  $PY -m semiseg_cli prepare-splits --dataset yolo --root "$ROOT" --split train2017 --classes-file "$SPL/coco80.txt" \
    --labeled 128 --tags --out "$SPL" > "$SPL/prepare.log"
fi
for method in dupl cam_baseline; do
  out=$OUT/$method
  if [ -f "$out/cam.json" ]; then echo "$method: done already"; continue; fi
  args=(--preset "${method}_mbv2-os16_1x4-300it_camvid-176x224" --set 'data.dataset="yolo"' --root "$ROOT"
        --set "data.classes_file=\"$SPL/coco80.txt\"" --set 'data.train_split="train2017"'
        --labeled-list "$SPL/labeled.txt" --val-list "$SPL/labeled.txt" --set data.resize=0.5 --crop-size 224,224
        --iters "$ITERS" --set "$method.seg_start=$(( 3 * ITERS / 10 ))" --set train.val_interval=0
        --set train.ckpt_interval=$(( ITERS / 6 > 0 ? ITERS / 6 : 1 )) --out "$out")
  [ "$method" = dupl ] && args+=(--set "dupl.gmm_start=$(( 6 * ITERS / 10 ))")
  if [ -f "$out/last.pt" ]; then args+=(--resume); else args+=(--overwrite); fi
  echo "$(date +%T) $method: train ${args[*]}"
  $PY -m semiseg_cli train "${args[@]}" > "$out.log" 2>&1
  $PY -m semiseg_cli eval -c "$out/last.pt" --json "$out/eval.json" --overwrite >> "$out.log" 2>&1
  $PY bench/dupl_cam_miou.py -c "$out/last.pt" --split train2017 --json "$out/cam.json" >> "$out.log" 2>&1
  echo "$(date +%T) $method: $(grep -o 'mIoU [0-9.]*' "$out.log" | tail -n 1)"
done
$PY - "$OUT" "bench/results/coco128_weak_cpu_$ITERS.json" <<'EOF'
import json, sys
from pathlib import Path
runs, dest = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for m in ("dupl", "cam_baseline"):
    ev = json.loads((runs / m / "eval.json").read_text())
    cam = json.loads((runs / m / "cam.json").read_text())
    seg = {c: v["IoU"] for c, v in ev["per_class"].items() if v.get("pixels", 1) > 0 and v["IoU"] is not None}
    sub = cam["subnets"]["net1"]
    cam_iou = {c: v for c, v in zip(cam["classes"], sub["iou"]) if v is not None}
    rows[m] = {
        "seg_miou": ev["mIoU"], "cam_miou": sub["miou"], "cam_miou_confident": sub["miou_confident"],
        "cam_coverage": sub["coverage"], "classes_scored": len(seg),
        "seg_learned": sorted(c for c, v in seg.items() if v >= 0.10 and c != "background"),
        "cam_learned": sorted(c for c, v in cam_iou.items() if v >= 0.10 and c != "background"),
        "seg_iou": seg, "cam_iou": cam_iou,
    }
print(f"{'method':<14}{'seg mIoU':>9}{'CAM mIoU':>9}{'CAM conf':>9}{'coverage':>9}  foreground classes with IoU >= 10% (seg / CAM)")
for m, r in rows.items():
    print(f"{m:<14}{100 * r['seg_miou']:>9.2f}{100 * r['cam_miou']:>9.2f}{100 * r['cam_miou_confident']:>9.2f}"
          f"{100 * r['cam_coverage']:>8.1f}%  {len(r['seg_learned'])} / {len(r['cam_learned'])}")
    print(f"    seg: {', '.join(r['seg_learned']) or '-'}")
    print(f"    CAM: {', '.join(r['cam_learned']) or '-'}")
tmp = dest.with_suffix(".tmp")
tmp.write_text(json.dumps({"protocol": "coco128-seg train2017, tags only, scored on the same 128 images", "runs": rows}, indent=1) + "\n")
tmp.replace(dest)
print(f"wrote {dest}")
EOF
