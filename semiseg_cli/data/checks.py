"""Checks of a training run's data before any work: every file, and what the files mean together.

`check_training_data` reads every labeled, unlabeled and validation image completely (a truncated
JPEG fails here, not an hour into training) and every mask, and reports all bad files at once.
Then it looks at the pools as a whole: inputs a run can only fail on are refused (no labeled
pixel at all; masks where one class and "ignore" are all there is, the usual sign of 0/255
binary masks; image-level tags identical for every image), and questionable ones get a warning
line that says what to do (classes no labeled mask shows, images both labeled and unlabeled, a
batch larger than its pool). `prepare-splits` runs the same pool checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from semiseg_cli.data.layouts import IGNORE, Layout, Pair
from semiseg_cli.errors import UserError, warn


SHOWN_PROBLEMS = 3


class DatasetProblems(UserError):
    """The pool has bad files. The message is one line; `.problems` holds every line for the CLI."""

    shown = SHOWN_PROBLEMS

    def __init__(self, problems: list[str], where: str) -> None:
        self.problems = list(problems)
        n = len(problems)
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f"; and {n - SHOWN_PROBLEMS} more" if n > SHOWN_PROBLEMS else ""
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in {where}: {shown}{more}; fix them and run again")


@dataclass
class PoolReport:
    """What the scan of a run's pools found (class ids per image with a mask)."""

    labeled_present: dict[str, list[int]] = field(default_factory=dict)
    labeled_with_ignore: set[str] = field(default_factory=set)


def check_mask_content(layout: Layout, present: dict[str, list[int]], with_ignore: set[str], where: str) -> None:
    """Refuse masks that cannot mean a segmentation task; warn about classes never shown."""
    if not present:
        return
    seen = sorted({c for ids in present.values() for c in ids})
    names = layout.class_names
    if not seen:
        raise UserError(
            f"the masks of {where} hold no labeled pixel (every pixel is {IGNORE} = ignore); "
            "check the mask files: class ids go 0..C-1 and 255 marks pixels to ignore"
        )
    if len(seen) == 1 and len(names) > 1:
        only = seen[0]
        if with_ignore:
            raise UserError(
                f"the masks of {where} hold only class {only} ({names[only]}) and {IGNORE}; {IGNORE} means ignore, so "
                f"{', '.join(n for i, n in enumerate(names) if i != only)} never appear. If {IGNORE} marks the foreground "
                f"(0/255 binary masks), store it as 1 (e.g. mask // 255) and list the classes in classes.txt"
            )
        raise UserError(f"the masks of {where} hold only class {only} ({names[only]}); there is nothing to segment")
    absent = [names[c] for c in range(len(names)) if c not in seen]
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        warn(
            f"{len(absent)} of {len(names)} classes never appear in the masks of {where} ({shown}); the model cannot "
            "learn them: label more images or draw another split"
        )


def check_training_data(
    layout: Layout,
    labeled: Sequence[Pair],
    unlabeled: Sequence[Pair],
    val: Sequence[Pair],
    *,
    labeled_needs_masks: bool,
    val_split: str,
    labeled_batch: int,
    unlabeled_batch: int | None,
) -> PoolReport:
    problems: list[str] = []
    report = PoolReport()
    if labeled_needs_masks:
        no_mask = [img for img, mask in labeled if mask is None]
        if len(no_mask) == len(labeled):
            raise UserError(
                f"none of the {len(labeled)} labeled images has a mask, so there are no labeled pixels to learn from; "
                "give a labeled list whose lines read `image mask` (semiseg prepare-splits writes them)"
            )
    scan = layout.scan(list(labeled), require_masks=labeled_needs_masks)
    problems += [f"labeled: {p}" for p in scan.problems]
    report.labeled_present, report.labeled_with_ignore = scan.present, scan.with_ignore
    if unlabeled:
        problems += [f"unlabeled: {p}" for p in layout.scan(list(unlabeled), require_masks=False).problems]
    val_scan = layout.scan(list(val), require_masks=True)
    problems += [f"val ({val_split}): {p}" for p in val_scan.problems]
    if problems:
        raise DatasetProblems(problems, f"the training data under {layout.root}")
    if labeled_needs_masks:
        check_mask_content(layout, scan.present, scan.with_ignore, f"the {len(labeled)} labeled images")
    trained = {img for img, _ in labeled} | {img for img, _ in unlabeled}
    seen_in_training = sorted({img for img, _ in val} & trained)
    if seen_in_training:
        warn(
            f"{len(seen_in_training)} validation image(s) ({val_split}) are training images too (e.g. {seen_in_training[0]}), "
            "so validation scores are optimistic: draw the validation split with `semiseg prepare-splits --val` so it is disjoint"
        )
    both = {img for img, _ in labeled} & {img for img, _ in unlabeled}
    if both:
        warn(
            f"{len(both)} image(s) are listed as both labeled and unlabeled (e.g. {sorted(both)[0]}); they are used both ways: "
            "draw the split with `semiseg prepare-splits` so the two lists are disjoint"
        )
    for what, pool, batch in (("labeled", labeled, labeled_batch), ("unlabeled", unlabeled, unlabeled_batch)):
        if pool and batch is not None and batch > len(pool):
            warn(
                f"the {what} batch ({batch}) is larger than the {what} pool ({len(pool)} images), so every batch repeats "
                f"images; lower the batch size to at most {len(pool)}"
            )
    return report


def check_tags(tags: dict[str, list[int]], images: Sequence[str], class_names: Sequence[str]) -> None:
    """Weak supervision learns from differences between images' tags: identical tags for every
    image (or none at all) teach nothing."""
    sets = {tuple(sorted(tags.get(img, []))) for img in images}
    if len(images) > 1 and len(sets) == 1:
        only = next(iter(sets))
        shown = ", ".join(class_names[c] for c in only) if only else "no class"
        raise UserError(
            f"every one of the {len(images)} training images has the same tags ({shown}), so a model learning from tags "
            "cannot tell classes apart; check the tags file (or the masks they are derived from)"
        )
