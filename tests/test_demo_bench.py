"""bench/demo_seeds.py, the demo's per-seed comparison, runs end to end at a tiny size; bench/demo_variants.py
and bench/demo_confidence.py read what it and its runs leave."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], subprocess.CompletedProcess]:
    """bench/demo_seeds.py --tiny over seeds 0 and 1, once for this module: (runs, json, command, result)."""
    base = tmp_path_factory.mktemp("demo_bench")
    out, dest = base / "runs", base / "demo_seeds.json"
    cmd = [sys.executable, str(REPO / "bench/demo_seeds.py"), "--tiny", "--seeds", "0,1", "--out", str(out), "--json", str(dest)]
    return out, dest, cmd, subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_demo_bench_runs_end_to_end_and_reports_every_seed_and_gap(tiny_bench) -> None:
    out, dest, cmd, r = tiny_bench
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


def _demo_seeds_json(path: Path, version: int, sup: dict[str, dict[str, float]], uni: dict[str, float], iters: int | None = None) -> Path:
    """A file shaped as bench/demo_seeds.py writes it: per-class IoU for supervised, mIoU for both."""
    def miou(pc: dict) -> float:
        xs = [v for v in pc.values() if v is not None]
        return sum(xs) / len(xs)

    runs = {"supervised": {s: {"mIoU": miou(pc), "per_class": pc} for s, pc in sup.items()},
            "unimatch": {s: {"mIoU": m, "per_class": {}} for s, m in uni.items()}}
    path.write_text(json.dumps({"seeds": [int(s) for s in sup], "labeled": "1/16", "iters": iters, "data": {"version": version, "n_val": 60},
                                "presets": {"supervised": "supervised_r18-os16_1x8-800it_demo-64"}, "runs": runs}))
    return path


def test_demo_variants_tabulates_the_baseline_floor_against_the_gain(tmp_path: Path) -> None:
    a = _demo_seeds_json(tmp_path / "va.json", 3, {"0": {"bg": 80.0, "box": 20.0}, "1": {"bg": 90.0, "box": 40.0}}, {"0": 55.0, "1": 60.0})
    b = _demo_seeds_json(tmp_path / "vb.json", 4, {"0": {"bg": 70.0, "box": None, "disc": 10.0}}, {"0": 38.0}, iters=1600)
    dest = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(REPO / "bench/demo_variants.py"), str(a), str(b), "--json", str(dest)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = json.loads(dest.read_text())
    assert [x["version"] for x in rows] == [3, 4]
    # the schedule: demo_seeds --iters where given, else what the supervised preset trains for
    preset = tomllib.loads((REPO / "presets/supervised_r18-os16_1x8-800it_demo-64.toml").read_text())
    assert [x["iters"] for x in rows] == [preset["train"]["iters"], 1600]
    # supervised mIoU 50 and 65 -> mean 57.5; gaps +5 and -5 -> mean 0
    assert rows[0]["supervised"] == 57.5 and rows[0]["gaps"]["unimatch"] == {"mean": 0.0, "per_seed": {"0": 5.0, "1": -5.0}}
    assert rows[0]["weakest"] == {"0": {"class": "box", "IoU": 20.0}, "1": {"class": "box", "IoU": 40.0}}
    # the class supervised learns worst on the mean over seeds (box: 30 against background's 85)
    assert rows[0]["weakest_on_mean"] == {"class": "box", "supervised": 30.0, "unimatch": None}
    # an absent class (None) is not the weakest; supervised mIoU there is over the classes given
    assert rows[1]["weakest"]["0"] == {"class": "disc", "IoU": 10.0} and rows[1]["gaps"]["unimatch"]["mean"] == -2.0
    assert f"| va.json | 3 | 1/16 | {rows[0]['iters']} | 0,1 | 60 | 57.50 | box 20.0, box 40.0 | +0.00 (+5.0, -5.0) |" in r.stdout


def _confidence(checkpoint: Path, split: Path, tau: float, dest: Path) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "bench/demo_confidence.py"), "-c", str(checkpoint), "--split", str(split),
                        "--tau", str(tau), "--json", str(dest)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [res] = json.loads(dest.read_text())
    return res


def test_demo_confidence_counts_each_class_and_what_the_threshold_passes(tiny_bench, tmp_path: Path) -> None:
    out, _, _, r = tiny_bench
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt, split = out / "s0-unimatch" / "last.pt", out / "splits" / "unlabeled.txt"
    # the pixels of each class, counted here from the mask files the split names
    names = (out / "data" / "classes.txt").read_text().split()
    counts = np.zeros(len(names), dtype=np.int64)
    pairs = [line.split() for line in split.read_text().splitlines() if line.strip()]
    for _, mask in pairs:
        m = np.asarray(Image.open(out / "data" / mask)).ravel()
        counts += np.bincount(m[m != 255], minlength=len(names))[: len(names)]
    everything = _confidence(ckpt, split, 0.0, tmp_path / "t0.json")
    half = _confidence(ckpt, split, 0.5, tmp_path / "t05.json")
    assert everything["images"] == len(pairs) and everything["method"] == "unimatch"
    for c, name in enumerate(names):
        a, b = everything["per_class"][name], half["per_class"][name]
        assert a["pixels"] == b["pixels"] == counts[c]
        if not counts[c]:
            assert a["confident"] is None
            continue
        # at tau 0 every pixel passes, so a right target is a correct prediction (the class's recall)
        assert a["confident"] == 1.0 and a["targets_right"] == a["right_of_confident"] == a["recall"] == b["recall"]
        assert abs(a["targets_right"] + a["targets_wrong"] - 1.0) < 1e-9
        # a higher threshold passes a subset: never more confident pixels or right targets
        assert b["confident"] <= a["confident"] and b["targets_right"] <= a["targets_right"] + 1e-12
        assert b["targets_into"] <= a["targets_into"] + 1e-12
        # the targets a class's pixels get, by class: the right ones, then the wrong ones
        for r in (a, b):
            assert abs(r["targets_as"][name] - r["targets_right"]) < 1e-9
            assert abs(sum(r["targets_as"].values()) - r["confident"]) < 1e-9
        if b["confident"]:
            assert abs(b["targets_right"] - b["confident"] * b["right_of_confident"]) < 1e-9
        assert abs(b["targets_right"] + b["targets_wrong"] - b["confident"]) < 1e-9
    # wrong targets: what each class receives from the others adds up to all confident wrong pixels
    wrong_total = sum(v["targets_into"] * v["pixels"] for v in everything["per_class"].values() if v["pixels"])
    right_total = sum(v["targets_right"] * v["pixels"] for v in everything["per_class"].values() if v["pixels"])
    assert abs(wrong_total + right_total - counts.sum()) < 1e-6 * counts.sum()
    # what the other classes' pixels get as this class is what this class receives
    for name, v in everything["per_class"].items():
        if v["pixels"]:
            given = sum(w["targets_as"][name] * w["pixels"] for other, w in everything["per_class"].items() if other != name and w["pixels"])
            assert abs(given - v["targets_into"] * v["pixels"]) < 1e-6 * counts.sum()
    bad = subprocess.run([sys.executable, str(REPO / "bench/demo_confidence.py"), "-c", str(ckpt), "--split", str(split), "--tau", "1.5"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--tau 1.5" in bad.stderr and "Traceback" not in bad.stderr
