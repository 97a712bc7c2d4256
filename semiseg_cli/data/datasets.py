"""The torch side of the data: image-level tags and the Dataset over a layout's pairs.

Layouts (where files are, how masks map to classes) live in `layouts.py`; this module reads
their pairs into tensors through the paired transforms.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from semiseg_cli.data.decoded import Decoded, DecodedCache, admit
from semiseg_cli.data.layouts import IGNORE, Layout, Pair, layout_for
from semiseg_cli.data.reading import JPEG_SUFFIXES, _present_values, _thread_map, read_rgb_scaled, scaled_size
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


class SegDataset(Dataset):
    """(image, mask) pairs of one layout, read, optionally resized, then transformed.

    Each item is a dict: `image` (3xHxW float), `mask` (HxW long, all ignore for an image
    without a mask), `has_mask`, `tags` (multi-hot over the classes), `name` and `index`.
    `tags` ({image: [class ids]}) may be replaced after construction; every image must then be
    in it (a UserError otherwise). Without `tags`, an image's tags are the classes present in its
    mask, or none without a mask.

    Reading is split in two: `decode(i)`, the deterministic part (decode, label mapping, the
    `resize`), which `cache` ("auto", True or False: `data.cache_decoded`, see `decoded.py`) may
    keep in memory, and the transform, which runs on every read. `jpeg_draft` decodes JPEGs at
    reduced size when `resize` < 1 (`reading.read_rgb_scaled`).
    """

    def __init__(
        self,
        layout: Layout,
        pairs: list[tuple[str, str | None]],
        transform: Callable[[Image.Image, np.ndarray | None], tuple[torch.Tensor, torch.Tensor | None]],
        tags: dict[str, list[int]] | None = None,
        resize: float = 1.0,
        tag_exclude: tuple[int, ...] | None = None,
        *,
        cache: bool | str = False,
        cache_ram_fraction: float = 0.25,
        jpeg_draft: bool = False,
    ) -> None:
        self.layout = layout
        self.pairs = list(pairs)
        self.transform = transform
        self.tags = tags
        self.resize = resize
        self.tag_exclude = layout.tag_exclude if tag_exclude is None else tag_exclude
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False (got {cache!r})")
        self.cache_mode = cache
        self.cache_ram_fraction = cache_ram_fraction
        self.jpeg_draft = jpeg_draft
        self._cache: DecodedCache | None = None
        self._cache_decided = False
        self._cache_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict[str, Any]:  # spawn workers get the dataset pickled; locks do not pickle
        state = dict(self.__dict__)
        state.pop("_cache_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    # ----------------------------------------------------------------------------- reading

    def uses_draft(self, img_rel: str) -> bool:
        """Whether image `img_rel` is decoded through the JPEG draft: only when asked, only when
        `resize` shrinks the image anyway, only for JPEG files."""
        return self.jpeg_draft and self.resize < 1.0 and Path(img_rel).suffix.lower() in JPEG_SUFFIXES

    def decode(self, i: int) -> Decoded:
        """Item i's deterministic part: the RGB image and mapped mask at `resize`, and the class
        ids present in the stored mask (before the resize)."""
        img_rel, mask_rel = self.pairs[i]
        if self.uses_draft(img_rel):
            image, size, _ = read_rgb_scaled(self.layout.root / img_rel, self.resize)
        else:
            image = self.layout.read_image(img_rel)
            size = image.size
            if self.resize != 1.0:
                image = image.resize(scaled_size(size, self.resize), Image.BILINEAR)
        mask: np.ndarray | None = None
        present: tuple[int, ...] | None = None
        if mask_rel is not None:
            mask = self.layout.read_mask(mask_rel)
            if mask.shape != (size[1], size[0]):
                raise UserError(f"mask {self.layout.root / mask_rel} is not the size of image {img_rel}")
            present = tuple(int(c) for c in _present_values(mask) if c != IGNORE)
            if self.resize != 1.0:
                mask = np.array(Image.fromarray(mask).resize(image.size, Image.NEAREST))
        return Decoded(np.asarray(image), mask, present)

    def decoded_cache(self) -> DecodedCache | None:
        """This dataset's cache, decided on first use in the process that builds the loaders (a
        DataLoader worker never starts one of its own); None when `cache` is off or `auto` finds
        it too large."""
        if self._cache_decided or self.cache_mode is False:
            return self._cache
        if get_worker_info() is not None:
            return None
        with self._cache_lock:
            if not self._cache_decided:
                with_mask = [m is not None for _, m in self.pairs]
                sizes = self._stored_sizes()
                if self.resize != 1.0:
                    sizes = [scaled_size(s, self.resize) for s in sizes]
                need = DecodedCache.bytes_for(sizes, with_mask)
                if admit(self.cache_mode, need, self.cache_ram_fraction, f"{len(self)} images of {self.layout.root}"):
                    self._cache = DecodedCache(sizes, with_mask)
                self._cache_decided = True
        return self._cache

    def _stored_sizes(self) -> list[tuple[int, int]]:
        def size(rel: str) -> tuple[int, int]:
            path = self.layout.root / rel
            try:
                with Image.open(path) as im:
                    return im.size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise UserError(f"cannot read image {path}: {str(e) or type(e).__name__}") from None

        return _thread_map(size, [img for img, _ in self.pairs])

    def fill_cache(self) -> int:
        """Decode every item not cached yet into the cache (before DataLoader workers start, so
        that they share it); returns how many were added, 0 without a cache."""
        cache = self.decoded_cache()
        return 0 if cache is None else cache.fill(self.decode)

    def _decoded(self, i: int) -> Decoded:
        cache = self.decoded_cache() if self.cache_mode is not False else None
        if cache is not None:
            hit = cache.get(i)
            if hit is not None:
                return hit
        item = self.decode(i)
        if cache is not None:
            cache.put(i, item)  # stored in the owning process only
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        img_rel, mask_rel = self.pairs[i]
        arr, mask, present = self._decoded(i)
        has_mask = mask_rel is not None
        if mask is None:
            mask = np.full(arr.shape[:2], IGNORE, np.uint8)
        tags = self._tags(img_rel, present)
        x, y, *valid = self.transform(Image.fromarray(arr), mask)  # training crops also say where the image is
        item = {"image": x, "mask": y, "has_mask": has_mask, "tags": tags, "name": img_rel, "index": i}
        if valid:
            item["valid"] = valid[0]
        return item

    def _tags(self, img_rel: str, present: Sequence[int] | None) -> torch.Tensor:
        out = torch.zeros(self.layout.num_classes)
        if self.tags is not None:  # given tags are the whole supervision: never fall back to the mask
            if img_rel not in self.tags:
                raise UserError(f"no tags for {img_rel}: the tags file must list every training image; {_REGENERATE_TAGS} or add it")
            ids = list(self.tags[img_rel])
        elif present is not None:
            ids = [c for c in present if c not in self.tag_exclude]
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
    cache = getattr(data_cfg, "cache_decoded", False) if train else False  # evaluation reads each image once a pass
    return SegDataset(
        layout, pairs, transform, resize=data_cfg.resize, cache=cache,
        cache_ram_fraction=getattr(data_cfg, "cache_ram_fraction", 0.25), jpeg_draft=getattr(data_cfg, "jpeg_draft", False),
    )
