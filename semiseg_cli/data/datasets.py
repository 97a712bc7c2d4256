"""The torch side of the data: image-level tags and the Dataset over a layout's pairs.

Layouts (where files are, how masks map to classes) live in `layouts.py`; this module reads
their pairs into tensors through the paired transforms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from semiseg_cli.data.layouts import IGNORE, Layout, Pair, layout_for
from semiseg_cli.data.reading import _present_values
from semiseg_cli.errors import UserError

def derive_tags(layout: Layout, pairs: Sequence[Pair], exclude: tuple[int, ...] = ()) -> dict[str, list[int]]:
    """Class ids present per image (ignore and `exclude` left out); images without a mask get none."""
    out: dict[str, list[int]] = {}
    for img, mask in pairs:
        if mask is None:
            continue
        ids = _present_values(layout.read_mask(mask))
        out[img] = [int(c) for c in ids if c != IGNORE and c not in exclude]
    return out


_REGENERATE_TAGS = "regenerate it with `semiseg prepare-splits --tags`"


def load_tags(
    path: str | Path, num_classes: int | None = None, images: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """A tags file written by `prepare-splits --tags`: {image_rel: [class ids]}.

    Keys are image paths relative to the dataset root, as in labeled.txt (a leading `/` is
    dropped, as split files allow). With `num_classes`, every id must lie in 0..num_classes-1;
    with `images`, every one of them must have an entry (weak supervision trains from the tags
    alone, so no image may fall back to its mask). Every problem is a one-line `UserError`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(
            f"cannot read tags file {path}: {e.strerror or e}; {_REGENERATE_TAGS} or unset data.tags_file to derive tags from the masks"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"tags file {path} is not UTF-8 text; {_REGENERATE_TAGS}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"tags file {path} is not valid JSON: {e}") from None
    example = 'e.g. {"JPEGImages/a.jpg": [0, 15]}'
    if not isinstance(data, dict):
        raise UserError(f"tags file {path} must hold one JSON object mapping image paths to lists of class ids ({example}), not a {type(data).__name__}")
    tags: dict[str, list[int]] = {}
    for img, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
            raise UserError(f"tags file {path}: the entry for {img!r} must be a list of integer class ids ({example}), got {json.dumps(ids)[:60]}")
        if num_classes is not None:
            bad = [c for c in ids if not 0 <= c < num_classes]
            if bad:
                raise UserError(
                    f"tags file {path}: {img!r} has class id {bad[0]} outside 0..{num_classes - 1} "
                    f"(the dataset has {num_classes} classes); {_REGENERATE_TAGS}"
                )
        tags[img.lstrip("/")] = list(ids)
    if images is not None:
        missing = [img for img in images if img not in tags]
        if missing:
            first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise UserError(
                f"tags file {path} has no entry for {len(missing)} of {len(images)} training images ({first}); "
                f"{_REGENERATE_TAGS} for this training pool or add them (keys are image paths relative to data.root, as in labeled.txt)"
            )
    return tags


def _rescale(image: Image.Image, mask: np.ndarray, factor: float) -> tuple[Image.Image, np.ndarray]:
    w, h = image.size
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = image.resize(size, Image.BILINEAR)
    mask = np.array(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


class SegDataset(Dataset):
    """(image, mask) pairs of one layout, read, optionally resized, then transformed.

    Each item is a dict: `image` (3xHxW float), `mask` (HxW long, all ignore for an image
    without a mask), `has_mask`, `tags` (multi-hot over the classes), `name` and `index`.
    `tags` ({image: [class ids]}) may be replaced after construction; every image must then be
    in it (a UserError otherwise). Without `tags`, an image's tags are the classes present in its
    mask, or none without a mask.
    """

    def __init__(
        self,
        layout: Layout,
        pairs: list[tuple[str, str | None]],
        transform: Callable[[Image.Image, np.ndarray | None], tuple[torch.Tensor, torch.Tensor | None]],
        tags: dict[str, list[int]] | None = None,
        resize: float = 1.0,
        tag_exclude: tuple[int, ...] | None = None,
    ) -> None:
        self.layout = layout
        self.pairs = list(pairs)
        self.transform = transform
        self.tags = tags
        self.resize = resize
        self.tag_exclude = layout.tag_exclude if tag_exclude is None else tag_exclude

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img_rel, mask_rel = self.pairs[i]
        image = self.layout.read_image(img_rel)
        has_mask = mask_rel is not None
        if has_mask:
            mask = self.layout.read_mask(mask_rel)
            if mask.shape != (image.size[1], image.size[0]):
                raise UserError(f"mask {self.layout.root / mask_rel} is not the size of image {img_rel}")
        else:
            mask = np.full((image.size[1], image.size[0]), IGNORE, np.uint8)
        tags = self._tags(img_rel, mask if has_mask else None)
        if self.resize != 1.0:
            image, mask = _rescale(image, mask, self.resize)
        x, y, *valid = self.transform(image, mask)  # training crops also say where the image is
        item = {"image": x, "mask": y, "has_mask": has_mask, "tags": tags, "name": img_rel, "index": i}
        if valid:
            item["valid"] = valid[0]
        return item

    def _tags(self, img_rel: str, mask: np.ndarray | None) -> torch.Tensor:
        out = torch.zeros(self.layout.num_classes)
        if self.tags is not None:  # given tags are the whole supervision: never fall back to the mask
            if img_rel not in self.tags:
                raise UserError(f"no tags for {img_rel}: the tags file must list every training image; {_REGENERATE_TAGS} or add it")
            ids = list(self.tags[img_rel])
        elif mask is not None:
            ids = [int(c) for c in _present_values(mask) if c != IGNORE and c not in self.tag_exclude]
        else:
            ids = []
        if ids:
            if max(ids) >= len(out) or min(ids) < 0:
                raise UserError(f"tags of {img_rel} hold class ids {ids} outside 0..{len(out) - 1}")
            out[ids] = 1.0
        return out


def build_dataset(data_cfg: Any, pairs: list[tuple[str, str | None]], train: bool) -> SegDataset:
    """The dataset for `pairs` with the training (random crops) or evaluation transform.

    Tags are not loaded here: the tags file covers the training pool only, so the caller sets
    `dataset.tags` where it applies.
    """
    from semiseg_cli.data.transforms import EvalTransform, TrainTransform

    if data_cfg.ignore_index != IGNORE:
        raise UserError(f"data.ignore_index = {data_cfg.ignore_index} is not supported: masks mark ignored pixels with {IGNORE}")
    layout = layout_for(data_cfg)
    if train:
        transform: Any = TrainTransform(
            data_cfg.crop_size, data_cfg.scale_range, data_cfg.flip, data_cfg.mean, data_cfg.std, data_cfg.ignore_index
        )
    else:
        transform = EvalTransform(data_cfg.mean, data_cfg.std)
    return SegDataset(layout, pairs, transform, resize=data_cfg.resize)
