"""`semiseg compare`: `semiseg eval --json` reports side by side, with each run's gap to the first.

Each input is an eval report (the JSON `semiseg eval --json` writes) or a run folder, whose
`eval.json` is used (`split=` picks, among its `eval*.json`, the report on that split). Every
input is loaded and checked before anything is printed or written: a missing file, a file that
is not JSON or not an eval report, reports whose class lists differ, a label count that does not
match the inputs, an output that exists without `overwrite` are each one `UserError`.

The comparison as JSON: `{"runs": [{"label", "source", **report}, ...], "gaps": {label: gap},
"baseline": label}`. "runs" keeps the shape `bench/compare_runs.py` has always written (a label
plus the whole report), which `bench/seed_summary.py` reads; a gap is the run's mIoU minus the
first run's, in mIoU points (100 x the difference of the fractions), None when either is n/a.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from semiseg_cli.errors import UserError, flush_warnings, warn
from semiseg_cli.io import check_output_file, read_text, write_json

# The keys every report of `semiseg eval --json` has and the comparison needs.
REQUIRED_KEYS = ("mIoU", "aAcc", "mAcc", "per_class", "method", "split")
METRIC_ROWS = ("mIoU", "aAcc", "mAcc")


@dataclass
class Entry:
    """One input: where its report came from, the report, and its label."""

    given: Path  # the argument as typed (a report or a run folder)
    source: Path  # the report read
    report: dict[str, Any]
    label: str = ""


def _eval_command(run: Path, split: str | None) -> str:
    ckpt = run / "last.pt"
    if not ckpt.exists() and (run / "best.pt").exists():
        ckpt = run / "best.pt"
    if split is None:
        return f"semiseg eval -c {ckpt} --json {run / 'eval.json'}"
    return f"semiseg eval -c {ckpt} --split {split} --json {run / f'eval_{split}.json'}"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_report(path: Path) -> dict[str, Any]:
    """An eval report from `path`, checked: a one-line `UserError` when the file is missing,
    not JSON, or not what `semiseg eval --json` writes."""
    text = read_text(path, "eval report")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"eval report {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "write it again with `semiseg eval --json`"
        ) from None
    if isinstance(data, dict) and "runs" in data and "per_class" not in data:
        raise UserError(f"{path} is a comparison (from `semiseg compare --json`), not an eval report; give the eval reports it compares")
    if not isinstance(data, dict):
        raise UserError(f"{path} is not an eval report (a JSON object from `semiseg eval --json`); it holds a JSON {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"{path} is not an eval report from `semiseg eval --json`: it lacks {', '.join(missing)}")
    for key in METRIC_ROWS:
        if data[key] is not None and not _is_number(data[key]):
            raise UserError(f"{path} is not an eval report: {key} is {data[key]!r}, not a number")
    per_class = data["per_class"]
    if not isinstance(per_class, dict) or not per_class:
        raise UserError(f"{path} is not an eval report: per_class is not a non-empty mapping of class names")
    for name, row in per_class.items():
        if not isinstance(row, dict) or "IoU" not in row or (row["IoU"] is not None and not _is_number(row["IoU"])):
            raise UserError(f"{path} is not an eval report: per_class[{name!r}] has no numeric IoU")
    return data


def _run_reports(run: Path) -> list[Path]:
    """The run folder's `eval*.json`, eval.json first."""
    found = sorted(p for p in run.glob("eval*.json") if p.is_file())
    return sorted(found, key=lambda p: p.name != "eval.json")


def resolve_input(path: Path, split: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(report file, report) of one argument: an eval report, or a run folder's eval.json (or,
    with `split`, its eval*.json on that split)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give an eval report (`semiseg eval --json`) or a run folder")
    if not path.is_dir():
        report = read_report(path)
        if split is not None and report["split"] != split:
            raise UserError(f"--split {split}: {path} is a report on split {report['split']!r}")
        return path, report
    candidates = _run_reports(path)
    if split is None:
        main = path / "eval.json"
        if main.is_file():
            return main, read_report(main)
        others = ""
        if candidates:
            others = f" (it has {', '.join(p.name for p in candidates)}: give that file, or --split SPLIT)"
        raise UserError(f"run folder {path} has no eval.json{others}; write one with `{_eval_command(path, None)}`")
    # Named candidates first, so a broken stray file elsewhere in the folder does not block.
    preferred = [path / "eval.json", path / f"eval_{split}.json"]
    ordered = [p for p in preferred if p in candidates] + [p for p in candidates if p not in preferred]
    seen: list[str] = []
    for p in ordered:
        report = read_report(p)
        if report["split"] == split:
            return p, report
        seen.append(f"{p.name}: {report['split']}")
    have = f" (it has {'; '.join(seen)})" if seen else ""
    raise UserError(f"run folder {path} has no eval report on split {split!r}{have}; write one with `{_eval_command(path, split)}`")


def _folder_name(entry: Entry) -> str:
    folder = entry.given if entry.given.is_dir() else entry.source.parent
    return folder.name or folder.resolve().name


def default_labels(entries: Sequence[Entry]) -> list[str]:
    """Labels "<method> (<run folder>)", as `bench/compare_runs.py` has always labelled runs (and
    `bench/seed_summary.py` matches runs by that folder name). Labels that would collide take
    the report's file name, then the path as given."""
    styles = (
        lambda e: _folder_name(e),
        lambda e: f"{_folder_name(e)}/{e.source.name}",
        lambda e: str(e.source),
    )
    labels = [""] * len(entries)
    pending = list(range(len(entries)))
    for style in styles:
        names = {i: f"{entries[i].report['method']} ({style(entries[i])})" for i in pending}
        counts: dict[str, int] = {}
        for n in names.values():
            counts[n] = counts.get(n, 0) + 1
        taken = set(labels) - {""}
        for i, n in names.items():
            if counts[n] == 1 and n not in taken:
                labels[i] = n
        pending = [i for i in pending if not labels[i]]
        if not pending:
            break
    for i in pending:  # same method, folder and path text: cannot happen for distinct files
        labels[i] = f"{entries[i].report['method']} ({entries[i].source}) #{i + 1}"
    return labels


def load_entries(inputs: Sequence[Path], labels: Sequence[str] | None = None, split: str | None = None) -> list[Entry]:
    """Every input resolved, read and checked, the class lists compared, and the labels set."""
    if not inputs:
        raise UserError("nothing to compare: give one or more eval reports (`semiseg eval --json`) or run folders")
    labels = list(labels or [])
    if labels and len(labels) != len(inputs):
        raise UserError(
            f"{len(inputs)} input{'s' if len(inputs) != 1 else ''} but {len(labels)} --label value"
            f"{'s' if len(labels) != 1 else ''}; give one --label per input, in order, or none"
        )
    for lab in labels:
        if not lab.strip():
            raise UserError("--label is empty; give each input a name")
        if labels.count(lab) > 1:
            raise UserError(f"--label {lab!r} is given twice; each input needs its own label")
    entries: list[Entry] = []
    seen: dict[Path, Path] = {}
    for given in inputs:
        source, report = resolve_input(Path(given), split)
        key = source.resolve()
        if key in seen:
            raise UserError(f"{given} and {seen[key]} are the same report {source}; give each report once")
        seen[key] = Path(given)
        entries.append(Entry(Path(given), source, report))
    first = entries[0]
    base_classes = list(first.report["per_class"])
    for e in entries[1:]:
        classes = list(e.report["per_class"])
        if set(classes) != set(base_classes):
            only_first = [c for c in base_classes if c not in classes]
            only_this = [c for c in classes if c not in base_classes]
            detail = "; ".join(
                part for part in (
                    f"only in {first.source}: {', '.join(only_first)}" if only_first else "",
                    f"only in {e.source}: {', '.join(only_this)}" if only_this else "",
                ) if part
            )
            raise UserError(f"{first.source} and {e.source}: the class lists differ ({detail}); compare reports of the same classes")
    for e, lab in zip(entries, labels or default_labels(entries)):
        e.label = lab
    splits: dict[str, list[str]] = {}
    for e in entries:
        splits.setdefault(str(e.report["split"]), []).append(e.label)
    if len(splits) > 1:
        warn("comparing reports on different splits (" + "; ".join(f"{s}: {', '.join(labs)}" for s, labs in splits.items())
             + "); their numbers are not measured on the same images")
    return entries


def points_gap(value: float | None, base: float | None) -> float | None:
    """`value - base` in points (100 x), rounded to 1e-4 points (the reports hold 1e-6), None
    when either is n/a."""
    if value is None or base is None:
        return None
    return round(100 * (value - base), 4)


def comparison(entries: Sequence[Entry]) -> dict[str, Any]:
    """The machine-readable comparison (see the module's docstring)."""
    base = entries[0].report["mIoU"]
    runs = [
        {"label": e.label, "source": str(e.source), **{k: v for k, v in e.report.items() if k not in ("label", "source")}}
        for e in entries
    ]
    gaps = {e.label: points_gap(e.report["mIoU"], base) for e in entries[1:]}
    return {"runs": runs, "gaps": gaps, "baseline": entries[0].label}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _gap_text(g: float | None) -> str:
    return "n/a" if g is None else f"{g:+.2f}"


def provenance(entry: Entry) -> str:
    """One line: where a column's numbers come from and how they were measured."""
    r = entry.report
    proto = r.get("protocol") or {}
    if proto:
        how = str(proto.get("mode", "?"))
        if proto.get("mode") == "slide" and proto.get("crop_size"):
            how += " " + "x".join(map(str, proto["crop_size"]))
        how += ", scales " + ",".join(map(str, proto.get("scales") or [1.0]))
        how += ", flip" if proto.get("flip") else ", no flip"
    else:
        how = "protocol not recorded"
    images = r.get("images")
    return (
        f"{entry.label}: method {r['method']}, checkpoint {r.get('checkpoint', '?')} ({r.get('weights', '?')} weights), "
        f"step {r.get('step', '?')}, split {r['split']}, {images if images is not None else '?'} images, {how}; "
        f"report {entry.source}"
    )


def print_comparison(entries: Sequence[Entry], console: Any) -> None:
    """The side-by-side table (classes, then mIoU, aAcc, mAcc; a gap column after every run but
    the first), the mIoU gaps and one provenance line per run."""
    from rich.markup import escape
    from rich.table import Table

    first = entries[0]
    splits = list(dict.fromkeys(str(e.report["split"]) for e in entries))
    table = Table(title=f"{escape(', '.join(splits))} mIoU side by side")
    table.add_column("class")
    for i, e in enumerate(entries):
        table.add_column(escape(e.label), justify="right")
        if i:
            table.add_column("gap", justify="right")

    def row(values: list[float | None], bold: bool = False) -> list[str]:
        cells = []
        for i, v in enumerate(values):
            cells.append(_pct(v))
            if i:
                cells.append(_gap_text(points_gap(v, values[0])))
        return [f"[bold]{c}" for c in cells] if bold else cells

    for name in first.report["per_class"]:
        table.add_row(escape(name), *row([e.report["per_class"][name]["IoU"] for e in entries]))
    table.add_section()
    for key in METRIC_ROWS:
        bold = key == "mIoU"
        table.add_row(f"[bold]{key}" if bold else key, *row([e.report[key] for e in entries], bold))
    caption = []
    if len(entries) > 1:
        caption.append(f"gap: points of the column to its left minus {escape(first.label)}")
    if any(v["IoU"] is None for e in entries for v in e.report["per_class"].values()):
        caption.append("n/a: class absent from both prediction and ground truth, left out of the mean")
    table.caption = "\n".join(caption) or None
    console.print(table)
    for e in entries[1:]:
        g = points_gap(e.report["mIoU"], first.report["mIoU"])
        if g is not None:
            console.print(f"{e.label}: {g:+.2f} mIoU points over {first.label}", highlight=False, markup=False, soft_wrap=True)
    for e in entries:
        console.print(provenance(e), highlight=False, markup=False, soft_wrap=True)


def run_compare(
    inputs: Sequence[Path],
    labels: Sequence[str] | None = None,
    split: str | None = None,
    json_out: Path | str | None = None,
    overwrite: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Check every input and the output, then print the comparison on `console` and write it
    to `json_out` (`-`: stdout). Returns the comparison."""
    to_stdout = json_out is not None and str(json_out) == "-"
    out_path = None if json_out is None or to_stdout else Path(json_out)
    check_output_file(out_path, overwrite, "--json comparison")
    entries = load_entries(inputs, labels, split)
    if out_path is not None:
        target = out_path.resolve()
        for e in entries:
            if e.source.resolve() == target:
                raise UserError(f"--json {out_path} is the input report {e.given}; write the comparison to another file")
    result = comparison(entries)
    flush_warnings()  # the checks have passed
    if console is not None:
        print_comparison(entries, console)
    if to_stdout:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        sys.stdout.flush()
    elif out_path is not None:
        write_json(out_path, result)
    return result

