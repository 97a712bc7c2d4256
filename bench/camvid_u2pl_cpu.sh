#!/usr/bin/env bash
# CamVid 1/8: the supervised baseline against U2PL variants on the CPU, one run after the other
# (each with every core), at ITERS iterations with U2PL's supervised-only warm-up scaled from the
# presets' 60-of-300. Every run: same split files, preset family, seed, iterations; validation of
# the final weights (last.pt: the EMA teacher for U2PL). Resumes: a finished run is skipped, a
# killed one continues from its last.pt.
#   ITERS=1200 [SEED=1] bash bench/camvid_u2pl_cpu.sh [LABEL=u2pl+key=val ...] [LABEL=unimatch[+key=val]] [LABEL=fixmatch] [LABEL=advsemiseg]
# AdvSemiSeg's self-training start is scaled as U2PL's warm-up (the preset's 75 of 300: a quarter).
# Default variants: U2PL as the preset (no teacher-reset window) and with the official code's
# one-epoch reset window.
# SEED (default 0) sets train.seed for every run (the split stays the seed-0 one); a seed other
# than 0 gets its own folders and JSON, suffixed _s$SEED.
# Every final model is also evaluated on the 233 test images, held out from every choice made here.
# TAG (default none) names a re-measurement apart from the recorded one: runs/...-$TAG and
# bench/results/..._$TAG{,_test}.json.
# Results: runs/camvid-cpu-$ITERS[-s$SEED][-$TAG]/<label>/eval{,_test}.json,
# bench/results/camvid_u2pl_cpu_$ITERS[_s$SEED][_$TAG]{,_test}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ITERS=${ITERS:-1200}
SPLITS=${SPLITS:-splits/camvid}
ROOT=${CAMVID_ROOT:-../shared/data/camvid}
SEED=${SEED:-0}
WARM=$(( 60 * ITERS / 300 ))
SUFFIX=; [ "$SEED" = 0 ] || SUFFIX=_s$SEED
[ -z "${TAG:-}" ] || SUFFIX=${SUFFIX}_$TAG
OUT=runs/camvid-cpu-$ITERS${SUFFIX//_/-}
SUP=supervised_mbv2-os16_1x4-300it_camvid-176x224
U2=u2pl_mbv2-os16_1x4+4-300it_camvid-176x224
mkdir -p "$OUT" bench/results
if [ ! -f "$SPLITS/labeled.txt" ]; then
  $PY -m semiseg_cli prepare-splits --dataset camvid --root "$ROOT" --labeled 1/8 --seed 0 --out "$SPLITS"
fi
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(u2pl u2pl_reset=u2pl+u2pl.teacher_reset=true)

run() {  # label preset [--set ...]
  local label=$1 preset=$2; shift 2
  local out="$OUT/$label"
  if [ -f "$out/eval.json" ]; then echo "$label: done already"; test_eval "$out"; return; fi
  local args=(--preset "$preset" --root "$ROOT" --labeled-list "$SPLITS/labeled.txt" --out "$out"
              --iters "$ITERS" --set train.val_interval=$(( ITERS / 4 > 0 ? ITERS / 4 : 1 )) --set train.ckpt_interval=$(( ITERS / 12 > 0 ? ITERS / 12 : 1 )) --set train.seed=$SEED)
  case $preset in
    u2pl*) args+=(--unlabeled-list "$SPLITS/unlabeled.txt" --set u2pl.sup_only_iters=$WARM);;
    unimatch*|fixmatch*) args+=(--unlabeled-list "$SPLITS/unlabeled.txt");;
    advsemiseg*) args+=(--unlabeled-list "$SPLITS/unlabeled.txt" --set advsemiseg.semi_start=$(( ITERS / 4 )));;
  esac
  if [ -f "$out/last.pt" ]; then args+=(--resume); else args+=(--overwrite); fi
  echo "$(date +%T) $label: train ${args[*]} $*"
  $PY -m semiseg_cli train "${args[@]}" "$@" > "$out.log" 2>&1
  $PY -m semiseg_cli eval -c "$out/last.pt" --json "$out/eval.json" --overwrite >> "$out.log" 2>&1
  echo "$(date +%T) $label: $(grep -o 'mIoU [0-9.]*' "$out.log" | tail -n 1)"
  test_eval "$out"
}

test_eval() {  # run folder
  [ -f "$1/eval_test.json" ] && return
  $PY -m semiseg_cli eval -c "$1/last.pt" --split test --json "$1/eval_test.json" > "$1.test.log" 2>&1
  echo "$(date +%T) $(basename "$1") on test: $(grep -o 'mIoU [0-9.]*' "$1.test.log" | tail -n 1)"
}

run supervised "$SUP"
reports=("$OUT/supervised/eval.json"); tests=("$OUT/supervised/eval_test.json")
for v in "${variants[@]}"; do
  label=${v%%=*}; spec=${v#*=}; [ "$label" = "$v" ] && spec=u2pl
  method=${spec%%+*}  # u2pl | unimatch | fixmatch: the method's 300-iteration CamVid preset
  case $method in u2pl) preset=$U2;; unimatch|fixmatch|advsemiseg) preset=${method}_mbv2-os16_1x4+4-300it_camvid-176x224;;
    *) echo "unknown method $method in $v (u2pl, unimatch, fixmatch, advsemiseg)"; exit 2;; esac
  sets=(); IFS=+ read -ra parts <<< "${spec#"$method"}"
  for kv in "${parts[@]}"; do [ -n "$kv" ] && sets+=(--set "$kv"); done
  run "$label" "$preset" "${sets[@]}"
  reports+=("$OUT/$label/eval.json"); tests+=("$OUT/$label/eval_test.json")
done
$PY bench/compare_runs.py "${reports[@]}" --out "bench/results/camvid_u2pl_cpu_$ITERS$SUFFIX.json"
$PY bench/compare_runs.py "${tests[@]}" --out "bench/results/camvid_u2pl_cpu_$ITERS${SUFFIX}_test.json"
