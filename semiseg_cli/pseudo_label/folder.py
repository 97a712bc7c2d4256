"""The output folder of a dump: its names, its identity, resuming it and its manifest.

What can go wrong, and what this module does about it:
- A rerun after a crash or Ctrl-C must not redo finished images nor leave a manifest that lists
  an image twice or misses one: the per-image record is written after its files (by the
  writer), an image counts as done when its record and every file it lists exist (`is_done`),
  and the manifest is rebuilt from the records after every run (`finish`), never appended to,
  in split order, so it does not depend on the order in which the writer processes finished.
- Mixing two checkpoints (or two threshold settings) in one folder silently produces a useless
  label set, so `meta.json` records the identity (SHA-256 of the inference weights, which
  weights, and every setting that changes the files) and a different one is refused unless
  `--overwrite` (which clears only the files this command owns, OWNED).
- Two images that mirror to the same name (`a.png` and `a.jpg`) would overwrite each other's
  labels: refused before anything is written (`unique_stems`).
- `split.txt` must be readable by `read_split_file`, which joins every path to the dataset
  root: label paths are written relative to the root (`os.path.relpath`, so `../` is normal),
  so moving the folder or the root afterwards breaks it. Datasets whose stored mask values are
  not class ids (Cityscapes labelIds) get a second copy in the stored encoding
  (`train_labels/`), because the dataset reader would otherwise map the class ids as if they
  were labelIds. Paths with whitespace cannot go into a split file: then none is written.
- A start that fails before any image is done leaves nothing behind (`discard`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Sequence

from semiseg_cli.errors import UserError
from semiseg_cli.io import clean_stale_temps, remove_entries, write_text

if TYPE_CHECKING:  # torch loads lazily: `semiseg --help` should not import it
    from torch import nn

META_FORMAT = "semiseg-pseudo-labels"
META_VERSION = 1
IGNORE = 255  # label value of unreliable pixels (and of pixels without ground truth in masks)
U16 = 65535  # confidence and entropy PNGs store value x U16 as 16-bit grey
UNRELIABLE_COLOUR = (255, 255, 255)
# Everything this command writes into its folder; `--overwrite` removes these and nothing else.
OWNED = (
    "labels", "train_labels", "confidence", "entropy", "overlays", "records",
    "manifest.jsonl", "split.txt", "summary.json", "meta.json",
)


class PseudoLabelCheckFailed(UserError):
    """The folder holds outputs this run must not mix with (another checkpoint or settings)."""


# ----------------------------------------------------------------------------- names


def output_stem(image_rel: str) -> str:
    """The mirrored name of an image: its root-relative path without the extension."""
    p = PurePosixPath(image_rel.replace("\\", "/").lstrip("/"))
    if ".." in p.parts:
        raise UserError(f"image path {image_rel!r} leaves the dataset root; pseudo-labels mirror root-relative paths, so list images under the root")
    return str(p.with_suffix(""))


def unique_stems(images: Sequence[str]) -> list[str]:
    """The stem of every image, refusing two images that would write the same files."""
    stems: dict[str, str] = {}
    out = []
    for img in images:
        s = output_stem(img)
        if s in stems:
            raise UserError(f"{stems[s]} and {img} would write the same pseudo-label {s}.png; rename one of them or pseudo-label them separately")
        stems[s] = img
        out.append(s)
    return out


def output_paths(stem: str, fmt: str, overlays: bool, train_labels: bool) -> dict[str, str]:
    """The files of one image, relative to the folder, under the keys its record lists them."""
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


def record_path(out: Path, stem: str) -> Path:
    return out / "records" / f"{stem}.json"


# ----------------------------------------------------------------------------- resume


def _read_record(out: Path, stem: str) -> dict[str, Any] | None:
    p = record_path(out, stem)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a record is written atomically, so this is a foreign or damaged file: redo


def is_done(out: Path, stem: str, wanted: dict[str, str]) -> dict[str, Any] | None:
    """The record of a finished image: one that lists exactly the `wanted` files, all present."""
    rec = _read_record(out, stem)
    if rec is None:
        return None
    files = rec.get("files", {})
    for key, rel in wanted.items():
        if files.get(key) != rel or not (out / rel).is_file():
            return None
    return rec


# ----------------------------------------------------------------------------- identity


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
            remove_entries(out, OWNED)
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


def file_formats(fmt: str, num_classes: int, train_labels: bool) -> dict[str, Any]:
    """The `files` and `scales` entries of meta.json: how to decode every file, so a reader
    never has to guess the scale of a PNG."""
    u16 = fmt == "png"
    return {
        "files": {
            "labels": "labels/NAME.png: palette PNG, value = class id, 255 = unreliable",
            "confidence": (f"confidence/NAME.png: 16-bit grey, max softmax probability = value / {U16}" if u16
                           else "confidence/NAME.npz: key 'confidence', float16 max softmax probability"),
            "entropy": (f"entropy/NAME.png: 16-bit grey, entropy in nats = value / {U16} * ln(C)" if u16
                        else "entropy/NAME.npz: key 'entropy', float16 entropy / ln(C)"),
            "train_labels": ("train_labels/NAME.png: the labels in the dataset's stored encoding, for split.txt"
                             if train_labels else None),
            "split": "split.txt: `image label` per line, both relative to the dataset root (label via ../ if needed)",
        },
        "scales": {
            "confidence": {"scale": U16 if u16 else 1.0, "decode": "value / scale"},
            "entropy": {"scale": U16 if u16 else 1.0, "normaliser": "ln(C)", "num_classes": num_classes,
                        "decode": "value / scale * ln(C) nats"},
        },
    }


# ----------------------------------------------------------------------------- end of a run


def _format_split(lines: Sequence[tuple[str, str]]) -> str | None:
    if any(any(ch.isspace() for ch in a + b) for a, b in lines):
        return None
    return "".join(f"{a} {b}\n" for a, b in lines)


def finish(out: Path, pairs: Sequence[tuple[str, str | None]], stems: Sequence[str], wanted: Sequence[dict[str, str]],
           root: Path, train_labels: bool, known: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rebuild manifest.jsonl and split.txt from the records of the split's finished images, in
    split order (whatever order the writers finished them in).

    `known`: records by split index already known to be done (checked at the start of the run, or
    acknowledged by a writer in it), which are not read back; every other image is checked on
    disk (`is_done`). Runs after every run, failed or interrupted ones included, so both always
    match the files.
    """
    known = known or {}
    records = []
    lines: list[tuple[str, str]] = []
    root_abs = Path(os.path.abspath(root))
    for i, ((img, _), st, w) in enumerate(zip(pairs, stems, wanted)):
        rec = known[i] if i in known else is_done(out, st, w)
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


def discard(out: Path, created: bool) -> None:
    """Remove what this command wrote into `out` (the folder too when it created it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    remove_entries(out, OWNED)
