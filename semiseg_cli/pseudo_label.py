"""`semiseg pseudo-label`: dump a checkpoint's pseudo-labels, confidence and entropy for a split.

For every image of a split (a split file or a split name of the checkpoint's dataset) the
inference network (the EMA teacher when the checkpoint has one) predicts class probabilities,
optionally averaged over test-time scales and flips, and the command writes, mirroring the
image's root-relative path with the extension changed:

    DIR/labels/NAME.png       palette PNG, value = class id, 255 = unreliable (when thresholded)
    DIR/confidence/NAME.png   16-bit grey, max softmax probability x 65535   (or .npz, float16)
    DIR/entropy/NAME.png      16-bit grey, entropy / ln(C) x 65535           (or .npz, float16)
    DIR/overlays/NAME.jpg     the image with the labels blended in (--overlays)
    DIR/records/NAME.json     the per-image record, written last: its presence marks the image done
    DIR/manifest.jsonl        one record per image of the split, rebuilt from records/ every run
    DIR/split.txt             "image label" lines usable as `semiseg train --labeled-list`
    DIR/summary.json          per-class pixel share, confidence, reliable fraction, accuracy
    DIR/meta.json             checkpoint identity, settings and how to decode the files

What can go wrong, and what this module does about it:
- A rerun after a crash or Ctrl-C must not redo finished images nor leave a manifest that lists
  an image twice or misses one: every file is written atomically, the per-image record is
  written after its files, and the manifest is rebuilt from the records, never appended to.
- Mixing two checkpoints (or two threshold settings) in one folder silently produces a useless
  label set, so `meta.json` records the identity (SHA-256 of the inference weights, which
  weights, and every setting that changes the files) and a different one is refused unless
  `--overwrite` (which clears only the files this command owns).
- Padding images of different sizes into one batch changes the prediction everywhere (ASPP's
  global pooling sees the padding), so batches are built from images of the same size only.
- `split.txt` must be readable by `read_split_file`, which joins every path to the dataset
  root: label paths are written relative to the root (`os.path.relpath`, so `../` is normal),
  so moving DIR or the root afterwards breaks it. Datasets whose stored mask values are not
  class ids (Cityscapes labelIds) get a second copy in the stored encoding (`train_labels/`),
  because the dataset reader would otherwise map the class ids as if they were labelIds.
"""

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Sequence

from semiseg_cli import __version__
from semiseg_cli.errors import UserError, flush_warnings
from semiseg_cli.io import atomic_path, check_output_dir, clean_stale_temps, write_json, write_text

if TYPE_CHECKING:  # torch and numpy load lazily: `semiseg --help` should not import torch
    import numpy as np
    import torch
    from torch import nn

META_FORMAT = "semiseg-pseudo-labels"
META_VERSION = 1
IGNORE = 255
U16 = 65535
UNRELIABLE_COLOUR = (255, 255, 255)
# Everything this command writes into its folder; `--overwrite` removes these and nothing else.
OWNED = (
    "labels", "train_labels", "confidence", "entropy", "overlays", "records",
    "manifest.jsonl", "split.txt", "summary.json", "meta.json",
)


class PseudoLabelCheckFailed(UserError):
    """The folder holds outputs this run must not mix with (another checkpoint or settings)."""


@dataclass
class PseudoLabelSettings:
    """Everything that decides the content of the written files (part of the folder identity),
    plus runtime knobs that do not (batch size, workers, overlays)."""

    min_confidence: float | None = None
    drop_percent: float | None = None
    fmt: str = "png"  # png | npz
    # None: the checkpoint's eval settings (cfg.eval) decide; flip=True adds flips either way.
    mode: str | None = None
    scales: tuple[float, ...] | None = None
    flip: bool = False
    crop_size: tuple[int, int] | None = None
    overlays: bool = False
    batch_size: int = 4
    workers: int = 2
    amp: bool = True

    def identity(self) -> dict[str, Any]:
        return {
            "min_confidence": self.min_confidence,
            "drop_percent": self.drop_percent,
            "drop_percent_scope": "per image",
            "format": self.fmt,
            "mode": self.mode,
            "scales": list(self.scales) if self.scales else None,
            "flip": self.flip,
            "crop_size": list(self.crop_size) if self.mode == "slide" and self.crop_size else None,
        }


# ----------------------------------------------------------------------------- pure tensor functions


def normalised_entropy(probs: "torch.Tensor") -> "torch.Tensor":
    """Entropy of (B,C,H,W) probabilities divided by ln(C): 0 = one-hot, 1 = uniform (0 for C = 1)."""
    from semiseg_cli.ops import entropy

    return entropy(probs, 1, normalise=True)


def reliable_mask(
    confidence: "torch.Tensor",
    entropy: "torch.Tensor",
    min_confidence: float | None = None,
    drop_percent: float | None = None,
) -> "torch.Tensor":
    """(B,H,W) bool: pixels kept as pseudo-labels; the rest become 255.

    `min_confidence`: keep pixels whose max probability is >= the value.
    `drop_percent` (U2PL-style): drop the `drop_percent`% highest-entropy pixels *of each image*
    (a per-image percentile; U2PL computes it over the training batch, which would make a
    pixel's fate depend on the other images of a batch). A pixel is dropped when its entropy is
    strictly above the largest entropy among the kept (100 - p)%; pixels tied with that value are
    kept, so at most p% go. U2PL's `entropy.ge(percentile)` drops ties instead, which for a
    saturated model (many pixels at entropy 0) drops every pixel of the image.
    Both together: a pixel must pass both.
    """
    import torch

    from semiseg_cli.ops import keep_low_entropy

    keep = torch.ones_like(confidence, dtype=torch.bool)
    if min_confidence is not None:
        keep &= confidence >= min_confidence
    if drop_percent is not None and drop_percent > 0:
        keep &= keep_low_entropy(entropy, 100.0 - drop_percent, scope="image")
    return keep


def batch_counts(
    label: "torch.Tensor",
    reliable: "torch.Tensor",
    confidence: "torch.Tensor",
    gt: "torch.Tensor | None",
    num_classes: int,
) -> dict[str, "torch.Tensor"]:
    """Per-image, per-class pixel counts (each (B,C)) in three bincounts over the whole batch.

    `label` is the argmax (no 255), `gt` holds class ids with 255 (or any id >= C) for pixels
    without ground truth. Keys: hist (predicted pixels), reliable_hist, conf_sum (float64), and
    with `gt`: gt_hist, inter (argmax == gt), pred_valid (predicted where gt is valid),
    reliable_valid, reliable_correct.

    Each pixel's (image, predicted class, reliable, has gt, correct) is one bin of a single
    bincount, and the counts are sums over bins: boolean-mask indexing per count (8 of them)
    cost ~10% of the whole pseudo-label loop on a CPU.
    """
    import torch

    b = label.shape[0]
    c = num_classes
    offset = (torch.arange(b, device=label.device) * c).view(b, *([1] * (label.dim() - 1)))
    idx = (label.long() + offset).flatten()
    out = {"conf_sum": torch.bincount(idx, weights=confidence.double().flatten(), minlength=b * c).view(b, c)}
    if gt is None:
        n = torch.bincount(idx * 2 + reliable.flatten().long(), minlength=b * c * 2).view(b, c, 2)
        out["hist"] = n.sum(-1)
        out["reliable_hist"] = n[..., 1]
        return out
    gt = gt.long()
    valid = (gt >= 0) & (gt < c)
    correct = valid & (label.long() == gt)
    flags = reliable.long() + 2 * valid.long() + 4 * correct.long()  # correct implies valid: 0-3, 6, 7
    n = torch.bincount(idx * 8 + flags.flatten(), minlength=b * c * 8).view(b, c, 8)
    out["hist"] = n.sum(-1)
    out["reliable_hist"] = n[..., 1::2].sum(-1)
    out["pred_valid"] = n[..., 2:].sum(-1)
    out["inter"] = n[..., 6:].sum(-1)
    out["reliable_valid"] = n[..., 3] + n[..., 7]
    out["reliable_correct"] = n[..., 7]
    gt_idx = torch.where(valid, gt.clamp(0, c - 1) + offset, torch.full_like(gt, b * c)).flatten()
    out["gt_hist"] = torch.bincount(gt_idx, minlength=b * c + 1)[: b * c].view(b, c)
    return out


def _ratio(num: float, den: float) -> float | None:
    return None if den <= 0 else num / den


def _miou(inter: Sequence[float], pred: Sequence[float], gt: Sequence[float]) -> float | None:
    ious = [i / (p + g - i) for i, p, g in zip(inter, pred, gt) if p + g - i > 0]
    return sum(ious) / len(ious) if ious else None


# ----------------------------------------------------------------------------- names and folders


def output_stem(image_rel: str) -> str:
    """The mirrored name of an image: its root-relative path without the extension."""
    p = PurePosixPath(image_rel.replace("\\", "/").lstrip("/"))
    if ".." in p.parts:
        raise UserError(f"image path {image_rel!r} leaves the dataset root; pseudo-labels mirror root-relative paths, so list images under the root")
    return str(p.with_suffix(""))


def _unique_stems(images: Sequence[str]) -> list[str]:
    stems: dict[str, str] = {}
    out = []
    for img in images:
        s = output_stem(img)
        if s in stems:
            raise UserError(f"{stems[s]} and {img} would write the same pseudo-label {s}.png; rename one of them or pseudo-label them separately")
        stems[s] = img
        out.append(s)
    return out


def _output_paths(stem: str, fmt: str, overlays: bool, train_labels: bool) -> dict[str, str]:
    ext = ".png" if fmt == "png" else ".npz"
    paths = {
        "label": f"labels/{stem}.png",
        "confidence": f"confidence/{stem}{ext}",
        "entropy": f"entropy/{stem}{ext}",
    }
    if train_labels:
        paths["train_label"] = f"train_labels/{stem}.png"
    if overlays:
        paths["overlay"] = f"overlays/{stem}.jpg"
    return paths


def _record_path(out: Path, stem: str) -> Path:
    return out / "records" / f"{stem}.json"


def _read_record(out: Path, stem: str) -> dict[str, Any] | None:
    p = _record_path(out, stem)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a record is written atomically, so this is a foreign or damaged file: redo


def _is_done(out: Path, stem: str, wanted: dict[str, str]) -> dict[str, Any] | None:
    rec = _read_record(out, stem)
    if rec is None:
        return None
    files = rec.get("files", {})
    for key, rel in wanted.items():
        if files.get(key) != rel or not (out / rel).is_file():
            return None
    return rec


def weights_digest(model: "nn.Module") -> str:
    """SHA-256 of the inference weights (names and bytes in a fixed order).

    Hashing the weights, not the checkpoint file, keeps the identity when best.pt is copied or
    re-saved, and changes it when the same path holds a newer checkpoint.
    """
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("weights_sha256") != new.get("weights_sha256") or old.get("weights") != new.get("weights"):
        return f"another checkpoint ({old.get('checkpoint', '?')} step {old.get('step', '?')})"
    diff = [k for k in new.get("settings", {}) if old.get("settings", {}).get(k) != new["settings"][k]]
    return "other settings (" + ", ".join(f"{k}: {old.get('settings', {}).get(k)!r} -> {new['settings'][k]!r}" for k in diff) + ")"


def prepare_out_dir(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Resume a folder written with the same identity; refuse anything else without `overwrite`.

    `overwrite` deletes only the names in OWNED, so a mistyped --out cannot wipe a folder of
    unrelated files.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            for name in OWNED:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        else:
            meta_path = out / "meta.json"
            try:
                meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
            except (OSError, json.JSONDecodeError):
                meta = None
            if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
                raise UserError(f"{out} is not empty and holds no pseudo-labels of semiseg; pass --overwrite to write into it anyway, or choose another --out")
            old = meta.get("identity", {})
            if old.get("weights_sha256") != identity["weights_sha256"] or old.get("weights") != identity["weights"] or old.get("settings") != identity["settings"]:
                raise PseudoLabelCheckFailed(
                    f"{out} holds pseudo-labels from {_describe_difference(old, identity)}; "
                    "pass --overwrite to replace them, or choose another --out"
                )
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out, recursive=True)  # files of a dump killed mid-write


def training_encoding(layout: Any) -> "np.ndarray | None":
    """class id -> stored mask value, for layouts whose stored values are not class ids (the
    layout's own `training_encoding`; None for VOC, CamVid, folder and demo)."""
    return layout.training_encoding()


# ----------------------------------------------------------------------------- data


class PseudoLabelDataset:
    """Images (resized by data.resize for the network) with their original size and mask.

    Errors (an undecodable image, a bad mask) are returned as `{"error": message}` instead of
    raised: an exception raised in a DataLoader worker reaches the main process wrapped in a
    multi-line traceback, and the CLI must print one line.
    """

    def __init__(self, layout: Any, pairs: Sequence[tuple[str, str | None]], mean: Sequence[float],
                 std: Sequence[float], resize: float = 1.0, overlays: bool = False) -> None:
        self.layout, self.pairs = layout, list(pairs)
        self.mean, self.std, self.resize, self.overlays = tuple(mean), tuple(std), resize, overlays

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._load(i)
        except UserError as e:
            return {"error": str(e), "index": i}

    def _load(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        from semiseg_cli.data.transforms import to_tensor

        img_rel, mask_rel = self.pairs[i]
        image = self.layout.read_image(img_rel)
        w, h = image.size
        if mask_rel is not None:
            mask = self.layout.read_mask(mask_rel)
            if mask.shape != (h, w):
                raise UserError(f"mask {self.layout.root / mask_rel} is {mask.shape[1]}x{mask.shape[0]} but image {img_rel} is {w}x{h}")
        else:
            mask = np.full((h, w), IGNORE, np.uint8)
        net_image = image
        if self.resize != 1.0:
            net_image = image.resize((max(1, round(w * self.resize)), max(1, round(h * self.resize))), Image.BILINEAR)
        item = {
            "image": to_tensor(net_image, self.mean, self.std),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "has_mask": mask_rel is not None,
            "index": i,
        }
        if self.overlays:
            item["rgb"] = torch.from_numpy(np.array(image, dtype=np.uint8))
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a same-size batch; a batch with a failed item becomes `{"error": first message}`."""
    import torch

    for it in items:
        if "error" in it:
            return {"error": it["error"], "index": [x["index"] for x in items]}
    out: dict[str, Any] = {
        "image": torch.stack([x["image"] for x in items]),
        "mask": torch.stack([x["mask"] for x in items]),
        "has_mask": [bool(x["has_mask"]) for x in items],
        "index": [int(x["index"]) for x in items],
    }
    if "rgb" in items[0]:
        out["rgb"] = torch.stack([x["rgb"] for x in items])
    return out


# The size grouping lives in semiseg_cli.engine.loaders (shared with `eval` and validation);
# imported when called, since that module imports torch and `semiseg --help` should not.


def image_sizes(layout: Any, images: Sequence[str]) -> list[tuple[int, int]]:
    """See `semiseg_cli.engine.loaders.image_sizes`: header sizes, a bad file fails before work."""
    from semiseg_cli.engine.loaders import image_sizes as _image_sizes

    return _image_sizes(layout, images)


def size_batches(indices: Sequence[int], sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """See `semiseg_cli.engine.loaders.size_batches`: same-size batches, first-seen order."""
    from semiseg_cli.engine.loaders import size_batches as _size_batches

    return _size_batches(indices, sizes, batch_size)


# ----------------------------------------------------------------------------- writing


def _save_png(path: Path, arr: "np.ndarray", palette: list[int] | None = None, compress_level: int = 1) -> None:
    from PIL import Image

    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(palette)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", compress_level=compress_level)


def _save_npz(path: Path, key: str, arr: "np.ndarray") -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{key: arr})


def _palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    flat = [0] * 768
    for cid, rgb in enumerate(palette[:255]):
        flat[3 * cid : 3 * cid + 3] = [int(v) for v in rgb]
    flat[3 * IGNORE : 3 * IGNORE + 3] = list(UNRELIABLE_COLOUR)
    return flat


def _overlay(rgb: "np.ndarray", label: "np.ndarray", colours: "np.ndarray", alpha: float = 0.5) -> "np.ndarray":
    import numpy as np

    coloured = colours[label]  # 255 -> the image itself (colours[255] is never blended)
    out = rgb.astype(np.float32)
    keep = label != IGNORE
    out[keep] = (1 - alpha) * out[keep] + alpha * coloured[keep]
    return out.clip(0, 255).astype(np.uint8)


@dataclass
class _Outputs:
    """One image's arrays and record, handed to a writer thread."""

    stem: str
    label: "np.ndarray"
    confidence: "np.ndarray"
    entropy: "np.ndarray"
    record: dict[str, Any]
    rgb: "np.ndarray | None" = None


class _Writer:
    """Writes outputs in a small thread pool (PNG/zlib encoding releases the GIL) so disk work
    overlaps the next batch's inference; at most `depth` images wait, bounding memory."""

    def __init__(self, out: Path, settings: PseudoLabelSettings, palette: list[int], colours: "np.ndarray",
                 encoding: "np.ndarray | None", threads: int = 2, depth: int = 32) -> None:
        self.out, self.settings, self.palette, self.colours, self.encoding = out, settings, palette, colours, encoding
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pl-writer")
        self.pending: list[Future[None]] = []
        self.depth = depth

    def submit(self, item: _Outputs) -> None:
        self.pending.append(self.pool.submit(self._write, item))
        while len(self.pending) > self.depth:
            self.pending.pop(0).result()

    def drain(self) -> None:
        """Wait for everything submitted; re-raise the first writer error."""
        errors = []
        for f in self.pending:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected, the first is re-raised
                errors.append(e)
        self.pending = []
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)

    def _write(self, item: _Outputs) -> None:
        files = item.record["files"]
        out = self.out
        _save_png(out / files["label"], item.label, self.palette)
        if "train_label" in files and self.encoding is not None:
            _save_png(out / files["train_label"], self.encoding[item.label], self.palette)
        if self.settings.fmt == "png":
            _save_png(out / files["confidence"], item.confidence)
            _save_png(out / files["entropy"], item.entropy)
        else:
            _save_npz(out / files["confidence"], "confidence", item.confidence)
            _save_npz(out / files["entropy"], "entropy", item.entropy)
        if "overlay" in files and item.rgb is not None:
            from PIL import Image

            with atomic_path(out / files["overlay"]) as tmp:
                Image.fromarray(_overlay(item.rgb, item.label, self.colours)).save(tmp, format="JPEG", quality=85)
        write_json(_record_path(out, item.stem), item.record)  # last: marks the image done


# ----------------------------------------------------------------------------- summary


COUNT_KEYS = ("hist", "reliable_hist", "conf_sum", "gt_hist", "inter", "pred_valid", "reliable_valid", "reliable_correct")


def summarise(records: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Totals over the records: per-class pixel share, mean confidence, reliable fraction,
    accuracy of the reliable pseudo-labels (precision against ground truth) and IoU of the
    argmax, plus the overall numbers. Accuracy fields are None where no image had a mask."""
    c = len(class_names)
    tot = {k: [0.0] * c for k in COUNT_KEYS}
    with_gt = 0
    for rec in records:
        counts = rec["counts"]
        for k in COUNT_KEYS:
            if k in counts:
                tot[k] = [a + b for a, b in zip(tot[k], counts[k])]
        with_gt += "gt_hist" in counts
    pixels = sum(tot["hist"])
    per_class = {}
    for i, name in enumerate(class_names):
        union = tot["pred_valid"][i] + tot["gt_hist"][i] - tot["inter"][i]
        per_class[name] = {
            "pixel_share": _ratio(tot["hist"][i], pixels),
            "mean_confidence": _ratio(tot["conf_sum"][i], tot["hist"][i]),
            "reliable_fraction": _ratio(tot["reliable_hist"][i], tot["hist"][i]),
            "accuracy": _ratio(tot["reliable_correct"][i], tot["reliable_valid"][i]) if with_gt else None,
            "iou": _ratio(tot["inter"][i], union) if with_gt else None,
        }
    return {
        "images": len(records),
        "images_with_masks": with_gt,
        "pixels": int(pixels),
        "mean_confidence": _ratio(sum(tot["conf_sum"]), pixels),
        "reliable_fraction": _ratio(sum(tot["reliable_hist"]), pixels),
        "accuracy": _ratio(sum(tot["inter"]), sum(tot["gt_hist"])) if with_gt else None,
        "accuracy_reliable": _ratio(sum(tot["reliable_correct"]), sum(tot["reliable_valid"])) if with_gt else None,
        "miou": _miou(tot["inter"], tot["pred_valid"], tot["gt_hist"]) if with_gt else None,
        "per_class": per_class,
    }


def print_summary(summary: dict[str, Any], console: Any, title: str) -> None:
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    table = Table(title=title)
    for col in ("class", "pixels %", "mean conf %", "reliable %", "acc % (reliable)", "IoU %"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, row in summary["per_class"].items():
        table.add_row(name, pct(row["pixel_share"]), pct(row["mean_confidence"]), pct(row["reliable_fraction"]),
                      pct(row["accuracy"]), pct(row["iou"]))
    caption = (f"{summary['images']} images: mean confidence {pct(summary['mean_confidence'])}%, "
               f"reliable {pct(summary['reliable_fraction'])}%")
    if summary["images_with_masks"]:
        caption += (f"\nagainst the masks of {summary['images_with_masks']} images: pixel acc {pct(summary['accuracy'])}% "
                    f"(reliable pixels {pct(summary['accuracy_reliable'])}%), mIoU {pct(summary['miou'])}%")
    else:
        caption += "\nno ground-truth masks in this split: accuracy not measured"
    table.caption = caption
    console.print(table)


# ----------------------------------------------------------------------------- the command


@dataclass
class PseudoLabelResult:
    out: Path
    processed: int
    skipped: int
    summary: dict[str, Any]
    seconds: float  # wall time of the inference + writing loop (excludes loading the checkpoint)
    cpu_seconds: float  # CPU time of that loop: this process's threads + the finished DataLoader workers
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_pairs(split: str, layout: Any) -> list[tuple[str, str | None]]:
    """A split file (any existing path or *.txt) or a split name of the dataset; deduplicated."""
    from semiseg_cli.data.splits import read_split_file

    if split.endswith(".txt") or Path(split).is_file():
        pairs = read_split_file(split, layout.root)
    else:
        pairs = layout.list_pairs(split)
    seen: set[str] = set()
    out = []
    for img, mask in pairs:
        if img not in seen:
            seen.add(img)
            out.append((img, mask))
    return out


def _format_split(lines: Sequence[tuple[str, str]]) -> str | None:
    if any(any(ch.isspace() for ch in a + b) for a, b in lines):
        return None
    return "".join(f"{a} {b}\n" for a, b in lines)


def run_pseudo_label(
    checkpoint: Path,
    split: str,
    out: Path,
    root: Path | None = None,
    settings: PseudoLabelSettings | None = None,
    weights: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    console: Any = None,
    progress_console: Any = None,
) -> PseudoLabelResult:
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from torch.utils.data import DataLoader

    from semiseg_cli.data import get_layout
    from semiseg_cli.engine.checkpoint import load_for_inference
    from semiseg_cli.engine.device import resolve_device
    from semiseg_cli.inference import InferenceSettings

    s = settings or PseudoLabelSettings()
    check_output_dir(out, "--out")
    if s.fmt not in ("png", "npz"):
        raise UserError(f"--format must be png or npz (got {s.fmt!r})")
    if s.min_confidence is not None and not 0 <= s.min_confidence <= 1:
        raise UserError(f"--min-confidence must be in [0, 1] (got {s.min_confidence})")
    if s.drop_percent is not None and not 0 <= s.drop_percent <= 100:
        raise UserError(f"--drop-percent must be in [0, 100] (got {s.drop_percent})")
    if s.batch_size < 1 or s.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")

    dev = resolve_device(device or "auto")
    model, cfg, ckpt = load_for_inference(checkpoint, dev, weights)
    data_root = Path(root) if root else Path(cfg.data.root)
    layout = get_layout(cfg.data.dataset, data_root)
    class_names = list(ckpt["class_names"])
    num_classes = int(ckpt["num_classes"])
    if num_classes > 255:
        raise UserError(f"{num_classes} classes do not fit an 8-bit label PNG with 255 for unreliable pixels")
    if list(layout.class_names) != class_names:
        raise UserError(f"the dataset at {data_root} has classes {layout.class_names[:5]}... but the checkpoint was trained on {class_names[:5]}...; is --root right?")

    pairs = resolve_pairs(split, layout)
    images = [p[0] for p in pairs]
    stems = _unique_stems(images)
    sizes = image_sizes(layout, images)  # header check of every image before anything is written
    encoding = training_encoding(layout)

    inf = InferenceSettings.from_config(cfg, mode=s.mode, scales=s.scales, crop_size=s.crop_size)
    inf.flip = inf.flip or s.flip
    # Record what runs (the checkpoint's eval settings fill what the caller left open).
    s.flip, s.mode, s.scales, s.crop_size = inf.flip, inf.mode, tuple(inf.scales), tuple(inf.crop_size)
    used_weights = "teacher" if (weights != "student" and ckpt.get("has_teacher")) else "student"
    identity = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": ckpt.get("step"),
        "method": cfg.method,
        "weights": used_weights,
        "weights_sha256": weights_digest(model),
        "settings": s.identity(),
    }
    out = Path(out)
    created = not out.exists()
    prepare_out_dir(out, identity, overwrite)
    flush_warnings()
    u16 = s.fmt == "png"
    meta = {
        "format": META_FORMAT,
        "format_version": META_VERSION,
        "semiseg_version": __version__,
        "identity": identity,
        "dataset": cfg.data.dataset,
        "root": str(data_root.resolve()),
        "split": split,
        "class_names": class_names,
        "palette": [list(c) for c in layout.palette],
        "files": {
            "labels": "labels/NAME.png: palette PNG, value = class id, 255 = unreliable",
            "confidence": (f"confidence/NAME.png: 16-bit grey, max softmax probability = value / {U16}" if u16
                           else "confidence/NAME.npz: key 'confidence', float16 max softmax probability"),
            "entropy": (f"entropy/NAME.png: 16-bit grey, entropy in nats = value / {U16} * ln(C)" if u16
                        else "entropy/NAME.npz: key 'entropy', float16 entropy / ln(C)"),
            "train_labels": ("train_labels/NAME.png: the labels in the dataset's stored encoding, for split.txt"
                             if encoding is not None else None),
            "split": "split.txt: `image label` per line, both relative to the dataset root (label via ../ if needed)",
        },
        "scales": {
            "confidence": {"scale": U16 if u16 else 1.0, "decode": "value / scale"},
            "entropy": {"scale": U16 if u16 else 1.0, "normaliser": "ln(C)", "num_classes": num_classes,
                        "decode": "value / scale * ln(C) nats"},
        },
    }
    write_json(out / "meta.json", meta)

    todo: list[int] = []
    wanted = [_output_paths(st, s.fmt, s.overlays, encoding is not None) for st in stems]
    for i, st in enumerate(stems):
        if overwrite or _is_done(out, st, wanted[i]) is None:
            todo.append(i)
    skipped = len(stems) - len(todo)

    palette = _palette_bytes(layout.palette)
    colours = np.zeros((256, 3), np.float32)
    colours[: len(layout.palette)] = np.array(layout.palette, np.float32)
    ds = PseudoLabelDataset(layout, pairs, cfg.data.mean, cfg.data.std, cfg.data.resize, s.overlays)
    batches = size_batches(todo, sizes, s.batch_size)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=s.workers, collate_fn=collate,  # type: ignore[arg-type]
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    amp = s.amp and dev.type == "cuda"
    writer = _Writer(out, s, palette, colours, encoding)
    progress_console = progress_console or console
    t0, c0 = time.perf_counter(), _cpu_seconds()
    error: str | None = None
    try:
        with Progress(TextColumn("pseudo-label"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=progress_console, transient=True, disable=progress_console is None) as bar:
            task = bar.add_task("pseudo-label", total=len(todo))
            for batch in (loader if batches else []):  # an empty loader would still start its workers
                if "error" in batch:
                    error = batch["error"]
                    break
                _process_batch(model, batch, inf, dev, amp, num_classes, s, stems, pairs, wanted, writer)
                bar.advance(task, len(batch["index"]))
            writer.drain()
    finally:
        try:
            writer.close()
        finally:
            seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - c0
            records = _finish(out, pairs, stems, wanted, layout.root, encoding is not None)
    if error is not None and not records:  # a failed start leaves nothing behind
        _discard(out, created)
        raise UserError(f"{error}; nothing was written to {out}: fix the file and rerun")
    summary = summarise(records, class_names)
    write_json(out / "summary.json", summary)
    if error is not None:
        raise UserError(f"{error} ({len(records)} of {len(pairs)} images are done in {out}; fix the file and rerun to continue)")
    if console is not None:
        ttl = f"pseudo-labels of {split} by {cfg.method} @ step {ckpt.get('step')} ({used_weights}) -> {out}"
        print_summary(summary, console, ttl)
        console.print(f"{len(todo)} images labelled, {skipped} already done (skipped); manifest {out / 'manifest.jsonl'}", highlight=False)
    return PseudoLabelResult(out, len(todo), skipped, summary, seconds, cpu_seconds, meta)


def _discard(out: Path, created: bool) -> None:
    """Remove what this command wrote into `out` (the folder too when it created it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (DataLoader workers are joined
    when a loader is exhausted); for benchmarks on shared machines, where wall time drifts."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _process_batch(model: "nn.Module", batch: dict[str, Any], inf: Any, dev: "torch.device", amp: bool, num_classes: int,
                   s: PseudoLabelSettings, stems: Sequence[str], pairs: Sequence[tuple[str, str | None]],
                   wanted: Sequence[dict[str, str]], writer: _Writer) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from semiseg_cli.inference import predict_probs

    x = batch["image"].to(dev, non_blocking=True)
    gt = batch["mask"].to(dev, non_blocking=True)
    with torch.no_grad():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            probs = predict_probs(model, x, inf)
        probs = probs.float()
        if probs.shape[2:] != gt.shape[1:]:  # data.resize: labels are written at the stored size
            probs = F.interpolate(probs, size=gt.shape[1:], mode="bilinear", align_corners=False)
        conf, label = probs.max(1)
        ent = normalised_entropy(probs)
        keep = reliable_mask(conf, ent, s.min_confidence, s.drop_percent)
        has_gt = any(batch["has_mask"])
        counts = batch_counts(label, keep, conf, gt if has_gt else None, num_classes)
        out_label = torch.where(keep, label, torch.full_like(label, IGNORE)).to(torch.uint8)
        if s.fmt == "png":
            conf_q = (conf * U16).round_().to(torch.int32)
            ent_q = (ent * U16).round_().to(torch.int32)
        else:
            conf_q, ent_q = conf.half(), ent.half()
    out_label_np = out_label.cpu().numpy()
    conf_np, ent_np = conf_q.cpu().numpy(), ent_q.cpu().numpy()
    if s.fmt == "png":
        conf_np, ent_np = conf_np.astype(np.uint16), ent_np.astype(np.uint16)
    counts_np = {k: v.cpu().numpy() for k, v in counts.items()}
    rgb = batch.get("rgb")
    for b, idx in enumerate(batch["index"]):
        c = {k: (v[b].round(4).tolist() if k == "conf_sum" else v[b].astype(int).tolist()) for k, v in counts_np.items()}
        if not batch["has_mask"][b]:
            for k in ("gt_hist", "inter", "pred_valid", "reliable_valid", "reliable_correct"):
                c.pop(k, None)
        npx = int(sum(c["hist"]))
        img, mask = pairs[idx]
        rec: dict[str, Any] = {
            "image": img,
            "mask": mask,
            "files": wanted[idx],
            "size": [int(out_label_np.shape[1]), int(out_label_np.shape[2])],
            "mean_confidence": round(sum(c["conf_sum"]) / max(npx, 1), 6),
            "reliable_fraction": round(sum(c["reliable_hist"]) / max(npx, 1), 6),
            "class_hist": c["hist"],
        }
        if "gt_hist" in c:
            acc = _ratio(sum(c["inter"]), sum(c["gt_hist"]))
            acc_r = _ratio(sum(c["reliable_correct"]), sum(c["reliable_valid"]))
            miou = _miou(c["inter"], c["pred_valid"], c["gt_hist"])
            rec["accuracy"] = None if acc is None else round(acc, 6)
            rec["accuracy_reliable"] = None if acc_r is None else round(acc_r, 6)
            rec["miou"] = None if miou is None else round(miou, 6)
        rec["counts"] = c
        writer.submit(_Outputs(stems[idx], out_label_np[b], conf_np[b], ent_np[b], rec,
                               None if rgb is None else rgb[b].numpy()))


def _finish(out: Path, pairs: Sequence[tuple[str, str | None]], stems: Sequence[str], wanted: Sequence[dict[str, str]],
            root: Path, train_labels: bool) -> list[dict[str, Any]]:
    """Rebuild manifest.jsonl and split.txt from the records of the split's finished images.

    Runs after every run, failed or interrupted ones included, so both always match the files.
    """
    records = []
    lines: list[tuple[str, str]] = []
    root_abs = Path(os.path.abspath(root))
    for (img, _), st, w in zip(pairs, stems, wanted):
        rec = _is_done(out, st, w)
        if rec is None:
            continue
        records.append(rec)
        lab = w["train_label"] if train_labels else w["label"]
        lines.append((img, Path(os.path.relpath(os.path.abspath(out / lab), root_abs)).as_posix()))
    write_text(out / "manifest.jsonl", "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    text = _format_split(lines)
    if text is not None and lines:
        write_text(out / "split.txt", text)
    elif lines:
        (out / "split.txt").unlink(missing_ok=True)
    return records
