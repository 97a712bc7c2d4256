#!/usr/bin/env bash
# Everything this project measures on a CUDA GPU, in one bounded run (a lent GPU is short-lived):
#   0. the speed switches (bench_flops.py): at the VOC presets of supervised, U2PL, UniMatch and
#      AdvSemiSeg, the step time before and after each of channels_last, cudnn.benchmark and the
#      fused optimizer (and torch.compile for U2PL), FLOPs per step, TFLOP/s and share of the peak,
#      peak memory per image and the largest per-GPU U2PL batch for 80 GB;
#   1. train-step time and peak memory per image (bench_train_step.py) at the CamVid presets and at
#      the paper-size VOC presets (U2PL, AdvSemiSeg, DuPL ViT-B/16), pseudo-label throughput
#      (bench_pseudo_label.py), and one torchrun (NCCL, DDP + SyncBN) smoke run on the GPU;
#   2. the CamVid 1/8 comparisons, all runs at once on the GPU: supervised vs U2PL vs AdvSemiSeg
#      at the presets' 300 iterations and at LONG_ITERS, and the DuPL ablation (full, no GMM
#      filter, no consistency, neither, single network), each evaluated on val, DuPL's CAM
#      pseudo-labels also scored on the whole train set (dupl_cam_miou.py).
# JSON lands in $RES (default bench/results/gpu); runs in $RUNS. Each run's final weights (last.pt)
# are evaluated; a run still going at DEADLINE seconds is stopped and its last.pt evaluated (the
# JSON's `step` says how far it got).
#
#   bash bench/gpu_session.sh                       # defaults: ../shared data and weights
#   DEVICE=cpu ITERS=4 LONG_ITERS=0 QUICK=1 CAM_LIMIT=4 DEADLINE=1500 bash bench/gpu_session.sh   # dry run on a CPU
#     (nine trainings share the cores there: at the default DEADLINE the slowest are stopped)
#   SWITCHES_ONLY=1 DEADLINE=600 bash bench/gpu_session.sh   # section 0 only (a short GPU loan)
#   SKIP_SWITCHES=1 bash bench/gpu_session.sh                # everything but section 0
set -uo pipefail
export COLUMNS=${COLUMNS:-160}
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
CAMVID=${CAMVID_ROOT:-../shared/data/camvid}
RESIZE=${CAMVID_RESIZE:-0.5}       # 1.0 for a copy already stored at half resolution
W=${MBV2_WEIGHTS:-../shared/weights/mobilenet_v2_imagenet_features.pth}
SPLITS=${SPLITS:-splits/camvid}
ITERS=${ITERS:-300}
LONG_ITERS=${LONG_ITERS:-1500}
DEADLINE=${DEADLINE:-480}
QUICK=${QUICK:-0}                  # 1: tiny benches (checks the script, not the numbers)
RES=${RES:-bench/results/gpu}
RUNS=${RUNS:-runs/gpu}
mkdir -p "$RES" "$RUNS"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }

log "device: $DEVICE"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

# ---------------------------------------------------------------- 0. speed switches and FLOPs
# Each call is capped at its own limit and at what is left of DEADLINE; bench_flops.py rewrites
# its JSON after every row, so a call stopped by its timeout keeps the rows it measured.
upto() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
flops() {  # limit_s [bench_flops.py args...]
  local t; t=$(upto "$1"); shift
  if [ "$t" -lt 30 ]; then log "skip flops $* (${t}s left)"; return; fi
  log "flops $* (${t}s)"; timeout "$t" $PY bench/bench_flops.py --device "$DEVICE" ${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS} "$@" 2>&1 | tail -n 32
}
if [ "${SKIP_SWITCHES:-0}" != 1 ]; then
  if [ "$QUICK" = 1 ]; then
    flops 120 --tiny --methods supervised,u2pl --out "$RES/flops_voc_${DEVICE}_tiny.json"
  else
    # 4 methods x 4 variants (plain, +channels_last, +cudnn.benchmark, +fused), then the U2PL memory fit.
    flops 420 --steps 8 --warmup 2 --out "$RES/flops_voc_$DEVICE.json"
    # torch.compile on top, U2PL only (compiling a ResNet-101 step takes minutes).
    flops 300 --methods u2pl --variants plain,channels_last,cudnn_benchmark,fused,compile --steps 8 --warmup 3 \
      --fit-batches "" --out "$RES/flops_voc_u2pl_compile_$DEVICE.json"
  fi
fi
if [ "${SWITCHES_ONLY:-0}" = 1 ]; then log "finished (SWITCHES_ONLY)"; exit 0; fi

# ---------------------------------------------------------------- 1. benches (GPU to themselves)
if [ "${SKIP_BENCH:-0}" != 1 ]; then
steps=20; big=5; CAM=(--set model.pretrained="$W")
[ "$QUICK" = 1 ] && steps=1 && big=1 && CAM+=(--warmup 1 --set "data.crop_size=[64,64]")
bench() { log "bench $*"; timeout 150 $PY bench/bench_train_step.py --device "$DEVICE" "$@" 2>&1 | tail -n 12; }
bench --preset u2pl_mbv2-os16_1x4+4-300it_camvid-176x224 --methods supervised,u2pl,u2pl_student=u2pl+u2pl.labeled_keys=student,advsemiseg,fixmatch,unimatch \
  --steps $steps "${CAM[@]}" --out "$RES/train_step_camvid_$DEVICE.json"
bench --preset u2pl_mbv2-os16_1x4+4-300it_camvid-176x224 --methods supervised,u2pl --set u2pl.delta_p=0.0 \
  --steps $steps "${CAM[@]}" --out "$RES/train_step_camvid_deltap0_$DEVICE.json"
bench --preset dupl_mbv2-os16_1x4-300it_camvid-176x224 \
  --methods plain=dupl+dupl.gmm=false+dupl.consistency=false,dupl \
  --steps $steps "${CAM[@]}" --out "$RES/train_step_camvid_dupl_$DEVICE.json"
if [ "$QUICK" != 1 ]; then
  bench --preset u2pl_r101-os8_4x4+4-80e_voc-classic-513 --methods supervised,u2pl --steps $big --warmup 1 \
    --set model.pretrained=none --out "$RES/train_step_voc_u2pl_$DEVICE.json"
  bench --preset advsemiseg_r101-os8_1x10+10-20k_voc-blender-321 --methods supervised,advsemiseg --steps $big --warmup 1 \
    --set model.pretrained=none --out "$RES/train_step_voc_advsemiseg_$DEVICE.json"
  bench --preset dupl_vitb16_1x4-20k_voc-448 --methods plain=dupl+dupl.gmm=false+dupl.consistency=false,dupl \
    --steps $big --warmup 1 --set dupl.vit_pretrained=none --out "$RES/train_step_voc_dupl_$DEVICE.json"
fi
log "pseudo-label throughput"
timeout 150 $PY bench/bench_pseudo_label.py --device "$DEVICE" --workers 4 --work "$RUNS/pl_work" \
  --out "$RES/pseudo_label_$DEVICE.json" 2>&1 | tail -n 12
if [ "${QUICK:-0}" != 1 ]; then  # a realistic image size, where the network is most of the work
  log "pseudo-label throughput at 512x512"
  timeout 240 $PY bench/bench_pseudo_label.py --device "$DEVICE" --workers 4 --images 96 --size 512 --batch-size 8 \
    --work "$RUNS/pl_work_512" --out "$RES/pseudo_label_${DEVICE}_512.json" 2>&1 | tail -n 12
  log "pseudo-label writer stage, and end to end at 512x512 (issue #21 part 1)"
  if [ "$QUICK" = 1 ]; then PLW=(--tiny); else PLW=(--only-default --writers 4,8 --e2e-size 512 --e2e-images 96 --batch-size 8 --workers 4 --work "$RUNS/pl_work_512"); fi
  timeout 300 $PY bench/bench_pl_writers.py --device "$DEVICE" "${PLW[@]}" --out "$RES/pl_writers_$DEVICE.json" 2>&1 | tail -n 40
fi
log "loader throughput against this session's step times (issue #21 part 3)"
LARGS=(); [ "$QUICK" = 1 ] && LARGS=(--tiny)
timeout 240 $PY bench/bench_loader.py --workers 0,2,4,8 --camvid-root "$CAMVID" --gpu-dir "$RES" --out "$RES/loader_$DEVICE.json" "${LARGS[@]}" 2>&1 | tail -n 30
if [ "$DEVICE" = cuda ]; then
  log "torchrun smoke (NCCL, 1 process)"
  $PY -m semiseg_cli demo-data --out "$RUNS/demo_data" > /dev/null 2>&1 || true
  timeout 120 $PY -m torch.distributed.run --nproc_per_node 1 -m semiseg_cli train --preset u2pl_r18-os16_1x4+4-400it_demo-96 \
    --root "$RUNS/demo_data" --labeled 1/8 --iters 30 --set train.val_interval=0 --device cuda --out "$RUNS/ddp" --overwrite \
    > "$RUNS/ddp.log" 2>&1; echo "torchrun rc=$?" | tee "$RES/torchrun_cuda.txt"; tail -n 3 "$RUNS/ddp.log" >> "$RES/torchrun_cuda.txt"
fi
fi  # SKIP_BENCH

# ---------------------------------------------------------------- 2. CamVid comparisons
DATA=(--root "$CAMVID" --set data.resize="$RESIZE" --set model.pretrained="$W" --set data.workers=2 --device "$DEVICE"
      --labeled-list "$SPLITS/labeled.txt")
UNL=(--unlabeled-list "$SPLITS/unlabeled.txt")
SUP=supervised_mbv2-os16_1x4-300it_camvid-176x224
U2=u2pl_mbv2-os16_1x4+4-300it_camvid-176x224
ADV=advsemiseg_mbv2-os16_1x4+4-300it_camvid-176x224
DU=dupl_mbv2-os16_1x4-300it_camvid-176x224
UM=unimatch_mbv2-os16_1x4+4-300it_camvid-176x224
FM=fixmatch_mbv2-os16_1x4+4-300it_camvid-176x224
run() {  # name preset [train args...]: train, then evaluate best.pt on val (and DuPL's CAMs on train)
  local name=$1 preset=$2; shift 2
  local out="$RUNS/$name"
  OMP_NUM_THREADS=2 timeout "$(left)" $PY -m semiseg_cli train --preset "$preset" "${DATA[@]}" --out "$out" --overwrite "$@" \
    > "$out.log" 2>&1
  echo "train rc=$?" >> "$out.log"
  # The final weights (last.pt), not the best validation checkpoint: no model selection on val.
  [ -f "$out/last.pt" ] || { log "$name: no checkpoint"; return; }
  OMP_NUM_THREADS=2 $PY -m semiseg_cli eval -c "$out/last.pt" --device "$DEVICE" --json "$RES/eval_$name.json" --overwrite >> "$out.log" 2>&1
  case $preset in dupl*) OMP_NUM_THREADS=2 $PY bench/dupl_cam_miou.py -c "$out/last.pt" --split train --device "$DEVICE" ${CAM_LIMIT:+--limit $CAM_LIMIT} \
      --json "$RES/cam_$name.json" >> "$out.log" 2>&1 ;; esac
  log "$name done: $(grep -o 'mIoU [0-9.]*' "$out.log" | tail -n 1)"
}
it=(--iters "$ITERS")
pids=()
run sup "$SUP" "${it[@]}" & pids+=($!)
run u2pl "$U2" "${UNL[@]}" "${it[@]}" --set u2pl.sup_only_iters=$(( 60 * ITERS / 300 )) & pids+=($!)  # the preset's 60 of 300
run adv "$ADV" "${UNL[@]}" "${it[@]}" & pids+=($!)
run unimatch "$UM" "${UNL[@]}" "${it[@]}" & pids+=($!)
run fixmatch "$FM" "${UNL[@]}" "${it[@]}" & pids+=($!)
run dupl "$DU" "${it[@]}" & pids+=($!)
run dupl_nogmm "$DU" "${it[@]}" --set dupl.gmm=false & pids+=($!)
run dupl_nocons "$DU" "${it[@]}" --set dupl.consistency=false & pids+=($!)
run dupl_neither "$DU" "${it[@]}" --set dupl.gmm=false --set dupl.consistency=false & pids+=($!)
if [ "$LONG_ITERS" -gt 0 ]; then
  k=$(( LONG_ITERS / ITERS ))  # warm-ups and starts scaled with the schedule
  L=(--iters "$LONG_ITERS" --set train.val_interval=$(( LONG_ITERS / 4 )) --set train.ckpt_interval=$(( LONG_ITERS / 4 )))
  run sup_long "$SUP" "${L[@]}" & pids+=($!)
  run u2pl_long "$U2" "${UNL[@]}" "${L[@]}" --set u2pl.sup_only_iters=$(( 60 * k )) & pids+=($!)
  run unimatch_long "$UM" "${UNL[@]}" "${L[@]}" & pids+=($!)
  run adv_long "$ADV" "${UNL[@]}" "${L[@]}" --set advsemiseg.semi_start=$(( 75 * k )) & pids+=($!)
  run dupl_long "$DU" "${L[@]}" --set dupl.seg_start=$(( 90 * k )) --set dupl.gmm_start=$(( 180 * k )) \
    --set optim.warmup_iters=$(( 30 * k )) & pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
for f in "$RUNS"/*.log; do n=$(basename "$f" .log); echo "== $n: $(grep -c . "$f") lines; $(grep -E 'train rc|stopped|error' "$f" | head -n 3 | tr '\n' ' ')"; done
$PY - "$RES" "$RUNS" <<'EOF'
"""One summary table of every eval/cam JSON, with the iterations each run reached."""
import json, sys
from pathlib import Path
res, runs = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for f in sorted(res.glob("eval_*.json")):
    name = f.stem[5:]
    r = json.loads(f.read_text())
    m = runs / name / "metrics.jsonl"
    recs = [json.loads(l) for l in m.read_text().splitlines() if l.strip()] if m.is_file() else []
    vals = [x["val_mIoU"] for x in recs if "val_mIoU" in x]
    rows[name] = {"val_miou_final": r.get("mIoU"), "step": r.get("step"),
                  "val_miou_best_during_training": max(vals) if vals else None}
for f in sorted(res.glob("cam_*.json")):
    r = json.loads(f.read_text())
    rows.setdefault(f.stem[4:], {})["cam_train_miou"] = {k: v["miou"] for k, v in r["subnets"].items()}
(res / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
for k, v in rows.items():
    print(f"{k:18s} {json.dumps(v)}")
EOF
log "finished"
