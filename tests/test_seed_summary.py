"""bench/seed_summary.py on hand-made per-seed files: paired gaps, the sign-flip test, the
per-class means and the Markdown table with val / test cells."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def load() -> Any:
    spec = importlib.util.spec_from_file_location("seed_summary", REPO / "bench" / "seed_summary.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(label: str, miou: float, a: float, b: float) -> dict[str, Any]:
    return {"label": f"{label} ({label})", "mIoU": miou, "per_class": {"a": {"IoU": a}, "b": {"IoU": b}}}


def seed_file(path: Path, runs: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"runs": runs}))
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    val = [
        seed_file(tmp_path / "r_1200.json", [run("supervised", 0.40, 0.6, 0.2), run("x", 0.43, 0.6, 0.26)]),
        seed_file(tmp_path / "r_1200_s1.json", [run("supervised", 0.42, 0.6, 0.24), run("x", 0.41, 0.6, 0.22)]),
        seed_file(tmp_path / "r_1200_s2.json", [run("supervised", 0.38, 0.5, 0.26), run("x", 0.44, 0.6, 0.28),
                                                run("y", 0.30, 0.4, 0.2)]),
    ]
    test = [seed_file(tmp_path / f"t{i}.json", [run("supervised", 0.30 + i / 100, 0.5, 0.1), run("x", 0.33, 0.5, 0.16)])
            for i in range(3)]
    return val, test


def test_paired_gaps_sign_flip_and_class_means(files: tuple[list[Path], list[Path]]) -> None:
    mod = load()
    val, _ = files
    s = mod.summarise({p.stem: json.loads(p.read_text()) for p in val}, "supervised")
    x = s["runs"]["x"]
    assert x["gap"] == pytest.approx({"r_1200": 3.0, "r_1200_s1": -1.0, "r_1200_s2": 6.0})
    assert x["mean_gap"] == pytest.approx(8 / 3) and x["wins"] == 2
    # Of the 8 sign patterns of (3, -1, 6), |sum| >= 8 for sums 8, 10, -10 and -8.
    assert x["p_sign_flip"] == pytest.approx(4 / 8)
    assert s["runs"]["y"]["gap"] == pytest.approx({"r_1200_s2": -8.0}) and s["runs"]["y"]["p_sign_flip"] is None
    assert s["per_class_mean"]["x"] == pytest.approx({"a": 60.0, "b": 25.333333})
    assert s["per_class_mean"]["y"] == pytest.approx({"a": 40.0, "b": 20.0})


def test_markdown_has_val_and_test_in_every_cell(files: tuple[list[Path], list[Path]], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    mod = load()
    val, test = files
    monkeypatch.setattr(sys, "argv", ["seed_summary.py", *map(str, val), "--test", *map(str, test), "--markdown"])
    mod.main()
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in out.splitlines() if ln.startswith("| ")}
    assert rows["supervised"][:4] == ["40.00 / 30.00", "42.00 / 31.00", "38.00 / 32.00", "40.00 / 31.00"]
    # x: test gaps 3, 2, 1 -> +2.00 ± 0.58, ahead on all three.
    assert rows["x"][4:6] == ["+2.67 ± 2.03 / +2.00 ± 0.58", "2/3 / 3/3"]
    assert rows["y"][3] == "30.00 / — (1 seed)"
    assert rows["b"] == ["23.3", "25.3", "20.0"]  # the per-class table: supervised, x, y

    monkeypatch.setattr(sys, "argv", ["seed_summary.py", *map(str, val), "--test", str(test[0]), "--markdown"])
    with pytest.raises(SystemExit, match="one per seed"):
        mod.main()
