#!/usr/bin/env bash
# DuPL ablation on one preset: full DuPL, without the GMM noise filter, without the consistency
# term, and without both; each evaluated on val (segmentation mIoU of the final weights) and
# scored on the whole train split (CAM pseudo-label mIoU, bench/dupl_cam_miou.py). One table and
# bench/results/dupl_ablation_<name>.json at the end. (The single-network baseline of earlier
# results files was removed with `dupl.single_net`.)
#
#   bash bench/dupl_ablation.sh demo dupl_r18-os16_1x4-400it_demo-96 --root demo_data
#   JOBS=2 bash bench/dupl_ablation.sh camvid dupl_mbv2-os16_1x4-300it_camvid-176x224
# Extra arguments go to every `semiseg train`. JOBS runs that many at once (one torch thread each).
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1; preset=$2; shift 2
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
RUNS=runs/dupl-ablation-$name
mkdir -p "$RUNS" bench/results
declare -A VARIANTS=(
  [full]=""
  [no_gmm]="--set dupl.gmm=false"
  [no_consistency]="--set dupl.consistency=false"
  [neither]="--set dupl.gmm=false --set dupl.consistency=false"
)
one() {
  local v=$1 out="$RUNS/$1"; shift
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 $PY -m semiseg_cli train --preset "$preset" --out "$out" --overwrite "$@" ${VARIANTS[$v]} > "$out.log" 2>&1 \
    || { echo "$v: training failed, see $out.log"; return; }
  OMP_NUM_THREADS=1 $PY -m semiseg_cli eval -c "$out/last.pt" --json "$out/eval.json" --overwrite >> "$out.log" 2>&1
  OMP_NUM_THREADS=1 $PY bench/dupl_cam_miou.py -c "$out/last.pt" --split train --json "$out/cam.json" >> "$out.log" 2>&1
  echo "$v done"
}
for v in full no_gmm no_consistency neither; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
  one "$v" "$@" &
done
wait
$PY - "$RUNS" "bench/results/dupl_ablation_$name.json" "$preset" <<'EOF'
import json, sys
from pathlib import Path
runs, out, preset = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = {}
for v in ("full", "no_gmm", "no_consistency", "neither"):
    e, c = runs / v / "eval.json", runs / v / "cam.json"
    if not e.is_file():
        continue
    ev, cam = json.loads(e.read_text()), json.loads(c.read_text()) if c.is_file() else {"subnets": {}}
    rows[v] = {"val_miou": ev["mIoU"], "val_aacc": ev["aAcc"], "step": ev.get("step"),
               "cam_train_miou": {k: r["miou"] for k, r in cam["subnets"].items()},
               "cam_train_coverage": {k: r["coverage"] for k, r in cam["subnets"].items()}}
out.write_text(json.dumps({"preset": preset, "runs": rows}, indent=2) + "\n")
print(f"{'variant':16s} {'val mIoU':>9s} {'CAM mIoU (train) net1/net2':>28s}")
for v, r in rows.items():
    cams = "/".join(f"{100 * x:.1f}" for x in r["cam_train_miou"].values())
    print(f"{v:16s} {100 * r['val_miou']:9.2f} {cams:>28s}")
print(f"wrote {out}")
EOF
