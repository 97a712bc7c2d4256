"""Labeled/unlabeled (and validation) splits: drawing them reproducibly and keeping them as plain text files.

A split file has one pair per line, `image mask` relative to the dataset root (just `image` for
an image without a mask): labeled.txt, unlabeled.txt and, with `--val`, val.txt (validation
images carved out of the pool before the labeled draw). `prepare_dataset` also writes the data
report (report.json, `report.py`). Files are written atomically and never silently replaced,
since the same split must be reused by every method that is compared on it.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from semiseg_cli.data.checks import DatasetProblems, check_mask_content
from semiseg_cli.data.layouts import Layout, LayoutOptions, get_layout
from semiseg_cli.errors import UserError, flush_warnings, warn
from semiseg_cli.io import check_output_dir, read_text, write_text

Pair = tuple[str, "str | None"]


# --------------------------------------------------------------------------------- amounts


def _amount_value(text: str, what: str = "labeled") -> Fraction | int:
    """A fraction ("1/8", "0.25") as Fraction, a count ("183") as int; UserError otherwise."""
    hint = "use a fraction like 1/8 or 0.125, or a count like 183"
    try:
        if "/" in text or "." in text:
            value = Fraction(text)
        else:
            value = int(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{what} amount {text!r} is not a number; {hint}") from None
    if isinstance(value, Fraction) and not 0 < value <= 1:
        raise UserError(f"{what} fraction {text} must be in (0, 1]; {hint}")
    if isinstance(value, int) and value < 1:
        raise UserError(f"{what} count {text} must be at least 1; {hint}")
    return value


def parse_amounts(text: str) -> list[str]:
    """"1/8", "183" or a comma list like "1/8,1/4,92" -> the validated amounts, in order."""
    amounts = [a.strip() for a in text.split(",")]
    if not any(amounts):
        raise UserError("no labeled amount given; use e.g. 1/8 or 183, or a list like 1/16,1/8,92")
    seen: set[tuple[str, Fraction | int]] = set()  # typed: "1.0" (all) and "1" (one) differ
    for a in amounts:
        if not a:
            raise UserError(f"empty item in the amount list {text!r}; separate amounts with single commas")
        v = _amount_value(a)
        key = (type(v).__name__, v)
        if key in seen:
            raise UserError(f"labeled amount {a} is listed twice in {text!r}")
        seen.add(key)
    return amounts


def amount_count(amount: str, pool_size: int) -> int:
    """How many labeled images `amount` means for a pool of `pool_size`."""
    v = _amount_value(amount.strip())
    if isinstance(v, Fraction):
        count = max(1, round(v * pool_size))
    else:
        count = v
    if count > pool_size:
        raise UserError(f"labeled amount {amount} asks for {count} images but the pool has only {pool_size}")
    return count


def amount_dirname(amount: str) -> str:
    """A folder name for an amount: "1/8" -> "1_8", "183" -> "183"."""
    return amount.strip().replace("/", "_")


# --------------------------------------------------------------------------------- drawing


def draw_split(pairs: Sequence[Pair], amount: str, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(labeled, unlabeled), both sorted. Draws from the sorted pool with its own RNG, so the
    result depends only on the pool, the amount and the seed, never on global random state."""
    pool = sorted(set(pairs), key=lambda p: (p[0], p[1] or ""))
    if not pool:
        raise UserError("cannot draw a split from an empty pool of images")
    count = amount_count(amount, len(pool))
    chosen = set(random.Random(seed).sample(range(len(pool)), count))
    labeled = [p for i, p in enumerate(pool) if i in chosen]
    unlabeled = [p for i, p in enumerate(pool) if i not in chosen]
    return labeled, unlabeled


def parse_val_amount(text: str) -> str:
    """The `--val` amount: one fraction below 1 ("0.2", "1/5") or a count ("50")."""
    text = text.strip()
    if not text:
        raise UserError("--val is empty; give a fraction like 0.2 or a count like 50")
    if "," in text:
        raise UserError(f"--val takes one amount, not a list ({text!r}); give e.g. 0.2 or 50")
    v = _amount_value(text, "--val")
    if isinstance(v, Fraction) and v == 1:
        raise UserError(f"--val {text} would take the whole pool for validation and leave nothing to train on; give e.g. 0.2")
    return text


VAL_SEED_PREFIX = "semiseg-val:"


def draw_val(pairs: Sequence[Pair], amount: str, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(val, rest), both sorted: the validation images carved out of the sorted pool before the
    labeled/unlabeled draw, with an RNG of its own (seeded from `seed` through a string, so it is
    not the labeled draw's stream), so val.txt depends only on the pool, the amount and the seed."""
    pool = sorted(set(pairs), key=lambda p: (p[0], p[1] or ""))
    v = _amount_value(amount.strip(), "--val")
    count = max(1, round(v * len(pool))) if isinstance(v, Fraction) else v
    if count >= len(pool):
        raise UserError(
            f"--val {amount} takes {count} of the {len(pool)} images of the pool and leaves none to train on; "
            "give a smaller fraction or count"
        )
    chosen = set(random.Random(f"{VAL_SEED_PREFIX}{seed}").sample(range(len(pool)), count))
    return [p for i, p in enumerate(pool) if i in chosen], [p for i, p in enumerate(pool) if i not in chosen]


def widen_unlabeled(labeled: Sequence[Pair], unlabeled: Sequence[Pair], extra: Sequence[Pair]) -> list[Pair]:
    """`unlabeled` plus every image of `extra` that is not already labeled or unlabeled, sorted.

    U2PL's VOC "classic" setting draws its labeled images from the 1464 fine `train` pool and
    takes the rest of the 10582 `train_aug` pool as unlabeled: images are matched by image path,
    so an image whose mask lives in another folder in `extra` is still recognised as labeled.
    """
    taken = {img for img, _ in labeled} | {img for img, _ in unlabeled}
    out = list(unlabeled) + [p for p in extra if p[0] not in taken]
    return sorted(set(out), key=lambda p: (p[0], p[1] or ""))


# --------------------------------------------------------------------------------- files


def _format_pairs(pairs: Sequence[Pair]) -> str:
    lines = []
    for img, mask in pairs:
        for rel in (img, mask):
            if rel is not None and (not rel or any(c.isspace() for c in rel)):
                raise UserError(f"cannot write {rel!r} to a split file: paths there may not contain spaces; rename the file")
        lines.append(img if mask is None else f"{img} {mask}")
    return "".join(line + "\n" for line in lines)


def _refuse_changes(files: dict[Path, str], overwrite: bool) -> None:
    """UserError if any file exists with other content; identical files are fine to rewrite."""
    if overwrite:
        return
    for path, text in files.items():
        if path.is_file() and path.read_bytes() != text.encode("utf-8"):
            raise UserError(f"{path} already exists with a different content; pass --overwrite to replace it")
        if path.exists() and not path.is_file():
            raise UserError(f"{path} exists and is not a file; remove it or choose another output folder")


def _write_all(files: dict[Path, str]) -> list[Path]:
    for path, text in files.items():
        write_text(path, text)
    return list(files)


def write_split_files(out_dir: str | Path, labeled: Sequence[Pair], unlabeled: Sequence[Pair], overwrite: bool = False) -> list[Path]:
    """Write `labeled.txt` and `unlabeled.txt` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    files = {out / "labeled.txt": _format_pairs(labeled), out / "unlabeled.txt": _format_pairs(unlabeled)}
    _refuse_changes(files, overwrite)
    return _write_all(files)


def read_split_file(path: str | Path, root: str | Path) -> list[tuple[str, str | None]]:
    """Pairs from a split file, each checked to exist under `root`.

    A leading "/" is dropped, so DeepLab-style lists ("/JPEGImages/x.jpg /Seg.../x.png") work.
    Blank lines and lines starting with # are skipped.
    """
    path, root = Path(path), Path(root)
    text = read_text(path, "split file", "write it with `semiseg prepare-splits` or save it as UTF-8")
    pairs: list[tuple[str, str | None]] = []
    first_line: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise UserError(f"{path} line {n}: expected `image [mask]`, got {len(parts)} fields: {line.strip()!r}")
        rels = [p.lstrip("/") for p in parts]
        for rel in rels:
            if not (root / rel).is_file():
                raise UserError(f"{path} line {n}: {rel} does not exist under {root}; is data.root right?")
        if rels[0] in first_line:  # a repeat would be drawn twice as often: use each image once
            repeats.append((n, first_line[rels[0]]))
            continue
        first_line[rels[0]] = n
        pairs.append((rels[0], rels[1] if len(rels) == 2 else None))
    if not pairs:
        raise UserError(f"split file {path} lists no images")
    if repeats:
        n, first = repeats[0]
        warn(f"{path}: {len(repeats)} line(s) repeat an earlier image (line {n} repeats line {first}); "
             "each image is used once: remove the repeated lines")
    return pairs


# --------------------------------------------------------------------------------- prepare


class Prepared(NamedTuple):
    """What `prepare_dataset` wrote, and the data report (None unless asked for)."""

    written: list[Path]
    report: dict[str, Any] | None


def prepare_splits(
    dataset: str,
    root: str | Path,
    amounts: list[str],
    seed: int,
    out_dir: str | Path,
    split: str = "train",
    overwrite: bool = False,
    tags: bool = False,
    unlabeled_split: str | None = None,
    val_split: str | None = "val",
    options: LayoutOptions | None = None,
    val: str | None = None,
) -> list[Path]:
    """`prepare_dataset` without the report; returns every file written."""
    return prepare_dataset(
        dataset, root, amounts, seed, out_dir, split=split, overwrite=overwrite, tags=tags,
        unlabeled_split=unlabeled_split, val_split=val_split, options=options, val=val, report=False,
    ).written


def prepare_dataset(
    dataset: str,
    root: str | Path,
    amounts: list[str],
    seed: int,
    out_dir: str | Path,
    split: str = "train",
    overwrite: bool = False,
    tags: bool = False,
    unlabeled_split: str | None = None,
    val_split: str | None = "val",
    options: LayoutOptions | None = None,
    val: str | None = None,
    report: bool = True,
) -> Prepared:
    """Validate the pool (and the `val_split` that training will validate on, when the dataset
    has it), draw one split per amount and write them; returns every file written and, with
    `report`, the data report (also written as `out_dir/report.json`).

    `val` ("0.2", "50") carves a validation split out of the pool first, with the seed, and
    writes it as val.txt beside every labeled.txt: its images are in neither labeled nor
    unlabeled, the labeled amounts apply to the rest, and `val_split` is then not looked at.

    `unlabeled_split` adds the images of another pool (not drawn as labeled) to every
    unlabeled.txt: `--split train --unlabeled-split train_aug` is U2PL's VOC classic setting.

    Nothing is written unless the pool is clean, every amount fits and no existing file would
    change (without `overwrite`). One amount writes into `out_dir`; several into
    `out_dir/<amount_dirname>/` (report.json stays in `out_dir`).
    """
    amounts = parse_amounts(",".join(amounts))
    val_amount = parse_val_amount(val) if val is not None else None
    check_output_dir(out_dir, "--out")
    layout = get_layout(dataset, root, options)
    pool = layout.list_pairs(split)
    problems, present, with_ignore = layout.scan(pool)
    if problems:
        raise DatasetProblems(problems, f"the {split} split of {layout.root}")
    if val_amount is None and val_split is not None and val_split != split:
        try:
            val_pairs = layout.list_pairs(val_split)
        except UserError:
            warn(f"{layout.root} has no {val_split!r} split, so it was not checked; `semiseg train` validates on "
                 "data.val_split: set it to a split this dataset has, or draw a validation split out of the pool "
                 "with --val 0.2 (val.txt, for `train --val-list`)")
        else:
            problems = layout.scan(val_pairs).problems
            if problems:
                raise DatasetProblems(problems, f"the {val_split} split of {layout.root} (validation)")
    check_mask_content(layout, present, with_ignore, f"the {split} split of {layout.root}")
    extra: list[Pair] = []
    if unlabeled_split is not None and unlabeled_split != split:
        in_pool = {img for img, _ in pool}
        extra = [p for p in layout.list_pairs(unlabeled_split) if p[0] not in in_pool]  # only images the pool lacks
        problems = layout.scan(extra).problems
        if problems:
            raise DatasetProblems(problems, f"the {unlabeled_split} split of {layout.root}")
    val_drawn, rest = draw_val(pool, val_amount, seed) if val_amount is not None else ([], list(pool))
    out = Path(out_dir)
    files: dict[Path, str] = {}
    draws: list[tuple[str, str, list[Pair], list[Pair]]] = []
    tags_text = _tags_json(layout, present) if tags else None
    for amount in amounts:
        folder = out if len(amounts) == 1 else out / amount_dirname(amount)
        if val_amount is not None:
            _check_fits_after_val(amount, len(rest), len(pool), val_amount)
        labeled, unlabeled = draw_split(rest, amount, seed)
        if extra:
            unlabeled = widen_unlabeled(labeled, unlabeled, extra)
        files[folder / "labeled.txt"] = _format_pairs(labeled)
        files[folder / "unlabeled.txt"] = _format_pairs(unlabeled)
        if val_amount is not None:
            files[folder / "val.txt"] = _format_pairs(val_drawn)
        if tags_text is not None:
            files[folder / "tags.json"] = tags_text
        draws.append((amount, folder.relative_to(out).as_posix(), labeled, unlabeled))
    data_report = None
    if report:
        from semiseg_cli.data.report import build_report

        data_report = build_report(
            layout, pool, split=split, seed=seed, draws=draws, val_pairs=val_drawn, val_amount=val_amount,
            tags=tags, extra=len(extra),
        )
        files[out / "report.json"] = json.dumps(data_report, indent=1) + "\n"
    _refuse_changes(files, overwrite)
    if data_report is not None:
        for line in data_report["warnings"]:
            warn(line)
    flush_warnings()
    return Prepared(_write_all(files), data_report)


def _check_fits_after_val(amount: str, rest: int, pool: int, val_amount: str) -> None:
    v = _amount_value(amount.strip())
    if isinstance(v, int) and v > rest:
        raise UserError(
            f"labeled amount {amount} asks for {v} images but only {rest} of the {pool} remain after --val {val_amount} "
            f"took {pool - rest} for validation; lower --labeled or --val"
        )


def _tags_json(layout: Layout, present: dict[str, list[int]]) -> str:
    """{image: [class ids]} without ignore and the layout's non-tag classes (VOC background)."""
    tags = {img: [c for c in ids if c not in layout.tag_exclude] for img, ids in sorted(present.items())}
    return json.dumps(tags, indent=1) + "\n"
