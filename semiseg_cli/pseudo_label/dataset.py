"""The images of a dump: a split's unique (image, mask) pairs, read for the network.

What can go wrong, and what this module does about it:
- An undecodable image or a mask of another size than its image: the item becomes
  `{"error": message}` instead of raising, because an exception raised in a DataLoader worker
  reaches the main process wrapped in a multi-line traceback and the CLI must print one line;
  the runner stops at the first such batch.
- Padding images of different sizes into one batch changes the prediction everywhere (ASPP's
  global pooling sees the padding), so `collate` stacks same-size batches only; the batches
  come from `semiseg_cli.engine.loaders.size_batches`, over sizes read from the headers.
- `data.resize` (CamVid at half resolution): the network sees the resized image, but masks and
  overlay pixels stay at the stored size, which is the size of every file written.
- An image listed twice in a split file would be labelled twice and listed twice in the
  manifest: `resolve_pairs` keeps its first occurrence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from semiseg_cli.errors import UserError
from semiseg_cli.pseudo_label.folder import IGNORE

if TYPE_CHECKING:
    from semiseg_cli.data.layouts import Layout


def resolve_pairs(split: str, layout: "Layout") -> list[tuple[str, str | None]]:
    """A split file (any existing path or *.txt) or a split name of the dataset; deduplicated."""
    from semiseg_cli.engine.inputs import split_pairs

    return unique_pairs(split_pairs(split, layout))


def unique_pairs(pairs: Sequence[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """`pairs` without repeated images (the first occurrence of each stays)."""
    seen: set[str] = set()
    out = []
    for img, mask in pairs:
        if img not in seen:
            seen.add(img)
            out.append((img, mask))
    return out


class PseudoLabelDataset:
    """Images (resized by data.resize for the network) with their original size and mask.

    Errors (an undecodable image, a bad mask) are returned as `{"error": message}` instead of
    raised: an exception raised in a DataLoader worker reaches the main process wrapped in a
    multi-line traceback, and the CLI must print one line.
    """

    def __init__(self, layout: "Layout", pairs: Sequence[tuple[str, str | None]], mean: Sequence[float],
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
