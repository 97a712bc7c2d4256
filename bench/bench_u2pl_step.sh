#!/usr/bin/env bash
# U2PL step time against the supervised step at the same preset, batch and crop, on one CPU
# thread, for both `u2pl.labeled_keys` modes; then the floor the network passes alone set
# (student forward+backward over 2B images with the representation head, teacher forward over
# 2B or B images), in units of one supervised forward+backward. Results in bench/results/.
# docs/methods_u2pl.md ("Speed") quotes them. Takes ~10 min on a loaded 2-core machine.
#
#   bash bench/bench_u2pl_step.sh            # CamVid and demo presets
#   PY=python bash bench/bench_u2pl_step.sh
#   FLOOR_ONLY=1 bash bench/bench_u2pl_step.sh   # only the network-pass floor (~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
CAMVID=u2pl_mbv2-os16_1x4+4-300it_camvid-176x224
DEMO=u2pl_r18-os16_1x4+4-400it_demo-96
R=bench/results
bench() { $PY bench/bench_train_step.py --methods supervised,u2pl --device cpu --steps 6 "$@"; }

if [ -z "${FLOOR_ONLY:-}" ]; then
bench --preset $CAMVID --out $R/train_step_camvid_cpu.json
bench --preset $CAMVID --set u2pl.labeled_keys='"student"' --out $R/train_step_camvid_cpu_student.json
bench --preset $DEMO --out $R/train_step_demo_cpu.json
bench --preset $DEMO --set u2pl.labeled_keys='"student"' --out $R/train_step_demo_cpu_student.json
# A random-init teacher is rarely confident enough for anchors (prob > delta_p = 0.3), so the
# runs above under-count the contrastive loss; delta_p = 0 makes every class active, as a
# trained teacher does.
bench --preset $CAMVID --set u2pl.delta_p=0.0 --out $R/train_step_camvid_cpu_deltap0.json
bench --preset $CAMVID --set u2pl.delta_p=0.0 --set u2pl.labeled_keys='"student"' --out $R/train_step_camvid_cpu_deltap0_student.json
fi

for spec in "$CAMVID 11 camvid" "$DEMO 5 demo"; do
  set -- $spec
  $PY - "$1" "$2" "$R/u2pl_floor_$3_cpu.json" <<'EOF'
"""Thread CPU time of the network passes alone, round-robin, relative to a supervised step."""
import json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from semiseg_cli.config import build_config
from semiseg_cli.models import build_model

torch.set_num_threads(1)
preset, nc, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


def net(rep: bool, train: bool):
    cfg = build_config(preset, [f"model.rep_head={str(rep).lower()}"])
    torch.manual_seed(0)
    m = build_model(cfg.model.model_copy(update={"pretrained": None}), nc)
    return m.train(train), cfg


sup, cfg = net(False, True)
stu, _ = net(True, True)
tea, _ = net(True, False)
h, w = cfg.data.crop_size
b = cfg.data.batch_size
x1, x2 = torch.randn(b, 3, h, w), torch.randn(2 * b, 3, h, w)


def fb(m, x, rep):
    o = m(x)
    (o["logits"].mean() + (o["rep"].mean() if rep else 0)).backward()


def fwd(m, x):
    with torch.no_grad():
        m(x)


jobs = {
    "supervised_fwd_bwd_B": lambda: fb(sup, x1, False),
    "student_fwd_bwd_2B_rep_head": lambda: fb(stu, x2, True),
    "student_fwd_bwd_2B_no_rep_head": lambda: fb(sup, x2, False),
    "teacher_fwd_B": lambda: fwd(tea, x1),
    "teacher_fwd_2B": lambda: fwd(tea, x2),
}
times = {k: [] for k in jobs}
for i in range(6):
    for k, f in jobs.items():
        t = time.thread_time()
        f()
        if i:
            times[k].append(time.thread_time() - t)
med = {k: statistics.median(v) for k, v in times.items()}
base = med["supervised_fwd_bwd_B"]
rel = {k: round(v / base, 3) for k, v in med.items()}
floor = {
    "labeled_keys=teacher": round((med["student_fwd_bwd_2B_rep_head"] + med["teacher_fwd_2B"]) / base, 3),
    "labeled_keys=student": round((med["student_fwd_bwd_2B_rep_head"] + med["teacher_fwd_B"]) / base, 3),
}
res = {"meta": {"preset": preset, "crop": [h, w], "B": b, "torch": torch.__version__, "threads": 1,
                "supervised_fwd_bwd_B_s": round(base, 4)},
       "relative_to_supervised": rel, "floor": floor}
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
EOF
done
