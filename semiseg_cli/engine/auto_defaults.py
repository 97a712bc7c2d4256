"""`data.auto`: the settings a generic preset leaves to the data, filled in before a run starts.

The generic preset (`presets/generic_mbv2-os16_auto.toml`, what `semiseg train --dataset X`
uses when no preset is named) works on any layout; what a CamVid or VOC preset fixes by hand is
derived here from the training pool's image headers (no decoding), and written into the resolved
config, so `config.toml`, `--dry-run` and the printed lines show concrete values and the run
folder's config reproduces the run as a preset:

- `data.resize`: 1, unless the median image's longer side exceeds 1024 pixels; then the factor
  that brings it to 1024 (photos from phones and drones are 3000-6000 pixels wide; nothing is
  learned at that scale that is not learned at 1024, and a step would cost 10-30 times more).
- `data.crop_size`: a square of the median (resized) shorter side, rounded down to a multiple of
  16 (the backbone's stride), between 64 and 512 (512: the size the papers train at).
- `eval.batch_size`: the largest power of two (at most 16) whose batch of median images holds
  about 2 megapixels: 8 for CamVid's 480x360, 1 for Cityscapes' 2048x1024.
- `model.pretrained` (MobileNetV2, the generic preset's backbone): the project's ImageNet
  MobileNetV2 features (`$SEMISEG_SHARED/weights/mobilenet_v2_imagenet_features.pth`) when the
  file exists, else torchvision's ImageNet weights when they are in the torch hub cache already,
  else random initialisation with a warning that says how to give weights (nothing downloads).

A field the preset, a `--set` or a command-line option gives explicitly is never changed. The
class count needs no default: it is always the dataset's. At most 2000 images (evenly spaced) of
the pool are measured.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from semiseg_cli.errors import warn

MAX_LONG_SIDE = 1024
CROP_RANGE = (64, 512)
EVAL_PIXELS = 2**21
MAX_EVAL_BATCH = 16
SAMPLE = 2000
SHARED_MBV2 = "weights/mobilenet_v2_imagenet_features.pth"
AUTO_FIELDS = ("data.resize", "data.crop_size", "eval.batch_size", "model.pretrained")


def explicit_keys(preset: str | None, overrides: Iterable[str], values: Iterable[str]) -> set[str]:
    """Dotted keys the user set: in the preset file (with its base chain), a `--set`, an option."""
    from semiseg_cli.config import load_preset, resolve_preset

    keys = {o.split("=", 1)[0].strip() for o in overrides}
    keys |= set(values)
    if preset:
        def walk(raw: dict[str, Any], prefix: str) -> None:
            for k, v in raw.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    keys.add(f"{prefix}{k}")

        walk(load_preset(resolve_preset(preset)), "")
    return keys


def _median_size(cfg: Any) -> tuple[int, int, int]:
    """(median width, median height, images measured) of the training pool."""
    from semiseg_cli.data import layout_for
    from semiseg_cli.data.splits import read_split_file
    from semiseg_cli.engine.loaders import image_sizes

    d = cfg.data
    layout = layout_for(d)
    if d.labeled_list:
        pairs = read_split_file(d.labeled_list, layout.root)
        if d.unlabeled_list:
            pairs += read_split_file(d.unlabeled_list, layout.root)
    else:
        pairs = layout.list_pairs(d.train_split)
    images = [p[0] for p in pairs]
    if len(images) > SAMPLE:
        step = len(images) / SAMPLE
        images = [images[int(i * step)] for i in range(SAMPLE)]
    sizes = image_sizes(layout, images)
    return int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes)), len(sizes)


def _imagenet_mobilenet() -> tuple[str | None, str]:
    """(model.pretrained, where it came from) for the generic MobileNetV2; nothing downloads."""
    from semiseg_cli.config import shared_dir

    shared = shared_dir() / SHARED_MBV2
    if shared.is_file():
        return str(shared), "the shared ImageNet features"
    try:
        import torch
        import torchvision.models as tvm

        url = tvm.MobileNet_V2_Weights.IMAGENET1K_V1.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if cached.is_file():
            return "imagenet", f"torchvision's ImageNet weights (cached in {cached.parent})"
    except Exception:  # an old torchvision without the enum: no cached weights to find
        pass
    return None, "none found"


def fill_from_data(cfg: Any, explicit: set[str]) -> list[str]:
    """Fill the `AUTO_FIELDS` the user left open from the data when `cfg.data.auto`; returns one
    line per field (what was chosen and why). Clears `data.auto`, so the stored config is plain."""
    if not cfg.data.auto:
        return []
    notes: list[str] = []
    w, h, n = _median_size(cfg)
    median = f"median image {w}x{h} over {n} images"
    resize = cfg.data.resize
    if "data.resize" not in explicit:
        long_side = max(w, h)
        resize = 1.0 if long_side <= MAX_LONG_SIDE else round(MAX_LONG_SIDE / long_side, 4)
        cfg.data.resize = resize
        notes.append(f"data.resize = {resize:g} ({median}; longer side at most {MAX_LONG_SIDE})")
    rw, rh = w * resize, h * resize
    if "data.crop_size" not in explicit:
        side = int(min(rw, rh)) // 16 * 16
        side = max(CROP_RANGE[0], min(CROP_RANGE[1], side))
        cfg.data.crop_size = (side, side)
        notes.append(f"data.crop_size = [{side}, {side}] (the resized shorter side {int(min(rw, rh))}, a multiple of 16 in {CROP_RANGE[0]}..{CROP_RANGE[1]})")
    if "eval.batch_size" not in explicit:
        fit = EVAL_PIXELS / max(1.0, rw * rh)
        batch = max(1, min(MAX_EVAL_BATCH, 2 ** int(math.floor(math.log2(fit))) if fit >= 1 else 1))
        cfg.eval.batch_size = batch
        notes.append(f"eval.batch_size = {batch} (about {EVAL_PIXELS / 2**20:g} megapixels of {int(rw)}x{int(rh)} images)")
    if "model.pretrained" not in explicit and cfg.model.arch == "deeplabv3plus" and cfg.model.backbone == "mobilenet_v2":
        pretrained, source = _imagenet_mobilenet()
        cfg.model.pretrained = pretrained
        if pretrained is None:
            warn("no ImageNet MobileNetV2 weights found (neither the shared features file nor torchvision's cache), so "
                 "the backbone starts from random weights and needs far more labels and iterations; give "
                 "model.pretrained=PATH (a local state dict) or model.pretrained=\"imagenet\" (torchvision downloads it)")
        notes.append(f"model.pretrained = {pretrained!r} ({source})")
    cfg.data.auto = False
    return notes
