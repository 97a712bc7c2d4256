"""The data report of `prepare-splits`: what a dataset's pool holds, and what looks wrong with it.

`build_report` reads the pool once more after the checks (image headers for size and mode, each
mask through `layout.read_mask`, in threads) and returns a JSON-ready dict: image count, sizes
and modes; per class the pixels, the share of labeled pixels and the images that show it; the
ignored share of all pixels; per drawn split the labeled images per class; and `warnings`, one
line each, which the caller passes to `errors.warn`:

- every mask (or most of them) holds only the values 0 and 255: binary masks whose foreground
  (255) is read as ignore;
- classes shown by fewer than `RARE_LABELED` labeled images of a split;
- classes that no validation image shows (with `--val`): their IoU cannot be measured;
- image-level tags identical for every image (with `--tags`): weak supervision refuses them;
- images whose longer side exceeds `LARGE_SIDE` pixels: suggests `data.resize`.

Classes the pool never shows are listed (`absent_classes`) but not warned about here:
`checks.check_mask_content` already does. The report holds nothing that depends on the machine
or the working folder (no root path, no timestamps), so the same pool and seed give the same bytes.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Sequence

import numpy as np
from PIL import Image

from semiseg_cli.data.layouts import IGNORE, Layout, Pair
from semiseg_cli.data.reading import _thread_map
from semiseg_cli.errors import UserError

# A class shown by fewer labeled images than this is warned about.
RARE_LABELED = 3
# Images with a longer side than this get a data.resize suggestion.
LARGE_SIDE = 2048
REPORT_VERSION = 1


def _pair_stats(layout: Layout, pair: Pair) -> tuple[tuple[int, int], str, np.ndarray | None]:
    img, mask = pair
    with Image.open(layout.root / img) as im:  # header only: the scan decoded it already
        size, mode = im.size, im.mode
    counts = None
    if mask is not None:
        counts = np.bincount(layout.read_mask(mask).ravel(), minlength=256).astype(np.int64)
    return size, mode, counts


def _images_per_class(counts: dict[str, np.ndarray], pairs: Sequence[Pair], n_cls: int) -> list[int]:
    """How many of `pairs` show each class id (a list indexed by class id)."""
    out = [0] * n_cls
    for img, _ in pairs:
        v = counts.get(img)
        if v is not None:
            for c in np.flatnonzero(v[:n_cls]).tolist():
                out[c] += 1
    return out


def _spread(values: list[int]) -> dict[str, float | int]:
    med = statistics.median(values)
    return {"min": min(values), "median": int(med) if float(med).is_integer() else float(med), "max": max(values)}


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_report(
    layout: Layout,
    pool: Sequence[Pair],
    *,
    split: str,
    seed: int,
    draws: Sequence[tuple[str, str, Sequence[Pair], Sequence[Pair]]] = (),
    val_pairs: Sequence[Pair] = (),
    val_amount: str | None = None,
    tags: bool = False,
    extra: int = 0,
) -> dict[str, Any]:
    """The report of `pool` (every pair with a readable mask, as after `layout.scan`).

    `draws`: (amount, folder relative to the output, labeled, unlabeled) per drawn split;
    `val_pairs`: the validation images carved out with `val_amount`; `extra`: images another
    pool added to every unlabeled list."""
    pool = list(pool)
    stats = _thread_map(lambda p: _pair_stats(layout, p), pool)
    names = layout.class_names
    n_cls = len(names)
    counts = {img: c for (img, _), (_, _, c) in zip(pool, stats) if c is not None}
    sizes = [s for s, _, _ in stats]
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    total = np.sum(list(counts.values()), axis=0) if counts else np.zeros(256, np.int64)
    all_pixels = int(total.sum())
    labeled_pixels = int(total[:n_cls].sum())
    images_with = {c: sum(1 for v in counts.values() if v[c] > 0) for c in range(n_cls)}
    classes = [
        {
            "id": c,
            "name": names[c],
            "pixels": int(total[c]),
            "pixel_fraction": round(int(total[c]) / labeled_pixels, 6) if labeled_pixels else 0.0,
            "images": images_with[c],
        }
        for c in range(n_cls)
    ]
    absent = [names[c] for c in range(n_cls) if images_with[c] == 0]
    warnings: list[str] = []
    where = f"the {split} split"

    # 0/255 binary masks: 255 is ignore here, so their foreground would never be learned. Only
    # where stored values are class ids (not Cityscapes labelIds, not colours through a palette).
    try:
        stored_are_ids = layout.training_encoding() is None and getattr(layout, "colour_palette", None) is None
    except UserError:
        stored_are_ids = False
    if stored_are_ids and counts:
        binary = [img for img, v in counts.items() if set(np.flatnonzero(v).tolist()) == {0, IGNORE}]
        if binary and 2 * len(binary) >= len(counts):
            warnings.append(
                f"{len(binary)} of {len(counts)} masks of {where} hold only the values 0 and {IGNORE} (e.g. {binary[0]}): "
                f"mask values are 0/{IGNORE}: looks like a binary mask with {IGNORE} = foreground, but {IGNORE} means ignore; "
                "store foreground as 1 (e.g. mask // 255) or pass a palette file (`0 0 0 background`, `255 255 255 foreground`)"
            )

    split_reports = []
    for amount, folder, labeled, unlabeled in draws:
        per_class = _images_per_class(counts, labeled, n_cls)
        rare = [(names[c], k) for c, k in enumerate(per_class) if images_with[c] > 0 and k < RARE_LABELED]
        split_reports.append({
            "amount": amount,
            "folder": folder,
            "labeled": len(labeled),
            "unlabeled": len(unlabeled),
            "labeled_images_per_class": per_class,
            "rare_classes": [n for n, _ in rare],
        })
        if rare:
            shown = ", ".join(f"{n}: {k}" for n, k in rare[:5]) + (f" and {len(rare) - 5} more" if len(rare) > 5 else "")
            warnings.append(
                f"with --labeled {amount} ({len(labeled)} images), {len(rare)} class{'es are' if len(rare) != 1 else ' is'} "
                f"shown by fewer than {RARE_LABELED} labeled images ({shown}); the model sees too few examples of "
                "them: label more images, raise --labeled or try another --seed"
            )

    val_report = None
    if val_pairs:
        val_per_class = _images_per_class(counts, val_pairs, n_cls)
        val_report = {"amount": val_amount, "images": len(val_pairs), "images_per_class": val_per_class}
        unseen = [names[c] for c in range(n_cls) if images_with[c] > 0 and val_per_class[c] == 0]
        if unseen:
            warnings.append(
                f"--val {val_amount} ({len(val_pairs)} images) holds no image of {len(unseen)} class"
                f"{'es' if len(unseen) != 1 else ''} ({_names(unseen)}), so validation cannot score them: "
                "raise --val or try another --seed"
            )

    if tags and len(counts) > 1:
        tag_sets = {tuple(c for c in np.flatnonzero(v[:n_cls]).tolist() if c not in layout.tag_exclude) for v in counts.values()}
        if len(tag_sets) == 1:
            only = next(iter(tag_sets))
            warnings.append(
                f"every one of the {len(counts)} images of {where} has the same tags "
                f"({', '.join(names[c] for c in only) if only else 'no class'}): image-level tags cannot tell classes apart, "
                "so weakly supervised training (DuPL) will refuse them; check the masks the tags come from"
            )

    large = [(max(w, h), img, (w, h)) for (img, _), ((w, h), _, _) in zip(pool, stats) if max(w, h) > LARGE_SIDE]
    if large:
        side, img, (w, h) = max(large)
        factor = 0.5
        while side * factor > LARGE_SIDE:
            factor /= 2
        warnings.append(
            f"{len(large)} of {len(pool)} images of {where} have a side longer than {LARGE_SIDE} pixels (the largest, {img}, "
            f"is {w}x{h}): training crops see a small part of them and full-size validation is slow; "
            f"consider data.resize = {factor:g}"
        )

    size_counts = Counter(sizes)
    return {
        "version": REPORT_VERSION,
        "dataset": layout.name,
        "split": split,
        "seed": seed,
        "images": len(pool),
        "image_sizes": {
            "width": _spread(widths) if widths else None,
            "height": _spread(heights) if heights else None,
            "distinct": len(size_counts),
            "most_common": [[w, h, k] for (w, h), k in sorted(size_counts.items(), key=lambda t: (-t[1], t[0]))[:5]],
        },
        "image_modes": dict(sorted(Counter(m for _, m, _ in stats).items())),
        "mask_pixels": all_pixels,
        "ignore_fraction": round(int(total[IGNORE]) / all_pixels, 6) if all_pixels else 0.0,
        "classes": classes,
        "absent_classes": absent,
        "val": val_report,
        "extra_unlabeled": extra,
        "splits": split_reports,
        "warnings": warnings,
    }


def print_data_report(report: dict[str, Any], console: Any) -> None:
    """The report as a few lines and a per-class table on a rich console."""
    from rich.table import Table

    sizes = report["image_sizes"]
    w, h = sizes["width"], sizes["height"]
    size_text = (
        f"{w['min']}x{h['min']}" if sizes["distinct"] == 1
        else f"width {w['min']}..{w['max']} (median {w['median']}), height {h['min']}..{h['max']} (median {h['median']}), "
             f"{sizes['distinct']} distinct sizes"
    )
    modes = ", ".join(f"{m} {k}" for m, k in report["image_modes"].items())
    console.print(f"{report['images']} images in the {report['split']} split of the {report['dataset']} dataset: "
                  f"{size_text}; modes {modes}; {100 * report['ignore_fraction']:.1f}% of mask pixels ignored", highlight=False, soft_wrap=True)
    if report["val"]:
        console.print(f"validation: {report['val']['images']} images (--val {report['val']['amount']}), in neither labeled "
                      "nor unlabeled", highlight=False, soft_wrap=True)
    table = Table(title="classes", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("pixels %", justify="right")
    table.add_column("images", justify="right")
    for s in report["splits"]:
        table.add_column(f"labeled {s['amount']}", justify="right")
    if report["val"]:
        table.add_column("val", justify="right")
    for c in report["classes"]:
        row = [str(c["id"]), c["name"], f"{100 * c['pixel_fraction']:.2f}", str(c["images"])]
        row += [str(s["labeled_images_per_class"][c["id"]]) for s in report["splits"]]
        if report["val"]:
            row.append(str(report["val"]["images_per_class"][c["id"]]))
        table.add_row(*row)
    console.print(table)
    for s in report["splits"]:
        where = "" if s["folder"] == "." else f" ({s['folder']}/)"
        console.print(f"--labeled {s['amount']}{where}: {s['labeled']} labeled, {s['unlabeled']} unlabeled", highlight=False, soft_wrap=True)
