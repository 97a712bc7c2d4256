"""bench/demo_seeds.py, the demo's per-seed comparison, runs end to end at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_bench_runs_end_to_end_and_reports_every_seed_and_gap(tmp_path: Path) -> None:
    out, dest = tmp_path / "runs", tmp_path / "demo_seeds.json"
    cmd = [sys.executable, str(REPO / "bench/demo_seeds.py"), "--tiny", "--seeds", "0,1", "--out", str(out), "--json", str(dest)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(dest.read_text())
    assert set(res["runs"]) == {"supervised", "u2pl", "unimatch"}
    for method, per_seed in res["runs"].items():
        assert set(per_seed) == {"0", "1"}
        for seed, row in per_seed.items():
            # each number is the final weights of that run, evaluated on val
            report = json.loads((out / f"s{seed}-{method}" / "eval.json").read_text())
            assert row["mIoU"] == 100 * report["mIoU"] and row["split"] == "val"
            assert row["checkpoint"].endswith(f"s{seed}-{method}/last.pt")
    s = res["summary"]
    for method in ("u2pl", "unimatch"):
        gaps = [res["runs"][method][k]["mIoU"] - res["runs"]["supervised"][k]["mIoU"] for k in ("0", "1")]
        assert s[method]["gaps"] == gaps and s[method]["target_met"] == (min(gaps) > 0 and sum(gaps) / 2 >= s[method]["target_gap"])
    weakest = s["supervised"]["weakest_class"]["0"]
    assert weakest["IoU"] == min(v for v in res["runs"]["supervised"]["0"]["per_class"].values() if v is not None)
    assert "gap to supervised" in r.stdout and "seed 1" in r.stdout
    # a rerun reuses the finished runs (their eval.json) and trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("s*-*/last.pt")}
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("s*-*/last.pt")} == before
