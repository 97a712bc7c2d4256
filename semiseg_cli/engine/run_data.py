"""A run's data: the labeled/unlabeled pools, every file checked once, and the datasets.

The checks (`data/checks.py`) read every labeled, unlabeled and val image completely before the
run folder exists, so a bad file costs a second, not a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semiseg_cli.errors import UserError
from semiseg_cli.methods import Method


def resolve_pools(cfg: Any, layout: Any, uses_tags: bool) -> tuple[list, list]:
    """(labeled, unlabeled) pairs: split files, a split drawn now from a fraction, or all."""
    from semiseg_cli.data.splits import draw_split, read_split_file, widen_unlabeled

    d = cfg.data
    if d.labeled_list:
        labeled = read_split_file(d.labeled_list, layout.root)
        unlabeled = read_split_file(d.unlabeled_list, layout.root) if d.unlabeled_list else []
    elif d.labeled:
        labeled, unlabeled = draw_split(layout.list_pairs(d.train_split), d.labeled, d.split_seed)
        if d.unlabeled_split and d.unlabeled_split != d.train_split:
            unlabeled = widen_unlabeled(labeled, unlabeled, layout.list_pairs(d.unlabeled_split))
    else:
        labeled, unlabeled = layout.list_pairs(d.train_split), []
    if uses_tags:  # weak supervision: every training image, tags only
        labeled, unlabeled = sorted(set(labeled) | set(unlabeled)), []
    return labeled, unlabeled


def validation_pairs(cfg: Any, layout: Any) -> tuple[list, str]:
    """(the validation pairs, what to call them in messages): the split file `data.val_list`
    when set (val.txt from `prepare-splits --val`), else the dataset's `data.val_split`."""
    from semiseg_cli.data.splits import read_split_file

    if cfg.data.val_list:
        return read_split_file(cfg.data.val_list, layout.root), str(cfg.data.val_list)
    return layout.list_pairs(cfg.data.val_split), cfg.data.val_split


@dataclass
class RunData:
    layout: Any
    ds_l: Any
    ds_u: Any
    ds_val: Any


def build_data(cfg: Any, method_cls: type[Method]) -> RunData:
    """The run's datasets, after every file they use has been read once and found sound."""
    from semiseg_cli.data import build_dataset, layout_for, load_tags
    from semiseg_cli.data.checks import check_tags, check_training_data

    layout = layout_for(cfg.data)
    labeled, unlabeled = resolve_pools(cfg, layout, method_cls.uses_tags)
    if method_cls.uses_unlabeled and not unlabeled:
        raise UserError(
            f"method {cfg.method} needs unlabeled images but the split leaves none; pass --labeled 1/8 "
            "(or data.unlabeled_list) so part of the training pool is unlabeled"
        )
    val_pairs, val_name = validation_pairs(cfg, layout)
    tags = None
    if method_cls.uses_tags and cfg.data.tags_file:  # the user's tags must cover every training image
        tags = load_tags(cfg.data.tags_file, layout.num_classes, [img for img, _ in labeled])
    report = check_training_data(
        layout, labeled, unlabeled if method_cls.uses_unlabeled else [], val_pairs,
        labeled_needs_masks=tags is None, val_split=val_name,
        labeled_batch=cfg.data.batch_size,
        unlabeled_batch=(cfg.data.unlabeled_batch_size or cfg.data.batch_size) if method_cls.uses_unlabeled else None,
    )
    if method_cls.uses_tags:
        if tags is None:
            tags_now = {img: [c for c in ids if c not in layout.tag_exclude] for img, ids in report.labeled_present.items()}
        else:
            tags_now = tags
        check_tags(tags_now, [img for img, _ in labeled], layout.class_names)
    ds_l = build_dataset(cfg.data, labeled, train=True)
    if tags is not None:
        ds_l.tags = tags
    ds_u = build_dataset(cfg.data, unlabeled, train=True) if method_cls.uses_unlabeled else None
    ds_val = build_dataset(cfg.data, val_pairs, train=False)
    return RunData(layout, ds_l, ds_u, ds_val)
