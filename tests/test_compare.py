"""`semiseg compare` on hand-made eval reports: the table, the gaps, the JSON, run folders,
--split, and every bad input refused as one line with nothing written. Also the
bench/compare_runs.py wrapper keeps the JSON "runs" shape bench/seed_summary.py reads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from semiseg_cli.cli import app
from tests.cli_checks import no_temp_files, one_line_error

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def report(
    miou: float | None, ious: dict[str, float | None], *, method: str = "supervised", split: str = "val",
    aacc: float = 0.9, macc: float = 0.6, step: int = 300, weights: str = "student", mode: str = "whole",
    flip: bool = False, scales: list[float] | None = None, images: int = 12, checkpoint: str = "runs/x/last.pt",
) -> dict[str, Any]:
    """An eval report shaped like `semiseg eval --json` writes it."""
    return {
        "mIoU": miou, "aAcc": aacc, "mAcc": macc,
        "per_class": {n: {"IoU": v, "Acc": None if v is None else min(1.0, v + 0.05), "pixels": 100} for n, v in ious.items()},
        "absent_classes": [n for n, v in ious.items() if v is None],
        "checkpoint": checkpoint, "step": step, "method": method, "split": split, "images": images,
        "protocol": {"mode": mode, "scales": scales or [1.0], "flip": flip, "crop_size": [64, 64] if mode == "slide" else None},
        "weights": weights,
    }


A = report(0.5, {"bg": 0.9, "cat": 0.4, "dog": 0.2}, aacc=0.91, macc=0.61, checkpoint="runs/a/last.pt")
B = report(0.5123, {"bg": 0.9012, "cat": 0.45, "dog": 0.1857}, method="u2pl", weights="teacher", aacc=0.9, macc=0.6234,
           step=1200, mode="slide", flip=True, scales=[0.75, 1.0, 1.25], images=34, checkpoint="runs/b/best.pt")
C = report(0.475, {"bg": 0.88, "cat": 0.35, "dog": 0.195}, method="fixmatch", checkpoint="runs/c/last.pt")


def write(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [write(tmp_path / name / "eval.json", r) for name, r in (("a", A), ("b", B), ("c", C))]


def test_table_has_every_number_and_signed_gap(three: list[Path]) -> None:
    r = runner.invoke(app, ["compare", *map(str, three), "--label", "A", "--label", "B", "--label", "C"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    table_rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
                  for line in out.splitlines() if line.startswith("│")}
    #                 A        B       gap      C       gap
    assert table_rows["bg"] == ["90.00", "90.12", "+0.12", "88.00", "-2.00"]
    assert table_rows["cat"] == ["40.00", "45.00", "+5.00", "35.00", "-5.00"]
    assert table_rows["dog"] == ["20.00", "18.57", "-1.43", "19.50", "-0.50"]
    assert table_rows["mIoU"] == ["50.00", "51.23", "+1.23", "47.50", "-2.50"]
    assert table_rows["aAcc"] == ["91.00", "90.00", "-1.00", "90.00", "-1.00"]
    assert table_rows["mAcc"] == ["61.00", "62.34", "+1.34", "60.00", "-1.00"]
    assert list(table_rows)[:3] == ["bg", "cat", "dog"]  # classes first, then the metrics
    assert "B: +1.23 mIoU points over A" in out
    assert "C: -2.50 mIoU points over A" in out
    lines = out.splitlines()
    prov_b = next(line for line in lines if line.startswith("B: method u2pl"))
    for part in ("runs/b/best.pt", "teacher weights", "step 1200", "split val", "34 images", "slide 64x64",
                 "scales 0.75,1.0,1.25", "flip", str(three[1])):
        assert part in prov_b, (part, prov_b)
    prov_a = next(line for line in lines if line.startswith("A: method supervised"))
    for part in ("runs/a/last.pt", "student weights", "step 300", "12 images", "whole", "no flip"):
        assert part in prov_a, (part, prov_a)
    assert r.stderr == ""  # same split: no warning


def test_default_labels_are_method_and_run_folder(three: list[Path]) -> None:
    r = runner.invoke(app, ["compare", str(three[0]), str(three[1]), "--json", "-"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # --json -: only the JSON on stdout, the table on stderr
    assert [run["label"] for run in data["runs"]] == ["supervised (a)", "u2pl (b)"]
    assert data["baseline"] == "supervised (a)"
    assert data["gaps"] == {"u2pl (b)": 1.23}
    assert "u2pl (b): +1.23 mIoU points over supervised (a)" in r.stderr


def test_json_output_has_runs_gaps_and_baseline(three: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp" / "compare.json"
    r = runner.invoke(app, ["compare", *map(str, three), "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert set(data) == {"runs", "gaps", "baseline"}
    assert data["baseline"] == "supervised (a)"
    assert data["gaps"] == {"u2pl (b)": 1.23, "fixmatch (c)": -2.5}  # exact, in mIoU points
    for run, src, rep in zip(data["runs"], three, (A, B, C)):
        assert run == {"label": run["label"], "source": str(src), **rep}
    assert no_temp_files(out.parent)  # written atomically, no temporary left


def test_run_folder_uses_eval_json_and_split_picks_eval_test(tmp_path: Path) -> None:
    for name, r_val, r_test in (("sup", A, C), ("semi", B, C)):
        write(tmp_path / name / "eval.json", r_val)
        write(tmp_path / name / "eval_test.json", {**r_test, "method": r_val["method"], "split": "test",
                                                   "mIoU": r_val["mIoU"] - 0.1})
    runs = [str(tmp_path / "sup"), str(tmp_path / "semi")]
    r = runner.invoke(app, ["compare", *runs, "--json", "-"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [run["source"] for run in data["runs"]] == [str(tmp_path / n / "eval.json") for n in ("sup", "semi")]
    assert [run["split"] for run in data["runs"]] == ["val", "val"]
    assert [run["label"] for run in data["runs"]] == ["supervised (sup)", "u2pl (semi)"]

    r = runner.invoke(app, ["compare", *runs, "--split", "test", "--json", "-"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [run["source"] for run in data["runs"]] == [str(tmp_path / n / "eval_test.json") for n in ("sup", "semi")]
    assert [run["split"] for run in data["runs"]] == ["test", "test"]
    assert data["gaps"] == {"u2pl (semi)": 1.23}


def test_different_splits_are_compared_with_a_warning(tmp_path: Path) -> None:
    a = write(tmp_path / "a" / "eval.json", A)
    b = write(tmp_path / "b" / "eval_test.json", {**B, "split": "test"})
    r = runner.invoke(app, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "val" in warning[0] and "test" in warning[0], r.stderr
    assert "+1.23" in r.stdout


def test_na_miou_is_shown_and_has_no_gap(tmp_path: Path) -> None:
    a = write(tmp_path / "a" / "eval.json", A)
    b = write(tmp_path / "b" / "eval.json", report(None, {"bg": None, "cat": None, "dog": None}, method="u2pl"))
    out = tmp_path / "c.json"
    r = runner.invoke(app, ["compare", str(a), str(b), "--label", "A", "--label", "B", "--json", str(out)])
    assert r.exit_code == 0, r.output
    miou_row = next(line for line in r.stdout.splitlines() if line.startswith("│") and "mIoU" in line)
    assert [c.strip() for c in miou_row.split("│")[2:-1]] == ["50.00", "n/a", "n/a"]
    assert "mIoU points over" not in r.stdout
    assert json.loads(out.read_text())["gaps"] == {"B": None}


def test_one_input_is_a_table_without_gaps(three: list[Path]) -> None:
    r = runner.invoke(app, ["compare", str(three[0]), "--json", "-"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["gaps"] == {} and data["baseline"] == "supervised (a)" and len(data["runs"]) == 1


def _bad_cases(tmp: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (compare arguments, a fragment the error line must hold)."""
    corrupt = write(tmp / "corrupt" / "eval.json", '{"mIoU": 0.5, "per_class": ')
    not_report = write(tmp / "notreport" / "eval.json", {"mIoU": 0.5, "hello": 1})
    a_list = write(tmp / "list" / "eval.json", [1, 2, 3])
    bad_iou = write(tmp / "badiou" / "eval.json", {**A, "per_class": {"bg": {"IoU": "high"}}})
    binary = tmp / "binary" / "eval.json"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"\xff\xfe\x00garbage")
    other_classes = write(tmp / "other" / "eval.json", report(0.4, {"bg": 0.8, "cat": 0.3, "bird": 0.1}))
    comparison = write(tmp / "cmp.json", {"runs": [{"label": "x", **A}]})
    (tmp / "empty_run").mkdir()
    (tmp / "empty_run" / "last.pt").write_bytes(b"")
    test_only = write(tmp / "test_only" / "eval_test.json", {**A, "split": "test"})
    return {
        "missing file": ([str(good), str(tmp / "nope" / "eval.json")], "does not exist"),
        "missing folder": ([str(tmp / "no_such_run")], "does not exist"),
        "corrupt json": ([str(good), str(corrupt)], "not valid JSON"),
        "not utf-8": ([str(binary)], "not UTF-8"),
        "missing keys": ([str(good), str(not_report)], "lacks aAcc, mAcc, per_class, method, split"),
        "json list": ([str(a_list)], "not an eval report"),
        "non-numeric IoU": ([str(bad_iou)], "no numeric IoU"),
        "a comparison file": ([str(comparison)], "is a comparison"),
        "classes differ": ([str(good), str(other_classes)], "class lists differ"),
        "no input": ([], "nothing to compare"),
        "too few labels": ([str(good), str(other_classes), "--label", "x"], "2 inputs but 1 --label"),
        "too many labels": ([str(good), "--label", "x", "--label", "y"], "1 input but 2 --label"),
        "same label twice": ([str(good), str(c_report(tmp)), "--label", "x", "--label", "x"], "given twice"),
        "same report twice": ([str(good), str(good.parent)], "same report"),
        "run without eval.json": ([str(tmp / "empty_run")],
                                  f"semiseg eval -c {tmp / 'empty_run' / 'last.pt'} --json {tmp / 'empty_run' / 'eval.json'}"),
        "run with only eval_test.json": ([str(tmp / "test_only")], "--split"),
        "no report on that split": ([str(good.parent), "--split", "train"], "no eval report on split 'train'"),
        "file on another split": ([str(test_only), "--split", "val"], "is a report on split 'test'"),
    }


def c_report(tmp: Path) -> Path:
    return write(tmp / "c_ok" / "eval.json", C)


@pytest.mark.parametrize("case", [
    "missing file", "missing folder", "corrupt json", "not utf-8", "missing keys", "json list", "non-numeric IoU",
    "a comparison file", "classes differ", "no input", "too few labels", "too many labels", "same label twice",
    "same report twice", "run without eval.json", "run with only eval_test.json", "no report on that split",
    "file on another split",
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    good = write(tmp_path / "good" / "eval.json", A)
    args, fragment = _bad_cases(tmp_path, good)[case]
    out = tmp_path / "out" / "compare.json"
    r = runner.invoke(app, ["compare", *args, "--json", str(out)])
    err = one_line_error(r, quiet_stdout=True)
    assert fragment in err, err
    assert not out.exists() and not out.parent.exists()


def test_classes_differ_names_both_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a" / "eval.json", A)
    b = write(tmp_path / "b" / "eval.json", report(0.4, {"bg": 0.8, "cat": 0.3, "bird": 0.1}))
    err = one_line_error(runner.invoke(app, ["compare", str(a), str(b)]), quiet_stdout=True)
    assert str(a) in err and str(b) in err and "class lists differ" in err and "dog" in err and "bird" in err


def test_json_is_not_overwritten_without_overwrite(three: list[Path], tmp_path: Path) -> None:
    out = write(tmp_path / "compare.json", "keep me")
    err = one_line_error(runner.invoke(app, ["compare", *map(str, three), "--json", str(out)]), quiet_stdout=True)
    assert "--overwrite" in err
    assert out.read_text() == "keep me"
    r = runner.invoke(app, ["compare", *map(str, three), "--json", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["baseline"] == "supervised (a)"


def test_json_never_replaces_an_input_report(three: list[Path]) -> None:
    before = three[1].read_text()
    err = one_line_error(runner.invoke(app, ["compare", *map(str, three), "--json", str(three[1]), "--overwrite"]), quiet_stdout=True)
    assert "input report" in err
    assert three[1].read_text() == before


def test_bench_wrapper_writes_the_runs_shape_seed_summary_reads(three: list[Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "bench" / "compare_runs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = write(tmp_path / "res.json", "an earlier result")  # the bench scripts rerun into the same file
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(three[0]), str(three[1]), "--out", str(out)])
    mod.main()
    printed = capsys.readouterr().out
    assert "u2pl (b): +1.23 mIoU points over supervised (a)" in printed
    data = json.loads(out.read_text())
    # What compare_runs.py has always written: {"label": "METHOD (FOLDER)", **report} per input.
    assert [{k: v for k, v in run.items() if k != "source"} for run in data["runs"]] == [
        {"label": "supervised (a)", **A}, {"label": "u2pl (b)", **B}]
    assert data["gaps"] == {"u2pl (b)": 1.23}

    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "does not exist" in err
