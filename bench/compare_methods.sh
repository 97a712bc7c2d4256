#!/usr/bin/env bash
# Train several presets on the same split files, evaluate each, and compare them in one table.
#   bench/compare_methods.sh camvid splits/camvid PRESET [PRESET ...]
# Runs go to runs/bench-<name>/<preset>; the comparison JSON to bench/results/compare_<name>.json.
# Set PARALLEL=1 to train the presets concurrently (one torch thread each).
set -euo pipefail
name=$1; splits=$2; shift 2
py=${PY:-.venv/bin/python}
mkdir -p bench/results "runs/bench-$name"
run_one() {
  local preset=$1 out="runs/bench-$name/$1"
  local args=(--preset "$preset" --labeled-list "$splits/labeled.txt" --out "$out")
  [ -f "$splits/unlabeled.txt" ] && args+=(--unlabeled-list "$splits/unlabeled.txt")
  if [ -f "$out/last.pt" ]; then args+=(--resume); fi
  $py -m semiseg_cli train "${args[@]}" > "$out.log" 2>&1 || { echo "train $preset failed, see $out.log"; return 1; }
  $py -m semiseg_cli eval -c "$out/best.pt" --json "$out/eval.json" --overwrite >> "$out.log" 2>&1
}
pids=()
for p in "$@"; do
  mkdir -p "runs/bench-$name"
  if [ "${PARALLEL:-0}" = 1 ]; then OMP_NUM_THREADS=1 run_one "$p" & pids+=($!); else run_one "$p"; fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
reports=(); for p in "$@"; do reports+=("runs/bench-$name/$p/eval.json"); done
$py bench/compare_runs.py "${reports[@]}" --out "bench/results/compare_$name.json"
